"""Write the Core ML packages and the manifest an app needs (docs/architecture.md, "Core ML").

    DIR/S2DiT.mlpackage        functions `denoise` and `write` sharing one set of weights
    DIR/VAEDecoder.mlpackage   one latent frame -> 4 pixel frames, causal history as state
                               (Wan VAE: functions `first` for latent frame 0 and `decode`)
    DIR/manifest.json          shapes, states, schedule, fps, the streaming loop in words
    DIR/prompt.f16             optional: text encoder output for a prompt (raw fp16)

Everything is written into a temporary folder beside DIR and renamed into place at the end, so
a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..attention import attention_kind
from ..errors import S2DiTError
from ..fsutil import atomic_dir, check_output_dir
from ..sampling import FEW_STEP
from . import emit
from ._ct import quiet_progress
from .emit import coreml_emitter, ct, dit_state_specs
from .shapes import StreamShapes
from .vae import (
    check_vae,
    decoder_programs,
    first_call_note,
    vae_functions,
    vae_state_specs,
)

COMPRESSIONS = ("none", "int8", "palette6", "palette4")
# int8 leaves these DiT weights in float16: the timestep MLP and the modulation projection feed
# every block's shift, scale and gate, and the head writes the velocity, so their rounding
# reaches everything (8% of the DiT's weights). On the built-in model: 31.0 dB -> 35.0 dB with
# symmetric int8, 38.5 dB with affine (tests/test_coreml.py, 35 dB gate).
DIT_INT8_FLOAT16 = (
    "time_embedding.0.weight",
    "time_embedding.2.weight",
    "time_projection.1.weight",
    "head.head.weight",
)
PRECISIONS = {"float16": "fp16", "float32": "fp32"}
DIT_PACKAGE = "S2DiT.mlpackage"
VAE_PACKAGE = "VAEDecoder.mlpackage"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: schedule.sampler ("few-step" or "euler", with sigmas)


def module_weights(module) -> dict[str, np.ndarray]:
    """Flat float32 numpy copies of an MLX module's parameters."""
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(module.parameters())}


def convert(prog):
    """A MIL program -> an (unloaded) ML program model for iOS 18; dtypes stay as emitted."""
    with quiet_progress():
        return ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            # The emitter chose every dtype (fp16 compute, fp32 sinusoids); leave them alone.
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
        )


def compress(model, mode: str, weight_threshold: int = 2048, int8_float16: tuple[str, ...] = ()):
    """Compress linear and conv weights: int8 per channel, or 6-/4-bit k-means palettes.

    int8 is affine (a zero point per channel: all 256 levels for lopsided rows) and leaves the
    weights named in `int8_float16` in float16.
    """
    if mode == "none":
        return model
    from coremltools.optimize import coreml as opt

    keep: dict = {}
    if mode == "int8":
        cfg = opt.OpLinearQuantizerConfig(
            mode="linear", dtype="int8", weight_threshold=weight_threshold
        )
        fn = opt.linear_quantize_weights
        # coremltools names each weight const after the weight, dots made underscores
        keep = {name.replace(".", "_"): None for name in int8_float16}
    elif mode in ("palette6", "palette4"):
        cfg = opt.OpPalettizerConfig(
            mode="kmeans", nbits=int(mode[-1]), weight_threshold=weight_threshold
        )
        fn = opt.palettize_weights
    else:
        raise S2DiTError(f"unknown compression {mode!r} (choose {', '.join(COMPRESSIONS)})")
    # Only weights feeding linear/conv ops: masks, RoPE matrices, modulations stay exact.
    config = opt.OptimizationConfig(
        op_type_configs={"linear": cfg, "conv": cfg}, op_name_configs=keep
    )
    with quiet_progress():
        return fn(model, config)


