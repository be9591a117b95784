"""Environments for reinforcement learning, in pure JAX (jittable, batched, ``lax.scan``-able),
and the policy-gradient machinery that trains on them (``bpkit.envs.policy_gradient``)."""
from bpkit.envs import cartpole

ENVS = {"cartpole": cartpole}  # data.name -> environment module (reset, step, constants)

__all__ = ["cartpole", "ENVS"]
