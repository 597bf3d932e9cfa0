"""Adapters that put mrt_fast's kernels and losses inside other RL libraries.

* :mod:`mrt_fast.integrations.trl` - ``patch()`` / ``unpatch()``: TRL's chunked LM-head log-probs
  and ``selective_log_softmax``.
* :mod:`mrt_fast.integrations.verl` - ``register()`` / ``unregister()``: a verl policy loss
  (``loss_mode=mrt_fast``) and, optionally, verl's ``linear_cross_entropy`` kernel.
* :mod:`mrt_fast.integrations.verl_autoload` - the same ``register()`` run on import, for verl's
  ``actor_rollout_ref.model.external_lib`` so every Ray worker loads it.

Nothing here is imported by ``import mrt_fast``; each module imports its library only when called.
A library whose version or signatures differ from what an adapter expects raises
:class:`UnsupportedVersionError` before anything is replaced.
"""

from mrt_fast.integrations._patching import UnsupportedVersionError

__all__ = ["UnsupportedVersionError"]
