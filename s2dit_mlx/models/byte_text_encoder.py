"""A small byte-level text encoder: UTF-8 bytes -> a few pre-norm transformer layers.

No tokenizer files are needed, which makes it the text encoder of tiny test and demo
models. It follows the pipeline's TextEncoder interface: `.dim` and
`.encode(prompts) -> [B, max_len, dim]`. Like Wan's umT5 context, positions past
the end of a prompt are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigBase
from ..errors import S2DiTError
from ..validate import check_field_types

PAD_ID = 0
EOS_ID = 257  # ids 1..256 are the bytes 0..255
VOCAB_SIZE = 258


@dataclass
class ByteTextEncoderConfig(ConfigBase):
    """Config of the byte text encoder (the `text_encoder` entry, type "byte")."""

    config_name: ClassVar[str] = "byte text encoder config"

    type: str = "byte"
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: int = 4
    max_len: int = 64  # ids per prompt, EOS included; longer prompts are cut
    eps: float = 1e-6

    def validate(self) -> None:
        """Raise S2DiTError on an inconsistent config."""
        check_field_types(self, "byte text encoder config")
        if self.type != "byte":
            raise S2DiTError(f"byte text encoder config has type {self.type!r}, expected 'byte'")
        for name in ("dim", "num_heads", "mlp_ratio", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise S2DiTError(f"byte text encoder config: {name} must be a positive integer")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise S2DiTError("byte text encoder config: num_layers must be an integer >= 0")
        if self.dim % self.num_heads:
            raise S2DiTError(
                f"byte text encoder config: dim {self.dim} is not divisible by "
                f"num_heads {self.num_heads}"
            )


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, cfg: ByteTextEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = nn.MultiHeadAttention(cfg.dim, cfg.num_heads, bias=True)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.dim * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.dim * cfg.mlp_ratio, cfg.dim)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + self.fc2(nn.gelu_approx(self.fc1(self.norm2(x))))


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes -> [B, max_len, dim] text embeddings."""

    def __init__(self, config: ByteTextEncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.dim)
        self.position_embedding = nn.Embedding(config.max_len, config.dim)
        self.layers = [EncoderLayer(config) for _ in range(config.num_layers)]
        self.norm = nn.LayerNorm(config.dim, eps=config.eps)

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokenize(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """Prompts -> (ids [B, max_len] int32, lengths [B]); every prompt ends with EOS."""
        n = self.config.max_len
        rows, lengths = [], []
        for prompt in prompts:
            ids = [b + 1 for b in prompt.encode("utf-8")][: n - 1] + [EOS_ID]
            lengths.append(len(ids))
            rows.append(ids + [PAD_ID] * (n - len(ids)))
        return mx.array(rows, dtype=mx.int32), mx.array(lengths, dtype=mx.int32)

    def __call__(self, ids: mx.array, lengths: mx.array) -> mx.array:
        """Encode token ids [B, L] with valid lengths [B] -> [B, L, dim]; padding gives zeros."""
        valid = mx.arange(ids.shape[1])[None, :] < lengths[:, None]  # [B, L]
        x = self.token_embedding(ids) + self.position_embedding(mx.arange(ids.shape[1]))
        # Padded keys get -inf; every row has at least the EOS key, so no row is all -inf.
        mask = mx.where(valid, 0.0, -mx.inf)[:, None, None, :].astype(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) * valid[..., None].astype(x.dtype)

    def encode(self, prompts: list[str]) -> mx.array:
        """Encode a list of prompts -> [B, max_len, dim]."""
        ids, lengths = self.tokenize(list(prompts))
        return self(ids, lengths)

    def sanitize(self, weights: dict) -> dict:
        """Weights are stored under their module names: nothing to rename."""
        return weights
