"""``bpkit.debug.nonfinite_origin``: the report names the equation where a NaN/inf is born
(backward and forward), with the user's line, the layer and the operand values, eagerly and
under jax.jit, inside scan, remat, jit and cond; and it is None (with value and gradient
equal to bpkit's and jax's) when everything is finite."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from bpkit.debug import nonfinite_origin


def line_of(fn, text: str) -> int:
    """The line number (in this file) of the first line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def line_no(where: str) -> int:
    return int(where.split(" (")[0].rsplit(":", 1)[1])


def sqrt_norm(x):
    with jax.named_scope("norm"):
        r = jnp.sqrt(jnp.sum(x * x, axis=1))  # sqrt at 0 for a zero row
    return jnp.sum(r)


def log_loss(p):
    return -jnp.sum(jnp.log(p))


def masked_ratio(x, y):
    return jnp.sum(jnp.where(y != 0, x / y, 0.0))  # the division is masked, its VJP is not


def exp_loss(x):
    return jnp.sum(jnp.exp(x))


def linear_loss(w, data):
    return jnp.sum(jnp.tanh(data @ w) ** 2)


def scan_loss(xs):
    def body(c, x):
        return c + jnp.sqrt(x * c), None
    c, _ = lax.scan(body, jnp.ones((), xs.dtype), xs)
    return c


def remat_jit_loss(x):
    inner = jax.jit(lambda u: jnp.sum(jnp.log1p(u)))
    return jax.checkpoint(lambda t: inner(t * 2.0))(x)


def cond_loss(x):
    return lax.cond(jnp.sum(x) > 0, lambda a: jnp.sum(jnp.sqrt(a)), lambda a: jnp.sum(a), x)


F32 = jnp.float32


def test_finite_gives_none_and_the_gradient():
    x = jnp.arange(6.0, dtype=F32).reshape(2, 3) + 1
    value, grad, report = nonfinite_origin(sqrt_norm)(x)
    assert report is None
    v, g = bpkit.value_and_grad(sqrt_norm)(x)
    np.testing.assert_allclose(value, v)
    np.testing.assert_allclose(grad, g)
    np.testing.assert_allclose(grad, jax.grad(sqrt_norm)(x), rtol=1e-6)


def test_sqrt_at_zero():
    x = jnp.array([[1.0, 2.0], [0.0, 0.0]], F32)
    value, grad, report = nonfinite_origin(sqrt_norm)(x)
    b = report.backward
    assert b.entry.primitive == "sqrt"
    assert line_no(b.location) == line_of(sqrt_norm, "jnp.sqrt")
    assert b.layer == "norm"
    assert b.position == (1,) and b.kind == "inf"
    assert b.operand_values[0] == 0
    assert report.forward is None                      # sqrt(0) = 0: the forward is finite
    s = str(report)
    assert "sqrt at x = 0" in s and "layer 'norm'" in s and "1/(2·sqrt(x))" in s
    assert s.startswith("The gradient became inf at `sqrt`")
    assert int(report.grad_nonfinite) == int(np.sum(~np.isfinite(np.asarray(grad))))


def test_log_of_zero_forward_and_backward():
    p = jnp.array([0.5, 0.0, 0.25], F32)
    _, _, report = nonfinite_origin(log_loss)(p)
    line = line_of(log_loss, "jnp.log")
    f, b = report.forward, report.backward
    assert f.entry.primitive == "log" and line_no(f.location) == line and f.kind == "-inf"
    assert b.entry.primitive == "log" and line_no(b.location) == line and b.position == (1,)
    assert "log at x = 0" in str(report)


def angle_loss(y, x):
    return jnp.sum(jnp.arctan2(y, x))  # finite at (0, 0); its VJP divides by x² + y² = 0


def test_division_by_zero_in_the_backward_only():
    y = jnp.array([1.0, 0.0], F32)
    x = jnp.array([1.0, 0.0], F32)
    value, grad, report = nonfinite_origin(angle_loss, argnums=(0, 1))(y, x)
    assert np.isfinite(value) and report.forward is None
    b = report.backward
    assert b.entry.primitive == "atan2" and b.position == (1,) and b.kind == "NaN"
    assert line_no(b.location) == line_of(angle_loss, "arctan2")
    assert "0/0 at x = y = 0" in str(report) and "The forward pass was finite." in str(report)


