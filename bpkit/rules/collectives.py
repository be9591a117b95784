"""Rules of explicit SPMD: ``shard_map`` (and so ``pmap``) and the collectives its body calls.

Inside a ``shard_map`` body every value is one shard; a collective combines the shards of the
mesh axes it names. Every collective is linear in its input, so its VJP is its transpose, and
each transpose is another collective (``x`` is this shard's input, ``ct`` its output's
cotangent):

=====================  ======================================  ===============================
primitive              forward (per shard)                     cotangent of x
=====================  ======================================  ===============================
psum (unchecked)       sum over shards of x                    psum(ct): JAX reads psum as a
                                                               sum then a broadcast
psum_invariant         sum over shards of x (varying ->        pvary(ct): every shard gets ct
                       invariant, ``check_vma=True``)
pvary                  x, now typed as varying                 psum_invariant(ct)
all_gather             all shards' x, concatenated/stacked     psum_scatter(ct): shard k sums
                                                               block k of every shard's ct
all_gather_invariant   the same, typed invariant               block k of ct on shard k
reduce_scatter         block k of the sum, on shard k          all_gather(ct)
ppermute               shard dst gets x of shard src           ppermute(ct, inverse perm)
all_to_all             block j of ``split_axis`` to shard j,   all_to_all(ct), split and
                       received blocks on ``concat_axis``      concat axes swapped
pbroadcast             every shard gets x of ``source``        psum(ct) on ``source``, else 0
axis_index             this shard's index (an integer)         none (non-differentiable)
pmax, pmin             refused: JAX defines no derivative either (see the message)
=====================  ======================================  ===============================

``pmean`` is ``psum`` followed by a division, so it needs no rule of its own.

**shard_map** (forward-backward rule). The body is differentiated per shard by bpkit's own
engine, and the backward pass is itself a shard_map, as in JAX:

1. The body's forward and backward are traced together once, as a shard_map over the same mesh
   (so collectives and replication types are exactly those of the user's body), then split by
   dependence on the cotangent inputs, like ``scan``'s body (see ``control.py``).
2. The forward shard_map runs the cotangent-free half and also returns the per-shard values the
   backward half reads (residuals), each stacked over the mesh axes it varies over.
3. The backward shard_map runs the other half on the residuals and the output cotangents, with
   in-specs ``(residual specs, out_specs)`` and out-specs ``in_specs``.

With ``check_vma=True`` the replication types make this exact as is: an input replicated over
an axis enters the body through ``pvary``, whose transpose ``psum_invariant`` sums its
cotangent over that axis. With ``check_vma=False`` (and in ``pmap``) nothing is typed, and
JAX's convention is followed exactly: the cotangent of an output replicated over mesh axes
(those its out-spec does not mention) is divided by their total size, and the cotangent of an
input replicated over axes is ``psum``-ed over them.
"""
from __future__ import annotations

import math
import weakref

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from bpkit.engine import compat
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import register_fwd_bwd, register_nondiff, register_refused, \
    register_vjp
from bpkit.rules.control import _active_outputs, _eval_eqns, _split_by_cotangent
from bpkit.rules.helpers import deflinear, instantiate_zeros, zeros_like

_prim = compat.parallel_primitive


# --- psum, psum_invariant, pvary ----------------------------------------------------------------
def _psum_transpose(ct, x, *, axes, axis_index_groups):
    """Unchecked ``psum``: ``ct_x = psum(ct)`` over the named axes (JAX reads psum as a sum
    followed by a broadcast to every shard); positional (integer) axes of ``axes`` are a local
    ``reduce_sum``, whose cotangent broadcasts back."""
    positional = tuple(a for a in axes if isinstance(a, int))
    named = tuple(a for a in axes if not isinstance(a, int))
    if positional:
        kept = tuple(d for d in range(x.ndim) if d not in positional)
        ct = lax.broadcast_in_dim(ct, x.shape, kept)
    return [_prim("psum_p").bind(ct, axes=named, axis_index_groups=axis_index_groups)]


deflinear(_prim("psum_p"), _psum_transpose)


def _psum_invariant_transpose(ct, x, *, axes):
    """Checked ``psum`` (varying -> invariant): every shard's ``x`` feeds the one sum, so each
    gets the sum's cotangent, cast back to varying: ``ct_x = pvary(ct)``."""
    return [compat.pvary_p.bind(ct, axes=axes)]


