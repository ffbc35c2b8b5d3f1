"""One self-attention layer at Wan-1.3B width: full vs lcha vs ssa, time and peak memory.

Writes benchmarks/results/attention.json. Projections are included in every figure.
Also reports how close `full` gets to its matmul FLOP count at the measured GEMM rate,
and the peak memory of untiled softmax attention (what query tiling saves).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
import mlx.core as mx
from results_io import write_result

from s2dit_mlx.attention import TokenLayout, attention_kind
from s2dit_mlx.info import gemm_gflops
from s2dit_mlx.models import layers
from s2dit_mlx.models.s2dit import ModelArgs

DIM, HEADS = 1536, 12
FRAME_GRID = (30, 52)  # a 480x832 video's latent frame after 2x2 patches: 1560 tokens


def measure(kind: str, tokens: int, repeats: int) -> dict:
    """Median time and peak memory of one forward of one attention layer."""
    args = ModelArgs(dim=DIM, num_heads=HEADS, layers=[kind])
    mx.random.seed(0)
    module = attention_kind(kind).module(args)
    x = mx.random.normal((1, tokens, DIM))
    mx.eval(module.parameters(), x)
    layout = TokenLayout((tokens // 1560, *FRAME_GRID), 0, None)
    mx.eval(module(x, layout))  # warm-up (compiles the LCHA conv)
    times = []
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(module(x, layout))
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times),
        "peak_mb": (mx.get_peak_memory() - base) / 1e6,
        "us_per_token": statistics.median(times) / tokens * 1e6,
    }


def full_flops(tokens: int) -> float:
    """Matmul FLOPs of a full attention layer: q, k, v, o projections + QK^T and PV."""
    return 8 * tokens * DIM * DIM + 4 * tokens * tokens * DIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1560, 4680, 9360])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    opts = parser.parse_args()

    gemm = gemm_gflops(2048)
    rows = []
    for tokens in opts.tokens:
        row = {"tokens": tokens}
        for kind in ("full", "lcha", "ssa"):
            row[kind] = measure(kind, tokens, opts.repeats)
            print(f"{kind:5s} {tokens:5d} tokens: {row[kind]['seconds']:.3f} s", flush=True)
        budget = layers.ATTENTION_SCORE_BUDGET
        layers.ATTENTION_SCORE_BUDGET = 1 << 62
        row["full_untiled"] = measure("full", tokens, 1)
        layers.ATTENTION_SCORE_BUDGET = budget
        row["full_over_lcha"] = row["full"]["seconds"] / row["lcha"]["seconds"]
        row["full_over_ssa"] = row["full"]["seconds"] / row["ssa"]["seconds"]
        ideal = full_flops(tokens) / (gemm * 1e9)
        row["full_matmul_fraction"] = ideal / row["full"]["seconds"]
        rows.append(row)

    result = {
        "benchmark": "attention",
        "dim": DIM,
        "heads": HEADS,
        "gemm_gflops_fp32": gemm,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "mlx": mx.__version__,
        "rows": rows,
    }
    write_result(opts.out, result)

    print(f"\nfp32 GEMM: {gemm:.0f} GFLOP/s")
    print(
        "| tokens | full s | lcha s | ssa s | full/lcha | full/ssa | full peak MB "
        "(untiled) | lcha peak MB | ssa peak MB | full matmul-rate fraction |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['full']['seconds']:.2f} | {r['lcha']['seconds']:.2f} | "
            f"{r['ssa']['seconds']:.2f} | {r['full_over_lcha']:.1f}x | {r['full_over_ssa']:.1f}x | "
            f"{r['full']['peak_mb']:.0f} ({r['full_untiled']['peak_mb']:.0f}) | "
            f"{r['lcha']['peak_mb']:.0f} | {r['ssa']['peak_mb']:.0f} | "
            f"{r['full_matmul_fraction']:.2f} |"
        )


if __name__ == "__main__":
    main()
