"""umT5 (and T5) text encoder: the text encoder of Wan 2.x (umT5-XXL encoder).

T5 details that matter for parity:
- attention logits are q.k with no 1/sqrt(d) scale; positions enter only as a learned
  bias per (bucketed relative position, head), added to the logits;
- umT5 gives every layer its own relative-position bias table; T5 shares layer 0's;
- norms are RMSNorm without bias; the feed-forward is gated: fc2(fc1(x) * gelu_tanh(gate(x))).

Weights load from three layouts (see `UMT5Encoder.sanitize`): ours (which uses Wan's names),
the original Wan `models_t5_umt5-xxl-enc-bf16.pth`, and transformers'
UMT5EncoderModel / T5EncoderModel (also the encoder half of a full T5 checkpoint).

`UMT5TextEncoder` is the pipeline component ("type": "umt5"): tokenizer -> encoder ->
[B, text_len, dim] with every position past a prompt's last token zeroed. That is Wan's
"trim to true length, zero-pad to 512" rule.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ConfigBase
from ..errors import S2DiTError
from ..tokenizer import CLEAN_MODES, Tokenizer
from ..validate import check_field_types
from .layers import GeluTanh

# feed_forward_proj -> (gated, activation module), as transformers reads
# T5Config.feed_forward_proj ("gated-gelu" is the tanh approximation, transformers' "gelu_new").
_FEED_FORWARD = {
    "gated-gelu": (True, GeluTanh),
    "gated-silu": (True, nn.SiLU),
    "gated-relu": (True, nn.ReLU),
    "relu": (False, nn.ReLU),
    "gelu": (False, nn.GELU),
    "silu": (False, nn.SiLU),
}


@dataclass
class UMT5Config(ConfigBase):
    """umT5 encoder config; field names follow transformers' UMT5Config (defaults: umT5-XXL)."""

    config_name: ClassVar[str] = "umT5 config"

    type: str = "umt5"
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    # T5 (not umT5) shares one relative-position table, owned by layer 0, across layers.
    shared_relative_bias: bool = False
    # Component settings: tokenizer file (relative to the component folder), Wan's text rules.
    text_len: int = 512
    tokenizer: str = "tokenizer.json"
    clean: str | None = "whitespace"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"

    @classmethod
    def adapt(cls, d: dict) -> dict:
        """A transformers T5 config.json says model_type "t5": its encoder shares the bias table."""
        if d.get("model_type") == "t5" and "shared_relative_bias" not in d:
            return {**d, "shared_relative_bias": True}
        return d

    def validate(self) -> None:
        """Raise S2DiTError on an inconsistent config."""
        check_field_types(self, "umT5 config")
        if self.type != "umt5":
            raise S2DiTError(f"umT5 text encoder config has type {self.type!r}, expected 'umt5'")
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "text_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise S2DiTError(f"umT5 config: {name} must be a positive integer, got {value!r}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise S2DiTError("umT5 config: num_layers must be an integer")
        if self.num_layers < 0:
            raise S2DiTError("umT5 config: num_layers must be >= 0")
        if self.relative_attention_num_buckets < 4:
            raise S2DiTError("umT5 config: relative_attention_num_buckets must be >= 4")
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise S2DiTError(
                f"umT5 config: feed_forward_proj {self.feed_forward_proj!r} is not supported "
                f"(known: {', '.join(_FEED_FORWARD)})"
            )
        if self.clean not in CLEAN_MODES:
            raise S2DiTError(f"umT5 config: clean must be one of {CLEAN_MODES}, got {self.clean!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise S2DiTError("umT5 config: tokenizer must name a file in the component folder")


@lru_cache(maxsize=32)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """T5's bidirectional bucket of (key - query) for a [length, length] grid, int32."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).astype(np.int64) * half  # keys after the query use the upper half
    dist = np.abs(rel)
    exact = half // 2
    # Distances past `exact` share log-spaced buckets up to max_distance; float32 like the
    # references, since a float64 log could land on the other side of a bucket edge.
    with np.errstate(divide="ignore"):
        ratio = np.log(dist.astype(np.float32) / np.float32(exact))
    scaled = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = exact + np.where(dist < exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    bucket += np.where(dist < exact, dist, large)
    return mx.array(bucket.astype(np.int32))


class RelativeBias(nn.Module):
    """Learned per-head bias for each relative-position bucket -> [1, heads, L, L]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def __call__(self, length: int) -> mx.array:
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return self.embedding(buckets).transpose(2, 0, 1)[None]


class Attention(nn.Module):
    """T5 self-attention: bias-free projections, no 1/sqrt(d) scaling."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=False)
        self.k = nn.Linear(dim, inner, bias=False)
        self.v = nn.Linear(dim, inner, bias=False)
        self.o = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, _ = x.shape
        q, k, v = (
            proj(x).reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q, self.k, self.v)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class FeedForward(nn.Module):
    """fc2(act(gate(x)) * fc1(x)) when gated (umT5), else fc2(act(fc1(x)))."""

    def __init__(self, dim: int, dim_ffn: int, kind: str):
        super().__init__()
        gated, activation = _FEED_FORWARD[kind]
        self.act = activation()
        if gated:
            self.gate = nn.Linear(dim, dim_ffn, bias=False)
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        h = h * self.act(self.gate(x)) if "gate" in self else self.act(h)
        return self.fc2(h)


def _fp16_clamp(x: mx.array) -> mx.array:
    # T5 activations can overflow fp16; Wan and transformers clamp just inside its range.
    if x.dtype == mx.float16:
        limit = float(np.finfo(np.float16).max) - 1000
        return mx.clip(x, -limit, limit)
    return x


class Block(nn.Module):
    """Pre-norm layer: x + Attn(norm1(x)); x + FFN(norm2(x))."""

    def __init__(self, cfg: UMT5Config, own_bias: bool):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_kv)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.feed_forward_proj)
        if own_bias:
            self.pos_embedding = RelativeBias(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                cfg.relative_attention_max_distance,
            )

    def __call__(self, x: mx.array, key_mask: mx.array, shared_bias: mx.array | None) -> mx.array:
        bias = self.pos_embedding(x.shape[1]) if "pos_embedding" in self else shared_bias
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias + key_mask))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


# transformers' names (after the "encoder." prefix) -> ours, for one layer's sub-modules.
_HF_LAYER = {
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.0.layer_norm": "norm1",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wi": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)\.weight")


class UMT5Encoder(nn.Module):
    """umT5 / T5 encoder stack: token ids [B, L] (+ mask) -> hidden states [B, L, d_model]."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.shared_relative_bias:
            self.pos_embedding = RelativeBias(
                config.relative_attention_num_buckets,
                config.num_heads,
                config.relative_attention_max_distance,
            )
        own = not config.shared_relative_bias
        self.blocks = [Block(config, own) for _ in range(config.num_layers)]
        self.norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def __call__(self, ids: mx.array, mask: mx.array | None = None) -> mx.array:
        """Encode ids [B, L]; mask [B, L] (1 = token, 0 = padding) hides padded keys.

        Outputs at padded positions are computed but meaningless (callers zero them).
        """
        x = self.token_embedding(ids)
        length = ids.shape[1]
        if mask is None:
            key_mask = mx.zeros((1, 1, 1, length), dtype=x.dtype)
        else:
            # -inf on padded keys; every row keeps at least its EOS key, so no row is all -inf.
            key_mask = mx.where(mask[:, None, None, :] > 0, 0.0, -mx.inf).astype(x.dtype)
        shared = self.pos_embedding(length) if "pos_embedding" in self else None
        for block in self.blocks:
            x = block(x, key_mask, shared)
        return self.norm(x)

    def sanitize(self, weights: dict) -> dict:
        """Map transformers' or Wan's .pth weight names onto ours (ours pass through)."""
        out = {}
        for name, w in weights.items():
            out_name = self._rename(name)
            if out_name is not None:
                out[out_name] = w
        return out

    def _rename(self, name: str) -> str | None:
        # transformers: the embedding is stored as "shared" and tied as "encoder.embed_tokens".
        if name in ("shared.weight", "encoder.embed_tokens.weight"):
            return "token_embedding.weight"
        if name == "encoder.final_layer_norm.weight":
            return "norm.weight"
        # A full (encoder-decoder) T5 checkpoint: the decoder half is not ours to load.
        if name.startswith(("decoder.", "lm_head.")):
            return None
        m = _HF_BLOCK.fullmatch(name)
        if m is not None:
            index, sub = m.groups()
            if sub not in _HF_LAYER:
                return name  # unknown: left for strict loading to report
            ours = _HF_LAYER[sub]
            if (
                ours.startswith("pos_embedding")
                and self.config.shared_relative_bias
                and index == "0"
            ):
                return f"{ours}.weight"  # T5: layer 0 owns the table all layers use
            return f"blocks.{index}.{ours}.weight"
        # Wan's .pth: our names, except the gate is nn.Sequential(Linear, GELU).
        return re.sub(r"^(blocks\.\d+\.ffn\.gate)\.0\.", r"\1.", name)


class UMT5TextEncoder(UMT5Encoder):
    """The "umt5" text encoder component: prompts -> [B, text_len, d_model], zero past the end."""

    def __init__(self, config: UMT5Config, tokenizer: Tokenizer | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return self.config.d_model

    def _text_rules(self) -> dict:
        c = self.config
        return dict(
            text_len=c.text_len, clean=c.clean, eos_token=c.eos_token, pad_token=c.pad_token
        )

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use `tokenizer`'s vocabulary with this config's text rules (text_len, clean, tokens)."""
        self.tokenizer = tokenizer.replace(**self._text_rules())

    def load_assets(self, folder: str | os.PathLike) -> None:
        """Read the tokenizer file named by the config from the component folder."""
        path = Path(folder) / self.config.tokenizer
        if not path.is_file():
            # Named like loading.py's messages: "text_encoder/tokenizer.json is missing".
            raise S2DiTError(
                f"tokenizer file {Path(folder).name}/{self.config.tokenizer} is missing"
            )
        self.tokenizer = Tokenizer.from_file(path, **self._text_rules())

    def save_assets(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer file into the component folder."""
        if self.tokenizer is None:
            raise S2DiTError("the umT5 text encoder has no tokenizer to save")
        self.tokenizer.save(Path(folder) / self.config.tokenizer)

    def encode(self, prompts: list[str]) -> mx.array:
        """Encode prompts -> [B, text_len, d_model]; positions past each prompt's EOS are 0."""
        if self.tokenizer is None:
            raise S2DiTError("the umT5 text encoder has no tokenizer (load_assets was not called)")
        ids, mask = self.tokenizer(list(prompts))
        lengths = mask.sum(axis=1)
        if ids.max(initial=0) >= self.config.vocab_size:
            raise S2DiTError(
                f"tokenizer id {int(ids.max())} is outside the text encoder's vocabulary "
                f"({self.config.vocab_size})"
            )
        # Keys past a prompt's end are masked, so running only up to the longest prompt gives
        # the same values as Wan's run over all 512 positions, at a fraction of the cost.
        n = int(lengths.max())
        ids_mx, mask_mx = mx.array(ids[:, :n]), mx.array(mask[:, :n])
        x = self(ids_mx, mask_mx)
        x = x * mask_mx[..., None].astype(x.dtype)
        pad = self.config.text_len - n
        return mx.pad(x, [(0, 0), (0, pad), (0, 0)]) if pad else x
