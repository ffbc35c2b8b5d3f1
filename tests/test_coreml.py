"""Core ML export: saved packages, re-loaded and run by our numpy interpreter, match MLX.

A tiny random S2DiT with an lcha/ssa/full sandwich (window 3 chunks, 1 sink, so the KV ring
buffer wraps within the 5 streamed chunks) and the patch VAE decoder; tiny random Wan VAE
decoders (2.1 and 2.2) streamed over 5 latent frames. Gates (docs/architecture.md, "Core ML export"):
PSNR (peak = max |MLX|) >= 60 dB for the fp32 package, >= 50 dB for fp16, per chunk, states
carried across calls. Compressed packages (random weights, so no quality gate yet) must export,
pass the structural checks and run; their PSNR is printed and bounded loosely.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("coremltools")

from s2dit_mlx.attention.lcha import depthwise_causal_conv3d, softplus  # noqa: E402
from s2dit_mlx.coreml import verify  # noqa: E402
from s2dit_mlx.coreml._ct import quiet_progress  # noqa: E402
from s2dit_mlx.coreml.check import check_package  # noqa: E402
from s2dit_mlx.coreml.cli import main as export_main  # noqa: E402
from s2dit_mlx.coreml.emit import (  # noqa: E402
    Ctx,
    Function,
    Program,
    apply_rope,
    ct,
    mb,
    rope_tables,
    types,
)
from s2dit_mlx.coreml.export import (  # noqa: E402
    DIT_INT8_FLOAT16,
    DIT_PACKAGE,
    MANIFEST,
    VAE_PACKAGE,
    convert,
    describe_sampler,
    expected_structure,
    export_coreml,
)
from s2dit_mlx.coreml.interpret import Package  # noqa: E402
from s2dit_mlx.errors import S2DiTError  # noqa: E402
from s2dit_mlx.generation import Sampler, SeededNoise, stream  # noqa: E402
from s2dit_mlx.models import layers  # noqa: E402
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig  # noqa: E402
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT  # noqa: E402
from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig  # noqa: E402
from s2dit_mlx.sampling import FlowEulerSolver  # noqa: E402

TIMESTEPS = [1000.0, 937.5, 833.3, 625.0]
CHUNKS = 5
HEIGHT, WIDTH = 32, 64  # pixels: latent 4 x 8, tokens 2 x 4 per frame, SSA 1 x 2
DIT = dict(
    in_dim=4,
    out_dim=4,
    dim=32,
    ffn_dim=64,
    freq_dim=32,
    text_dim=16,
    num_heads=2,
    layers=["lcha", "ssa", "full"],
    text_len=16,
    frames_per_chunk=2,
    window=3,
    sink=1,
)
VAE = dict(
    z_dim=4,
    hidden_dim=16,
    mlp_blocks=1,
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[0.5, 1.5, 1.0, 2.0],
)


def randomise(module, seed: int) -> None:
    """Perturb every parameter (zero-initialised biases and gates included)."""
    key = mx.random.key(seed)
    params = []
    for name, p in tree_flatten(module.parameters()):
        std = float(mx.std(p)) if p.size > 1 else 0.0
        key, sub = mx.random.split(key)
        noise = mx.random.normal(p.shape, key=sub)
        params.append((name, p + noise * (0.5 * std if std > 0 else 0.2)))
    module.load_weights(params, strict=True)
    mx.eval(module.parameters())


@pytest.fixture(scope="module")
def tiny():
    """(dit, vae, text context [1, text_len, text_dim], noise, MLX chunks, MLX frames)."""
    mx.random.seed(3)
    dit = S2DiT(ModelArgs(**DIT))
    vae = PatchVAE(PatchVAEConfig(**VAE))
    randomise(dit, 1)
    randomise(vae, 2)
    rng = np.random.default_rng(4)
    context = verify.pad_context(rng.standard_normal((1, 11, 16)).astype(np.float32), 16)
    noise = verify.make_noise(CHUNKS, len(TIMESTEPS), (1, 2, 4, 8, 4), seed=5)
    chunks = list(verify.mlx_stream(dit, context, noise, TIMESTEPS))
    frames = list(verify.mlx_vae_stream(vae, chunks))
    return dit, vae, context, noise, chunks, frames


_EXPORTS: dict = {}


def exported(tiny, tmp_path_factory, precision: str, compress: str = "none") -> Path:
    """Export once per (precision, compression) for the whole module."""
    key = (precision, compress)
    if key not in _EXPORTS:
        dit, vae = tiny[:2]
        out = tmp_path_factory.mktemp("coreml") / f"{precision}-{compress}"
        export_coreml(
            dit,
            vae,
            out,
            height=HEIGHT,
            width=WIDTH,
            compress_mode=compress,
            precision=precision,
            timesteps=TIMESTEPS,
            fps=8.0,
            weight_threshold=256,
        )
        _EXPORTS[key] = out
    return _EXPORTS[key]


def stream_psnrs(folder: Path, tiny, state=None) -> tuple[list[float], list[float]]:
    """Per-chunk PSNR of the DiT package and of the VAE decoder package against MLX."""
    _, _, context, noise, chunks, frames = tiny
    pkg = Package(folder / DIT_PACKAGE)
    got = list(verify.package_stream(pkg, context, noise, TIMESTEPS, state=state))
    vae_pkg = Package(folder / VAE_PACKAGE)
    got_frames = list(verify.package_vae_stream(vae_pkg, chunks))
    dit_psnr = [verify.psnr(r, g) for r, g in zip(chunks, got, strict=True)]
    vae_psnr = [verify.psnr(r, g) for r, g in zip(frames, got_frames, strict=True)]
    return dit_psnr, vae_psnr


# ------------------------------------------------------------------------------------------------
# Parity of saved packages over a stream of chunks


@pytest.mark.parametrize("precision, gate", [("float32", 60.0), ("float16", 50.0)])
def test_package_matches_mlx_over_streamed_chunks(tiny, tmp_path_factory, precision, gate):
    folder = exported(tiny, tmp_path_factory, precision)
    dit_psnr, vae_psnr = stream_psnrs(folder, tiny)
    print(f"{precision}: DiT PSNR per chunk {np.round(dit_psnr, 1)}, VAE {np.round(vae_psnr, 1)}")
    assert len(dit_psnr) == CHUNKS
    assert min(dit_psnr) >= gate
    assert min(vae_psnr) >= gate
    # The VAE stream gives 1 + 4k frames per 1 + k latent frames.
    assert tiny[5][0].shape[1] == 1 + 4 * (DIT["frames_per_chunk"] - 1)


def test_package_without_sink_matches_mlx(tiny, tmp_path):
    """sink = 0 (the built-in model's): the ring holds only recent chunks, as MLX's cache does."""
    dit, _, context, noise, with_sink = tiny[:5]
    dit.args.sink = 0
    try:
        reference = list(verify.mlx_stream(dit, context, noise, TIMESTEPS))
        export_coreml(
            dit,
            None,
            tmp_path / "nosink",
            height=HEIGHT,
            width=WIDTH,
            precision="float32",
            timesteps=TIMESTEPS,
            fps=8.0,
            spatial_factor=8,
        )
    finally:
        dit.args.sink = DIT["sink"]
    pkg = Package(tmp_path / "nosink" / DIT_PACKAGE)
    got = list(verify.package_stream(pkg, context, noise, TIMESTEPS))
    psnrs = [verify.psnr(r, g) for r, g in zip(reference, got, strict=True)]
    assert min(psnrs) >= 60.0, psnrs
    # From chunk 3 on, the window no longer reaches chunk 0, so the stream differs from sink 1's.
    assert np.allclose(reference[2], with_sink[2], atol=1e-5)
    assert not np.allclose(reference[3], with_sink[3], atol=1e-3)


def test_int8_package_exports_and_runs(tiny, tmp_path_factory):
    folder = exported(tiny, tmp_path_factory, "float16", "int8")
    dit_psnr, vae_psnr = stream_psnrs(folder, tiny)
    print(f"int8 (random weights): DiT PSNR {np.round(dit_psnr, 1)}, VAE {np.round(vae_psnr, 1)}")
    # Random tiny weights, no quality gate (35 dB applies to a trained model); it must be sane.
    assert min(dit_psnr) > 20 and min(vae_psnr) > 20
    spec = ct.models.MLModel(str(folder / DIT_PACKAGE), skip_model_load=True).get_spec()
    ops = {
        o.outputs[0].name: o
        for f in spec.mlProgram.functions.values()
        for o in f.block_specializations[f.opset].operations
        if o.outputs
    }
    # Affine int8 (a zero point per channel) on the blocks; the timestep MLP, the modulation
    # projection and the head stay float16.
    quantised = ops["blocks_0_ffn_0_weight_quantized"]
    assert quantised.type == "constexpr_blockwise_shift_scale" and "offset" in quantised.inputs
    for name in DIT_INT8_FLOAT16:
        assert ops[name.replace(".", "_")].type == "const", name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["palette6", "palette4"])
def test_palettised_package_exports_and_runs(tiny, tmp_path_factory, mode):
    folder = exported(tiny, tmp_path_factory, "float16", mode)
    dit_psnr, vae_psnr = stream_psnrs(folder, tiny)
    print(f"{mode} (random weights): DiT PSNR {np.round(dit_psnr, 1)}, VAE {np.round(vae_psnr, 1)}")
    assert min(dit_psnr) > 10 and min(vae_psnr) > 10


def test_state_is_carried_and_needed(tiny, tmp_path_factory):
    """Restarting from a fresh state for each chunk breaks the gate: the state matters."""
    _, _, context, noise, chunks, _ = tiny
    pkg = Package(exported(tiny, tmp_path_factory, "float32") / DIT_PACKAGE)
    psnrs = []
    for c in range(1, CHUNKS):
        state = pkg.make_state()
        # Chunk index c without the earlier chunks written: what forgetting the state gives.
        shifted = [noise[c]]
        got = None
        for x0 in verify.package_stream(pkg, context, shifted, TIMESTEPS, state=state):
            got = x0
        psnrs.append(verify.psnr(chunks[c], got))
    assert max(psnrs) < 60.0


def corrupt_weight(folder: Path, name_part: str) -> str:
    """Flip the sign of one weight tensor in the saved DiT package's blob file, in place."""
    model = ct.models.MLModel(str(folder / DIT_PACKAGE), skip_model_load=True)
    spec = model.get_spec()
    for func in spec.mlProgram.functions.values():
        for o in func.block_specializations[func.opset].operations:
            val = o.attributes.get("val") if o.type == "const" else None
            if val is None or val.WhichOneof("value") != "blobFileValue":
                continue
            if name_part in o.outputs[0].name:
                blob = Path(model.weights_dir) / "weight.bin"
                raw = bytearray(blob.read_bytes())
                header = val.blobFileValue.offset
                sentinel, _, size, data_offset = struct.unpack_from("<IIQQ", raw, header)
                assert sentinel == 0xDEADBEEF
                data = np.frombuffer(raw, np.float32, size // 4, data_offset).copy()
                raw[data_offset : data_offset + size] = (-data).tobytes()
                blob.write_bytes(bytes(raw))
                return o.outputs[0].name
    raise AssertionError(f"no blob weight named like {name_part}")


def test_negative_control_corrupted_weight_fails_gate(tiny, tmp_path_factory, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(exported(tiny, tmp_path_factory, "float32"), folder)
    corrupt_weight(folder, "blocks_2_self_attn_v_weight")
    dit_psnr, _ = stream_psnrs(folder, tiny)
    assert min(dit_psnr) < 60.0


# ------------------------------------------------------------------------------------------------
# Structure of every saved package


def all_exports() -> list[tuple]:
    return list(_EXPORTS.items())


def test_structure_of_saved_packages(tiny, tmp_path_factory):
    exported(tiny, tmp_path_factory, "float32")
    exported(tiny, tmp_path_factory, "float16")
    exported(tiny, tmp_path_factory, "float16", "int8")
    dit, vae = tiny[:2]
    shapes_src = json.loads((_EXPORTS[("float32", "none")] / MANIFEST).read_text())
    assert shapes_src["minimum_deployment_target"] == "iOS18"
    from s2dit_mlx.coreml.export import check_export

    shapes = check_export(dit, vae, HEIGHT, WIDTH, None, None, None, "none", "float16")
    for key, folder in all_exports():
        for file, (states, writes) in expected_structure(dit, vae, shapes).items():
            problems = check_package(folder / file, states, writes)
            assert problems == [], (key, file, problems)
        manifest = json.loads((folder / MANIFEST).read_text())
        dit_m = manifest["packages"]["dit"]
        assert set(dit_m["functions"]) == {"denoise", "write"}
        assert dit_m["spec_version"] >= 9
        assert {s["name"] for s in dit_m["states"]} == set(
            expected_structure(dit, vae, shapes)[DIT_PACKAGE][0]
        )
        assert all(s["dtype"] == "fp16" for s in dit_m["states"])
        assert dit_m["state_bytes"] == sum(2 * np.prod(s["shape"]) for s in dit_m["states"])
        assert manifest["schedule"]["timesteps"] == TIMESTEPS
        assert manifest["streaming"] == {
            **manifest["streaming"],
            "window": 3,
            "sink": 1,
            "slots": 3,
        }


def _save(prog, path: Path, passes: bool = True) -> Path:
    if passes:
        convert(prog).save(str(path))
        return path
    # No optimisation passes: the default ones would repair the bad programs below.
    with quiet_progress():
        ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
            pass_pipeline=ct.PassPipeline.EMPTY,
        ).save(str(path))
    return path


def test_structure_check_catches_bad_programs(tmp_path):
    """The checker must fail: a second read after a write, and an output that is a state source."""
    specs = {
        "x": mb.placeholder(shape=(1, 4), dtype=types.fp16),
        "s": mb.state_tensor_placeholder(shape=(1, 4), dtype=types.fp16),
    }
    with Function(specs, opset_version=ct.target.iOS18) as func:
        x, s = func.inputs["x"], func.inputs["s"]
        new = mb.add(x=mb.read_state(input=s), y=x)
        mb.coreml_update_state(state=s, value=new)
        other = mb.mul(x=x, y=np.float16(2.0))
        again = mb.read_state(input=s)  # a fresh read long after the write
        func.set_outputs([mb.add(x=again, y=other, name="out")])
    prog = Program()
    prog.add_function("main", func)
    problems = check_package(
        _save(prog, tmp_path / "bad.mlpackage", passes=False), {"s": (1, 4)}, {"main": {"s"}}
    )
    assert any("read again" in p for p in problems), problems

    specs = {
        "x": mb.placeholder(shape=(1, 4), dtype=types.fp16),
        "s": mb.state_tensor_placeholder(shape=(1, 4), dtype=types.fp16),
    }
    with Function(specs, opset_version=ct.target.iOS18) as func:
        x, s = func.inputs["x"], func.inputs["s"]
        new = mb.add(x=mb.read_state(input=s), y=x, name="out")
        mb.coreml_update_state(state=s, value=new)
        func.set_outputs([new])
    prog = Program()
    prog.add_function("main", func)
    problems = check_package(
        _save(prog, tmp_path / "bad2.mlpackage", passes=False), {"s": (1, 4)}, {"main": {"s"}}
    )
    assert any("source" in p or "update of state" in p for p in problems), problems
    # And an expected write that is missing is reported.
    assert any(
        "expected" in p
        for p in check_package(tmp_path / "bad2.mlpackage", {"s": (1, 4)}, {"main": set()})
    )


# ------------------------------------------------------------------------------------------------
# The interpreter, op by op against numpy / MLX


def _run_ops(tmp_path, inputs: dict, build) -> dict:
    """Build a one-function program over fp32 inputs, save it, run it in the interpreter."""
    specs = {k: mb.placeholder(shape=v.shape, dtype=types.fp32) for k, v in inputs.items()}
    with Function(specs, opset_version=ct.target.iOS18) as func:
        outs = build(func.inputs)
        func.set_outputs([mb.identity(x=v, name=k) for k, v in outs.items()])
    prog = Program()
    prog.add_function("main", func)
    path = tmp_path / "ops.mlpackage"
    with quiet_progress():
        ct.convert(
            prog,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
            pass_pipeline=ct.PassPipeline.EMPTY,
        ).save(str(path))
    return Package(path).predict(inputs)


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))
    assert err <= tol, err