@pytest.mark.slow
def test_masked_division_names_the_double_where_trick():
    x = jnp.array([1.0, 2.0, 3.0], F32)
    y = jnp.array([2.0, 0.0, 1.0], F32)
    value, grad, report = nonfinite_origin(masked_ratio, argnums=(0, 1))(x, y)
    assert np.isfinite(value)
    assert report.forward.entry.primitive == "div"       # inf, masked by the where
    b = report.backward
    assert b.entry.primitive == "div" and line_no(b.location) == line_of(masked_ratio, "x / y")
    assert b.kind == "NaN" and b.cotangent_in == 0 and b.operand_values[1] == 0
    assert "double where" in str(report)


def test_exp_overflow():
    x = jnp.array([1.0, 100.0], F32)
    _, _, report = nonfinite_origin(exp_loss)(x)
    assert report.forward.entry.primitive == "exp" and report.forward.kind == "inf"
    assert report.backward.entry.primitive == "exp" and report.backward.position == (1,)
    assert "exp at x = 100" in str(report) and "overflow" in str(report)


def test_nan_in_the_data():
    w = jnp.ones((3, 2), F32)
    data = jnp.ones((4, 3), F32).at[2, 1].set(jnp.nan)
    _, grad, report = nonfinite_origin(linear_loss)(w, data)
    f = report.forward
    assert f.entry.primitive == "input" and f.position == (2, 1) and f.kind == "NaN"
    assert "argument 1" in f.location
    assert report.backward.nonfinite_operands                 # carried, not born, there
    assert str(report).startswith("Argument 1 already holds NaN (the first at index [2, 1])")


def test_inside_scan_reports_the_step_and_the_body_line():
    xs = jnp.array([1.0, 2.0, 0.0, 3.0], F32)
    _, _, report = nonfinite_origin(scan_loss)(xs)
    b = report.backward
    assert b.entry.primitive == "sqrt" and line_no(b.location) == line_of(scan_loss, "jnp.sqrt")
    assert b.steps == (2,)
    assert "step 2 of the scan at" in str(report)


def test_inside_remat_and_jit():
    x = jnp.array([0.5, -0.5], F32)
    _, _, report = nonfinite_origin(remat_jit_loss)(x)
    b = report.backward
    assert b.entry.primitive == "log1p" and b.position == (1,)
    assert line_no(b.location) == line_of(remat_jit_loss, "jnp.log1p")
    assert [p for p, _ in b.entry.within][0].startswith("remat")
    assert "inside the jit at" in str(report) and "jax.checkpoint" in str(report)
    assert report.forward.entry.primitive == "log1p"   # seen inside the remat's jit too


@pytest.mark.slow
def test_inside_cond_branch():
    x = jnp.array([1.0, 0.0], F32)
    _, _, report = nonfinite_origin(cond_loss)(x)
    b = report.backward
    assert b.entry.primitive == "sqrt" and line_no(b.location) == line_of(cond_loss, "jnp.sqrt")
    assert "a branch of the cond" in str(report)


@pytest.mark.parametrize("fun,args", [
    (sqrt_norm, (jnp.array([[1.0, 2.0], [0.0, 0.0]], F32),)),
    pytest.param(scan_loss, (jnp.array([1.0, 0.0, 2.0], F32),), marks=pytest.mark.slow)])
def test_under_jit_the_report_leaves_as_arrays(fun, args):
    eager = nonfinite_origin(fun)(*args)[2]
    value, grad, report = jax.jit(nonfinite_origin(fun))(*args)
    assert bool(report)
    assert report.backward.entry.key == eager.backward.entry.key
    assert report.backward.steps == eager.backward.steps
    assert np.isnan(report.backward.operand_values[0])     # no second run under jit
    assert str(report).startswith("The gradient became inf at `sqrt`")
    finite = jax.jit(nonfinite_origin(fun))(*(jnp.abs(a) + 1 for a in args))[2]
    assert not finite and str(finite) == "The value and the gradient are finite."


@pytest.mark.slow
def test_report_to_dict_is_plain():
    import json
    _, _, report = nonfinite_origin(log_loss)(jnp.array([0.0, 1.0], F32))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["backward"]["primitive"] == "log" and d["forward"]["kind"] == "-inf"
    assert d["grad_nonfinite"] == 1 and d["message"] == str(report)


@pytest.mark.slow
def test_the_compiled_program_is_unchanged_without_an_observer():
    x = jnp.ones((2, 3), F32)
    before = jax.jit(bpkit.grad(scan_loss)).lower(x[0]).as_text()
    nonfinite_origin(scan_loss)(x[0])                  # observes, then leaves no trace
    assert jax.jit(bpkit.grad(scan_loss)).lower(x[0]).as_text() == before
