"""The resource guard's memory estimate against measured peaks, for generate and export.

Writes benchmarks/results/resources.json. Each case runs in a fresh process (so one case's
allocator caches and library buffers do not hide the next one's), on the built-in model:

- generate at --generate sizes (default 64, 128, 256): the estimate of MLX's peak against
  mx.get_peak_memory() (MLX's own count of its buffers, exact and free of allocator noise:
  this is what the memory model computes term by term), and the estimate of everything the
  run adds against the growth of the process's max RSS (numpy frames, kernel buffers and the
  allocator's slack too, so noisier; it is what the machine must have);
- export coreml at --export sizes (default 256, 2048, 4096; below ~1024 its memory does not
  depend on the size): the estimate against the growth of max RSS (the exporter works in
  numpy and coremltools, not MLX).

Goal: every estimate within 25% of its measurement. The time estimate of generate is
recorded beside the measured time (a rough estimate; the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_result

HERE = Path(__file__).parent

CHILD = r"""
import json, os, resource, sys, tempfile, time
import s2dit_mlx
s2dit_mlx.setup_blas()  # what `s2dit generate` does: OpenBLAS, then its models on the kernels
import mlx.core as mx


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


kind, size = sys.argv[1], int(sys.argv[2])
from s2dit_mlx import resources
from s2dit_mlx.loading import TEACHER_MODEL_DIR

out = {"kind": kind, "size": size}
if kind == "generate":
    from s2dit_mlx.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(str(TEACHER_MODEL_DIR))
    from s2dit_mlx import kernels

    kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)
    est = pipe.estimate(height=size, width=size)
    before = rss()  # model loaded (weights still lazy): what the CLI has when it checks
    mx.reset_peak_memory()
    start = time.perf_counter()
    video = pipe.generate("a red circle moving left on a black background", seed=0,
                          height=size, width=size)
    out["seconds"] = time.perf_counter() - start
    out["mlx_peak_bytes"] = mx.get_peak_memory()
else:
    from s2dit_mlx.coreml import _ct

    _ct.require()
    from s2dit_mlx.coreml.export import check_export, export_coreml
    from s2dit_mlx.loading import load_model

    bundle = load_model(str(TEACHER_MODEL_DIR))
    mx.eval(bundle.dit.parameters(), bundle.vae.parameters())
    shapes = check_export(bundle.dit, bundle.vae, size, size, None, None, None, "none",
                          "float16")
    est = resources.estimate_export(bundle.dit, bundle.vae, shapes, size, size)
    before = rss()  # model loaded, coremltools imported: what the CLI has when it checks
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        export_coreml(bundle.dit, bundle.vae, os.path.join(tmp, "out"), height=size,
                      width=size, timesteps=[1000.0], schedule={"sampler": "euler"})
    out["seconds"] = time.perf_counter() - start
out["max_rss_before"] = before
out["rss_growth_bytes"] = max_rss() - before
out["estimate"] = est.to_dict()
print("RESULT " + json.dumps(out))
"""


def run_case(kind: str, size: int) -> dict:
    """One case in a fresh interpreter; its RESULT line as a dict."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(size)],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
        timeout=3600,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _row(case: dict) -> dict:
    est = case["estimate"]
    row = {
        "kind": case["kind"],
        "size": case["size"],
        "seconds": round(case["seconds"], 3),
        "estimated_seconds": None if est["seconds"] is None else round(est["seconds"], 3),
        "estimated_peak_mb": est["peak_bytes"] / 1e6,
        "rss_growth_mb": case["rss_growth_bytes"] / 1e6,
        "rss_ratio": est["peak_bytes"] / case["rss_growth_bytes"],
        "parts_mb": {k: round(v / 1e6, 3) for k, v in est["parts"].items()},
    }
    if case["kind"] == "generate":
        row["estimated_mlx_mb"] = est["mlx_bytes"] / 1e6
        row["mlx_peak_mb"] = case["mlx_peak_bytes"] / 1e6
        row["mlx_ratio"] = est["mlx_bytes"] / case["mlx_peak_bytes"]
        row["compared"] = "mlx"
        row["within_25"] = abs(row["mlx_ratio"] - 1) <= 0.25
    else:
        row["compared"] = "rss"
        row["within_25"] = abs(row["rss_ratio"] - 1) <= 0.25
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--export", type=int, nargs="*", default=[256, 2048, 4096])
    parser.add_argument("--out", default=str(HERE / "results" / "resources.json"))
    opts = parser.parse_args()

    rows = []
    load_start = os.getloadavg()
    for kind, sizes in (("generate", opts.generate), ("export", opts.export)):
        for size in sizes:
            row = _row(run_case(kind, size))
            rows.append(row)
            mlx = ""
            if kind == "generate":
                mlx = (
                    f"MLX peak {row['mlx_peak_mb']:.1f} MB, estimated {row['estimated_mlx_mb']:.1f}"
                    f" ({row['mlx_ratio']:.2f}x); "
                )
            print(
                f"{kind} {size}x{size}: {mlx}RSS growth {row['rss_growth_mb']:.1f} MB, estimated "
                f"{row['estimated_peak_mb']:.1f} ({row['rss_ratio']:.2f}x); {row['seconds']:.1f} s"
                + (
                    f" (estimated {row['estimated_seconds']:.1f} s)"
                    if row["estimated_seconds"] is not None
                    else ""
                ),
                flush=True,
            )
    result = {
        "benchmark": "resources",
        "model": "built-in (s2dit_mlx/assets/teacher)",
        "goal": "estimate within 25% of the measured peak",
        "compared": {
            "generate": "estimated MLX peak vs mx.get_peak_memory() (MLX's exact count of its "
            "buffers); the whole estimate vs max-RSS growth is recorded too",
            "export": "whole estimate vs max-RSS growth after the model is loaded and "
            "coremltools imported (the exporter allocates in numpy and coremltools)",
        },
        "all_within_25": all(r["within_25"] for r in rows),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": load_start,
            "shared": "other jobs may run on this machine; memory is per process, times are not",
        },
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_result(opts.out, result)
    print(f"all within 25%: {result['all_within_25']}; wrote {opts.out}")


if __name__ == "__main__":
    main()
