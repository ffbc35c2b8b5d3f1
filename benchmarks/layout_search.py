"""Does the layout search's additive model predict whole layouts? Every layout, measured.

Writes benchmarks/results/layout_search.json. For a teacher and its teacher cache (the built-in
model by default) and two kinds (lcha, ssa), over all 2^L layouts:
- quality: the additive prediction of the search (teacher loss + the sum of per-layer
  penalties, train/layout_search.py) against the measured held-out loss of the whole layout
  (initialised from the teacher by name, every swapped layer's attention fitted for the same
  steps on the cache): Spearman rank correlation; and for three latency budgets, the DP's pick
  against the best layout that fits: its loss as a fraction of the loss range;
- latency: the search's cost model (the sum of per-block streaming costs, plus the embeddings
  and head measured once) against the measured time of one whole-model streaming call, per
  layout: the largest relative error.

    python benchmarks/layout_search.py --cache runs/cache --fit-steps 40
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
import mlx.core as mx

from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_model
from s2dit_mlx.models.s2dit import S2DiT
from s2dit_mlx.transfer import init_from
from train.flow import FlowConfig
from train.kd import cache_source
from train.layout_dp import LayoutProblem, solve
from train.layout_search import fit_layers, held_out_loss, layer_penalties, measure_costs


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def whole_call_seconds(model: S2DiT, latent, repeats: int = 9) -> float:
    """Seconds of one streaming call of the whole model at steady state: the fastest of
    `repeats`, as the search times its blocks."""
    args = model.args
    f = args.frames_per_chunk
    x = mx.random.normal((1, f, *latent, args.in_dim))
    ctx = mx.random.normal((1, args.text_len, args.text_dim))
    cache = model.make_cache()
    fill = (args.sink + (args.window or 2) - 1) + 1
    for _ in range(fill):
        mx.eval(model(x, mx.zeros((1,)), ctx, cache=cache, update_cache=True))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(model(x, mx.array([500.0]), ctx, cache=cache))
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TEACHER_MODEL_DIR))
    parser.add_argument("--cache", required=True, help="the teacher's cache (train.teacher_cache)")
    parser.add_argument("--kinds", default="lcha,ssa")
    parser.add_argument("--fit-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument(
        "--budgets",
        default="0.3,0.55,0.8",
        help="latency budgets: fractions of the way from the cheapest layout to the dearest",
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "layout_search.json")
    )
    opts = parser.parse_args()

    kinds = opts.kinds.split(",")
    teacher = load_model(opts.teacher).dit
    base = teacher.args
    layers = len(base.layers)
    source = cache_source(opts.cache, seed=0)
    n = len(source.cache)
    held = source(list(range(n - opts.held_out, n)))
    keys = mx.stack([mx.random.key(1000 + i) for i in range(opts.held_out)])
    flow = FlowConfig(mode="streaming", clean_context_prob=0.5)
    latent = (source.cache.spec.latent_height, source.cache.spec.latent_width)
    work = Path(tempfile.mkdtemp(prefix="layout-bench-"))

    def student(layout):
        mx.random.seed(0)
        s = S2DiT(replace(base, layers=list(layout)))
        init_from(s, teacher, "first")
        return s

    try:
        start = time.perf_counter()
        penalty = layer_penalties(
            teacher, base, kinds, source, held, opts.fit_steps, opts.lr, work / "penalties"
        )
        teacher_loss = held_out_loss(student(base.layers), held, keys, flow)
        rows = []
        for layout in itertools.product(kinds, repeat=layers):
            s = student(layout)
            swapped = [i for i, k in enumerate(layout) if k != base.layers[i]]
            fit_layers(s, swapped, source, opts.fit_steps, opts.lr, 0, work / "fit")
            shutil.rmtree(work / "fit", ignore_errors=True)
            measured = held_out_loss(s, held, keys, flow)
            predicted = teacher_loss + sum(penalty[i, kinds.index(k)] for i, k in enumerate(layout))
            rows.append({"layers": list(layout), "measured": measured, "predicted": predicted})
            print(
                f"{'/'.join(layout)}: measured {measured:.5f}, predicted {predicted:.5f}",
                flush=True,
            )
        fit_seconds = time.perf_counter() - start

        # Latency: per-block costs (one pass) plus what is not a block, against whole calls.
        block = measure_costs(base, kinds, latent, passes=1)
        empty = whole_call_seconds(student(base.layers[:1]), latent) - block[base.layers[0]]
        worst_latency = 0.0
        for row in rows[:: max(1, len(rows) // 12)]:  # a dozen layouts spread over the set
            predicted_s = empty + sum(block[k] for k in row["layers"])
            measured_s = whole_call_seconds(student(row["layers"]), latent)
            row["latency_predicted_s"], row["latency_measured_s"] = predicted_s, measured_s
            worst_latency = max(worst_latency, abs(predicted_s - measured_s) / measured_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    measured = [r["measured"] for r in rows]
    span = max(measured) - min(measured)
    latency = np.array([[block[k] for k in kinds]] * layers)
    picks = []
    cheapest, dearest = float(latency.min(axis=1).sum()), float(latency.max(axis=1).sum())
    for fraction in map(float, opts.budgets.split(",")):
        budget = cheapest + fraction * (dearest - cheapest)
        problem = LayoutProblem(kinds, latency, np.zeros_like(latency), penalty, budget)
        choice = solve(problem)
        fits = [
            r for r in rows
            if sum(block[k] for k in r["layers"]) <= budget + 1e-12
        ]  # fmt: skip
        best = min(r["measured"] for r in fits)
        chosen = next(r for r in rows if r["layers"] == choice.layers)["measured"]
        picks.append(
            {
                "budget_fraction": fraction,
                "dp_layers": choice.layers,
                "dp_measured": chosen,
                "best_measured": best,
                "gap_over_range": (chosen - best) / span if span > 0 else 0.0,
            }
        )
    result = {
        "benchmark": "layout_search",
        "teacher": opts.teacher,
        "kinds": kinds,
        "fit_steps": opts.fit_steps,
        "teacher_loss": teacher_loss,
        "penalty": penalty.tolist(),
        "spearman": spearman([r["predicted"] for r in rows], measured),
        "budgets": picks,
        "latency_block_s": block,
        "latency_overhead_s": empty,
        "latency_worst_relative_error": worst_latency,
        "minutes": fit_seconds / 60,
        "layouts": rows,
        "machine": {"platform": platform.platform()},
        "median_measured": statistics.median(measured),
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("layouts", "penalty")}, indent=2)
    )


if __name__ == "__main__":
    main()