def test_interpreter_elementwise_and_norm_ops(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    y = rng.standard_normal((2, 3, 8)).astype(np.float32)
    g = rng.standard_normal(8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    w = rng.standard_normal((5, 8)).astype(np.float32)

    def build(v):
        x, y = v["x"], v["y"]
        return {
            "add": mb.add(x=x, y=y),
            "sub": mb.sub(x=x, y=y),
            "mul": mb.mul(x=x, y=y),
            "div": mb.real_div(x=x, y=mb.add(x=mb.abs(x=y), y=1.0)),
            "max": mb.maximum(x=x, y=y),
            "min": mb.minimum(x=x, y=y),
            "rsqrt": mb.rsqrt(x=mb.abs(x=x), epsilon=0.5),
            "gelu": mb.gelu(x=x, mode="TANH_APPROXIMATION"),
            "silu": mb.silu(x=x),
            "sigmoid": mb.sigmoid(x=x),
            "softplus": mb.softplus(x=mb.mul(x=x, y=30.0)),
            "cos": mb.cos(x=x),
            "sin": mb.sin(x=x),
            "clip": mb.clip(x=x, alpha=-0.5, beta=0.5),
            "ln": mb.layer_norm(x=x, axes=[-1], gamma=g, beta=b, epsilon=1e-5),
            "ln_plain": mb.layer_norm(x=x, axes=[-1], epsilon=1e-6),
            "mean": mb.reduce_mean(x=x, axes=[-1], keep_dims=True),
            "sum": mb.reduce_sum(x=x, axes=[0, 2]),
            "linear": mb.linear(x=x, weight=w, bias=b[:5]),
            "matmul_t": mb.matmul(x=x, y=y, transpose_y=True),
            "matmul_tx": mb.matmul(x=x, y=y, transpose_x=True),
            "half": mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"),
        }

    out = _run_ops(tmp_path, {"x": x, "y": y}, build)
    mxx, mxy = mx.array(x), mx.array(y)
    _close(out["add"], x + y)
    _close(out["sub"], x - y)
    _close(out["mul"], x * y)
    _close(out["div"], x / (np.abs(y) + 1))
    _close(out["max"], np.maximum(x, y))
    _close(out["min"], np.minimum(x, y))
    _close(out["rsqrt"], 1 / np.sqrt(np.abs(x) + 0.5))
    _close(out["gelu"], nn.gelu_approx(mxx))
    _close(out["silu"], nn.silu(mxx))
    _close(out["sigmoid"], mx.sigmoid(mxx))
    _close(out["softplus"], softplus(mxx * 30))
    _close(out["cos"], np.cos(x))
    _close(out["sin"], np.sin(x))
    _close(out["clip"], np.clip(x, -0.5, 0.5))
    _close(out["ln"], mx.fast.layer_norm(mxx, mx.array(g), mx.array(b), 1e-5))
    _close(out["ln_plain"], mx.fast.layer_norm(mxx, None, None, 1e-6))
    _close(out["mean"], x.mean(-1, keepdims=True))
    _close(out["sum"], x.sum((0, 2)))
    _close(out["linear"], x @ w.T + b[:5])
    _close(out["matmul_t"], mxx @ mxy.swapaxes(-1, -2))
    _close(out["matmul_tx"], mxx.swapaxes(-1, -2) @ mxy)
    _close(out["half"], x.astype(np.float16), tol=0)


def test_interpreter_shape_and_index_ops(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    u = rng.standard_normal((2, 3, 2, 5)).astype(np.float32)
    c = np.array([7.0], np.float32)

    def build(v):
        x, u = v["x"], v["u"]
        ci = mb.cast(x=v["c"], dtype="int32")
        begin = mb.concat(
            values=[np.zeros(2, np.int32), mb.mod(x=ci, y=np.int32(3)), np.zeros(1, np.int32)],
            axis=0,
        )
        end = mb.add(x=begin, y=np.array([2, 3, 2, 5], np.int32))
        return {
            "transpose": mb.transpose(x=x, perm=[0, 2, 1, 3]),
            "reshape": mb.reshape(x=x, shape=[6, -1]),
            "concat": mb.concat(values=[x, u], axis=2),
            "slice": mb.slice_by_index(x=x, begin=[0, 1, 1, 0], end=[2, 3, 4, 5]),
            "tile": mb.tile(x=u, reps=[1, 1, 2, 1]),
            "expand": mb.expand_dims(x=u, axes=[-1]),
            "update": mb.slice_update(x=x, update=u, begin=begin, end=end),
            "less": mb.cast(x=mb.less(x=np.arange(10, dtype=np.int32), y=ci), dtype="fp32"),
            "minmod": mb.cast(
                x=mb.minimum(
                    x=ci,
                    y=mb.add(
                        x=mb.mod(
                            x=mb.maximum(x=mb.sub(x=ci, y=np.int32(1)), y=np.int32(0)),
                            y=np.int32(2),
                        ),
                        y=np.int32(1),
                    ),
                ),
                dtype="fp32",
            ),
        }

    out = _run_ops(tmp_path, {"x": x, "u": u, "c": c}, build)
    _close(out["transpose"], x.transpose(0, 2, 1, 3))
    _close(out["reshape"], x.reshape(6, -1))
    _close(out["concat"], np.concatenate([x, u], 2))
    _close(out["slice"], x[:, 1:3, 1:4])
    _close(out["tile"], np.tile(u, (1, 1, 2, 1)))
    _close(out["expand"], u[..., None])
    ref = x.copy()
    ref[:, :, 1:3] = u  # 7 mod 3 = 1
    _close(out["update"], ref)
    _close(out["less"], (np.arange(10) < 7).astype(np.float32))
    _close(out["minmod"], np.array([min(7, 1 + (6 % 2))], np.float32))


def test_interpreter_attention_and_conv_ops(tmp_path):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    mask = np.where(rng.random((1, 1, 1, 7)) < 0.3, -30000.0, 0.0).astype(np.float32)
    mask[..., -1] = 0.0
    x = rng.standard_normal((1, 6, 4, 5, 3)).astype(np.float32)  # [B, C, T, H, W]
    dw = rng.standard_normal((6, 1, 2, 3, 2)).astype(np.float32)  # even kernel width
    full = rng.standard_normal((5, 6, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)

    def build(t):
        return {
            "sdpa": mb.scaled_dot_product_attention(
                query=t["q"], key=t["k"], value=t["v"], attn_mask=t["mask"]
            ),
            "dwconv": mb.conv(
                x=t["x"],
                weight=dw,
                bias=bias,
                strides=[1, 1, 1],
                pad_type="custom",
                pad=[0, 0, 1, 1, 0, 1],
                dilations=[1, 1, 1],
                groups=6,
            ),
            "conv": mb.conv(
                x=t["x"],
                weight=full,
                strides=[1, 1, 1],
                pad_type="custom",
                pad=[0, 0, 1, 1, 1, 1],
                dilations=[1, 1, 1],
                groups=1,
            ),
        }

    out = _run_ops(tmp_path, {"q": q, "k": k, "v": v, "mask": mask, "x": x}, build)
    ref = mx.fast.scaled_dot_product_attention(
        mx.array(q), mx.array(k), mx.array(v), scale=8**-0.5, mask=mx.array(mask)
    )
    _close(out["sdpa"], ref)
    # Depthwise: our MLX causal conv (its input already holds the kt - 1 past frames).
    x_cl = mx.array(x.transpose(0, 2, 3, 4, 1))  # [B, T, H, W, C]
    ref = depthwise_causal_conv3d(x_cl, mx.array(dw[:, 0])) + mx.array(bias)
    _close(out["dwconv"], np.array(ref).transpose(0, 4, 1, 2, 3))
    padded = mx.pad(x_cl, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
    ref = mx.conv3d(padded, mx.array(full.transpose(0, 2, 3, 4, 1)))
    _close(out["conv"], np.array(ref).transpose(0, 4, 1, 2, 3))


def test_interpreter_compressed_weight_ops(tmp_path):
    """constexpr ops: the interpreter's dequantised weights equal coremltools' own decoding."""
    from coremltools.optimize import coreml as opt

    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    specs = {"x": mb.placeholder(shape=(1, 32), dtype=types.fp32)}
    with Function(specs, opset_version=ct.target.iOS18) as func:
        func.set_outputs([mb.linear(x=func.inputs["x"], weight=w, name="y")])
    prog = Program()
    prog.add_function("main", func)
    base = convert(prog)
    x = rng.standard_normal((1, 32)).astype(np.float32)
    for name, fn, cfg in (
        (
            "int8",
            opt.linear_quantize_weights,
            opt.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=1),
        ),
        ("lut4", opt.palettize_weights, opt.OpPalettizerConfig(nbits=4, weight_threshold=1)),
    ):
        with quiet_progress():
            model = fn(base, opt.OptimizationConfig(global_config=cfg))
        path = tmp_path / f"{name}.mlpackage"
        model.save(str(path))
        pkg = Package(path)
        func = pkg.program.functions["main"]
        const_op = next(o for o in func.operations if o.op_type.startswith("constexpr"))
        from s2dit_mlx.coreml.interpret import OPS

        args = {k: v.val for k, v in const_op.inputs.items()}
        ours = OPS[const_op.op_type](args)
        theirs = const_op.materialized_val_inference()
        _close(ours, theirs, tol=0)
        _close(pkg.predict({"x": x})["y"], x @ np.asarray(theirs, np.float32).T)
        # RMS error of the decoded weight (weights ~ N(0, 1)): int8 ~0.01, 16-entry palette ~0.1.
        assert np.sqrt(np.mean((ours - w) ** 2)) < (0.02 if name == "int8" else 0.2)


def test_emitted_rope_matches_mlx(tmp_path):
    """RoPE emitted with the chunk index as an input equals MLX's table at that frame offset."""
    args = ModelArgs(**DIT)
    grid = (2, 2, 4)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 16, args.head_dim)).astype(np.float32)
    specs = {
        "x": mb.placeholder(shape=x.shape, dtype=types.fp32),
        "chunk": mb.placeholder(shape=(1,), dtype=types.int32),
    }
    with Function(specs, opset_version=ct.target.iOS18) as func:
        ctx = Ctx(dtype="fp32", weights={}, write=False, chunk=func.inputs["chunk"])
        func.set_outputs(
            [
                mb.identity(
                    x=apply_rope(ctx, func.inputs["x"], rope_tables(ctx, args, grid)), name="y"
                )
            ]
        )
    prog = Program()
    prog.add_function("main", func)
    pkg = Package(_save(prog, tmp_path / "rope.mlpackage"))
    for chunk in (0, 3, 50):
        got = pkg.predict({"x": x, "chunk": np.array([chunk], np.int32)})["y"]
        cos, sin = layers.rope_table(args.head_dim, grid, chunk * grid[0])
        ref = layers.apply_rope(mx.array(x.transpose(0, 2, 1, 3)), cos, sin)
        _close(got, np.array(ref).transpose(0, 2, 1, 3), tol=1e-5)


# ------------------------------------------------------------------------------------------------
# CLI


def _nothing_written(out: Path) -> bool:
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return not out.exists() and not leftovers


def test_cli_bad_inputs_one_line_and_nothing_written(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ios"
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(tiny_model_dir), "--height", "33"], "not divisible"),
        (["--model", str(tiny_model_dir), "--window", "1"], "window"),
        (["--model", str(tiny_model_dir), "--chunk-frames", "0"], "chunk frames"),
        (["--model", str(tiny_model_dir), "--compress", "int3"], "invalid choice"),
    ]
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dit"]["layers"] = ["lcha", "mamba", "full"]
    (bad / "config.json").write_text(json.dumps(cfg))
    cases.append((["--model", str(bad)], "block type 'mamba'"))
    for argv, needle in cases:
        rc = export_main(["coreml", *argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
        assert _nothing_written(out)


def test_export_refuses_unsupported_vae_and_existing_foreign_folder(tiny, tmp_path):
    dit, vae = tiny[:2]

    class OtherVAE:
        config = type("Cfg", (), {"type": "wan21"})()
        spatial_factor = 8

    with pytest.raises(S2DiTError, match="skip-vae"):
        export_coreml(dit, OtherVAE(), tmp_path / "a", height=HEIGHT, width=WIDTH)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(S2DiTError, match="not an s2dit-mlx Core ML export"):
        export_coreml(dit, vae, tmp_path / "b", height=HEIGHT, width=WIDTH)
    assert (tmp_path / "b" / "keep.txt").exists()
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_cli_export_writes_packages_and_manifest(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ios"
    rc = export_main(
        [
            "coreml",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--prompt",
            "a red fox",
            "--compress",
            "int8",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["compression"] == "int8" and manifest["precision"] == "float16"
    assert manifest["video"] == {**manifest["video"], "height": 32, "width": 64, "fps": 8.0}
    prompt = manifest["text"]["prompt_files"]["prompt"]
    assert (out / prompt["file"]).stat().st_size == 2 * np.prod(prompt["shape"])
    assert (out / DIT_PACKAGE).is_dir() and (out / VAE_PACKAGE).is_dir()
    # The tiny folder samples with UniPC (the default solver): the app loop is Euler.
    euler = FlowEulerSolver(2, 5.0)
    schedule = manifest["schedule"]
    assert schedule["sampler"] == "euler" and schedule["timesteps"] == euler.timesteps.tolist()
    assert schedule["sigmas"] == euler.sigmas.tolist() and "renoise" not in schedule
    assert manifest["format_version"] == 2


def test_manifest_euler_rule_reproduces_mlx_streaming(tiny):
    """The manifest's Euler update, fed only denoise's x0, gives MLX's streaming Euler chunks."""
    dit, context = tiny[0], mx.array(tiny[2])
    euler = FlowEulerSolver(3, 3.0)
    chunks = stream(dit, context, 4, (4, 8), Sampler("euler", 3, 3.0), noise=SeededNoise(7))
    want = [c.latents for c in chunks]
    assert "(x - x0) * 1000 / t" in describe_sampler("euler")["step"]
    cache, key = dit.make_cache(), mx.random.key(7)
    for chunk in want:
        key, sub = mx.random.split(key)
        x = mx.random.normal(chunk.shape, key=sub)
        for i, t in enumerate(euler.timesteps.tolist()):
            x0 = x - t / 1000 * dit(x, mx.array([t]), context, cache=cache)  # what denoise returns
            x = x + float(euler.sigmas[i + 1] - euler.sigmas[i]) * (x - x0) * 1000 / t
        np.testing.assert_allclose(np.array(x), np.array(chunk), atol=1e-4)
        dit(x, mx.zeros((1,)), context, cache=cache, update_cache=True)
    with pytest.raises(S2DiTError, match="few-step or Euler sampler, not 'unipc'"):
        describe_sampler("unipc")


# ------------------------------------------------------------------------------------------------
# macOS: Core ML itself


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict needs macOS")
def test_coreml_predict_with_state_matches_mlx(tiny, tmp_path_factory):  # pragma: no cover
    folder = exported(tiny, tmp_path_factory, "float16")
    _, _, context, noise, chunks, _ = tiny
    denoise = ct.models.MLModel(
        str(folder / DIT_PACKAGE), function_name="denoise", compute_units=ct.ComputeUnit.CPU_ONLY
    )
    write = ct.models.MLModel(
        str(folder / DIT_PACKAGE), function_name="write", compute_units=ct.ComputeUnit.CPU_ONLY
    )
    state = denoise.make_state()
    for c, chunk_noise in enumerate(noise):
        x = chunk_noise[0]
        feed = {"context": context.astype(np.float16), "chunk": np.array([c], np.int32)}
        for i, t in enumerate(TIMESTEPS):
            out = denoise.predict(
                {**feed, "latents": x.astype(np.float16), "t": np.array([t], np.float32)},
                state=state,
            )
            x0 = out["x0"].astype(np.float32)
            if i + 1 < len(TIMESTEPS):
                s = TIMESTEPS[i + 1] / 1000.0
                x = (1 - s) * x0 + s * chunk_noise[i + 1]
        write.predict(
            {**feed, "latents": x0.astype(np.float16), "t": np.zeros(1, np.float32)}, state=state
        )
        assert verify.psnr(chunks[c], x0) >= 50.0


# ------------------------------------------------------------------------------------------------
# Analytic cost (benchmarks/coreml.py) against the exported graph


def _changed_slots(before, after, slot_tokens: int, slots: int) -> set[int]:
    """Which slot regions of a [1, H, slots * n, D] key buffer differ between two snapshots."""
    changed = set()
    for s in range(slots):
        region = slice(s * slot_tokens, (s + 1) * slot_tokens)
        if not np.array_equal(before[:, :, region], after[:, :, region]):
            changed.add(s)
    return changed


def test_manifest_and_mlx_caches_agree_slot_for_slot(tiny, tmp_path_factory):
    """One schedule object: chunk c lands in ChunkSchedule.slot(c) in the MLX KV cache and in
    the exported package's state, and the manifest states the same rule."""
    from s2dit_mlx.cache import ChunkSchedule
    from s2dit_mlx.coreml.verify import PackageDiT

    dit, _, context, noise, _, _ = tiny
    folder = exported(tiny, tmp_path_factory, "float32")
    manifest = json.loads((folder / MANIFEST).read_text())
    schedule = ChunkSchedule(dit.args.window, dit.args.sink)
    assert manifest["streaming"]["schedule"] == schedule.to_dict()
    past = schedule.past_slots
    layer = dit.args.layers.index("full")
    n = 2 * (4 // 2) * (8 // 2)  # tokens of a 2-frame chunk at 4 x 8 latents, patch 2
    package = PackageDiT(Package(folder / DIT_PACKAGE))
    mlx_cache, pkg_cache = dit.make_cache(), package.make_cache()
    ctx = mx.array(context)
    for c, chunk_noise in enumerate(noise):
        x = mx.array(chunk_noise[0])
        t0 = mx.zeros((1,))
        kv = mlx_cache.layers[layer]
        before = None if kv.keys is None else np.array(kv.keys)
        dit(x, t0, ctx, cache=mlx_cache, update_cache=True)
        after = np.array(kv.keys)
        before = np.zeros_like(after) if before is None else before
        # The MLX buffer has one more slot: the scratch slot of the chunk being denoised.
        mlx_changed = _changed_slots(before, after, n, past + 1) - {past}
        state = pkg_cache.buffers[f"l{layer}_keys"].copy()
        package(x, t0, ctx, cache=pkg_cache, update_cache=True)
        pkg_changed = _changed_slots(state, pkg_cache.buffers[f"l{layer}_keys"], n, past)
        want = {schedule.slot(c)}
        assert mlx_changed == want and pkg_changed == want, (c, mlx_changed, pkg_changed)


def test_analytic_cost_matches_exported_graph(tiny, tmp_path_factory):
    from s2dit_mlx.coreml import cost
    from s2dit_mlx.coreml.emit import dit_state_specs
    from s2dit_mlx.coreml.shapes import StreamShapes

    dit = tiny[0]
    args = dit.args
    pkg = Package(exported(tiny, tmp_path_factory, "float32") / DIT_PACKAGE)
    counted = cost.graph_flops(pkg.program.functions["denoise"])
    analytic = cost.call_flops(args, 2, 4, 8, window=3, sink=1)["total"]
    assert counted == analytic, (counted, analytic)
    # State bytes: the analytic count equals what the emitter allocates, also at 1.3B width.
    for a, (f, h, w) in ((args, (2, 4, 8)), (ModelArgs(), (3, 36, 64))):
        shapes = StreamShapes(f, h, w, window=3, sink=1, text_len=a.text_len)
        specs = dit_state_specs(a, shapes)
        assert cost.state_bytes(a, f, h, w, 3, 1) == sum(s.nbytes for s in specs)


def test_dit_only_export_without_vae(tiny, tmp_path):
    """vae=None (CLI --skip-vae) writes the DiT package and manifest only."""
    dit = tiny[0]
    out = tmp_path / "dit-only"
    manifest = export_coreml(dit, None, out, height=HEIGHT, width=WIDTH, precision="float32")
    assert manifest["packages"]["vae_decoder"] is None
    assert sorted(p.name for p in out.iterdir()) == [".s2dit", DIT_PACKAGE, MANIFEST]
    assert manifest["video"]["height"] == HEIGHT and manifest["video"]["width"] == WIDTH


# ------------------------------------------------------------------------------------------------
# Wan VAE decoder: functions `first` (latent frame 0 -> 1 frame) and `decode` (-> 4 frames)

# Every decoder level, a 1x1x1 shortcut, both temporal upsamplers; latent 4 x 8 -> 32 x 64.
WAN21 = dict(
    version="2.1",
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[0.5, 1.5, 1.0, 2.0],
)
# 2.2: residual up blocks with the repeat shortcut, 2x2 patchify; latent 2 x 4 -> 32 x 64.
WAN22 = {**WAN21, "version": "2.2", "patch_size": 2}
WAN_GRIDS = {"2.1": (4, 8), "2.2": (2, 4)}
WAN_CHUNKS = (2, 1, 2)  # latent frames per chunk: 5 in all, one per package call


@pytest.fixture(scope="module")
def tiny_wan():
    """version -> (vae, latent chunks, MLX streaming frames per chunk)."""
    out = {}
    for i, (version, cfg) in enumerate((("2.1", WAN21), ("2.2", WAN22))):
        mx.random.seed(10 + i)
        vae = WanVAE(WanVAEConfig(**cfg))
        randomise(vae, 20 + i)  # attention proj (zero-initialised) and RMS gains included
        h, w = WAN_GRIDS[version]
        rng = np.random.default_rng(30 + i)
        chunks = [rng.standard_normal((1, f, h, w, 4)).astype(np.float32) for f in WAN_CHUNKS]
        out[version] = (vae, chunks, list(verify.mlx_vae_stream(vae, chunks)))
    return out


_WAN_EXPORTS: dict = {}


def wan_exported(tiny_wan, tmp_path_factory, version: str, precision: str) -> Path:
    """The saved Wan VAE decoder package, once per (version, precision)."""
    from s2dit_mlx.coreml.export import PRECISIONS, module_weights, save_vae_package

    key = (version, precision)
    if key not in _WAN_EXPORTS:
        vae = tiny_wan[version][0]
        path = tmp_path_factory.mktemp("wan") / f"{version}-{precision}.mlpackage"
        h, w = WAN_GRIDS[version]
        dtype = PRECISIONS[precision]
        save_vae_package(vae, module_weights(vae), h, w, path, dtype, "none", 2048)
        _WAN_EXPORTS[key] = path
    return _WAN_EXPORTS[key]


def wan_structure(vae, version: str) -> tuple[dict, dict]:
    from s2dit_mlx.coreml.vae import vae_functions, vae_state_specs

    specs = vae_state_specs(vae, *WAN_GRIDS[version])
    states = {s.name: s.shape for s in specs}
    return states, {f: set(states) for f in vae_functions(vae)}


@pytest.mark.parametrize(
    "version, precision, gate",
    [("2.1", "float32", 60.0), ("2.1", "float16", 50.0), ("2.2", "float32", 60.0)],
)
def test_wan_vae_package_matches_mlx_streaming(
    tiny_wan, tmp_path_factory, version, precision, gate
):
    vae, chunks, frames = tiny_wan[version]
    path = wan_exported(tiny_wan, tmp_path_factory, version, precision)
    pkg = Package(path)
    assert set(pkg.functions) == {"first", "decode"}
    got = list(verify.package_vae_stream(pkg, chunks))
    psnrs = [verify.psnr(r, g) for r, g in zip(frames, got, strict=True)]
    print(f"Wan {version} {precision}: VAE PSNR per chunk {np.round(psnrs, 1)}")
    # 1 + 4k pixel frames for the first chunk's 1 + k latent frames, then 4 per latent frame.
    assert [g.shape[1] for g in got] == [5, 4, 8]
    assert got[0].shape[2:] == (32, 64, 3)
    assert min(psnrs) >= gate
    # Structure: iOS 18, fp16 states of the expected shapes, each written once by each function.
    states, writes = wan_structure(vae, version)
    assert check_package(path, states, writes) == []
    # A state per causal conv with a temporal kernel of 3, the time convs included.
    kinds = [s for s in states if s.endswith("time_conv")]
    assert len(kinds) == 2 and all(states[k][2] == 2 for k in states)


def test_wan_vae_state_is_needed_and_first_restarts(tiny_wan, tmp_path_factory):
    """`decode` without the history fails the gate; `first` restarts a used state exactly."""
    vae, chunks, frames = tiny_wan["2.1"]
    pkg = Package(wan_exported(tiny_wan, tmp_path_factory, "2.1", "float32"))
    state = pkg.make_state()
    list(verify.package_vae_stream(pkg, chunks, state=state))  # leaves a used state behind
    again = list(verify.package_vae_stream(pkg, chunks, state=state))  # no zeroing in between
    assert min(verify.psnr(r, g) for r, g in zip(frames, again, strict=True)) >= 60.0
    # Latent frame 1 decoded from a zero state (forgetting frame 0) is wrong.
    forgot = pkg.predict({"latents": chunks[0][:, 1:2]}, pkg.make_state(), "decode")["frames"]
    assert verify.psnr(frames[0][:, 1:5], forgot) < 40.0


def test_wan_vae_rms_norm_is_finite_in_fp16(tmp_path):
    """Activations whose squares overflow fp16 normalise like MLX; an all-zero position gives 0."""
    from s2dit_mlx.coreml.wan_vae import _Emitter

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1, 8, 1, 2, 3)) * 3000.0).astype(np.float32)
    x[..., 0, 0] = 0.0
    gamma = rng.standard_normal(8).astype(np.float32)
    specs = {"x": mb.placeholder(shape=x.shape, dtype=types.fp16)}
    with Function(specs, opset_version=ct.target.iOS18) as func:
        ctx = Ctx(dtype="fp16", weights={"decoder_module.n.gamma": gamma}, write=False)
        y = _Emitter(None, ctx, False, {}).rms_norm(func.inputs["x"], "n")
        func.set_outputs([mb.identity(x=y, name="y")])
    prog = Program()
    prog.add_function("main", func)
    got = Package(_save(prog, tmp_path / "rms.mlpackage")).predict({"x": x})["y"]
    x_cl = mx.array(x.transpose(0, 2, 3, 4, 1))
    ref = np.array(mx.fast.rms_norm(x_cl, mx.array(gamma), 1e-12)).transpose(0, 4, 1, 2, 3)
    assert np.all(np.isfinite(got)) and np.all(got[..., 0, 0] == 0)
    _close(got, ref, tol=5e-3)  # fp16 rounding of a few ops


def test_interpreter_pad_and_upsample_ops(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 2, 4, 5)).astype(np.float32)

    def build(v):
        x = v["x"]
        flat = mb.reshape(x=x, shape=[1, 6, 4, 5])
        return {
            "pad_t": mb.pad(x=x, pad=[2, 0, 0, 0, 0, 0], mode="constant"),
            "pad_all": mb.pad(x=x, pad=[0, 0, 1, 0, 1, 2, 0, 3, 2, 1], constant_val=1.5),
            "pad_edge": mb.pad(x=flat, pad=[1, 2, 2, 1], mode="replicate"),
            "pad_reflect": mb.pad(x=flat, pad=[1, 2, 2, 1], mode="reflect"),
            "up": mb.upsample_nearest_neighbor(x=flat, scale_factor_height=2, scale_factor_width=2),
            "up_hw": mb.upsample_nearest_neighbor(
                x=flat, scale_factor_height=3, scale_factor_width=1
            ),
        }

    out = _run_ops(tmp_path, {"x": x}, build)
    flat = x.reshape(1, 6, 4, 5)
    _close(out["pad_t"], np.pad(x, [(0, 0), (0, 0), (2, 0), (0, 0), (0, 0)]))
    _close(
        out["pad_all"],
        np.pad(x, [(0, 0), (1, 0), (1, 2), (0, 3), (2, 1)], constant_values=1.5),
    )
    _close(out["pad_edge"], np.pad(flat, [(0, 0), (0, 0), (1, 2), (2, 1)], mode="edge"))
    _close(out["pad_reflect"], np.pad(flat, [(0, 0), (0, 0), (1, 2), (2, 1)], mode="reflect"))
    # MLX's own 2x nearest upsampling (nearest-exact at an integer factor).
    ref = nn.Upsample(scale_factor=(2, 2), mode="nearest")(mx.array(flat.transpose(0, 2, 3, 1)))
    _close(out["up"], np.array(ref).transpose(0, 3, 1, 2))
    _close(out["up_hw"], np.repeat(flat, 3, axis=2))


@pytest.fixture(scope="module")
def wan_model_dir(tmp_path_factory):
    """A tiny model folder whose VAE is a (random) Wan 2.1 VAE."""
    from conftest import TINY_DEFAULTS, make_tiny_components

    from s2dit_mlx.loading import save_model

    dit, _, text_encoder = make_tiny_components(seed=1)
    mx.random.seed(2)
    vae = WanVAE(WanVAEConfig(**WAN21))
    mx.eval(vae.parameters())
    path = tmp_path_factory.mktemp("models") / "tiny-wan"
    save_model(path, dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    return path


def test_cli_export_with_wan_vae(wan_model_dir, tmp_path, capsys):
    out = tmp_path / "ios-wan"
    rc = export_main(["coreml", "--model", str(wan_model_dir), "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    vae_m = manifest["packages"]["vae_decoder"]
    assert vae_m["type"] == "wan"
    assert set(vae_m["functions"]) == {"first", "decode"}
    assert vae_m["functions"]["first"]["outputs"][0]["shape"] == [1, 1, 32, 64, 3]
    assert vae_m["functions"]["decode"]["outputs"][0]["shape"] == [1, 4, 32, 64, 3]
    assert "`first`" in vae_m["first_call"]
    assert all(s["dtype"] == "fp16" for s in vae_m["states"])
    assert len(vae_m["states"]) == len(wan_structure(WanVAE(WanVAEConfig(**WAN21)), "2.1")[0])
    assert (out / DIT_PACKAGE).is_dir() and (out / VAE_PACKAGE).is_dir()


@pytest.mark.slow
def test_palette_aware_weights_export_exactly(tiny, tmp_path):
    """Weights snapped by palette-aware training (train.palette) survive palette6 unchanged."""
    from train.palette import palette_targets, snap_weights

    dit, _, context, noise = tiny[:4]
    snapped = S2DiT(ModelArgs(**DIT))
    snapped.load_weights(tree_flatten(dit.parameters()), strict=True)
    snap_weights(snapped, 6, palette_targets(snapped, min_size=256))
    reference = list(verify.mlx_stream(snapped, context, noise, TIMESTEPS))
    psnrs = {}
    for mode in ("none", "palette6"):
        out = tmp_path / mode
        export_coreml(snapped, None, out, height=HEIGHT, width=WIDTH, compress_mode=mode,
                      precision="float16", timesteps=TIMESTEPS, fps=8.0, weight_threshold=256)  # fmt: skip
        got = verify.package_stream(Package(out / DIT_PACKAGE), context, noise, TIMESTEPS)
        psnrs[mode] = [verify.psnr(r, g) for r, g in zip(reference, got, strict=True)]
    print(
        f"snapped weights: fp16 {np.round(psnrs['none'], 1)}, palette6 {np.round(psnrs['palette6'], 1)}"
    )
    # palette6 only adds what fp16 costs: the export's k-means recovers the 64 values.
    assert min(psnrs["palette6"]) >= 50.0
    assert np.allclose(psnrs["palette6"], psnrs["none"], atol=1.0)


# ------------------------------------------------------------------------------------------------
# Compression on a trained model: the built-in default


# int8 is measured at 47-52 dB per chunk. The shipped DiT is the average of two palette-snapped
# models, not itself 6-bit palettes, so palette6 really quantizes it: 34-40 dB per chunk here
# (palette4, 19-20 dB, would fail).
MIN_PSNR_DEFAULT_MODEL = {"int8": 35.0, "palette6": 30.0}


@pytest.mark.parametrize("compress", sorted(MIN_PSNR_DEFAULT_MODEL))
def test_compressed_default_model_stays_close(tmp_path, compress):
    from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_model

    bundle = load_model(TEACHER_MODEL_DIR)
    dit = bundle.dit
    dit.set_dtype(mx.float32)
    args = dit.args
    steps = [1000.0, 750.0, 500.0, 250.0]
    context = np.array(bundle.text_encoder.encode(["a red circle moving left"]).astype(mx.float32))
    context = verify.pad_context(context, args.text_len)
    lat = bundle.defaults["height"] // bundle.vae.spatial_factor
    noise = verify.make_noise(4, len(steps), (1, args.frames_per_chunk, lat, lat, args.in_dim), 7)
    reference = list(verify.mlx_stream(dit, context, noise, steps))
    out = tmp_path / compress
    export_coreml(
        dit,
        None,
        out,
        height=bundle.defaults["height"],
        width=bundle.defaults["width"],
        compress_mode=compress,
        precision="float16",
        timesteps=steps,
        fps=16.0,
        spatial_factor=bundle.vae.spatial_factor,
    )
    got = list(verify.package_stream(Package(out / DIT_PACKAGE), context, noise, steps))
    psnrs = [verify.psnr(r, g) for r, g in zip(reference, got, strict=True)]
    print(f"{compress} on the built-in model: DiT PSNR per chunk {np.round(psnrs, 1)}")
    assert min(psnrs) >= MIN_PSNR_DEFAULT_MODEL[compress]