def package_size(path: Path) -> int:
    """Bytes on disk of a package folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _save_multifunction(parts: dict[str, Path], default: str, target: Path) -> None:
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), "main", name)
    desc.default_function_name = default
    with quiet_progress():
        # Identical weights in both functions are stored once (const deduplication).
        ct.utils.save_multifunction(desc, str(target))


def save_dit_package(
    args, weights, shapes: StreamShapes, target: Path, dtype: str, mode: str, threshold: int
) -> None:
    """Emit, convert, compress and save the two-function streaming DiT package."""
    work = target.with_name(target.name + ".parts")
    work.mkdir()
    try:
        parts = {}
        for name, write in (("denoise", False), ("write", True)):
            model = convert(emit.dit_function(args, weights, shapes, dtype, write))
            model = compress(model, mode, threshold, DIT_INT8_FLOAT16)
            parts[name] = work / f"{name}.mlpackage"
            model.save(str(parts[name]))
        _save_multifunction(parts, "denoise", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_vae_package(
    vae, weights, latent_height, latent_width, target: Path, dtype: str, mode: str, threshold: int
) -> None:
    """Emit, convert, compress and save the streaming VAE decoder package."""
    programs = decoder_programs(vae, weights, latent_height, latent_width, dtype)
    if list(programs) == ["main"]:
        model = convert(programs["main"])
        compress(model, mode, threshold).save(str(target))
        return
    work = target.with_name(target.name + ".parts")
    work.mkdir()
    try:
        parts = {}
        for name, prog in programs.items():
            parts[name] = work / f"{name}.mlpackage"
            compress(convert(prog), mode, threshold).save(str(parts[name]))
        # The last function is the one an app calls for every frame but the first.
        _save_multifunction(parts, list(programs)[-1], target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _feature(f) -> dict:
    """A spec input/output feature -> {name, shape, dtype}."""
    arr = f.type.multiArrayType
    names = {65552: "float16", 65568: "float32", 131104: "int32"}
    return {"name": f.name, "shape": list(arr.shape), "dtype": names.get(arr.dataType, "?")}


def describe_package(path: Path) -> dict:
    """Functions with their inputs and outputs, read back from the saved spec."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    desc = spec.description
    funcs = {}
    for fd in list(desc.functions) or [desc]:
        funcs[getattr(fd, "name", "") or "main"] = {
            "inputs": [_feature(f) for f in fd.input],
            "outputs": [_feature(f) for f in fd.output],
        }
    return {"spec_version": spec.specificationVersion, "functions": funcs}


