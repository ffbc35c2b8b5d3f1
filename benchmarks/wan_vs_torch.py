"""The Wan teacher in MLX vs PyTorch + diffusers on the CPU: same random weights, side by side.

Writes benchmarks/results/wan_vs_torch.json and prints a markdown table:

- DiT forward at Wan-1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096), 4 layers,
  at 1560 and 4680 tokens (1 and 3 latent frames of a 480x832 video), fp32:
  diffusers WanTransformer3DModel vs our S2DiT (all layers "full") with its weights;
- VAE decode of 5 latent frames at 60x104 (17 frames of 480x832), Wan2.1 VAE at full width:
  diffusers AutoencoderKLWan vs our WanVAE, one latent frame per pass on both sides;
- peak memory (peak RSS of a fresh process) of `python -m convert.wan` on a random
  1.3B-shaped bf16 checkpoint (original layout), and peak MLX memory (mx.get_peak_memory)
  of one denoising step (CFG: two forwards + a UniPC step) of the converted 30-layer model
  with bf16 weights.

The DiT runs torch and MLX in turns, `--dit-repeats` times each after a warm-up, and keeps
the medians (times, and the ratio of each pair); the VAE figure is one timed run
(`--repeats` for more; the median is kept).
Torch runs with `--threads` threads (default 2); MLX's OpenBLAS with its default (all cores),
or OPENBLAS_NUM_THREADS (recorded; `--threads 1` with OPENBLAS_NUM_THREADS=1 pins both to 1).
On this CPU, MLX has no fast bf16 GEMM (~20x slower than fp32), so the all-bf16 step
(Pipeline(dtype="bfloat16").denoise) runs at a small size (`--step-bf16-grid`), and the step
at 1560 tokens keeps the bf16 weights as stored but computes in float32 (float32 inputs: the
matmuls promote; the weights are not upcast in memory).

    python benchmarks/wan_vs_torch.py            # full sizes (~20 min on 2 cores)
    python benchmarks/wan_vs_torch.py --small    # same code at small sizes (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import s2dit_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from report import wan_vs_torch_table

from s2dit_mlx.kernels import cpu as cpu_kernels

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULT = HERE / "results" / "wan_vs_torch.json"

# Wan2.1-T2V-1.3B
DIM, HEADS, FFN, TEXT_DIM, TEXT_LEN, FREQ_DIM, Z = 1536, 12, 8960, 4096, 512, 256, 16
FULL_GRID = (60, 104)  # latents of a 480x832 frame; 30x52 = 1560 tokens per latent frame


def timed(fn, repeats: int):
    """(median wall time, last result) of `repeats` calls of fn (each call blocks until done)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def timed_alternating(fn_a, fn_b, repeats: int):
    """Times of fn_a and fn_b called in turns (a, b, a, b, ...) and their last results.

    Taken in turns, a slow spell of the machine lands on both sides instead of one.
    """
    times, outs = ([], []), [None, None]
    for _ in range(repeats):
        for side, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            outs[side] = fn()
            times[side].append(time.perf_counter() - start)
    return times[0], times[1], outs[0], outs[1]


