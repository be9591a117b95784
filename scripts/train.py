"""Thin equivalent of `bpkit train ...` (see bpkit/cli.py)."""
import sys

from bpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
