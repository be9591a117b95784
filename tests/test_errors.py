"""UnsupportedPrimitiveError: it names the user's line even when the primitive is emitted inside
JAX's jitted functions, its register_vjp snippet works for primitives jax.extend does not
export, and it never asks for a VJP of a primitive whose outputs are all integer or boolean."""
import functools
import importlib.util
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

import bpkit
from bpkit.engine import registry

# A primitive that no module of JAX exports and bpkit has no rule for (a stand-in for a
# library's internal primitive, such as Equinox's).
_frob_p = Primitive("frob")
_frob_p.def_impl(lambda x: x * 2)
_frob_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_frob_p, mlir.lower_fun(lambda x: x * 2, multiple_results=False))
_flag_p = Primitive("frob_flag")  # boolean output
_flag_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, np.bool_))

# jax.jit(Primitive.bind): the equation inside the jit carries JAX's frames only, like the
# primitives inside jnp.linalg / jax.random / jax.scipy functions; nested twice, so is the jit
# that calls it.
_frob_in_jax_jit = jax.jit(jax.jit(_frob_p.bind))


def _raise(fun, *args) -> bpkit.UnsupportedPrimitiveError:
    with pytest.raises(bpkit.UnsupportedPrimitiveError) as info:
        fun(*args)
    return info.value


def _line_of(fragment: str) -> str:
    """``file:line`` of the line of this file that contains ``fragment``."""
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if fragment in line and "_line_of" not in line:
                return f"{__file__}:{i}"
    raise AssertionError(fragment)


def _loss(x):
    y = jnp.sin(x)
    return jnp.sum(_frob_in_jax_jit(y))  # the user's line


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit, jax.checkpoint],
                         ids=["eager", "jit", "checkpoint"])
def test_names_the_users_line_when_emitted_inside_jax_jits(wrap):
    err = _raise(bpkit.grad(wrap(_loss)), jnp.ones(3))
    assert err.primitive is _frob_p
    assert err.location.startswith(_line_of("# the user's line"))
    assert f"produced at {err.location}" in str(err)


def test_names_the_users_line_inside_scan():
    def loss(x):
        c, _ = jax.lax.scan(lambda c, _: (_frob_in_jax_jit(c), None), x, None, length=2)
        return jnp.sum(c)  # scan line below

    err = _raise(bpkit.grad(loss), jnp.ones(3))
    assert "unknown location" not in str(err)
    assert err.location.split(":")[0] == __file__


def test_snippet_imports_a_primitive_jax_extend_does_not_export():
    err = _raise(bpkit.grad(_loss), jnp.ones(3))
    message = str(err)
    assert f"from {__name__} import _frob_p" in message
    snippet = textwrap.dedent(message.split("example:\n\n")[1].split("\n\nor wrap")[0])
    namespace = {"bpkit": bpkit}
    try:
        exec(snippet, namespace)  # the snippet registers a rule on the right object
        assert registry.vjp_rules[_frob_p] is namespace["_frob_vjp"]
    finally:
        registry.vjp_rules.pop(_frob_p, None)


def test_snippet_for_a_primitive_no_module_holds():
    closure_p = Primitive("frob_in_closure")
    closure_p.def_abstract_eval(lambda x: x)
    err = _raise(bpkit.grad(lambda x: jnp.sum(closure_p.bind(x))), jnp.ones(2))
    assert err.primitive is closure_p
    assert "prim = err.primitive" in str(err) and "register_vjp(prim)" in str(err)


def test_public_primitives_are_named_by_their_public_path():
    eqn = jax.make_jaxpr(jnp.sin)(1.0).jaxpr.eqns[0]
    assert "@bpkit.register_vjp(jax.extend.core.primitives.sin_p)" in str(
        registry.unsupported(eqn))


def test_never_asks_for_a_vjp_of_a_boolean_or_integer_primitive():
    eqn = jax.make_jaxpr(_flag_p.bind)(jnp.ones(3)).jaxpr.eqns[0]
    message = str(registry.unsupported(eqn))
    assert "register_vjp" not in message and "cotangent per primal" not in message
    assert f"bpkit.register_nondiff(_flag_p)" in message
    assert f"from {__name__} import _flag_p" in message


def test_refused_primitive_names_the_users_line():
    def loss(x):
        return jax.lax.while_loop(lambda c: c[0] < 3.0, lambda c: c * 2.0, x)[1]  # while line

    err = _raise(bpkit.grad(functools.partial(jax.jit(loss))), jnp.ones(2))
    assert "while_loop" in str(err) and err.location.startswith(_line_of("# while line"))


@pytest.mark.skipif(importlib.util.find_spec("equinox") is None,
                    reason="equinox is not installed (an optional test dependency)")
def test_third_party_primitive_recipe_from_docs():
    """docs/engine.md's recipe, on Equinox's nondifferentiable_backward primitive."""
    import equinox as eqx
    import equinox.internal as eqxi
    from equinox.internal import nondifferentiable_backward_p

    def loss(x, symbolic):
        return jnp.sum(eqxi.nondifferentiable_backward(x, msg="no grads", symbolic=symbolic) * x)

    assert _raise(bpkit.grad(loss), jnp.ones(3), True).primitive is nondifferentiable_backward_p

    @bpkit.register_vjp(nondifferentiable_backward_p)
    def _nondifferentiable_backward_vjp(ct, x, *, out, msg, symbolic):
        if symbolic:
            raise RuntimeError(msg)
        return [eqx.error_if(ct, jnp.any(ct != 0), msg)]

    try:
        for engine in (jax.grad, bpkit.grad):
            with pytest.raises(RuntimeError, match="no grads"):
                engine(loss)(jnp.ones(3), True)
        assert bpkit.grad(lambda x: jnp.sum(eqxi.nondifferentiable_backward(
            x, symbolic=False) * 0.0))(jnp.ones(3)).shape == (3,)  # a zero cotangent passes
    finally:
        registry.vjp_rules.pop(nondifferentiable_backward_p)