def check_export(
    dit,
    vae,
    height: int,
    width: int,
    chunk_frames: int | None,
    window: int | None,
    sink: int | None,
    compress_mode: str,
    precision: str,
    spatial_factor: int = 8,
) -> StreamShapes:
    """Validate every export choice; raise S2DiTError with one line on the first bad one.

    vae None exports the DiT alone; `spatial_factor` then gives the VAE's pixel/latent ratio.
    """
    args = dit.args
    for kind in args.layers:
        coreml_emitter(kind)  # S2DiTError for a kind without one
    if compress_mode not in COMPRESSIONS:
        raise S2DiTError(
            f"unknown compression {compress_mode!r} (choose {', '.join(COMPRESSIONS)})"
        )
    if precision not in PRECISIONS:
        raise S2DiTError(f"unknown precision {precision!r} (choose {', '.join(PRECISIONS)})")
    if vae is not None:
        check_vae(vae)
    if args.patch_size[0] != 1:
        raise S2DiTError("Core ML export needs a temporal patch size of 1")
    if args.lcha_rope and (args.lcha_feature_dim or args.head_dim) != args.head_dim:
        raise S2DiTError("Core ML export: LCHA with RoPE needs lcha_feature_dim == head_dim")
    spatial_factor = vae.spatial_factor if vae is not None else spatial_factor
    multiple = spatial_factor * args.spatial_multiple()
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise S2DiTError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            raise S2DiTError(
                f"{name} {value} is not divisible by {multiple} (VAE factor x patch x SSA stride)"
            )
    frames = args.frames_per_chunk if chunk_frames is None else chunk_frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise S2DiTError(f"chunk frames must be a positive integer, got {frames!r}")
    softmax = uses_window(args)
    window = args.window if window is None else window
    sink = args.sink if sink is None else sink
    if softmax:
        if window is None:
            raise S2DiTError(
                "the model keeps every chunk (window null); a static Core ML export needs "
                "--window N (chunks, >= 2)"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise S2DiTError(f"window must be an integer >= 2 chunks, got {window!r}")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise S2DiTError(f"sink must be an integer >= 0, got {sink!r}")
    else:
        window, sink = 2, 0  # no softmax layer: nothing uses them
    return StreamShapes(
        frames=frames,
        latent_height=height // spatial_factor,
        latent_width=width // spatial_factor,
        window=window,
        sink=sink,
        text_len=args.text_len,
    )


def check_target(
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    overwrite: bool = True,
    flag: str | None = None,
) -> Path:
    """Refuse an export folder we may not write (fsutil's output rule); returns it.

    New or empty: fine. An earlier Core ML export (marker, or manifest.json with format
    s2dit-coreml) holding only exported files: replaced with `overwrite`. Anything else, or a
    folder that is, contains or lies inside the model folder, raises S2DiTError.
    """
    inputs = [("model folder", model)]
    return check_output_dir(out_dir, "coreml", inputs=inputs, overwrite=overwrite, flag=flag)


def uses_window(args) -> bool:
    """Whether any layer keeps a window of chunks (a softmax kind), so window and sink apply."""
    return any(attention_kind(k).softmax for k in args.layers)


def export_coreml(
    dit,
    vae,
    out_dir: str | os.PathLike,
    *,
    height: int,
    width: int,
    chunk_frames: int | None = None,
    window: int | None = None,
    sink: int | None = None,
    compress_mode: str = "none",
    precision: str = "float16",
    timesteps: list[float] | None = None,
    schedule: dict | None = None,
    fps: float = 16.0,
    guidance: float = 1.0,
    prompts: dict[str, np.ndarray] | None = None,
    weight_threshold: int = 2048,
    model_name: str = "",
    spatial_factor: int = 8,
) -> dict:
    """Export a DiT + VAE decoder (vae None: the DiT alone) to DIR; returns the manifest.

    `prompts` maps a file stem ("prompt", "negative_prompt") to text encoder output [1, L, D],
    saved zero-padded to text_len as raw little-endian fp16.
    """
    shapes = check_export(
        dit,
        vae,
        height,
        width,
        chunk_frames,
        window,
        sink,
        compress_mode,
        precision,
        spatial_factor,
    )
    schedule = schedule or {}
    sampler = describe_sampler(schedule.get("sampler", FEW_STEP))  # before any package is built
    out_dir = check_target(out_dir)
    args = dit.args
    dtype = PRECISIONS[precision]
    with atomic_dir(out_dir, "coreml") as tmp:
        t0 = time.perf_counter()
        save_dit_package(
            args,
            module_weights(dit),
            shapes,
            tmp / DIT_PACKAGE,
            dtype,
            compress_mode,
            weight_threshold,
        )
        t_dit = time.perf_counter() - t0
        if vae is not None:
            save_vae_package(
                vae,
                module_weights(vae),
                shapes.latent_height,
                shapes.latent_width,
                tmp / VAE_PACKAGE,
                dtype,
                compress_mode,
                weight_threshold,
            )
        t_vae = time.perf_counter() - t0 - t_dit
        self_check(dit, vae, shapes, tmp)
        prompt_files = {}
        for stem, emb in (prompts or {}).items():
            from .verify import pad_context

            arr = pad_context(np.asarray(emb, np.float32), args.text_len).astype("<f2")
            (tmp / f"{stem}.f16").write_bytes(arr.tobytes())
            prompt_files[stem] = {
                "file": f"{stem}.f16",
                "shape": list(arr.shape),
                "dtype": "float16",
            }
        manifest = build_manifest(
            height,
            width,
            dit,
            vae,
            shapes,
            tmp,
            precision,
            compress_mode,
            timesteps or [],
            schedule,
            sampler,
            fps,
            guidance,
            prompt_files,
            model_name,
        )
        manifest["export_seconds"] = {"dit": round(t_dit, 3), "vae_decoder": round(t_vae, 3)}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


def expected_structure(dit, vae, shapes: StreamShapes) -> dict[str, tuple[dict, dict]]:
    """Package file -> (state name -> shape, function -> states it writes)."""
    dit_states = {s.name: s.shape for s in dit_state_specs(dit.args, shapes)}
    out = {DIT_PACKAGE: (dit_states, {"denoise": set(), "write": set(dit_states)})}
    if vae is not None:
        specs = vae_state_specs(vae, shapes.latent_height, shapes.latent_width)
        vae_states = {s.name: s.shape for s in specs}
        out[VAE_PACKAGE] = (vae_states, {f: set(vae_states) for f in vae_functions(vae)})
    return out


def self_check(dit, vae, shapes: StreamShapes, folder: Path) -> None:
    """Run the structural checks on the saved packages; a failure is an exporter bug."""
    from .check import check_package

    for file, (states, writes) in expected_structure(dit, vae, shapes).items():
        problems = check_package(folder / file, states, writes)
        if problems:
            raise S2DiTError(f"Core ML export self-check failed for {file}: {problems[0]}")


def describe_sampler(name: str) -> dict[str, Any]:
    """How the app advances x after each denoise call: the schedule's rule and the loop line."""
    if name == FEW_STEP:
        return {
            "rule": {"renoise": "x = (1 - s_next) * x0 + s_next * noise, s_next = t_next / 1000"},
            "step": "if a next t: x = (1 - s) * x0 + s * noise with s = t_next / 1000",
        }
    if name == "euler":
        return {
            "rule": {"update": "v = (x - x0) * 1000 / t; x = x + (sigmas[i + 1] - sigmas[i]) * v"},
            "step": "x = x + (sigmas[i + 1] - sigmas[i]) * (x - x0) * 1000 / t; after the last "
            "t, x0 = x",
        }
    raise S2DiTError(f"the Core ML loop runs the few-step or Euler sampler, not {name!r}")


def build_manifest(
    height: int,
    width: int,
    dit,
    vae,
    shapes: StreamShapes,
    folder: Path,
    precision: str,
    compress_mode: str,
    timesteps: list[float],
    schedule: dict,
    sampler: dict[str, Any],
    fps: float,
    guidance: float,
    prompt_files: dict,
    model_name: str,
) -> dict:
    """Everything an app needs to drive the packages, as a JSON-ready dict.

    `sampler` is describe_sampler's answer for schedule["sampler"].
    """
    args = dit.args
    dit_states = [s.to_dict() for s in dit_state_specs(args, shapes)]
    vae_states = [
        s.to_dict()
        for s in (vae_state_specs(vae, shapes.latent_height, shapes.latent_width) if vae else [])
    ]
    softmax = uses_window(args)
    return {
        "format": "s2dit-coreml",
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "coremltools": ct.__version__,
        "minimum_deployment_target": "iOS18",
        "precision": precision,
        "compression": compress_mode,
        "layers": list(args.layers),
        "video": {
            "height": height,
            "width": width,
            "fps": fps,
            "pixel_frames_per_latent_frame": vae.temporal_factor if vae else 4,
            "first_latent_frame_pixel_frames": 1,
        },
        "latent": {
            "channels": args.in_dim,
            "height": shapes.latent_height,
            "width": shapes.latent_width,
            "frames_per_chunk": shapes.frames,
        },
        "schedule": {
            "timesteps": [float(t) for t in timesteps],
            **schedule,
            "guidance": guidance,
            "sigma": "t / 1000",
            **sampler["rule"],
        },
        "streaming": {
            "window": shapes.window if softmax else None,
            "sink": shapes.sink if softmax else None,
            "slots": shapes.slots if softmax else 0,
            "schedule": shapes.schedule.to_dict() if softmax else None,
            "chunk_input": "0-based index of the chunk being generated (RoPE offset, ring slot)",
            "states_start": "zero",
            "lcha_state": "running means over all written tokens (not sums: fp16 safe)",
        },
        "text": {
            "text_len": shapes.text_len,
            "text_dim": args.text_dim,
            "context": "text encoder output, zero-padded to text_len",
            "prompt_files": prompt_files,
        },
        "packages": {
            "dit": {
                "file": DIT_PACKAGE,
                **describe_package(folder / DIT_PACKAGE),
                "states": dit_states,
                "state_bytes": sum(s["bytes"] for s in dit_states),
                "size_bytes": package_size(folder / DIT_PACKAGE),
            },
            "vae_decoder": None
            if vae is None
            else {
                "file": VAE_PACKAGE,
                **describe_package(folder / VAE_PACKAGE),
                "type": vae.config.type,
                "states": vae_states,
                "state_bytes": sum(s["bytes"] for s in vae_states),
                "size_bytes": package_size(folder / VAE_PACKAGE),
                "first_call": first_call_note(vae),
            },
        },
        "loop": [
            "state = dit.makeState(); zero it; vaeState = vae.makeState(); zero it",
            "for chunk c = 0, 1, ...: x = noise",
            "  for each t = schedule.timesteps[i]: x0 = dit.denoise(latents=x, t, context, "
            "chunk=c).x0; " + sampler["step"],
            "  dit.write(latents=x0, t=0, context, chunk=c)  # updates the states",
            "  for each latent frame i of x0: frames = vae(latents=x0[:, i:i+1]).frames"
            + (
                " (function `first` for the video's latent frame 0, `decode` after)"
                if vae is not None and "first" in vae_functions(vae)
                else ""
            ),
            "with guidance != 1: a second state for the negative prompt; "
            "v = v_neg + g * (v - v_neg); x0 = x - t/1000 * v",
        ],
    }
