"""`bpkit rules` / scripts/rule_coverage.py and the coverage helpers in bpkit/check/coverage.py."""
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from bpkit.check import coverage


def test_supported_primitives_kinds():
    kinds = coverage.supported_primitives()
    assert kinds["sin"] == "vjp"
    assert kinds["scan"] == "fwd_bwd"
    assert kinds["floor"] == "nondiff"
    assert kinds["while"] == "fwd_bwd"
    assert kinds["reduce_window"] == "refused"


def test_primitives_used_looks_inside_sub_jaxprs():
    def f(x):
        y = jax.jit(jnp.sin)(x)
        c, _ = lax.scan(lambda c, v: (c * jnp.exp(v), None), 1.0, y)
        return lax.cond(c > 0, jnp.tanh, jnp.cos, c)
    used = coverage.primitives_used(f, jnp.ones(3))
    assert {"sin", "exp", "tanh", "cos", "scan", "cond"} <= used


def _product_pool(x):
    return lax.reduce_window(x, jnp.ones((), x.dtype), lax.mul, (2,), (1,), "VALID")  # line reported


def test_unsupported_in_names_primitive_and_user_line():
    found = coverage.unsupported_in(_product_pool, jnp.ones(4, jnp.float32))
    assert len(found) == 1
    name, where = found[0]
    assert name == "reduce_window"
    assert f"test_coverage_cli.py:{_product_pool.__code__.co_firstlineno + 1}" in where


def test_unsupported_in_looks_inside_while_bodies_but_not_conditions():
    def f(x):
        return lax.while_loop(lambda c: jnp.sum(_product_pool(c)) < 10.0,  # cond: not checked
                              lambda c: c * 2.0, x)
    assert coverage.unsupported_in(f, jnp.ones(4, jnp.float32)) == []
    g = lambda x: lax.while_loop(lambda c: jnp.sum(c) < 10.0,  # noqa: E731
                                 lambda c: _product_pool(jnp.pad(c, (0, 1))) + 1.0, x)
    assert [name for name, _ in coverage.unsupported_in(g, jnp.ones(4, jnp.float32))] == [
        "reduce_window"]


def test_unsupported_in_ignores_the_non_differentiated_path():
    def f(x, n):
        k = lax.while_loop(lambda c: c < n, lambda c: c + 1, 0)  # integers only
        key_bits = jax.random.bits(jax.random.key(0), (3,))  # random bits, bitcasts
        return jnp.sum(x * k.astype(x.dtype)) + jnp.sum(key_bits.astype(x.dtype)) * 0
    assert coverage.unsupported_in(f, jnp.ones(3), 4) == []
    assert coverage.unsupported_in(_product_pool, jnp.ones(4, jnp.float32), argnums=()) == []


def test_parse_arg_spec():
    a, b, c = coverage.parse_arg_spec("f32[8,3], i32[8], f64[]")
    assert (a.shape, a.dtype) == ((8, 3), jnp.float32)
    assert (b.shape, b.dtype) == ((8,), jnp.int32)
    assert c.shape == ()
    with pytest.raises(ValueError):
        coverage.parse_arg_spec("q7[3]")


def test_rules_command_without_target_prints_the_table(capsys):
    assert coverage.rules_command([]) == 0
    out = capsys.readouterr().out
    for family in ("elementwise", "structural", "reductions", "linalg", "control", "nondiff",
                   "refusals"):
        assert f"{family} (" in out
    assert "dot_general" in out and "refusals (" in out
    assert "loops (1):" in out and "while[fwd_bwd]" in out


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent("""
        import jax.numpy as jnp
        from jax import lax

        def fine():
            x = jnp.ones(3)
            return jnp.sum(jnp.tanh(x) ** 2)

        def loss(w, x):
            return jnp.sum(lax.reduce_window(x * w, jnp.ones((), x.dtype), lax.mul, (2,), (1,), "VALID"))

        def example_args():
            return (jnp.ones(3), jnp.ones(3))
    """))
    return path


def test_rules_command_on_a_file(user_file, capsys):
    assert coverage.rules_command([f"{user_file}:fine"]) == 0
    assert "every primitive on the differentiated path has a rule" in capsys.readouterr().out
    assert coverage.rules_command([f"{user_file}:loss"]) == 1  # example_args(): a product pool
    out = capsys.readouterr().out
    assert "reduce_window" in out and "model.py:10" in out
    assert coverage.rules_command([f"{user_file}:loss", "--args", "f32[4], f32[4]"]) == 1


def test_rules_command_bad_targets(user_file, tmp_path, capsys):
    assert coverage.rules_command([f"{tmp_path}/missing.py:f"]) == 2
    assert coverage.rules_command([f"{user_file}:no_such_function"]) == 2
    assert coverage.rules_command([str(user_file)]) == 2
    err = capsys.readouterr().err
    assert "cannot check" in err
