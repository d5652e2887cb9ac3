"""The optimizer (AdamW, warmup, clipping, gradient accumulation) and the EMA of the weights.

The update comes in two styles with the same numbers, picked by the backend profile
(runtime.profile): :func:`update_leafwise` for the CPU's memory, :func:`update_fused` (the
plain optax chain, which XLA fuses) elsewhere. Both take and return the optimizer's own state,
so a checkpoint resumes under either.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ip2p_jax.train.config import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant, cosine down to 0 at `total_steps`, or constant
    until the last `decay_steps` and linear down to 0 over them (wsd)."""
    after_warmup = max(1, total_steps - config.warmup_steps)
    if config.schedule == "constant":
        after = optax.constant_schedule(config.learning_rate)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(config.learning_rate, after_warmup)
    elif config.schedule == "wsd":
        if not 0 < config.decay_steps <= after_warmup:
            raise ValueError(
                f"optim.schedule 'wsd' needs 0 < optim.decay_steps <= steps - warmup_steps "
                f"= {after_warmup}, got decay_steps={config.decay_steps}"
            )
        stable = after_warmup - config.decay_steps
        decay = optax.linear_schedule(config.learning_rate, 0.0, config.decay_steps)
        after = optax.join_schedules(
            [optax.constant_schedule(config.learning_rate), decay], [stable]
        )
    else:
        raise ValueError(f"optim.schedule must be constant, cosine or wsd, got {config.schedule!r}")
    if not config.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the learning-rate schedule. Global-norm clipping (config.grad_clip) is done
    by the update (`update_leafwise` needs the norm before it updates any leaf). (Gradient
    accumulation happens inside the train step, so one call is one optimizer step.)"""
    return optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def global_norm_clip(grads, max_norm: float | None) -> tuple[jax.Array, jax.Array] | None:
    """(trigger, norm) of optax.clip_by_global_norm for `grads`, or None without clipping."""
    if not max_norm:
        return None
    norm = optax.tree.norm(grads)
    return jnp.squeeze(norm < max_norm), norm


def clip_leaf(g: jax.Array, clip: tuple[jax.Array, jax.Array] | None, max_norm: float | None):
    """One leaf of optax.clip_by_global_norm, with its exact arithmetic."""
    if clip is None:
        return g
    trigger, norm = clip
    return jax.lax.select(trigger, g, (g / norm.astype(g.dtype)) * max_norm)


def ema_step(ema: jax.Array, param: jax.Array, decay: jax.Array) -> jax.Array:
    """One leaf of the EMA update: ema + (1 - decay) * (param - ema), in the EMA's dtype."""
    return ema + (1.0 - decay) * (param.astype(ema.dtype) - ema)


def update_leafwise(
    optimizer: optax.GradientTransformation,
    grads,
    opt_state,
    params,
    *,
    max_norm: float | None,
    ema=None,
    ema_decay_value: jax.Array | None = None,
):
    """Clipping, the optimizer update and the EMA one parameter at a time, each leaf's
    inputs gated on the previous leaf's outputs (`lax.optimization_barrier`).

    The same numbers as the tree-wide update (every op is per leaf, the clip factor comes
    from the global norm first), but XLA can no longer build a whole param-sized tree of
    updates before applying them: on SD-1.5 that tree is 3.2 GB of the step's temporaries.
    Returns (params, opt_state, ema)."""
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    ema_leaves = treedef.flatten_up_to(ema) if ema is not None else [None] * len(param_leaves)

    def is_param_tree(node) -> bool:  # the moments (mu, nu) have the params' structure
        return jax.tree.structure(node) == treedef

    nodes, outer = jax.tree.flatten(opt_state, is_leaf=is_param_tree)
    node_leaves = [treedef.flatten_up_to(n) if is_param_tree(n) else None for n in nodes]
    clip = global_norm_clip(grads, max_norm)
    new_params, new_ema, new_nodes = [], [], []
    previous = None
    for k, (p, g, e) in enumerate(zip(param_leaves, grad_leaves, ema_leaves, strict=True)):
        state_k = outer.unflatten(
            [
                leaves[k] if leaves is not None else n
                for n, leaves in zip(nodes, node_leaves, strict=True)
            ]
        )
        # the clip's scalars go through the barrier too, or XLA clips every leaf up front
        inputs = (p, g, e, state_k, clip)
        if previous is not None:
            inputs, _ = jax.lax.optimization_barrier((inputs, previous))
        p, g, e, state_k, leaf_clip = inputs
        update, state_k = optimizer.update(clip_leaf(g, leaf_clip, max_norm), state_k, p)
        p = optax.apply_updates(p, update)
        if e is not None:
            e = ema_step(e, p, ema_decay_value)
        new_params.append(p)
        new_ema.append(e)
        new_nodes.append(jax.tree.leaves(state_k))
        previous = (p, e, new_nodes[-1])
    # scalar nodes (step counts) advance alike in every leaf's update: take the first leaf's
    merged = [
        treedef.unflatten([leaves[j] for leaves in new_nodes])
        if node_leaves[j] is not None
        else new_nodes[0][j]
        for j in range(len(nodes))
    ]
    new_ema_tree = treedef.unflatten(new_ema) if ema is not None else None
    return treedef.unflatten(new_params), outer.unflatten(merged), new_ema_tree


def update_fused(
    optimizer: optax.GradientTransformation,
    grads,
    opt_state,
    params,
    *,
    max_norm: float | None,
    ema=None,
    ema_decay_value: jax.Array | None = None,
):
    """``optax.chain(clip_by_global_norm(max_norm), optimizer)`` over the whole tree, then
    the EMA: the update as optax writes it, which XLA fuses freely (GPU, TPU). The same
    numbers as :func:`update_leafwise`. Returns (params, opt_state, ema)."""
    if max_norm:
        chain = optax.chain(optax.clip_by_global_norm(max_norm), optimizer)
        # clipping keeps no state: the chain's state is the optimizer's behind an empty one
        updates, (_, opt_state) = chain.update(grads, (optax.EmptyState(), opt_state), params)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_step(e, p, ema_decay_value), ema, params)
    return params, opt_state, ema


def optimizer_update(style: str) -> Callable:
    """The update function of a style: "leafwise" (:func:`update_leafwise`) or "fused"
    (:func:`update_fused`); see ``BackendProfile.optimizer_update``."""
    updates = {"leafwise": update_leafwise, "fused": update_fused}
    if style not in updates:
        raise ValueError(f"optimizer update style {style!r}: choose one of {sorted(updates)}")
    return updates[style]


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """The reference's EMA warmup (LitEma): min(decay, (1 + n) / (10 + n)) at update n."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
