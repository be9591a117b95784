"""Differential fuzzing by hand: `python scripts/fuzz.py --n 2000 --seed 0`.

Prints how many random programs were checked and every mismatch with its program (as a jaxpr);
exits 1 if any program disagrees with jax.grad. The logic lives in bpkit/check/fuzz.py.
"""
import argparse
import sys

from bpkit.check.fuzz import fuzz


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of random programs")
    parser.add_argument("--seed", type=int, default=0, help="program i uses rng([seed, i])")
    parser.add_argument("--max-steps", type=int, default=8, help="operations per program")
    parser.add_argument("--jit", choices=["alternate", "eager", "jit"], default="alternate")
    args = parser.parse_args(argv)
    jit = {"alternate": None, "eager": False, "jit": True}[args.jit]

    def progress(i, r):
        if not r.ok:
            print(f"program {i}: MISMATCH", flush=True)
        elif (i + 1) % 100 == 0:
            print(f"{i + 1} programs checked", flush=True)

    report = fuzz(args.n, args.seed, jit=jit, progress=progress, max_steps=args.max_steps)
    print(report)
    ok = sum(r.ok for r in report.results)
    print(f"checked {len(report.results)} programs: {ok} agree with jax.grad, "
          f"{len(report.mismatches)} mismatch")
    return 1 if report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
