"""The Wan teacher in MLX vs PyTorch + diffusers on the CPU: same weights, each side in its own
process, all on every core, timed in turns.

Writes benchmarks/results/wan_vs_torch.json and prints a markdown table:

- DiT forward at Wan-1.3B width (dim 1536, 12 heads, ffn 8960, text 512 x 4096), 2 and 4
  layers, at 1560 and 4680 tokens (1 and 3 latent frames of a 480x832 video), fp32. Three
  sides, each a worker process of this script that loads the same random weights (one
  diffusers WanTransformer3DModel, randomised once and saved as safetensors; the 2-layer
  model is its first 2 blocks):
    torch      diffusers on PyTorch, torch.set_num_threads(os.cpu_count()); the process never
               imports s2dit_mlx (nothing of ours is loaded beside it);
    mlx_fast   our S2DiT with the Linux CPU fast path: setup_blas() (OpenBLAS, its default
               threads) and kernels.enable() (each kernel kind measured at its first use);
    mlx_plain  our S2DiT on plain MLX with OpenBLAS (setup_blas() only).
  Every round runs torch, mlx_fast, mlx_plain in turns (a slow spell of the machine lands on
  every side), `--dit-repeats` rounds after a warm-up; medians of the times and of the ratios
  of each round are kept, with their range;
- VAE decode of 5 latent frames at 60x104 (17 frames of 480x832), Wan2.1 VAE at full width:
  diffusers AutoencoderKLWan vs our WanVAE (fast path), workers as above, one latent frame per
  pass on both sides (`--vae-plain`: our plain path too, slow);
- peak memory (peak RSS of a fresh process) of `python -m convert.wan` on a random
  1.3B-shaped bf16 checkpoint (original layout), and peak MLX memory (mx.get_peak_memory)
  of one denoising step (CFG: two forwards + a UniPC step) of the converted 30-layer model
  with bf16 weights (in this process, plain MLX).

On this CPU, MLX has no fast bf16 GEMM (~20x slower than fp32), so the all-bf16 step
(Pipeline(dtype="bfloat16").denoise) runs at a small size (`--step-bf16-grid`), and the step
at 1560 tokens keeps the bf16 weights as stored but computes in float32 (float32 inputs: the
matmuls promote; the weights are not upcast in memory).

    python benchmarks/wan_vs_torch.py            # full sizes (~30 min on 2 cores)
    python benchmarks/wan_vs_torch.py --small    # same code at small sizes (~2 min)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import wan_vs_torch_table

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULT = HERE / "results" / "wan_vs_torch.json"

# Wan2.1-T2V-1.3B
DIM, HEADS, FFN, TEXT_DIM, TEXT_LEN, FREQ_DIM, Z = 1536, 12, 8960, 4096, 512, 256, 16
FULL_GRID = (60, 104)  # latents of a 480x832 frame; 30x52 = 1560 tokens per latent frame
SIDES = ("torch", "mlx_fast", "mlx_plain")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ----------------------------------------------------------------------------------------------
# Workers: one process per side, driven by JSON lines on stdin / stdout


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


def make_weights(kind: str, folder: Path, layers: int) -> None:
    """A random diffusers model (`kind` "dit": `layers` blocks; "vae": the Wan2.1 VAE) saved as
    folder/KIND.safetensors with its config as folder/KIND.json (a torch-side worker job)."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    if kind == "dit":
        model = diffusers.WanTransformer3DModel(
            num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=Z,
            out_channels=Z, text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN,
            num_layers=layers,
        )  # fmt: skip
    else:
        model = diffusers.AutoencoderKLWan()  # the Wan2.1 VAE architecture
    randomise_torch(model, 0 if kind == "dit" else 1)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{kind}.safetensors"))
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()}
    (folder / f"{kind}.json").write_text(json.dumps(config))


def _first_blocks(weights: dict, layers: int | None) -> dict:
    """The weights of a model with only its first `layers` blocks (None: all)."""
    if layers is None:
        return weights
    return {
        k: v
        for k, v in weights.items()
        if not k.startswith("blocks.") or int(k.split(".")[1]) < layers
    }


