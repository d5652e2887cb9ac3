"""The two optimizer update styles: leafwise (the CPU's: the tree-wide optax update's numbers,
without its param-sized temporary) and fused (the optax chain, elsewhere) agree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ip2p_jax.runtime.profile import profile_for
from ip2p_jax.train.config import OptimConfig, TrainConfig
from ip2p_jax.train.optim import (
    ema_decay,
    make_optimizer,
    optimizer_update,
    update_fused,
    update_leafwise,
)


def _tree(rng, scale=1.0):
    return {
        "conv": {
            "kernel": scale * rng.normal(size=(3, 3, 4, 8)),
            "bias": scale * rng.normal(size=8),
        },
        "dense": {"kernel": scale * rng.normal(size=(8, 5))},
    }


@pytest.mark.parametrize("update", [update_leafwise, update_fused])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # under and over the clipping norm
def test_both_update_styles_equal_the_tree_wide_optax_update(update, grad_scale):
    rng = np.random.default_rng(0)
    config = OptimConfig(warmup_steps=2, grad_clip=1.0)
    params = jax.tree.map(jnp.float32, _tree(rng))
    optimizer = make_optimizer(config, 10)
    reference = optax.chain(optax.clip_by_global_norm(config.grad_clip), optimizer)
    state, ref_state = optimizer.init(params), reference.init(params)
    ours, ref, ema, ref_ema = params, params, params, params

    def tree_wide(grads, state, params, ema, decay):
        updates, state = reference.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)

    for step in range(3):
        grads = jax.tree.map(jnp.float32, _tree(rng, grad_scale))
        decay = ema_decay(jnp.int32(step), 0.999)
        ours, state, ema = jax.jit(
            lambda g, s, p, e, d: update(
                optimizer, g, s, p, max_norm=config.grad_clip, ema=e, ema_decay_value=d
            )
        )(grads, state, ours, ema, decay)
        ref, ref_state, ref_ema = jax.jit(tree_wide)(grads, ref_state, ref, ref_ema, decay)
    # Both compiled: the same ops, per leaf; XLA may still contract a multiply-add
    # differently in the two programs: equal to float32 rounding (moments are ~1e-2, so
    # atol 1e-8 is a few ulps of their scale), not bit for bit.
    for got, want in ((ours, ref), (ema, ref_ema), (state, ref_state[1])):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), got, want)
    assert not np.allclose(ours["dense"]["kernel"], params["dense"]["kernel"])


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_the_cpu_and_accelerator_profiles_train_to_the_same_state(grad_clip):
    """apply_gradients under the CPU profile (leafwise) and the GPU/TPU one (fused): equal
    params, optimizer state and EMA after a few updates, with and without clipping."""
    from ip2p_jax.train.step import TrainState, apply_gradients

    rng = np.random.default_rng(1)
    config = TrainConfig(optim=OptimConfig(warmup_steps=2, grad_clip=grad_clip), ema_decay=0.9)
    params = jax.tree.map(jnp.float32, _tree(rng))
    optimizer = make_optimizer(config.optim, config.steps)
    start = TrainState(jnp.int32(0), params, optimizer.init(params), params, jnp.zeros(2, "uint32"))
    grads = [jax.tree.map(jnp.float32, _tree(rng, 3.0)) for _ in range(3)]
    states = {}
    for backend in ("cpu", "gpu", "tpu"):
        profile = profile_for(backend)
        step = jax.jit(lambda s, g, p=profile: apply_gradients(optimizer, config, s, g, s.rng, p))
        state = start
        for g in grads:
            state, metrics = step(state, g)
        states[profile.optimizer_update] = state
    assert set(states) == {"leafwise", "fused"}
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
        states["leafwise"],
        states["fused"],
    )
    assert int(states["fused"].step) == 3
    assert not np.allclose(states["fused"].ema_params["conv"]["bias"], params["conv"]["bias"])
    with pytest.raises(ValueError, match="choose one of"):
        optimizer_update("treewide")


def test_leafwise_update_keeps_no_param_sized_temporary():
    """XLA's own accounting: the tree-wide update holds a whole tree of updates (8 x 4 MB);
    the leafwise one at most a leaf."""
    leaves = 8
    params = {f"w{i}": jax.ShapeDtypeStruct((2**20,), jnp.float32) for i in range(leaves)}
    optimizer = make_optimizer(OptimConfig(), 100)
    state = jax.eval_shape(optimizer.init, params)

    def tree_wide(p, s, g):
        g = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
        u, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, u), s

    def leafwise(p, s, g):
        return update_leafwise(optimizer, g, s, p, max_norm=1.0)[:2]

    def temp_bytes(fn):
        lowered = jax.jit(fn, donate_argnums=(0, 1)).lower(params, state, params)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    leaf_bytes = 4 * 2**20
    assert temp_bytes(tree_wide) >= (leaves - 1) * leaf_bytes
    assert temp_bytes(leafwise) <= leaf_bytes + 2**16  # one leaf (and a few scalars)


def test_wsd_schedule_warms_up_holds_then_falls_linearly_to_zero():
    from ip2p_jax.train.optim import learning_rate_schedule

    config = OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule="wsd", decay_steps=20)
    rate = learning_rate_schedule(config, 100)
    expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 50: 1e-3, 80: 1e-3, 90: 5e-4, 95: 2.5e-4, 100: 0.0}
    for step, value in expected.items():
        assert float(rate(step)) == pytest.approx(value, abs=1e-9), step
    # Moving the end moves only the decay: the rates before it are the constant run's.
    longer = learning_rate_schedule(config, 200)
    assert all(float(longer(s)) == float(rate(s)) for s in range(0, 80, 7))
    with pytest.raises(ValueError, match="decay_steps <= steps - warmup_steps = 90"):
        learning_rate_schedule(dataclasses.replace(config, decay_steps=91), 100)
