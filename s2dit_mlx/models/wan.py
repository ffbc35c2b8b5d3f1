"""The Wan 2.x teacher: presets, checkpoint name mapping and the A14B two-expert switch.

A Wan2.1 / Wan2.2 DiT *is* an S2DiT whose layers are all "full": same blocks, same
parameter names as Wan's original checkpoints (patch_embedding, text_embedding.0/2,
time_embedding.0/2, time_projection.1, blocks.N.{self_attn,cross_attn,norm3,ffn,modulation},
head.{head,modulation}), per-frame timesteps for TI2V. This module adds what is specific
to Wan checkpoints:

- `PRESETS`: the published models with their generation defaults;
- `args_from_wan_config` / `args_from_diffusers_config`: ModelArgs from either config.json;
- `sanitize`: diffusers (`WanTransformer3DModel`) or original names and PyTorch conv layouts
  mapped onto ours;
- `WanExperts`: Wan2.2 A14B's high-noise / low-noise expert switch with per-expert guidance.

Converted folders (sharded, quantized, two experts) load through s2dit_mlx.loading
(`load_model`, or `load_dit` for the DiT alone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..cache import CacheGroup
from ..errors import S2DiTError
from ..sampling import WAN_NEGATIVE_PROMPT
from .s2dit import ModelArgs, S2DiT

# Every published Wan DiT uses 128-wide heads; used when a checkpoint has no config.json.
WAN_HEAD_DIM = 128
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class WanPreset:
    """A published Wan model: DiT shape, VAE, and the generation defaults of its reference code."""

    name: str
    task: str  # "t2v", "ti2v" (text or first-frame image to video) or "i2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    vae: str = "wan2.1"  # "wan2.1" (4x8x8, z=16) or "wan2.2" (4x16x16, z=48)
    defaults: dict = field(default_factory=dict)
    # Two-expert models (A14B): the high-noise expert runs while t >= boundary * 1000.
    boundary: float | None = None
    guidance_low_noise: float | None = None


def _defaults(height, width, frames, fps, steps, shift, guidance) -> dict:
    return dict(
        height=height,
        width=width,
        frames=frames,
        fps=fps,
        steps=steps,
        shift=shift,
        guidance=guidance,
        negative_prompt=WAN_NEGATIVE_PROMPT,
        mode="bidirectional",
        solver="unipc",
    )


# Defaults from the reference code (Wan2.1/2.2 generate.py and wan/configs): 1.3B supports
# 480x832 only, the 14B models default to 720x1280 (Wan's "1280*720" is width*height),
# TI2V-5B to 704x1280 at 24 fps. For A14B `guidance` is the high-noise expert's
# and `guidance_low_noise` the low-noise expert's (Wan's sample_guide_scale = (low, high)).
PRESETS: dict[str, WanPreset] = {
    p.name: p
    for p in (
        WanPreset(
            "wan2.1-t2v-1.3b", "t2v", 1536, 8960, 12, 30,
            defaults=_defaults(480, 832, 81, 16, 50, 5.0, 5.0),
        ),
        WanPreset(
            "wan2.1-t2v-14b", "t2v", 5120, 13824, 40, 40,
            defaults=_defaults(720, 1280, 81, 16, 50, 5.0, 5.0),
        ),
        WanPreset(
            "wan2.2-t2v-a14b", "t2v", 5120, 13824, 40, 40,
            defaults=_defaults(720, 1280, 81, 16, 40, 12.0, 4.0),
            boundary=0.875, guidance_low_noise=3.0,
        ),
        WanPreset(
            "wan2.2-i2v-a14b", "i2v", 5120, 13824, 40, 40, in_dim=36,
            defaults=_defaults(720, 1280, 81, 16, 40, 5.0, 3.5),
            boundary=0.900, guidance_low_noise=3.5,
        ),
        WanPreset(
            "wan2.2-ti2v-5b", "ti2v", 3072, 14336, 24, 30, in_dim=48, out_dim=48, vae="wan2.2",
            defaults=_defaults(704, 1280, 121, 24, 50, 5.0, 5.0),
        ),
    )
}  # fmt: skip


def wan_model_args(
    dim: int,
    ffn_dim: int,
    num_heads: int,
    num_layers: int,
    *,
    in_dim: int = 16,
    out_dim: int = 16,
    text_dim: int = 4096,
    freq_dim: int = 256,
    text_len: int = 512,
    eps: float = 1e-6,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    cross_attn_norm: bool = True,
) -> ModelArgs:
    """ModelArgs of a Wan DiT: every layer "full", bidirectional, Wan's widths."""
    args = ModelArgs(
        in_dim=in_dim,
        out_dim=out_dim,
        dim=dim,
        ffn_dim=ffn_dim,
        freq_dim=freq_dim,
        text_dim=text_dim,
        num_heads=num_heads,
        layers=["full"] * num_layers,
        patch_size=tuple(patch_size),
        eps=eps,
        cross_attn_norm=cross_attn_norm,
        text_len=text_len,
    )
    args.validate()
    return args