def randomise_torch(module, seed: int) -> None:
    """Every parameter random: weights N(0, 1/fan_in), norm gains ~1, biases small."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "scale_shift" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith(("weight", "gamma")) and "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def torch_weights_to_mx(module) -> dict[str, mx.array]:
    return {k: mx.array(v.detach().float().numpy()) for k, v in module.state_dict().items()}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ----------------------------------------------------------------------------------------------
# DiT forward


def bench_dit(token_frames: list[int], grid, layers: int, repeats: int) -> dict:
    """diffusers WanTransformer3DModel vs our S2DiT at 1.3B width, `layers` blocks, fp32."""
    import diffusers
    import torch

    from s2dit_mlx.models.s2dit import S2DiT
    from s2dit_mlx.models.wan import args_from_diffusers_config, sanitize

    ref = diffusers.WanTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        in_channels=Z,
        out_channels=Z,
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=FFN,
        num_layers=layers,
    ).eval()
    randomise_torch(ref, 0)
    ours = S2DiT(args_from_diffusers_config(dict(ref.config)))
    ours.load_weights(list(sanitize(torch_weights_to_mx(ref)).items()), strict=True)
    mx.eval(ours.parameters())

    rng = np.random.default_rng(0)
    context = np.zeros((1, TEXT_LEN, TEXT_DIM), np.float32)
    context[0, :20] = rng.standard_normal((20, TEXT_DIM))  # a 20-token prompt, zero-padded
    t = np.array([500.0], np.float32)
    rows = []
    for frames in token_frames:
        x = rng.standard_normal((1, frames, *grid, Z)).astype(np.float32)
        tx, tt, tc = (
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))),
            torch.from_numpy(t),
            torch.from_numpy(context),
        )
        mxx, mxt, mxc = mx.array(x), mx.array(t), mx.array(context)

        def run_torch(tx=tx, tt=tt, tc=tc):
            with torch.inference_mode():
                return ref(tx, timestep=tt, encoder_hidden_states=tc, return_dict=False)[0]

        def run_mlx(mxx=mxx, mxt=mxt, mxc=mxc, kernels=True):
            with cpu_kernels.enabled(kernels):
                out = ours(mxx, mxt, mxc)
                mx.eval(out)
            return out

        run_torch(), run_mlx()  # warm-up at this size: thread pools, allocator caches
        mx.reset_peak_memory()
        torch_times, mlx_times, ref_out, out = timed_alternating(run_torch, run_mlx, repeats)
        mlx_peak = mx.get_peak_memory()
        torch_s, mlx_s = statistics.median(torch_times), statistics.median(mlx_times)
        ratios = [a / b for a, b in zip(torch_times, mlx_times, strict=True)]
        # MLX's own matmuls and exp/tanh, for the record (what our CPU kernels replace).
        builtin_s, _ = timed(lambda: run_mlx(kernels=False), 1)
        err = rel_err(np.array(out), ref_out.numpy().transpose(0, 2, 3, 4, 1))
        tokens = frames * (grid[0] // 2) * (grid[1] // 2)
        rows.append(
            {
                "tokens": tokens,
                "latent_frames": frames,
                "torch_s": torch_s,
                "mlx_s": mlx_s,
                "mlx_builtin_ops_s": builtin_s,
                "torch_over_mlx": statistics.median(ratios),
                "torch_over_mlx_range": [min(ratios), max(ratios)],
                "torch_times_s": torch_times,
                "mlx_times_s": mlx_times,
                "mlx_peak_mb": mlx_peak / 1e6,
                "max_rel_err": err,
            }
        )
        print(
            f"  DiT {tokens} tokens: torch {torch_s:.2f} s, mlx {mlx_s:.2f} s "
            f"(no CPU kernels: {builtin_s:.2f} s) "
            f"(torch/mlx {statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f} "
            f"over {repeats} runs in turns), rel err {err:.1e}",
            flush=True,
        )
    return {"dim": DIM, "heads": HEADS, "ffn_dim": FFN, "layers": layers, "rows": rows}


# ----------------------------------------------------------------------------------------------
# VAE decode


def bench_vae(latent_frames: int, grid, repeats: int) -> dict:
    """diffusers AutoencoderKLWan.decode vs our WanVAE.decode, Wan2.1 VAE, fp32."""
    import diffusers
    import torch

    from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig

    ref = diffusers.AutoencoderKLWan().eval()  # the Wan2.1 VAE architecture
    randomise_torch(ref, 1)
    config = WanVAEConfig.from_diffusers_config(dict(ref.config))
    ours = WanVAE(config)
    ours.load_weights(list(ours.sanitize(torch_weights_to_mx(ref)).items()), strict=True)
    mx.eval(ours.parameters())

    rng = np.random.default_rng(1)
    raw = rng.standard_normal((1, latent_frames, *grid, Z)).astype(np.float32)
    traw = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 4, 1, 2, 3)))
    znorm = ours.normalize(mx.array(raw))  # ours denormalises inside decode()

    def run_torch():
        with torch.inference_mode():
            return ref.decode(traw, return_dict=False)[0]

    def run_mlx():
        with cpu_kernels.enabled():
            out = ours.decode(znorm)
            mx.eval(out)
        return out

    small = (1, 2, 8, 8, Z)  # warm-up on a small input
    with torch.inference_mode():
        ref.decode(torch.zeros(1, Z, 2, 8, 8))
    mx.eval(ours.decode(mx.zeros(small)))
    torch_s, ref_out = timed(run_torch, repeats)
    ref_out = ref_out.float().numpy().transpose(0, 2, 3, 4, 1)
    mx.reset_peak_memory()
    mlx_s, ours_out = timed(run_mlx, repeats)
    mlx_peak = mx.get_peak_memory()
    ours_out = np.array(ours_out)
    frames = ours_out.shape[1]
    print(
        f"  VAE {latent_frames}x{grid[0]}x{grid[1]} -> {frames} frames: torch {torch_s:.1f} s, "
        f"mlx {mlx_s:.1f} s (torch/mlx {torch_s / mlx_s:.2f})",
        flush=True,
    )
    return {
        "latent_frames": latent_frames,
        "latent_grid": list(grid),
        "pixel_frames": frames,
        "base_dim": config.base_dim,
        "torch_s": torch_s,
        "mlx_s": mlx_s,
        "torch_over_mlx": torch_s / mlx_s,
        "mlx_peak_mb": mlx_peak / 1e6,
        "max_abs_err": float(np.abs(ours_out - ref_out).max()),
    }


# ----------------------------------------------------------------------------------------------
# Conversion and one denoising step (1.3B-shaped, random weights)


def write_random_checkpoint(folder: Path, layers: int) -> int:
    """A random 1.3B-shaped (`layers` blocks) bf16 Wan DiT in the original layout; bytes."""
    from s2dit_mlx.models.s2dit import S2DiT
    from s2dit_mlx.models.wan import wan_model_args

    args = wan_model_args(DIM, FFN, HEADS, layers)
    shapes = {k: v.shape for k, v in tree_flatten(S2DiT(args).parameters())}  # lazy, unevaluated
    mx.random.seed(0)
    weights = {}
    for name, shape in shapes.items():
        if name == "patch_embedding.weight":  # ours O,D,H,W,I -> PyTorch O,I,D,H,W
            o, d, h, w, i = shape
            shape = (o, i, d, h, w)
        weights[name] = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights)
    config = {
        "_class_name": "WanModel", "model_type": "t2v", "dim": DIM, "ffn_dim": FFN,
        "num_heads": HEADS, "num_layers": layers, "in_dim": Z, "out_dim": Z,
        "freq_dim": FREQ_DIM, "text_len": TEXT_LEN, "eps": 1e-6,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    nbytes = sum(w.nbytes for w in weights.values())
    del weights
    mx.clear_cache()
    return nbytes


# Peak RSS of the child itself: ru_maxrss would not do on Linux, where a spawned process
# inherits its parent's high-water mark across exec; VmHWM belongs to the new address space.
CONVERT_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from convert.wan import main
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
try:
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    peak = int(line.split()[1]) * 1024
except OSError:  # macOS: no /proc; a fresh process there, ru_maxrss in bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_bytes": peak}))
"""


