"""bpkit's train step vs jax.grad's, side by side (see bpkit/bench.py); same as `bpkit bench`.

    python scripts/bench.py --json out.json [--models mlp gpt ...]
"""
import sys

from bpkit.bench import main

if __name__ == "__main__":
    sys.exit(main())
