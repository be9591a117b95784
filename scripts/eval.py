"""Thin equivalent of `bpkit eval ...` (see bpkit/cli.py)."""
import sys

from bpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
