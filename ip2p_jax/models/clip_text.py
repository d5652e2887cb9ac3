"""CLIPTextModel and CLIPTextModelWithProjection (transformers) in Flax linen: the text
encoders of Stable Diffusion (SDXL's second one has the projection).

Param paths mirror transformers 5 (``embeddings/token_embedding``, ``encoder/layers_3/mlp/fc1``,
``final_layer_norm``); checkpoints that carry the older ``text_model.`` prefix convert too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ip2p_jax.models.attention import attention
from ip2p_jax.models.config import ConfigError, load_json
from ip2p_jax.models.execution import Execution
from ip2p_jax.models.layers import dense, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The hyperparameters of a transformers CLIPTextModel that change its math."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # CLIPTextModelWithProjection (SDXL's second encoder): the pooled output through
    # text_projection (no bias) as `text_embeds`. None for a plain CLIPTextModel, whose
    # config may name a projection_dim it has no weights for.
    projection_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "text_encoder config") -> CLIPTextConfig:
        """Builds the config from ``text_encoder/config.json``.

        transformers writes many generic fields (label maps, generation defaults, ...) that
        never touch CLIPTextModel's math; the architecture and activation are checked.
        """
        architectures = raw.get("architectures") or ["CLIPTextModel"]
        if architectures[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ConfigError(f"{source}: architecture {architectures[0]!r} is not CLIPTextModel")
        if raw.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"{source}: model_type {raw['model_type']!r} is not clip_text_model")
        if raw.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act={raw['hidden_act']!r} is not supported "
                f"(only {sorted(ACTIVATIONS)})"
            )
        eos = raw.get("eos_token_id", 49407)
        if isinstance(eos, list):
            eos = eos[0]
        fields = {f.name for f in dataclasses.fields(cls)} - {"eos_token_id", "projection_dim"}
        projection = None
        if architectures[0] == "CLIPTextModelWithProjection":
            projection = raw.get("projection_dim", 512)  # transformers' default
        return cls(
            **{k: raw[k] for k in fields if k in raw}, eos_token_id=eos, projection_dim=projection
        )

    @classmethod
    def from_file(cls, path: str | Path) -> CLIPTextConfig:
        """Reads ``text_encoder/config.json``."""
        return cls.from_dict(load_json(Path(path)), source=str(path))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
    """``last_hidden_state`` (after the final LayerNorm), ``pooler_output`` (the EOS token),
    ``hidden_states``: the embeddings and each layer's output, before the final norm; and
    ``text_embeds``, the projected pooled output of a CLIPTextModelWithProjection (else None).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg, run = self.config, self.execution
        heads, dim = cfg.num_attention_heads, cfg.hidden_size

        def project(name: str) -> jax.Array:
            out = dense(dim, name, run)(x)
            return out.reshape(*x.shape[:2], heads, dim // heads)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        out = attention(q, k, v, kernel=run.attention, mask=mask)
        return dense(dim, "out_proj", run)(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, run = self.config, self.execution
        h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "fc1", run)(x))
        return dense(cfg.hidden_size, "fc2", run)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer."""

    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        eps, run = self.config.layer_norm_eps, self.execution
        x = x + CLIPAttention(self.config, run, name="self_attn")(
            layer_norm(eps, "layer_norm1", run)(x), mask
        )
        return x + CLIPMLP(self.config, run, name="mlp")(layer_norm(eps, "layer_norm2", run)(x))


class CLIPEncoder(nn.Module):
    """The stack of layers; returns every layer's output."""

    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> list[jax.Array]:
        outputs = []
        for i in range(self.config.num_hidden_layers):
            h = CLIPEncoderLayer(self.config, self.execution, name=f"layers_{i}")(h, mask)
            outputs.append(h)
        return outputs


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.execution.compute_dtype
        embed = lambda rows, name: nn.Embed(rows, cfg.hidden_size, dtype=dtype, name=name)
        tokens = embed(cfg.vocab_size, "token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, "position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextModel(nn.Module):
    """Token ids [B, T] -> :class:`CLIPTextOutput`. Causal attention, as CLIP's text tower.
    ``execution`` (models.execution): compute dtype and attention kernel; the outputs are in
    the compute dtype."""

    config: CLIPTextConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}"
            )
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:  # 1 = a real token, 0 = padding (not attended to)
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        run = self.execution
        h = CLIPTextEmbeddings(cfg, run, name="embeddings")(input_ids)
        hidden_states = [h, *CLIPEncoder(cfg, run, name="encoder")(h, mask)]
        last = layer_norm(cfg.layer_norm_eps, "final_layer_norm", run)(hidden_states[-1])
        if cfg.eos_token_id == 2:  # configs from before transformers#24773: the EOS has the max id
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
        projected = None
        if cfg.projection_dim is not None:
            projected = dense(cfg.projection_dim, "text_projection", run, use_bias=False)(pooled)
        hidden = tuple(hidden_states) if output_hidden_states else None
        return CLIPTextOutput(last, pooled, hidden, projected)


def sdxl_text_conditioning(
    first: CLIPTextOutput, second: CLIPTextOutput
) -> tuple[jax.Array, jax.Array]:
    """SDXL's text conditioning from its two encoders' outputs (run with
    ``output_hidden_states``): the penultimate hidden states of both joined along the
    features [N, T, D1 + D2], the UNet's text states; and the second encoder's projected
    pooled output [N, P], the UNet's ``text_embeds``."""
    if first.hidden_states is None or second.text_embeds is None:
        raise ValueError(
            "SDXL conditioning needs both encoders' hidden states (output_hidden_states=True) "
            "and a second encoder with a text projection (CLIPTextModelWithProjection)"
        )
    states = jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1)
    return states, second.text_embeds