def bench_convert(src: Path, out: Path) -> dict:
    """`python -m convert.wan SRC --out OUT --only dit` (bf16) in a fresh process: peak RSS.

    The checkpoint fits in one output shard (5 GB default), which the writer holds in memory
    until it is written: that, not the reading, sets the peak.
    """
    cmd = [sys.executable, "-c", CONVERT_CHILD, str(src), "--out", str(out), "--only", "dit"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"conversion failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return result


def bench_step(folder: Path, grid, latent_frames: int, compute: str) -> dict:
    """Peak MLX memory and time of one CFG denoising step of the converted model.

    compute "bfloat16": Pipeline(dtype="bfloat16").denoise(steps=1) (weights and activations
    bf16); "float32-activations": the same step (two forwards, CFG, one UniPC step) with the
    converted bf16 weights left as stored and float32 inputs (matmuls promote to float32).
    """
    from s2dit_mlx import sampling
    from s2dit_mlx.loading import load_dit
    from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig
    from s2dit_mlx.pipeline import Pipeline

    mx.clear_cache()
    dit = load_dit(folder)
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(dit.parameters()))
    shape = (1, latent_frames, *grid, Z)
    noise = mx.random.normal(shape, key=mx.random.key(0))
    ctx = mx.random.normal((1, TEXT_LEN, TEXT_DIM), key=mx.random.key(1))
    neg = mx.random.normal((1, TEXT_LEN, TEXT_DIM), key=mx.random.key(2))
    mx.eval(noise, ctx, neg)
    if compute == "bfloat16":
        vae = WanVAE(WanVAEConfig(base_dim=8))  # only its size factors are used: no decode
        pipe = Pipeline(dit, vae, text_encoder=None, dtype="bfloat16")
        weights_bytes = sum(v.nbytes for _, v in tree_flatten(dit.parameters()))

        def step():
            return pipe.denoise(
                frames=1 + 4 * (latent_frames - 1),
                height=grid[0] * 8,
                width=grid[1] * 8,
                steps=1,
                guidance=5.0,
                latents=noise,
                context=ctx,
                negative_context=neg,
            )
    else:

        def step():
            solver = sampling.make_solver("unipc", 1, 5.0)
            t = mx.full((1,), float(solver.timesteps[0]))
            v = sampling.cfg(dit(noise, t, ctx), dit(noise, t, neg), 5.0)
            return solver.step(v, noise)

    mx.reset_peak_memory()
    start = time.perf_counter()
    out = step()
    mx.eval(out)
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    tokens = latent_frames * (grid[0] // 2) * (grid[1] // 2)
    print(
        f"  step ({compute}) {tokens} tokens: {seconds:.1f} s, peak {peak / 1e9:.2f} GB "
        f"(weights {weights_bytes / 1e9:.2f} GB)",
        flush=True,
    )
    return {
        "compute": compute,
        "tokens": tokens,
        "latent_frames": latent_frames,
        "latent_grid": list(grid),
        "seconds": seconds,
        "peak_gb": peak / 1e9,
        "weights_gb": weights_bytes / 1e9,
    }


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes, to check the script")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per VAE figure (median kept)"
    )
    parser.add_argument(
        "--dit-repeats",
        type=int,
        default=5,
        help="DiT: timed runs of each side, in turns (torch, MLX, torch, ...); medians kept",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--only", default="dit,vae,convert,step", help="comma-separated parts to run"
    )
    parser.add_argument(
        "--step-bf16-grid", type=int, nargs=2, default=[4, 6],
        help="latent h w of the all-bf16 step (slow on a CPU: ~3 GFLOP/s bf16 GEMM)",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default: results/wan_vs_torch.json; none if --small)",
    )
    parser.add_argument("--workdir", default=None, help="scratch folder for the checkpoints")
    parser.add_argument(
        "--keep-other-parts",
        action="store_true",
        help="with --only: keep the parts not run from the existing JSON (marked as earlier)",
    )
    opts = parser.parse_args()
    parts = set(opts.only.split(","))

    import diffusers
    import torch

    torch.set_num_threads(opts.threads)
    if opts.small:
        dit_grid, dit_frames, vae_grid, vae_frames, layers = (8, 14), [1, 3], (8, 14), 5, 2
        step_grid_fp32, step_grid_bf16 = (8, 14), (4, 6)
    else:
        dit_grid, dit_frames, vae_grid, vae_frames, layers = FULL_GRID, [1, 3], FULL_GRID, 5, 30
        step_grid_fp32, step_grid_bf16 = FULL_GRID, tuple(opts.step_bf16_grid)
    result = {
        "benchmark": "wan_vs_torch",
        "small": opts.small,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "mlx": mx.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": opts.threads,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "repeats": opts.repeats,
        "dit_repeats": opts.dit_repeats,
        "mlx_cpu_kernels": cpu_kernels.status(),
        # other work on the machine skews the timings: recorded at the start and the end
        "load_average_start": os.getloadavg()[0],
    }
    # --small checks the script: its figures go to the results folder only when asked.
    out = Path(opts.out) if opts.out else (None if opts.small else RESULT)
    if opts.keep_other_parts and out is not None and out.exists():
        # Re-measure some parts only: the others are kept from the file, marked as earlier.
        previous = json.loads(out.read_text())
        result_key = {"dit": "dit", "vae": "vae", "convert": "convert", "step": "steps"}
        kept = [key for part, key in result_key.items() if part not in parts and key in previous]
        result.update({k: previous[k] for k in kept})
        result["kept_from_earlier_run"] = {
            "parts": kept,
            "mlx_cpu_kernels": previous.get("mlx_cpu_kernels", "not used (before the kernels)"),
        }
    started = time.perf_counter()
    if "dit" in parts:
        result["dit"] = bench_dit(dit_frames, dit_grid, 4, opts.dit_repeats)
    if "vae" in parts:
        result["vae"] = bench_vae(vae_frames, vae_grid, opts.repeats)
    if parts & {"convert", "step"}:
        with tempfile.TemporaryDirectory(dir=opts.workdir, prefix="wan-bench-") as tmp:
            src, conv = Path(tmp) / "src", Path(tmp) / "converted"
            nbytes = write_random_checkpoint(src, layers)
            c = bench_convert(src, conv)
            result["convert"] = {
                "layers": layers,
                "checkpoint_gb": nbytes / 1e9,
                "peak_rss_gb": c["peak_rss_bytes"] / 1e9,
                "seconds": c["seconds"],
            }
            print(
                f"  convert: {nbytes / 1e9:.2f} GB checkpoint, peak RSS "
                f"{result['convert']['peak_rss_gb']:.2f} GB, {c['seconds']:.1f} s",
                flush=True,
            )
            if "step" in parts:
                steps = []
                for compute, grid in (
                    ("float32-activations", step_grid_fp32),
                    ("bfloat16", step_grid_bf16),
                ):
                    s = bench_step(conv, grid, 1, compute)
                    steps.append({"layers": layers, **s})
                result["steps"] = steps
    result["total_s"] = time.perf_counter() - started
    result["load_average_end"] = os.getloadavg()[0]
    print()
    print("\n".join(wan_vs_torch_table(result)))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
