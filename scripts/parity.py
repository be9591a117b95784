"""Thin equivalent of `bpkit parity ...` (see bpkit/cli.py)."""
import sys

from bpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["parity", *sys.argv[1:]]))