def _pvary_transpose(ct, x, *, axes):
    """``pvary`` (invariant -> varying) uses one replicated ``x`` on every shard, so its
    cotangent is the sum of the shards' cotangents: ``ct_x = psum_invariant(ct)``."""
    return [_prim("psum_invariant_p").bind(ct, axes=axes)]


if _prim("psum_invariant_p") is not None:  # the check_vma forms (both supported releases)
    deflinear(_prim("psum_invariant_p"), _psum_invariant_transpose)
    deflinear(compat.pvary_p, _pvary_transpose)


# --- gathers and scatters -----------------------------------------------------------------------
@register_vjp(_prim("all_gather_p"))
def _all_gather_vjp(ct, x, *, out, all_gather_dimension, axis_name, axis_index_groups,
                    axis_size, tiled):
    """``out = concat/stack_k x_k`` on every shard; ``ct_x`` on shard k sums block k of every
    shard's ``ct``: ``psum_scatter`` over the same axes and dimension."""
    return [lax.psum_scatter(ct, axis_name, scatter_dimension=all_gather_dimension,
                             axis_index_groups=axis_index_groups, tiled=tiled)]


if _prim("all_gather_invariant_p") is not None:
    @register_vjp(_prim("all_gather_invariant_p"))
    def _all_gather_invariant_vjp(ct, x, *, out, all_gather_dimension, axis_name, axis_size,
                                  tiled):
        """Like ``all_gather`` but the result is typed invariant, so its cotangent is the same
        on every shard: shard k's ``ct_x`` is just block k of it (no sum)."""
        block = ct.shape[all_gather_dimension] // axis_size
        start = lax.axis_index(axis_name) * block
        piece = lax.dynamic_slice_in_dim(ct, start, block, axis=all_gather_dimension)
        return [piece if tiled else lax.squeeze(piece, (all_gather_dimension,))]


@register_vjp(_prim("reduce_scatter_p"))
def _reduce_scatter_vjp(ct, x, *, out, scatter_dimension, axis_name, axis_index_groups,
                        axis_size, tiled):
    """``out_k = block k of sum_j x_j``; every shard's ``x`` feeds every block, so ``ct_x`` is
    the gather of all shards' cotangents: ``all_gather`` along the scattered dimension."""
    return [lax.all_gather(ct, axis_name, axis_index_groups=axis_index_groups,
                           axis=scatter_dimension, tiled=tiled)]


# --- permutations -------------------------------------------------------------------------------
@register_vjp(_prim("ppermute_p"))
def _ppermute_vjp(ct, x, *, out, axis_name, perm):
    """``out`` on shard ``dst`` is ``x`` of shard ``src`` for each ``(src, dst)`` in ``perm``
    (zero on shards nobody sends to); ``ct_x`` goes back along the inverse permutation."""
    return [lax.ppermute(ct, axis_name, perm=[(dst, src) for src, dst in perm])]


@register_vjp(_prim("all_to_all_p"))
def _all_to_all_vjp(ct, x, *, out, axis_name, split_axis, concat_axis, axis_index_groups,
                    tiled):
    """``all_to_all`` splits ``split_axis`` into one block per shard, sends block j to shard j
    and concatenates the received blocks along ``concat_axis``; the inverse permutation of
    blocks is the ``all_to_all`` with the two axes swapped. (The primitive itself keeps the
    rank; ``lax.all_to_all`` adds and removes the unit axis of the untiled form around it.)"""
    return [_prim("all_to_all_p").bind(ct, axis_name=axis_name, split_axis=concat_axis,
                                       concat_axis=split_axis,
                                       axis_index_groups=axis_index_groups, tiled=tiled)]


@register_vjp(_prim("pbroadcast_p"))
def _pbroadcast_vjp(ct, x, *, out, axis_name, source):
    """``out = x_source`` on every shard; only shard ``source``'s ``x`` is used, and it is used
    by every shard: ``ct_x = psum(ct)`` on ``source``, zero elsewhere. (XLA lowers the
    collective broadcast on GPU only.)"""
    total = lax.psum(ct, axis_name)
    return [lax.select(lax.axis_index(axis_name) == source, total, zeros_like(total))]


# --- not differentiable -------------------------------------------------------------------------
register_nondiff(_prim("axis_index_p"))
for _name in ("pmax_p", "pmin_p"):
    register_refused(
        _prim(_name),
        "JAX defines no derivative for the cross-shard maximum/minimum either. When it "
        "stabilises a softmax or logsumexp, apply jax.lax.stop_gradient to its input (the "
        "result does not depend on the shift); otherwise gather the values (jax.lax."
        "all_gather) and take jnp.max over the gathered axis, which bpkit differentiates.")


