"""MIL emitters for the VAE decoder: one latent frame per call, its causal history as state.

Dispatch on the VAE's `config.type`: "wan" (2.1 / 2.2) is emitted by wan_vae.py as a package
with two functions (`first`, `decode`); "patch" is emitted here as one function `main`.

The small causal patch VAE (models/patch_vae.py), per call:
    z [1, 1, h, w, z_dim] (normalised, as the DiT makes them) -> denormalise -> causal Conv3d
    (kernel kt x k x k; the kt - 1 previous latent frames come from the fp16 state
    `vae_history` [1, z_dim, kt - 1, h, w]) -> SiLU -> Linear -> 4 x 8 x 8 x 3 patches ->
    frames [1, 4, 8h, 8w, 3] clipped to [-1, 1].
The first latent frame of a video stands for one pixel frame: the app keeps only the last of
the 4 frames of its first call (the manifest says so).
"""

from __future__ import annotations

import numpy as np

from ..errors import S2DiTError
from .emit import DTYPES, Ctx, Function, Program, StateSpec, ct, linear, mb, types
from .wan_vae import FUNCTIONS as WAN_FUNCTIONS
from .wan_vae import check_wan_vae, wan_decoder_programs, wan_state_specs

SUPPORTED = ("patch", "wan")


def vae_type(vae) -> str | None:
    """The VAE's config type ("patch", "wan", ...), None when it has none."""
    return getattr(getattr(vae, "config", None), "type", None)


def vae_functions(vae) -> tuple[str, ...]:
    """Function names of the decoder package (the default one last)."""
    return WAN_FUNCTIONS if vae_type(vae) == "wan" else ("main",)


def vae_state_specs(vae, latent_height: int, latent_width: int) -> list[StateSpec]:
    """The decoder's fp16 history states (patch: none when the temporal kernel is 1)."""
    if vae_type(vae) == "wan":
        return wan_state_specs(vae, latent_height, latent_width)
    cfg = vae.config
    if cfg.temporal_kernel <= 1:
        return []
    shape = (1, cfg.z_dim, cfg.temporal_kernel - 1, latent_height, latent_width)
    return [StateSpec("vae_history", shape, -1, "vae_history")]


def check_vae(vae) -> None:
    """Raise S2DiTError unless the decoder is one this module can emit."""
    kind = vae_type(vae)
    if kind not in SUPPORTED:
        raise S2DiTError(
            f"Core ML export supports the {' and '.join(map(repr, SUPPORTED))} VAE decoders, "
            f"not {kind!r} (pass --skip-vae to export the DiT alone)"
        )
    if kind == "wan":
        check_wan_vae(vae)


def first_call_note(vae) -> str:
    """How the app treats latent frame 0 of a video (for the manifest)."""
    if vae_type(vae) == "wan":
        return (
            "call function `first` for latent frame 0 of each video: it returns 1 pixel frame "
            "and (re)starts every state; call `decode` (the default) for each later latent "
            "frame: 4 pixel frames each"
        )
    return "keep only the last of the 4 frames (it stands for frame 0)"


def decoder_programs(vae, weights: dict, latent_height: int, latent_width: int, dtype: str):
    """Function name -> MIL program of the streaming decoder, in vae_functions order."""
    check_vae(vae)
    if vae_type(vae) == "wan":
        return wan_decoder_programs(vae, weights, latent_height, latent_width, dtype)
    return {"main": decoder_function(vae, weights, latent_height, latent_width, dtype)}


def decoder_function(vae, weights: dict, latent_height: int, latent_width: int, dtype: str):
    """The patch VAE's decode call as a MIL program: latents -> frames, history state updated."""
    if vae_type(vae) != "patch":
        raise S2DiTError(f"decoder_function emits the 'patch' VAE, not {vae_type(vae)!r}")
    cfg = vae.config
    ctx = Ctx(dtype=dtype, weights=weights, write=True)
    tdt = DTYPES[dtype][1]
    h, w, z = latent_height, latent_width, cfg.z_dim
    inputs = {"latents": mb.placeholder(shape=(1, 1, h, w, z), dtype=tdt)}
    specs = vae_state_specs(vae, h, w)
    for spec in specs:
        inputs[spec.name] = mb.state_tensor_placeholder(shape=spec.shape, dtype=types.fp16)
    mean = np.asarray(cfg.latents_mean or [0.0] * z, np.float32)
    std = np.asarray(cfg.latents_std or [1.0] * z, np.float32)
    kt, ks = cfg.temporal_kernel, cfg.spatial_kernel
    with Function(inputs, opset_version=ct.target.iOS18) as func:
        x = mb.add(x=mb.mul(x=func.inputs["latents"], y=ctx.c(std)), y=ctx.c(mean))
        x = mb.transpose(x=x, perm=[0, 4, 1, 2, 3])  # [1, z, 1, h, w]
        if specs:
            state = func.inputs["vae_history"]
            x = mb.concat(values=[ctx.to_compute(mb.read_state(input=state)), x], axis=2)
            last = mb.slice_by_index(x=x, begin=[0, 0, 1, 0, 0], end=[1, z, kt, h, w])
            mb.coreml_update_state(state=state, value=ctx.to_state(last))
        weight = weights["decoder_module.conv.conv.weight"].transpose(0, 4, 1, 2, 3)
        p = ks // 2
        x = mb.conv(
            x=x,
            weight=ctx.w("decoder_module.conv.conv.weight", weight),
            bias=ctx.w("decoder_module.conv.conv.bias"),
            strides=[1, 1, 1],
            pad_type="custom",
            pad=[0, 0, p, p, p, p],
            dilations=[1, 1, 1],
            groups=1,
        )  # [1, hidden, 1, h, w]
        x = mb.silu(x=x)
        x = mb.reshape(x=mb.transpose(x=x, perm=[0, 2, 3, 4, 1]), shape=[1, h * w, -1])
        for i in range(cfg.mlp_blocks):  # residual MLP blocks, per latent position
            prefix = f"decoder_module.blocks.{i}"
            inner = mb.silu(x=linear(ctx, x, prefix + ".fc1"))
            x = mb.add(x=x, y=linear(ctx, inner, prefix + ".fc2"))
        x = linear(ctx, x, "decoder_module.patch_out")  # [1, h*w, tf*sf*sf*3]
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        x = mb.reshape(x=x, shape=[h, w, tf, sf, sf * 3])
        x = mb.transpose(x=x, perm=[2, 0, 3, 1, 4])  # [tf, h, sf, w, sf*3]
        x = mb.reshape(x=x, shape=[1, tf, h * sf, w * sf, 3])
        frames = mb.clip(x=x, alpha=ctx.np_dtype(-1.0), beta=ctx.np_dtype(1.0), name="frames")
        func.set_outputs([frames])
    prog = Program()
    prog.add_function("main", func)
    return prog
