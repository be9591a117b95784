"""Differential fuzzing of bpkit.grad against jax.grad on random programs (bpkit/check/fuzz.py).

A small budget runs in CI; the large one (`pytest -m slow tests/test_fuzz.py`, or
`python scripts/fuzz.py --n 2000 --seed 0`) is run by hand."""
import numpy as np
import pytest

from bpkit.check.fuzz import check_program, fuzz, random_program


def test_programs_are_reproducible():
    a = random_program(np.random.default_rng([3, 7]))
    b = random_program(np.random.default_rng([3, 7]))
    assert a.steps == b.steps and a.jaxpr() == b.jaxpr()


def test_fuzz_small_budget():
    report = fuzz(12, seed=1234, max_steps=6)  # half eager, half jitted
    assert len(report.results) == 12
    assert not report.mismatches, str(report)


@pytest.mark.parametrize("seed,index", [(0, 13), (0, 38)])
def test_regressions(seed, index):
    """Programs that once failed: pow with a size-1-stretched exponent."""
    result = check_program(random_program(np.random.default_rng([seed, index])), jit=index % 2 == 1)
    assert result.ok, result.error or result.max_abs


@pytest.mark.slow
def test_fuzz_large_budget():
    report = fuzz(2000, seed=0)
    assert not report.mismatches, str(report)
