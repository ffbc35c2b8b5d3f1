"""Streaming per-chunk time and peak memory: this checkout vs an earlier checkout of s2dit-mlx.

Writes benchmarks/results/streaming_vs_release.json. `benchmarks/streaming.py` isolates the
caches (today's model code with the old caches swapped in); this one compares whole versions as
their users run them: each side in its own process, importing its own checkout
(`--before PATH`, e.g. a `git worktree` of the commit before the architecture work), with the
CPU fast path as that version's `s2dit generate` uses it (today: `kernels.enable_on_cpu`;
earlier versions hooked their kernels in at import). Same random S2DiT (weights written once
here, loaded strictly by both), same text context, same noise; few-step sampling, 4 steps + the
writing pass per chunk. The two processes run in lock step, one chunk at a time (chunk i of
this checkout, then chunk i of the other), so only one computes at any moment and a slow spell
of the machine lands on both. The final chunk's latents are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import write_result

ROOT = Path(__file__).resolve().parents[1]

# Runs in each side's process, against that side's checkout (sys.argv[1]); reads "go" per chunk.
WORKER = r"""
import json, sys, time
root, files, chunks, latent_h, latent_w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, root)
import s2dit_mlx
if hasattr(s2dit_mlx, "setup_blas"):
    s2dit_mlx.setup_blas()
import mlx.core as mx
import numpy as np
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
args = ModelArgs.from_dict(json.load(open(files + "/args.json")))
model = S2DiT(args)
model.load_weights(files + "/weights.safetensors", strict=True)
mx.eval(model.parameters())
context = mx.load(files + "/context.safetensors")["context"]
frames = args.frames_per_chunk * chunks
try:
    from s2dit_mlx import generation, kernels
    enable, stream = kernels.enable_on_cpu, generation.stream
except (ImportError, AttributeError):
    stream = None
if stream is not None:
    enable(model)
    sampler = generation.Sampler("few-step", steps=4, shift=5.0)
    it = (c.latents for c in generation.stream(
        model, context, frames, (latent_h, latent_w), sampler, noise=generation.SeededNoise(0)))
    version = "generation.stream"
else:
    from s2dit_mlx import sampling, streaming
    it = streaming.stream_latent_chunks(
        model, context, num_latent_frames=frames, latent_height=latent_h, latent_width=latent_w,
        seed=0, timesteps=sampling.few_step_timesteps(4, 5.0))
    version = "streaming.stream_latent_chunks"
print(json.dumps({"ready": version}), flush=True)
for i in range(chunks):
    sys.stdin.readline()
    mx.reset_peak_memory()
    start = time.perf_counter()
    x0 = next(it)
    mx.eval(x0)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": mx.get_peak_memory() / 1e6}), flush=True)
np.save(files + "/last-" + sys.argv[6] + ".npy", np.array(x0))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="an earlier checkout of s2dit-mlx")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--latent", type=int, nargs=2, default=[60, 104], help="latent h w")
    parser.add_argument("--layers", default="lcha,ssa,full,lcha")
    parser.add_argument("--small", action="store_true", help="a small model (a quick check)")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "streaming_vs_release.json")
    )
    opts = parser.parse_args()
    before = Path(opts.before).resolve()
    if not (before / "s2dit_mlx" / "__init__.py").is_file():
        sys.exit(f"error: {before} is not a checkout of s2dit-mlx")

    import mlx.core as mx

    sys.path.insert(0, str(ROOT))
    from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

    widths = dict(dim=1536, ffn_dim=8960, num_heads=12, text_dim=4096, text_len=512)
    if opts.small:
        widths = dict(dim=192, ffn_dim=512, num_heads=3, text_dim=64, text_len=32)
    args = ModelArgs(**widths, layers=opts.layers.split(","), frames_per_chunk=1, window=3, sink=1)
    sides = {"now": ROOT, "before": before}
    with tempfile.TemporaryDirectory() as files:
        mx.random.seed(0)
        model = S2DiT(args)
        model.save_weights(f"{files}/weights.safetensors")
        context = mx.random.normal((1, args.text_len, args.text_dim), key=mx.random.key(1))
        mx.save_safetensors(f"{files}/context.safetensors", {"context": context})
        keep = {k: v for k, v in args.to_dict().items() if k in ModelArgs.__dataclass_fields__}
        Path(files, "args.json").write_text(json.dumps(keep))
        del model
        procs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(root),
                    files,
                    str(opts.chunks),
                    *map(str, opts.latent),
                    name,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name, root in sides.items()
        }
        apis = {name: json.loads(p.stdout.readline())["ready"] for name, p in procs.items()}
        rows = {name: [] for name in sides}
        for i in range(opts.chunks):
            for name, p in procs.items():
                p.stdin.write("go\n")
                p.stdin.flush()
                rows[name].append(json.loads(p.stdout.readline()))
            print(
                f"chunk {i + 1:3d}: "
                + ", ".join(
                    f"{n} {r[-1]['seconds']:.2f} s ({r[-1]['peak_mb']:.0f} MB)"
                    for n, r in rows.items()
                ),
                flush=True,
            )
        for p in procs.values():
            p.stdin.close()
            if p.wait() != 0:
                sys.exit("error: a side failed")
        import numpy as np

        last = {name: np.load(f"{files}/last-{name}.npy") for name in sides}
    steady = slice(3, None)  # from chunk 4: the window is full
    summary = {
        name: {
            "median_seconds": statistics.median(x["seconds"] for x in r[steady]),
            "median_peak_mb": statistics.median(x["peak_mb"] for x in r[steady]),
        }
        for name, r in rows.items()
    }
    result = {
        "benchmark": "streaming_vs_release",
        "before": {"api": apis["before"], "commit": _commit(before)},
        "now": {"api": apis["now"], "commit": _commit(ROOT)},
        "model": args.to_dict(),
        "latent_hw": opts.latent,
        "chunks": opts.chunks,
        "sampler": "few-step, 4 steps + 1 writing pass per chunk",
        "summary": summary,
        "time_now_over_before": summary["now"]["median_seconds"]
        / summary["before"]["median_seconds"],
        "max_abs_difference_last_chunk": float(np.abs(last["now"] - last["before"]).max()),
        "machine": {"platform": platform.platform()},
        "mlx": mx.__version__,
        "rows": rows,
    }
    write_result(opts.out, result)
    print(
        f"median seconds per chunk (chunks 4-{opts.chunks}): now {summary['now']['median_seconds']:.2f}, "
        f"before {summary['before']['median_seconds']:.2f} ({result['time_now_over_before']:.2f}x); "
        f"max |now - before| on the last chunk {result['max_abs_difference_last_chunk']:.1e}"
    )


def _commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
