"""Streaming generation over many chunks: time and peak memory per chunk must stay flat.

Writes benchmarks/results/streaming.json. A mid-sized random-weight S2DiT sandwich
(the weights do not change the cost) generates 32 chunks with a rolling window.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import s2dit_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx

from s2dit_mlx.generation import Sampler, SeededNoise, stream
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--sink", type=int, default=1)
    parser.add_argument("--latent", type=int, nargs=2, default=[16, 24], help="latent h w")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming.json"))
    opts = parser.parse_args()

    args = ModelArgs(
        dim=384,
        ffn_dim=1024,
        num_heads=6,
        text_dim=256,
        text_len=64,
        layers=["lcha"] * 3 + ["ssa"] * 2 + ["full"] + ["lcha"] * 2,
        frames_per_chunk=3,
        window=opts.window,
        sink=opts.sink,
    )
    mx.random.seed(0)
    model = S2DiT(args)
    mx.eval(model.parameters())
    context = mx.random.normal((1, 64, 256))
    chunks = (
        c.latents
        for c in stream(
            model,
            context,
            3 * opts.chunks,
            tuple(opts.latent),
            Sampler("few-step", steps=4, shift=5.0),
            noise=SeededNoise(0),
        )
    )
    rows = []
    mx.reset_peak_memory()
    start = time.perf_counter()
    for i, chunk in enumerate(chunks):
        mx.eval(chunk)
        now = time.perf_counter()
        rows.append(
            {
                "chunk": i + 1,
                "seconds": now - start,
                "peak_mb": mx.get_peak_memory() / 1e6,
                "active_mb": mx.get_active_memory() / 1e6,
            }
        )
        print(
            f"chunk {i + 1:3d}: {now - start:.3f} s, peak {rows[-1]['peak_mb']:.1f} MB", flush=True
        )
        mx.reset_peak_memory()
        start = time.perf_counter()

    c4, last = rows[3], rows[-1]
    steady = rows[3:]
    peaks = [r["peak_mb"] for r in steady]
    result = {
        "benchmark": "streaming",
        "model": args.to_dict(),
        "latent_hw": opts.latent,
        "chunks": opts.chunks,
        "time_ratio_last_over_chunk4": last["seconds"] / c4["seconds"],
        "peak_spread_from_chunk4": (max(peaks) - min(peaks)) / min(peaks),
        "machine": {"platform": platform.platform()},
        "mlx": mx.__version__,
        "rows": rows,
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(
        f"chunk {len(rows)} / chunk 4 time: {result['time_ratio_last_over_chunk4']:.2f}x; "
        f"peak memory spread over chunks 4-{len(rows)}: {100 * result['peak_spread_from_chunk4']:.1f}%"
    )


if __name__ == "__main__":
    main()
