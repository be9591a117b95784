"""Thin equivalent of `bpkit plot ...` (see bpkit/cli.py)."""
import sys

from bpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