class TorchSide:
    """diffusers on PyTorch, every core; this process never imports s2dit_mlx."""

    def __init__(self, kind: str, folder: Path, layers: int | None, threads: int):
        import diffusers
        import torch
        from safetensors.torch import load_file

        torch.set_num_threads(threads)
        self.torch, self.kind = torch, kind
        config = json.loads((folder / f"{kind}.json").read_text())
        if kind == "dit":
            config["num_layers"] = layers
            self.model = diffusers.WanTransformer3DModel.from_config(config)
        else:
            self.model = diffusers.AutoencoderKLWan.from_config(config)
        weights = _first_blocks(load_file(str(folder / f"{kind}.safetensors")), layers)
        self.model.load_state_dict(weights, strict=True)
        self.model.eval()
        self.inputs = None

    def describe(self) -> dict:
        return {
            "torch": self.torch.__version__,
            "threads": self.torch.get_num_threads(),
            "imports_s2dit_mlx": any(m.startswith("s2dit_mlx") for m in sys.modules),
        }

    def load(self, path: str) -> None:
        data = np.load(path)
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(data["x"].transpose(0, 4, 1, 2, 3)))
        if self.kind == "dit":
            t, ctx = torch.from_numpy(data["t"]), torch.from_numpy(data["context"])
            self.inputs = (x, t, ctx)
        else:
            self.inputs = (x,)

    def run(self) -> np.ndarray:
        with self.torch.inference_mode():
            if self.kind == "dit":
                x, t, ctx = self.inputs
                out = self.model(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            else:
                out = self.model.decode(self.inputs[0], return_dict=False)[0]
        return out.float().numpy().transpose(0, 2, 3, 4, 1)  # ours: [B, T, H, W, C]


class MLXSide:
    """Our model on MLX: with the Linux CPU fast path (`fast`) or plain, OpenBLAS either way."""

    def __init__(self, kind: str, folder: Path, layers: int | None, fast: bool):
        from s2dit_mlx import setup_blas

        setup_blas()  # an entry point: OpenBLAS before mlx.core, as `s2dit` does
        import mlx.core as mx

        from s2dit_mlx import kernels

        self.mx, self.kernels, self.kind = mx, kernels, kind
        config = json.loads((folder / f"{kind}.json").read_text())
        weights = _first_blocks(mx.load(str(folder / f"{kind}.safetensors")), layers)
        if kind == "dit":
            from s2dit_mlx.models.s2dit import S2DiT
            from s2dit_mlx.models.wan import args_from_diffusers_config, sanitize

            config["num_layers"] = layers
            self.model = S2DiT(args_from_diffusers_config(config))
            self.model.load_weights(list(sanitize(weights).items()), strict=True)
        else:
            from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig

            self.model = WanVAE(WanVAEConfig.from_diffusers_config(config))
            self.model.load_weights(list(self.model.sanitize(weights).items()), strict=True)
        mx.eval(self.model.parameters())
        self.swapped = kernels.enable(self.model) if fast else 0
        self.inputs = None

    def describe(self) -> dict:
        from s2dit_mlx import _blas

        return {
            "mlx": self.mx.__version__,
            "blas": _blas.describe(),
            "openblas_threads": _blas.openblas_threads,
            "kernel_threads": self.kernels.cpu.gemm_threads(),
            "kernel_modules": self.swapped,
            # each kind's choice and measured speeds (after the first run)
            "kernel_choices": [m.line() for m in self.kernels.measurements()],
        }

    def load(self, path: str) -> None:
        mx = self.mx
        data = np.load(path)
        if self.kind == "dit":
            self.inputs = tuple(mx.array(data[k]) for k in ("x", "t", "context"))
        else:
            self.inputs = (self.model.normalize(mx.array(data["x"])),)  # decode() denormalises
        mx.eval(self.inputs)

    def run(self) -> np.ndarray:
        if self.kind == "dit":
            out = self.model(*self.inputs)
        else:
            out = self.model.decode(self.inputs[0])
        self.mx.eval(out)
        return out

    def peak_mb(self) -> float:
        return self.mx.get_peak_memory() / 1e6


def worker(opts) -> None:
    """A side's process: load the model, then answer commands (JSON lines) until "quit"."""
    folder, layers = Path(opts.folder), (opts.layers[0] if opts.layers else None)
    if opts.worker == "make":
        make_weights(opts.kind, folder, layers)
        return
    if opts.worker == "torch":
        side = TorchSide(opts.kind, folder, layers, opts.threads or os.cpu_count())
    else:
        side = MLXSide(opts.kind, folder, layers, fast=opts.worker == "mlx_fast")

    def reply(**fields) -> None:
        print(json.dumps(fields), flush=True)

    reply(ready=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "load":
            side.load(cmd["path"])
            reply(ok=True)
        elif cmd["cmd"] == "run":
            start = time.perf_counter()
            out = side.run()
            seconds = time.perf_counter() - start
            if cmd.get("save"):
                np.save(cmd["save"], np.array(out))
            reply(seconds=seconds, peak_mb=getattr(side, "peak_mb", lambda: None)())
        elif cmd["cmd"] == "describe":
            reply(**side.describe())


class Worker:
    """The parent's handle on one side's process."""

    def __init__(self, side: str, kind: str, folder: Path, layers: int | None, threads: int):
        cmd = [sys.executable, __file__, "--worker", side, "--kind", kind, "--folder", str(folder)]
        if layers is not None:
            cmd += ["--layers", str(layers)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready: the model is loaded

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.side} worker died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def in_turns(workers: dict[str, Worker], inputs: Path, rounds: int, scratch: Path) -> dict:
    """A warm-up run of every side, then `rounds` rounds of one run per side in turns; the
    last round saves every side's output, and each MLX side's error is taken against torch."""
    for w in workers.values():
        w.ask(cmd="load", path=str(inputs))
        w.ask(cmd="run")  # warm-up at this size: thread pools, caches, the kernels' choices
    times: dict[str, list[float]] = {side: [] for side in workers}
    peaks: dict[str, float | None] = {}
    for r in range(rounds):
        for side, w in workers.items():
            save = str(scratch / f"{side}.npy") if r == rounds - 1 else None
            res = w.ask(cmd="run", save=save)
            times[side].append(res["seconds"])
            peaks[side] = res.get("peak_mb")
    outs = {side: np.load(scratch / f"{side}.npy") for side in workers}
    row: dict = {
        "seconds": {side: statistics.median(t) for side, t in times.items()},
        "times_s": times,
        "mlx_peak_mb": {side: peaks[side] for side in workers if side != "torch"},
        "max_rel_err": {
            side: rel_err(out, outs["torch"]) for side, out in outs.items() if side != "torch"
        },
    }
    for side in workers:
        if side != "torch":
            ratios = [a / b for a, b in zip(times["torch"], times[side], strict=True)]
            row[f"torch_over_{side}"] = statistics.median(ratios)
            row[f"torch_over_{side}_range"] = [min(ratios), max(ratios)]
    return row


def _describe(workers: dict[str, Worker]) -> dict:
    return {side: w.ask(cmd="describe") for side, w in workers.items()}


# ----------------------------------------------------------------------------------------------
# DiT forward


def bench_dit(
    folder: Path, layer_counts: list[int], token_frames: list[int], grid, rounds: int, threads: int
) -> dict:
    """Each side in its own process at every (layers, tokens), in turns; see the top."""
    rng = np.random.default_rng(0)
    context = np.zeros((1, TEXT_LEN, TEXT_DIM), np.float32)
    context[0, :20] = rng.standard_normal((20, TEXT_DIM))  # a 20-token prompt, zero-padded
    inputs = {}
    for frames in token_frames:
        x = rng.standard_normal((1, frames, *grid, Z)).astype(np.float32)
        inputs[frames] = folder / f"dit-input-{frames}.npz"
        np.savez(inputs[frames], x=x, t=np.array([500.0], np.float32), context=context)
    rows, sides = [], {}
    for layers in layer_counts:
        workers = {side: Worker(side, "dit", folder, layers, threads) for side in SIDES}
        try:
            for frames in token_frames:
                tokens = frames * (grid[0] // 2) * (grid[1] // 2)
                row = in_turns(workers, inputs[frames], rounds, folder)
                rows.append({"layers": layers, "tokens": tokens, "latent_frames": frames, **row})
                sec = row["seconds"]
                print(
                    f"  DiT {layers} layers, {tokens} tokens: torch {sec['torch']:.2f} s, "
                    f"mlx fast path {sec['mlx_fast']:.2f} s "
                    f"(torch/mlx {row['torch_over_mlx_fast']:.2f}), plain "
                    f"{sec['mlx_plain']:.2f} s (torch/mlx {row['torch_over_mlx_plain']:.2f}); "
                    f"rel err {row['max_rel_err']['mlx_fast']:.1e}",
                    flush=True,
                )
            sides = _describe(workers)
        finally:
            for w in workers.values():
                w.close()
    return {
        "format": "processes",
        "dim": DIM,
        "heads": HEADS,
        "ffn_dim": FFN,
        "rounds": rounds,
        "sides": sides,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# VAE decode


def bench_vae(
    folder: Path, latent_frames: int, grid, rounds: int, threads: int, plain: bool
) -> dict:
    """diffusers AutoencoderKLWan.decode vs our WanVAE.decode (fast path; `plain` too), fp32."""
    raw = np.random.default_rng(1).standard_normal((1, latent_frames, *grid, Z))
    inputs = folder / "vae-input.npz"
    np.savez(inputs, x=raw.astype(np.float32))
    sides = ("torch", "mlx_fast", "mlx_plain") if plain else ("torch", "mlx_fast")
    workers = {side: Worker(side, "vae", folder, None, threads) for side in sides}
    try:
        row = in_turns(workers, inputs, rounds, folder)
        described = _describe(workers)
    finally:
        for w in workers.values():
            w.close()
    frames = int(np.load(folder / "torch.npy").shape[1])
    sec = row["seconds"]
    print(
        f"  VAE {latent_frames}x{grid[0]}x{grid[1]} -> {frames} frames: torch "
        f"{sec['torch']:.1f} s, mlx {sec['mlx_fast']:.1f} s "
        f"(torch/mlx {row['torch_over_mlx_fast']:.2f})",
        flush=True,
    )
    torch_out = np.load(folder / "torch.npy")
    return {
        "latent_frames": latent_frames,
        "latent_grid": list(grid),
        "pixel_frames": frames,
        "torch_s": sec["torch"],
        "mlx_s": sec["mlx_fast"],
        "mlx_plain_s": sec.get("mlx_plain"),
        "torch_over_mlx": row["torch_over_mlx_fast"],
        "mlx_peak_mb": row["mlx_peak_mb"]["mlx_fast"],
        "max_abs_err": float(np.abs(np.load(folder / "mlx_fast.npy") - torch_out).max()),
        "sides": described,
    }


# ----------------------------------------------------------------------------------------------
# Conversion and one denoising step (1.3B-shaped, random weights)


def write_random_checkpoint(folder: Path, layers: int) -> int:
    """A random 1.3B-shaped (`layers` blocks) bf16 Wan DiT in the original layout; bytes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

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
    import mlx.core as mx
    from mlx.utils import tree_flatten

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
        "--repeats", type=int, default=1, help="VAE: timed rounds of the sides in turns"
    )
    parser.add_argument(
        "--dit-repeats",
        type=int,
        default=5,
        help="DiT: timed rounds of the sides in turns (torch, MLX fast path, MLX plain, ...)",
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="DiT layer counts (default: 2 4)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: os.cpu_count())"
    )
    parser.add_argument("--vae-plain", action="store_true", help="VAE: our plain path too")
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
    # A side's process (started by this script): --worker SIDE --kind dit|vae --folder DIR
    parser.add_argument("--worker", choices=["make", *SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["dit", "vae"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return
    parts = set(opts.only.split(","))
    threads = opts.threads or os.cpu_count()

    if opts.small:
        dit_grid, dit_frames, vae_grid, vae_frames, step_layers = (8, 14), [1, 3], (8, 14), 5, 2
        layer_counts = opts.layers or [2]
        step_grid_fp32, step_grid_bf16 = (8, 14), (4, 6)
    else:
        dit_grid, dit_frames, vae_grid, vae_frames, step_layers = (
            FULL_GRID,
            [1, 3],
            FULL_GRID,
            5,
            30,
        )
        layer_counts = opts.layers or [2, 4]
        step_grid_fp32, step_grid_bf16 = FULL_GRID, tuple(opts.step_bf16_grid)
    result = {
        "benchmark": "wan_vs_torch",
        "small": opts.small,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        # (read from the installed packages: this process imports neither torch nor diffusers)
        "mlx": importlib.metadata.version("mlx"),
        "torch": importlib.metadata.version("torch"),
        "diffusers": importlib.metadata.version("diffusers"),
        "torch_threads": threads,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "repeats": opts.repeats,
        "dit_repeats": opts.dit_repeats,
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
    with tempfile.TemporaryDirectory(dir=opts.workdir, prefix="wan-bench-") as tmp:
        folder = Path(tmp)
        if "dit" in parts:
            cmd = [sys.executable, __file__, "--worker", "make", "--kind", "dit"]
            subprocess.run([*cmd, "--folder", tmp, "--layers", str(max(layer_counts))], check=True)
            result["dit"] = bench_dit(
                folder, layer_counts, dit_frames, dit_grid, opts.dit_repeats, threads
            )
            fast = result["dit"]["sides"].get("mlx_fast", {})
            result["mlx_cpu_kernels"] = "; ".join(fast.get("kernel_choices", [])) or "none"
        if "vae" in parts:
            cmd = [sys.executable, __file__, "--worker", "make", "--kind", "vae", "--folder", tmp]
            subprocess.run(cmd, check=True)
            result["vae"] = bench_vae(
                folder, vae_frames, vae_grid, opts.repeats, threads, opts.vae_plain
            )
    if parts & {"convert", "step"}:
        from s2dit_mlx import setup_blas

        setup_blas()  # this process runs MLX from here on (after every torch worker is done)
        with tempfile.TemporaryDirectory(dir=opts.workdir, prefix="wan-bench-") as tmp:
            src, conv = Path(tmp) / "src", Path(tmp) / "converted"
            nbytes = write_random_checkpoint(src, step_layers)
            c = bench_convert(src, conv)
            result["convert"] = {
                "layers": step_layers,
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
                    steps.append({"layers": step_layers, **s})
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
