"""LoRA adapters for the S2DiT, built on mlx_lm.tuner's LoRALinear.

Which linear layers get an adapter is given by name patterns (fnmatch, comma separated).
A pattern matches a module path either in full ("blocks.0.ffn.0", "text_embedding.*") or
inside any block ("self_attn.q" means every "blocks.N.self_attn.q"); only nn.Linear layers
are converted. `alpha` follows the usual convention: the update is (alpha / rank) * B A x.

Shareable file format, a folder (like mlx-lm's):

    adapters.safetensors    lora_a [in, r] and lora_b [r, out] per layer, under the layer's
                            module path in the DiT (e.g. blocks.0.self_attn.q.lora_a)
    adapter_config.json     {"format": "s2dit-lora", "version": 1, "fine_tune_type": "lora",
                             "lora_parameters": {"rank", "alpha", "scale", "dropout", "keys"},
                             "layers": "<patterns>", "base_model": {"id", "sha256"}}

base_model.sha256 hashes the base DiT's weights (names, shapes, dtypes and bytes), so an
adapter refuses to load onto a different base model unless told otherwise.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.fsutil import atomic_dir
from s2dit_mlx.validate import check_field_types

from .checkpoint import check_weights

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "s2dit-lora"
# Attention projections (self and cross) and the feed-forward linears of every block.
DEFAULT_LAYERS = "self_attn.q,self_attn.k,self_attn.v,self_attn.o,cross_attn.*,ffn.*"
ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclass
class LoRAConfig:
    """Rank, alpha (update scale = alpha / rank), dropout and the layer name patterns."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: str = DEFAULT_LAYERS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raise S2DiTError on a bad rank, alpha, dropout or empty pattern list."""
        check_field_types(self, "LoRA config")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise S2DiTError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise S2DiTError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise S2DiTError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.patterns():
            raise S2DiTError("LoRA layers: give at least one layer name pattern")

    def patterns(self) -> list[str]:
        """The comma-separated layer patterns as a list."""
        return [p.strip() for p in self.layers.split(",") if p.strip()]


def _lora_linear() -> type:
    # Imported on first use: mlx_lm's package import pulls in transformers (seconds).
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear


def match_lora_keys(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module paths of the nn.Linear layers the patterns select; S2DiTError if one matches none."""
    lora_cls = _lora_linear()
    linears = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, lora_cls)
    ]
    selected: set[str] = set()
    for pat in patterns:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pat)]
        hits += [n for n in linears if fnmatch.fnmatchcase(n, f"blocks.*.{pat}")]
        if not hits:
            raise S2DiTError(f"LoRA layer pattern '{pat}' matches no linear layer of the model")
        selected.update(hits)
    # Module order, so saved files and configs list layers the same way every time.
    return [n for n in linears if n in selected]


def linear_to_lora(model: nn.Module, keys: list[str], config: LoRAConfig) -> None:
    """Swap the named nn.Linear layers for mlx_lm LoRALinear layers (lora_b starts at zero)."""
    lora_cls = _lora_linear()
    modules = dict(model.named_modules())
    swapped = []
    for k in keys:
        layer = modules.get(k)
        if not isinstance(layer, nn.Linear):
            raise S2DiTError(f"LoRA layer {k} is not a linear layer of the model")
        layer = lora_cls.from_base(layer, r=config.rank, dropout=config.dropout, scale=config.scale)
        swapped.append((k, layer))
    model.update_modules(tree_unflatten(swapped))


def apply_lora(model: nn.Module, config: LoRAConfig, keys: list[str] | None = None) -> list[str]:
    """Freeze the model and add trainable adapters to the selected layers; returns their paths."""
    config.validate()
    keys = match_lora_keys(model, config.patterns()) if keys is None else list(keys)
    model.freeze()
    linear_to_lora(model, keys, config)
    # from_base wraps the frozen base layer; the fresh lora_a / lora_b are the only free leaves.
    for m in lora_layers(model).values():
        m.freeze()
        m.unfreeze(keys=list(ADAPTER_LEAVES), recurse=False)
    return keys


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All LoRALinear layers of a model by module path."""
    lora_cls = _lora_linear()
    return {k: m for k, m in model.named_modules() if isinstance(m, lora_cls)}


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The flat adapter weights (lora_a, lora_b) of a model."""
    return {
        k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES
    }


@dataclass
class FusedAdapter:
    """What fuse() merged into a linear layer, so unfuse() can take it out again."""

    lora_a: mx.array
    lora_b: mx.array
    scale: float
    dropout: float


def fuse_lora(model: nn.Module) -> dict[str, FusedAdapter]:
    """Merge every adapter into its base weight (W += scale * B^T A^T); returns them for unfuse."""
    fused, removed = [], {}
    for k, m in lora_layers(model).items():
        removed[k] = FusedAdapter(m.lora_a, m.lora_b, float(m.scale), 1.0 - m.dropout._p_1)
        fused.append((k, m.fuse()))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return removed


def unfuse_lora(model: nn.Module, adapters: dict[str, FusedAdapter]) -> None:
    """Undo fuse_lora: subtract each merged update and put the LoRA layer back."""
    modules = dict(model.named_modules())
    restored = []
    for k, a in adapters.items():
        linear = modules[k]
        delta = ((a.scale * a.lora_b.T) @ a.lora_a.T).astype(linear.weight.dtype)
        base = nn.Linear(*reversed(linear.weight.shape), bias="bias" in linear)
        base.weight = linear.weight - delta
        if "bias" in linear:
            base.bias = linear.bias
        layer = _lora_linear().from_base(
            base, r=a.lora_a.shape[1], dropout=a.dropout, scale=a.scale
        )
        layer.lora_a, layer.lora_b = a.lora_a, a.lora_b
        restored.append((k, layer))
    if restored:
        model.update_modules(tree_unflatten(restored))


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's base weights (names, shapes, dtypes, bytes), adapters excluded."""
    h = hashlib.sha256()
    for name, w in sorted(_base_weights(model).items()):
        arr = np.array(w.astype(mx.float32) if w.dtype == mx.bfloat16 else w)
        h.update(f"{name}|{arr.shape}|{w.dtype}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _base_weights(model: nn.Module) -> dict[str, mx.array]:
    # A LoRA layer's base is stored under ".linear."; hash it under the plain layer name.
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES:
            continue
        out[k.replace(".linear.", ".")] = v
    return out


def save_adapters(
    path: str | os.PathLike,
    model: nn.Module,
    config: LoRAConfig,
    base_id: str = "",
    base_sha256: str = "",
) -> Path:
    """Write adapters.safetensors + adapter_config.json into folder `path`, atomically."""
    target = Path(path)
    weights = adapter_weights(model)
    if not weights:
        raise S2DiTError("the model has no LoRA adapters to save")
    keys = list(lora_layers(model))
    meta = {
        "format": FORMAT,
        "version": 1,
        "fine_tune_type": "lora",
        "lora_parameters": {
            "rank": config.rank,
            "alpha": config.alpha,
            "scale": config.scale,
            "dropout": config.dropout,
            "keys": keys,
        },
        "layers": config.layers,
        "base_model": {"id": base_id, "sha256": base_sha256},
    }
    with atomic_dir(target, "adapter") as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return target


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and check adapter_config.json of an adapter folder."""
    path = Path(path)
    where = f"adapter {path}"
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise S2DiTError(f"{where}: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        params = meta["lora_parameters"]
        LoRAConfig(int(params["rank"]), float(params["alpha"]), float(params["dropout"])).validate()
        if not isinstance(params["keys"], list) or not params["keys"]:
            raise ValueError("no keys")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise S2DiTError(
            f"{where}: {ADAPTER_CONFIG} is invalid ({type(err).__name__}: {err})"
        ) from None
    if meta.get("format", FORMAT) != FORMAT:
        raise S2DiTError(f"{where}: unknown adapter format {meta.get('format')!r}")
    return meta


def load_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    check_base: bool = True,
    override_hint: str = "pass check_base=False",
) -> LoRAConfig:
    """Add the adapter folder's LoRA layers to `model` and load its weights (strict).

    `override_hint` ends the message for a base-model mismatch (a CLI names its flag there).
    """
    path = Path(path)
    where = f"adapter {path}"
    meta = read_adapter_config(path)
    params = meta["lora_parameters"]
    config = LoRAConfig(
        rank=int(params["rank"]),
        alpha=float(params["alpha"]),
        dropout=float(params["dropout"]),
        layers=meta.get("layers", ",".join(params["keys"])),
    )
    want = (meta.get("base_model") or {}).get("sha256")
    if check_base and want and weights_hash(model) != want:
        raise S2DiTError(
            f"{where} was trained on a different base model (weights sha256 differs); "
            f"{override_hint} to load it anyway"
        )
    try:
        weights = mx.load(str(path / ADAPTER_WEIGHTS), format="safetensors")
    except Exception as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise S2DiTError(f"{where}: {ADAPTER_WEIGHTS} is unreadable ({msg})") from None
    modules = dict(model.named_modules())
    for k in params["keys"]:
        if not isinstance(modules.get(k), nn.Linear):
            raise S2DiTError(f"{where} does not fit the model: it has no linear layer {k}")
    apply_lora(model, config, keys=params["keys"])
    check_weights(weights, adapter_weights(model), where)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def load_model_with_adapter(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, fuse: bool = False
):
    """Load a model folder and put an adapter on its DiT (fused into the weights if `fuse`)."""
    from s2dit_mlx.loading import load_model

    bundle = load_model(model_dir)
    load_adapters(bundle.dit, adapter_dir)
    if fuse:
        fuse_lora(bundle.dit)
    bundle.dit.eval()
    return bundle
