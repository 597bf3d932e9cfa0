"""Importing this module registers mrt_fast's verl loss: name it in verl's ``external_lib``.

verl builds its actor inside Ray worker processes, so registering in the driver script is not
enough. verl imports ``actor_rollout_ref.model.external_lib`` (and every module listed in the
``VERL_USE_EXTERNAL_MODULES`` environment variable) in each worker, which runs
:func:`mrt_fast.integrations.verl.register` there:

    actor_rollout_ref.model.external_lib=mrt_fast.integrations.verl_autoload
    actor_rollout_ref.actor.policy_loss.loss_mode=mrt_fast

With ``MRT_FAST_VERL_KERNEL=1`` in the workers' environment (e.g.
``+ray_kwargs.ray_init.runtime_env.env_vars.MRT_FAST_VERL_KERNEL='"1"'``) it also swaps in the
log-prob kernel for verl's fused-kernel path.
"""

import os

from mrt_fast.integrations.verl import register

KERNEL_ENV = "MRT_FAST_VERL_KERNEL"

register(kernel=os.environ.get(KERNEL_ENV, "0").strip().lower() in ("1", "true", "yes"))