def preset_args(name: str) -> ModelArgs:
    """ModelArgs of a published Wan model by preset name (see PRESETS)."""
    if name not in PRESETS:
        raise S2DiTError(f"unknown Wan preset {name!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[name]
    return wan_model_args(
        p.dim, p.ffn_dim, p.num_heads, p.num_layers, in_dim=p.in_dim, out_dim=p.out_dim
    )


def find_preset(args: ModelArgs, two_experts: bool = False) -> WanPreset | None:
    """The published model with this DiT shape (A14B when two experts), or None."""
    for p in PRESETS.values():
        same = (p.dim, p.ffn_dim, p.num_heads, p.num_layers, p.in_dim, p.out_dim) == (
            args.dim,
            args.ffn_dim,
            args.num_heads,
            len(args.layers),
            args.in_dim,
            args.out_dim,
        )
        if same and (p.boundary is not None) == two_experts:
            return p
    return None


def _get(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise S2DiTError(f"{where}: config has no {key!r}")
    return cfg[key]


def args_from_wan_config(
    cfg: dict, shapes: dict[str, tuple[int, ...]] | None = None, where: str = "Wan config"
) -> ModelArgs:
    """ModelArgs from an original-layout WanModel config.json (and the weights' shapes).

    WanModel leaves text_dim, patch_size and cross_attn_norm out of its config.json, so
    with `shapes` those come from the weights, and the config must agree with the weights.
    """
    model_type = cfg.get("model_type", "t2v")
    if model_type not in ("t2v", "ti2v", "i2v"):
        raise S2DiTError(f"{where}: Wan model_type {model_type!r} is not supported (t2v/ti2v/i2v)")
    if tuple(cfg.get("window_size", (-1, -1))) != (-1, -1):
        raise S2DiTError(f"{where}: windowed attention (window_size) is not supported")
    if not cfg.get("qk_norm", True):
        raise S2DiTError(f"{where}: models without qk_norm are not supported")
    num_heads = _get(cfg, "num_heads", where)
    if shapes is not None:
        args = args_from_shapes(shapes, num_heads=num_heads)
        for key, value in (
            ("dim", args.dim),
            ("ffn_dim", args.ffn_dim),
            ("num_layers", len(args.layers)),
            ("in_dim", args.in_dim),
            ("out_dim", args.out_dim),
            ("freq_dim", args.freq_dim),
        ):
            if key in cfg and cfg[key] != value:
                raise S2DiTError(f"{where}: config {key}={cfg[key]} but the weights have {value}")
        args.text_len = cfg.get("text_len", args.text_len)
        args.eps = cfg.get("eps", args.eps)
        return args
    return wan_model_args(
        _get(cfg, "dim", where),
        _get(cfg, "ffn_dim", where),
        num_heads,
        _get(cfg, "num_layers", where),
        in_dim=cfg.get("in_dim", 16),
        out_dim=cfg.get("out_dim", 16),
        text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256),
        text_len=cfg.get("text_len", 512),
        eps=cfg.get("eps", 1e-6),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        cross_attn_norm=cfg.get("cross_attn_norm", True),
    )


def args_from_diffusers_config(cfg: dict, where: str = "transformer config") -> ModelArgs:
    """ModelArgs from a diffusers WanTransformer3DModel config.json."""
    name = cfg.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise S2DiTError(f"{where}: {name} is not a WanTransformer3DModel")
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise S2DiTError(f"{where}: Wan2.1 I2V (CLIP image branch) is not supported")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise S2DiTError(f"{where}: qk_norm {cfg.get('qk_norm')!r} is not supported")
    heads = _get(cfg, "num_attention_heads", where)
    in_dim = cfg.get("in_channels", 16)
    return wan_model_args(
        heads * cfg.get("attention_head_dim", WAN_HEAD_DIM),
        _get(cfg, "ffn_dim", where),
        heads,
        _get(cfg, "num_layers", where),
        in_dim=in_dim,
        out_dim=cfg.get("out_channels") or in_dim,
        text_dim=cfg.get("text_dim", 4096),
        freq_dim=cfg.get("freq_dim", 256),
        eps=cfg.get("eps", 1e-6),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        cross_attn_norm=cfg.get("cross_attn_norm", True),
    )


def args_from_shapes(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> ModelArgs:
    """ModelArgs inferred from original-layout weight shapes (heads default to dim / 128)."""
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]
        text_dim = shapes["text_embedding.0.weight"][1]
        freq_dim = shapes["time_embedding.0.weight"][1]
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
        out_dim = shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2])
    except (KeyError, ValueError, IndexError) as err:
        raise S2DiTError(f"weights do not look like a Wan DiT (no usable {err})") from None
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    return wan_model_args(
        dim,
        ffn_dim,
        num_heads or max(1, dim // WAN_HEAD_DIM),
        len(blocks),
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=text_dim,
        freq_dim=freq_dim,
        patch_size=tuple(patch),
        cross_attn_norm=any(".norm3." in k for k in shapes),
    )


# diffusers name fragment -> original Wan fragment, inside a block and at the top level.
_BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers calls the affine cross-attention norm `norm2`; Wan calls it `norm3`.
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
_TOP_NAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder": "img_emb.proj",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def is_diffusers_name(name: str) -> bool:
    """True for a WanTransformer3DModel (diffusers) parameter name."""
    return name.startswith(("condition_embedder.", "proj_out.", "scale_shift_table")) or bool(
        re.match(r"blocks\.\d+\.(attn1|attn2|ffn\.net)\.", name)
    )


def wan_name(name: str) -> str:
    """The original Wan name of a diffusers or original (optionally prefixed) DiT parameter."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    m = re.match(r"(blocks\.\d+\.)(.+)", name)
    # No original name collides with a diffusers fragment (original blocks have no `norm2`
    # parameters, no `scale_shift_table`), so the table applies to either layout.
    table, head, rest = (_BLOCK_NAMES, m.group(1), m.group(2)) if m else (_TOP_NAMES, "", name)
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return head + dst + rest[len(src) :]
    return name


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Original or diffusers Wan DiT weights (PyTorch layouts) -> S2DiT names and layouts."""
    out = {}
    for name, w in weights.items():
        name = wan_name(name)
        if name == "patch_embedding.weight" and w.ndim == 5:
            w = w.transpose(0, 2, 3, 4, 1)  # O, I, D, H, W -> O, D, H, W, I
        out[name] = w
    return out


class WanExperts(nn.Module):
    """Wan2.2 A14B: the high-noise expert while t >= boundary * 1000, then the low-noise one.

    Each expert has its own classifier-free guidance scale (Wan: (3.0, 4.0) as (low, high)).
    Call it like an S2DiT; `select(t)` gives the (expert, guidance) a sampler should use.
    As an nn.Module, set_dtype / parameters / load_weights cover both experts.
    """

    def __init__(
        self,
        high_noise: S2DiT,
        low_noise: S2DiT,
        boundary: float = 0.875,
        guidance: tuple[float, float] = (3.0, 4.0),
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    ):
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise S2DiTError(f"expert boundary must lie in (0, 1), got {boundary}")
        if high_noise.args != low_noise.args:
            raise S2DiTError("the two experts must have the same architecture")
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = boundary
        self.guidance_low, self.guidance_high = (float(g) for g in guidance)
        self.threshold = boundary * num_train_timesteps

    @property
    def args(self) -> ModelArgs:
        return self.high_noise.args

    def is_high_noise(self, t) -> bool:
        """Whether timestep t (0..1000; scalar, or an array holding one value) is high-noise."""
        value = float(mx.max(t).item()) if isinstance(t, mx.array) else float(t)
        return value >= self.threshold

    def select(self, t) -> tuple[S2DiT, float]:
        """(expert, guidance) for timestep t."""
        if self.is_high_noise(t):
            return self.high_noise, self.guidance_high
        return self.low_noise, self.guidance_low

    def make_cache(self) -> CacheGroup:
        """Streaming state: each expert keeps its own caches (their keys differ)."""
        return CacheGroup(
            {"high_noise": self.high_noise.make_cache(), "low_noise": self.low_noise.make_cache()}
        )

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        context: mx.array,
        cache: CacheGroup | None = None,
        update_cache: bool = False,
        **kwargs,
    ) -> mx.array:
        """Flow velocity from the expert that owns timestep t.

        With a cache, a writing pass (the clean chunk at t = 0) runs both experts, so the
        high-noise expert's caches hold every clean chunk too.
        """
        expert = self.select(t)[0]
        if cache is None:
            return expert(x, t, context, **kwargs)
        out = None
        for name in ("high_noise", "low_noise"):
            module = getattr(self, name)
            if module is expert or update_cache:
                v = module(x, t, context, cache=cache[name], update_cache=update_cache, **kwargs)
                out = v if module is expert else out
        return out


EXPERTS_KEY = "experts"  # config.json entry of a two-expert (A14B) folder