# --- shard_map ----------------------------------------------------------------------------------
def _mesh_ordered(mesh, axes) -> tuple:
    return tuple(a for a in mesh.axis_names if a in axes)


def _unmentioned(mesh, spec, manual) -> tuple:
    """The manual mesh axes that ``spec`` does not mention: a value with this spec is
    replicated over them."""
    mentioned = {a for part in spec if part is not None
                 for a in (part if isinstance(part, tuple) else (part,))}
    mentioned |= set(getattr(spec, "unreduced", ()))
    return tuple(a for a in mesh.axis_names if a in manual and a not in mentioned)


def _residual_spec(mesh, aval, check_vma: bool, manual):
    """A residual leaves the forward shard_map with one new leading axis of size 1, stacked over
    the axes it varies over (all manual axes when replication is unchecked); the backward
    shard_map splits it back, so each shard gets its own value with its own type."""
    axes = compat.varying_axes(aval) if check_vma else manual
    axes = _mesh_ordered(mesh, axes)
    return P(axes) if axes else P()


class _ShardMapVJP:
    """The forward and backward shard_maps of one ``shard_map`` equation for one activity mask.

    Built once per (body, activity, argument types) and cached, so repeated eager calls reuse
    JAX's compiled programs."""

    def __init__(self, body, consts, primals, active, *, mesh, in_specs, out_specs,
                 check_vma, manual):
        self.mesh, self.check_vma, self.manual = mesh, check_vma, manual
        self.in_specs, self.out_specs = tuple(in_specs), tuple(out_specs)
        n_in, n_out = len(primals), len(body.outvars)
        self.active = [a and compat.is_inexact(compat.typeof(x)) for a, x in zip(active, primals)]
        self.out_active = _active_outputs(body, self.active)
        self.act_in = [i for i in range(n_in) if self.active[i]]
        self.act_out = [j for j in range(n_out) if self.out_active[j]]
        self.out_avals = [v.aval for v in body.outvars]

        def joint(*args):
            xs, cts = args[:n_in], args[n_in:]
            outs, backward, _ = vjp_jaxpr(body, consts, xs, self.active)
            full = [None] * n_out
            for j, ct in zip(self.act_out, cts):
                full[j] = ct
            cts_in = backward(full)
            cts_in = [instantiate_zeros(cts_in[i], xs[i]) for i in self.act_in]
            if not check_vma:  # an input replicated over axes: its cotangent sums over them
                cts_in = [_psum_if(ct, _unmentioned(mesh, compat.cotangent_spec(
                    self.in_specs[i]), manual)) for i, ct in zip(self.act_in, cts_in)]
            return tuple(outs) + tuple(cts_in)

        self.ct_specs = [compat.cotangent_spec(self.out_specs[j]) for j in self.act_out]
        self.in_ct_specs = [compat.cotangent_spec(self.in_specs[i]) for i in self.act_in]
        # The global output types (with their shardings, for meshes with explicit axes).
        global_outs = jax.eval_shape(
            self._shard_map(lambda *xs: tuple(_eval_body(body, consts, xs)),
                            self.in_specs, self.out_specs), *primals)
        joint_sm = self._shard_map(joint, self.in_specs + tuple(self.ct_specs),
                                   self.out_specs + tuple(self.in_ct_specs), jit=False)
        outer, outer_consts, _ = compat.make_jaxpr(
            joint_sm, *primals, *[global_outs[j] for j in self.act_out])
        (eqn,) = [e for e in outer.eqns if e.primitive is compat.shard_map_p]
        inner, inner_consts, _, _ = compat.shard_map_params(eqn.params)
        outer_env = dict(zip(outer.constvars, outer_consts))
        n_hoisted = len(eqn.invars) - n_in - len(self.act_out)  # consts shard_map hoisted
        self.inner = inner
        self.inner_consts = dict(zip(inner.constvars, inner_consts))
        for v_in, v_out in zip(inner.invars[:n_hoisted], eqn.invars[:n_hoisted]):
            self.inner_consts[v_in] = (v_out.val if isinstance(v_out, compat.Literal)
                                       else outer_env[v_out])
        self.arg_vars = inner.invars[n_hoisted:n_hoisted + n_in]
        self.ct_vars = inner.invars[n_hoisted + n_in:]
        n_primal = n_hoisted + n_in
        self.primal_eqns, self.tangent_eqns, _ = _split_by_cotangent(inner, n_primal)
        tangent_side = set(self.ct_vars) | {v for e in self.tangent_eqns for v in e.outvars}
        read = [v for e in self.tangent_eqns for v in e.invars] + list(inner.outvars[n_out:])
        known = set(self.arg_vars) | set(self.inner_consts)
        self.residuals, seen = [], set()
        for v in read:
            if (isinstance(v, compat.Var) and v not in tangent_side and v not in known
                    and v not in seen):
                seen.add(v)
                self.residuals.append(v)
        read_vars = {v for v in read if isinstance(v, compat.Var)}
        self.needed_args = [i for i, v in enumerate(self.arg_vars) if v in read_vars]
        self.res_specs = tuple(_residual_spec(mesh, v.aval, check_vma, manual)
                               for v in self.residuals)
        self.forward = self._shard_map(self._forward_body, self.in_specs,
                                       self.out_specs + self.res_specs)
        self.backward = self._shard_map(
            self._backward_body,
            self.res_specs + tuple(self.in_specs[i] for i in self.needed_args)
            + tuple(self.ct_specs),
            tuple(self.in_ct_specs))

    def _shard_map(self, fun, in_specs, out_specs, jit=True):
        mapped = compat.shard_map(fun, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                                  check_vma=self.check_vma, manual_axes=self.manual)
        # Under jit even when called eagerly: JAX runs a shard_map that leaves some mesh axes
        # automatic only inside jit, and a jitted program is compiled once and reused.
        return jax.jit(mapped) if jit else mapped

    def _forward_body(self, *args):
        env = dict(self.inner_consts)
        env.update(zip(self.arg_vars, args))
        _eval_eqns(self.primal_eqns, env)
        outs = [_read(env, v) for v in self.inner.outvars[:len(self.out_avals)]]
        return tuple(outs) + tuple(lax.expand_dims(env[v], (0,)) for v in self.residuals)

    def _backward_body(self, *args):
        n_res, n_args = len(self.residuals), len(self.needed_args)
        env = dict(self.inner_consts)
        env.update((v, lax.squeeze(r, (0,))) for v, r in zip(self.residuals, args[:n_res]))
        env.update((self.arg_vars[i], a)
                   for i, a in zip(self.needed_args, args[n_res:n_res + n_args]))
        env.update(zip(self.ct_vars, args[n_res + n_args:]))
        _eval_eqns(self.tangent_eqns, env)
        return tuple(_read(env, v) for v in self.inner.outvars[len(self.out_avals):])

    def __call__(self, primals):
        n_out = len(self.out_avals)
        results = self.forward(*primals)
        outs, residuals = list(results[:n_out]), list(results[n_out:])

        def pullback(cts):
            cts_act = []
            for j in self.act_out:
                ct = instantiate_zeros(cts[j], outs[j])
                if not self.check_vma:  # an output replicated over axes: JAX divides by them
                    size = math.prod(self.mesh.shape[a] for a in _unmentioned(
                        self.mesh, compat.cotangent_spec(self.out_specs[j]), self.manual))
                    ct = ct / size if size != 1 else ct
                cts_act.append(ct)
            cts_in = self.backward(*residuals, *[primals[i] for i in self.needed_args],
                                   *cts_act)
            result = [None] * len(primals)
            for i, ct in zip(self.act_in, cts_in):
                result[i] = ct
            return result

        return outs, pullback


def _eval_body(body, consts, args):
    outs, _, _ = vjp_jaxpr(body, consts, list(args), [False] * len(args))
    return outs


def _psum_if(x, axes):
    return lax.psum(x, axes) if axes else x


def _read(env, v):
    return v.val if isinstance(v, compat.Literal) else env[v]


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@register_fwd_bwd(compat.shard_map_p)
def _shard_map_fwd_bwd(primals, active, **params):
    body, consts, check_vma, manual = compat.shard_map_params(params)
    key = (tuple(active), tuple(compat.typeof(x) for x in primals), params["mesh"],
           params["in_specs"], params["out_specs"], check_vma, manual, compat.trace_context())
    try:
        per_body = _cache.setdefault(body, {})
    except TypeError:  # not weak-referenceable: build every time
        per_body = {}
    if any(compat.is_tracer(c) for c in consts):
        per_body = {}
    vjp = per_body.get(key)
    if vjp is None:
        vjp = per_body[key] = _ShardMapVJP(
            body, consts, primals, active, mesh=params["mesh"], in_specs=params["in_specs"],
            out_specs=params["out_specs"], check_vma=check_vma, manual=manual)
    return vjp(primals)
