"""The optimizer (AdamW, warmup, clipping, gradient accumulation) and the EMA of the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.train.config import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, or cosine down to 0 at `total_steps`."""
    if config.schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            config.learning_rate, max(1, total_steps - config.warmup_steps)
        )
    else:
        raise ValueError(f"optim.schedule must be constant or cosine, got {config.schedule!r}")
    if not config.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW after global-norm clipping. (Gradient accumulation happens inside the train
    step, so one call is one optimizer step.)"""
    chain = []
    if config.grad_clip:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    )
    return optax.chain(*chain)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The reference's EMA warmup (LitEma): min(decay, (1 + n) / (10 + n)) at update n."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, step: jax.Array, decay: float):
    """ema <- d * ema + (1 - d) * params, with d from ema_decay."""
    d = ema_decay(step, decay)
    return jax.tree.map(lambda e, p: e + (1.0 - d) * (p.astype(e.dtype) - e), ema, params)
