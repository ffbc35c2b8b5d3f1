"""Render benchmarks/results/*.json: full tables for docs/benchmarks.md, a summary for the README.

python benchmarks/report.py                  # print the full tables
python benchmarks/report.py --update-readme  # replace the blocks between the markers of
                                             # README.md (summary) and docs/benchmarks.md (tables)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
FULL = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def gemm_table(r: dict) -> list[str]:
    res = r["results"]
    sizes = list(res["mlx"]["gflops"])
    lines = [
        "**fp32 GEMM** (GFLOP/s, n x n x n; `benchmarks/gemm.py`)",
        "",
        "| n | MLX + our OpenBLAS | numpy | MLX, reference BLAS | MLX / numpy | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for n in sizes:
        mlx, npy = res["mlx"]["gflops"][n], res["numpy"]["gflops"][n]
        ref = res["mlx_reference"]["gflops"][n]
        lines.append(
            f"| {n} | {mlx:.0f} | {npy:.0f} | {ref:.1f} | {mlx / npy:.2f} | {mlx / ref:.0f}x |"
        )
    return lines


def attention_table(r: dict) -> list[str]:
    lines = [
        f"**One attention layer** at dim {r['dim']}, {r['heads']} heads, projections included "
        f"(seconds; peak MB; `benchmarks/attention.py`; GEMM {r['gemm_gflops_fp32']:.0f} GFLOP/s)",
        "",
        "| tokens | full | lcha | ssa | full / lcha | full / ssa | lcha us/token | "
        "peak MB full (untiled) / lcha / ssa | full at GEMM rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        f, lc, s = row["full"], row["lcha"], row["ssa"]
        lines.append(
            f"| {row['tokens']} | {f['seconds']:.2f} | {lc['seconds']:.2f} | {s['seconds']:.2f} | "
            f"{row['full_over_lcha']:.1f}x | {row['full_over_ssa']:.1f}x | "
            f"{lc['us_per_token']:.0f} | {f['peak_mb']:.0f} ({row['full_untiled']['peak_mb']:.0f})"
            f" / {lc['peak_mb']:.0f} / {s['peak_mb']:.0f} | {100 * row['full_matmul_fraction']:.0f}% |"
        )
    return lines


def streaming_table(r: dict) -> list[str]:
    m, now, before = r["model"], r["summary"]["now"], r["summary"]["before"]
    h, w = r["latent_hw"]
    lines = [
        f"**Streaming** {r['chunks']} chunks of {m['frames_per_chunk']} latent frame(s) at "
        f"{h}x{w} latents, dim {m['dim']}, layers {'/'.join(m['layers'])}, window "
        f"{m['window']}, sink {m['sink']}, {r['sampler']} (`benchmarks/streaming.py`; medians "
        f"over chunks 4-{r['chunks']}, both streams advanced in turns; same latents to "
        f"{r['max_abs_difference']:.0e})",
        "",
        "| caches | seconds per chunk | peak MB | peak spread, chunks 4+ | last / chunk 4 time |",
        "|---|---|---|---|---|",
    ]
    for label, x in (
        ("preallocated, in place; text side once", now),
        ("concatenated per pass; text side per pass", before),
    ):
        lines.append(
            f"| {label} | {x['median_seconds']:.2f} | {x['median_peak_mb']:.0f} | "
            f"{100 * x['peak_spread_from_chunk4']:.1f}% | {x['time_ratio_last_over_chunk4']:.2f}x |"
        )
    lines.append("")
    lines.append(f"now / before: {r['time_now_over_before']:.2f}x the time per chunk")
    return lines


def quality_table(r: dict) -> list[str]:
    acc = r["accuracy"]
    h, w = r["size"]
    s = r["settings"]
    background = f"{100 * acc['background']:.1f}%" if "background" in acc else "-"
    # One decimal: 200 prompts move a rate by 0.5 points, and the goals are tight.
    return [
        f"**Built-in model quality and speed** ({len(r['clips'])} random prompts and seeds, "
        f"{r['clip_frames']}-frame clips at {w}x{h}, {r['fps']} fps, read back by "
        f"`s2dit_mlx.world.evaluate`; {s['mode']}, solver {s.get('solver', 'few-step')}, "
        f"{s['steps']} steps per chunk, shift {s['shift']:g}, CFG {s['guidance']:g}; "
        "`benchmarks/quality.py`)",
        "",
        "| colour | shape | motion | all three | background | 10 s streamed clip: coherent "
        "frames (mean / min) | seconds per 2 s clip | streaming frames/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {100 * acc['colour']:.1f}% | {100 * acc['shape']:.1f}% "
        f"| {100 * acc['motion']:.1f}% | {100 * acc['all']:.1f}% | {background} "
        f"| {100 * r['long_coherence_mean']:.1f}% / {100 * r['long_coherence_min']:.1f}% "
        f"| {r['seconds_per_clip']:.2f} | {r['streaming_frames_per_s']:.1f} |",
    ]


def coreml_table(r: dict) -> list[str]:
    m = r["measured"]
    lines = [
        f"**Core ML export** ({m['weights']}; {m['chunks']} streamed chunks through the numpy "
        "interpreter of the saved package vs MLX; `benchmarks/coreml.py`)",
        "",
        "| precision | compression | DiT PSNR dB | VAE PSNR dB | DiT package MB | export s |",
        "|---|---|---|---|---|---|",
    ]
    for mode in m["modes"]:
        lines.append(
            f"| {mode['precision']} | {mode['compression']} | {mode['dit_psnr_db']:.1f} | "
            f"{mode['vae_psnr_db']:.1f} | {mode['dit_package_bytes'] / 1e6:.2f} | "
            f"{mode['export_s']:.1f} |"
        )
    return lines


def _ratio(row: dict, key: str) -> str:
    """A median ratio and, where kept, the range over the rounds: "1.12 (1.05-1.20)"."""
    spread = row.get(f"{key}_range")
    text = f"{row[key]:.2f}"
    return text + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _wan_processes_table(r: dict) -> list[str]:
    """The Wan teacher vs PyTorch, each side in its own process (the current format)."""
    d = r.get("dit", {})
    fast = d.get("sides", {}).get("mlx_fast", {})
    lines = [
        f"**Wan teacher, MLX vs PyTorch {r['torch']} + diffusers {r['diffusers']}** (CPU, "
        f"{r['machine']['cpus']} cores; each side in its own process, timed in turns; torch "
        f"on {r['torch_threads']} threads; MLX with the CPU fast path (OpenBLAS "
        f"{fast.get('openblas_threads', '?')} thread(s), CPU kernels "
        f"{fast.get('kernel_threads', '?')} threads) and without it (plain MLX on OpenBLAS); "
        f"seconds, medians of {d.get('rounds', r.get('dit_repeats'))} rounds; "
        "`benchmarks/wan_vs_torch.py`)",
        "",
        "| what | size | torch | MLX, fast path | torch / MLX | MLX, plain | torch / MLX plain "
        "| max error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in d.get("rows", []):
        sec = row["seconds"]
        lines.append(
            f"| DiT forward, {row['layers']} layers, dim {d['dim']}, fp32 | {row['tokens']} "
            f"tokens | {sec['torch']:.2f} | {sec['mlx_fast']:.2f} | "
            f"{_ratio(row, 'torch_over_mlx_fast')} | {sec['mlx_plain']:.2f} | "
            f"{_ratio(row, 'torch_over_mlx_plain')} | {row['max_rel_err']['mlx_fast']:.1e} (rel) |"
        )
    if "vae" in r:
        v = r["vae"]
        plain = v.get("mlx_plain_s")
        plain_cells = "- | -" if plain is None else f"{plain:.1f} | {v['torch_s'] / plain:.2f}"
        lines.append(
            f"| Wan2.1 VAE decode, fp32 | {v['latent_frames']}x{v['latent_grid'][0]}x"
            f"{v['latent_grid'][1]} latents -> {v['pixel_frames']} frames | {v['torch_s']:.1f} | "
            f"{v['mlx_s']:.1f} | {v['torch_over_mlx']:.2f} | {plain_cells} | "
            f"{v['max_abs_err']:.1e} (abs) |"
        )
    if r.get("mlx_cpu_kernels"):
        lines += ["", f"CPU kernels chosen by measurement in the fast-path process: "
                  f"{r['mlx_cpu_kernels']}."]  # fmt: skip
    return lines


def wan_vs_torch_table(r: dict) -> list[str]:
    """The Wan teacher vs PyTorch: speed ratios, errors and peak memory."""
    if r.get("dit", {}).get("format") == "processes":
        return _wan_processes_table(r) + _wan_memory_table(r)
    lines = [
        f"**Wan teacher, MLX vs PyTorch {r['torch']} + diffusers {r['diffusers']}** (CPU, "
        f"torch threads {r['torch_threads']}, MLX BLAS threads "
        f"{r.get('openblas_threads', 'default')}; seconds; `benchmarks/wan_vs_torch.py`)",
    ]
    kept = r.get("kept_from_earlier_run")
    if kept:
        lines[0] += (
            f". Rows for {', '.join(kept['parts'])} are from an earlier run (MLX CPU kernels: "
            f"{kept['mlx_cpu_kernels']})"
        )
    if "dit" in r or "vae" in r:
        lines += [
            "",
            "| what | size | torch | MLX | torch / MLX | MLX, no CPU kernels | max error |",
            "|---|---|---|---|---|---|---|",
        ]
    if "dit" in r:
        d = r["dit"]
        for row in d["rows"]:
            builtin = row.get("mlx_builtin_ops_s")
            spread = row.get("torch_over_mlx_range")
            ratio = f"{row['torch_over_mlx']:.2f}"
            if spread:  # median of the pairs taken in turns, and their range
                ratio += f" ({spread[0]:.2f}-{spread[1]:.2f})"
            lines.append(
                f"| DiT forward, {d['layers']} layers, dim {d['dim']}, fp32 | {row['tokens']} "
                f"tokens | {row['torch_s']:.2f} | {row['mlx_s']:.2f} | "
                f"{ratio} | "
                f"{'-' if builtin is None else f'{builtin:.2f}'} | "
                f"{row['max_rel_err']:.1e} (rel) |"
            )
    if "vae" in r:
        v = r["vae"]
        lines.append(
            f"| Wan2.1 VAE decode, fp32 | {v['latent_frames']}x{v['latent_grid'][0]}x"
            f"{v['latent_grid'][1]} latents -> {v['pixel_frames']} frames | {v['torch_s']:.1f} | "
            f"{v['mlx_s']:.1f} | {v['torch_over_mlx']:.2f} | - | {v['max_abs_err']:.1e} (abs) |"
        )
    return lines + _wan_memory_table(r)


def _wan_memory_table(r: dict) -> list[str]:
    """Conversion and one denoising step: peak memory and time."""
    lines = []
    if "convert" in r or "steps" in r:
        lines += ["", "| memory | size | peak | time |", "|---|---|---|---|"]
    if "convert" in r:
        c = r["convert"]
        lines.append(
            f"| convert.wan, random {c['layers']}-layer 1.3B-shaped bf16 checkpoint "
            f"({c['checkpoint_gb']:.2f} GB) | whole process | {c['peak_rss_gb']:.2f} GB (RSS) | "
            f"{c['seconds']:.1f} s |"
        )
    for s in r.get("steps", []):
        lines.append(
            f"| one CFG denoising step, {s['layers']} layers, bf16 weights, "
            f"{s['compute']} compute | {s['tokens']} tokens | {s['peak_gb']:.2f} GB "
            f"(weights {s['weights_gb']:.2f}) | {s['seconds']:.1f} s |"
        )
    return lines


def resources_table(r: dict) -> list[str]:
    lines = [
        "**Resource guard: estimated vs measured peak memory** (built-in teacher, MB; generate: "
        "MLX's peak, export: max-RSS growth; `benchmarks/resources.py`)",
        "",
        "| run | size | estimated | measured | ratio | RSS growth (estimated) | seconds "
        "(estimated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        gen = row["kind"] == "generate"
        est = row["estimated_mlx_mb"] if gen else row["estimated_peak_mb"]
        meas = row["mlx_peak_mb"] if gen else row["rss_growth_mb"]
        ratio = row["mlx_ratio"] if gen else row["rss_ratio"]
        rss = f"{row['rss_growth_mb']:.1f} ({row['estimated_peak_mb']:.1f})" if gen else "-"
        secs = f"{row['seconds']:.1f}"
        if row["estimated_seconds"] is not None:
            secs += f" ({row['estimated_seconds']:.1f})"
        lines.append(
            f"| {row['kind']} | {row['size']}x{row['size']} | {est:.1f} | {meas:.1f} | "
            f"{ratio:.2f} | {rss} | {secs} |"
        )
    return lines


def contention_table(r: dict) -> list[str]:
    lines = [
        f"**Generation under CPU contention** (built-in teacher, seconds per clip, median over "
        f"{r['rounds']} alternating runs x {r['clips_per_run']} clips; competitor "
        f"{r['competitor']}; quiet = without it, on a machine other jobs shared; "
        "`benchmarks/contention.py`)",
        "",
        "| size | setting | quiet | busy | busy / quiet |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for res in r["sizes"]:
        size = f"{res['size']}x{res['size']}"
        for name, row in res["settings"].items():
            quiet, busy = row["quiet_median_s"], row["busy_median_s"]
            lines.append(f"| {size} | {name} | {quiet:.2f} | {busy:.2f} | {busy / quiet:.1f}x |")
        notes.append(
            f"{size}: busy default / best {res['busy_default_over_best']:.2f} (goal <= 1.5), "
            f"quiet default / old default {res['quiet_default_over_old']:.2f}"
        )
    return [*lines, "", "; ".join(notes) + "."]


def decode_overlap_table(r: dict) -> list[str]:
    f = r["frames_per_s"]
    return [
        f"**Decode overlap** the built-in teacher streaming {r['frames']} frames, "
        f"{len(r['runs']['overlap'])} streams in turns, identical frames "
        "(`benchmarks/decode_overlap.py`)",
        "",
        "| VAE decode | frames/s (median) |",
        "|---|---|",
        f"| chunk k decoded while chunk k + 1 is denoised | {f['overlap']:.1f} |",
        f"| in line, after each chunk | {f['in_line']:.1f} |",
        "",
        f"overlap / in line: {r['ratio']:.2f}x",
    ]


def streaming_vs_release_table(r: dict) -> list[str]:
    m, now, before = r["model"], r["summary"]["now"], r["summary"]["before"]
    commit = (r["before"]["commit"] or "?")[:7]
    return [
        f"**Streaming, this version vs the one before the architecture work** (commit {commit}), "
        f"each in its own process as its users run it, in lock step: {r['chunks']} chunks of "
        f"{r['latent_hw'][0]}x{r['latent_hw'][1]} latents, dim {m['dim']}, layers "
        f"{'/'.join(m['layers'])}, window {m['window']}, sink {m['sink']}, {r['sampler']} "
        "(`benchmarks/streaming_vs_release.py`; medians from chunk 4; last chunk equal to "
        f"{r['max_abs_difference_last_chunk']:.0e})",
        "",
        "| version | seconds per chunk | peak MB |",
        "|---|---|---|",
        f"| now | {now['median_seconds']:.2f} | {now['median_peak_mb']:.0f} |",
        f"| before | {before['median_seconds']:.2f} | {before['median_peak_mb']:.0f} |",
        "",
        f"now / before: {r['time_now_over_before']:.2f}x the time per chunk",
    ]


def compiled_step_table(r: dict) -> list[str]:
    lines = [
        f"**Compiled per-chunk step** streaming, each chunk's denoising passes op by op or as one "
        f"compiled MLX graph, in turns, {r['sampler']}, CPU kernels {r['cpu_kernels']} "
        "(`benchmarks/compiled_step.py`; medians from chunk 3)",
        "",
        "| model | latents | eager ms / chunk | compiled ms / chunk | compiled / eager | max diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in r["cases"].items():
        m, (h, w) = c["median_seconds"], c["latent_hw"]
        lines.append(
            f"| {name} | {h}x{w} | {1e3 * m['eager']:.1f} | {1e3 * m['compiled']:.1f} | "
            f"{c['compiled_over_eager']:.2f}x | {c['max_abs_difference']:.1e} |"
        )
    return lines


def distill_table(r: dict) -> list[str]:
    lines = [
        f"**Distillation** the built-in teacher and its students, one run, models in "
        f"turns (`benchmarks/distill.py`): adherence over {r['prompts']} random prompts "
        f"({r['clip_frames']}-frame clips), coherence over {r['streams']} streams of "
        f"{r['long_clip_frames']} frames, diversity over {r['diversity_prompts']} prompts x "
        f"{r['diversity_seeds']} seeds (spread of the first frame's object centre and size)",
        "",
        "| model | steps, CFG | DiT passes / chunk | colour | shape | motion | all three | "
        "coherence (min) | s / clip | stream frames/s | diversity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        a, st = m["accuracy"], m["settings"]
        lines.append(
            f"| {name} | {st['steps']}, {st['guidance']:g} | {m['passes_per_chunk']} | "
            f"{_pct(a['colour'])} | {_pct(a['shape'])} | {_pct(a['motion'])} | {_pct(a['all'])} | "
            f"{_pct(m['coherence_mean'])} ({_pct(m['coherence_min'])}) | "
            f"{m['seconds_per_clip']:.2f} | {m['streaming_frames_per_s']:.1f} | "
            f"{m['diversity']['total']:.3f} |"
        )
    return lines


def layout_search_table(r: dict) -> list[str]:
    lines = [
        f"**Layout search** all {len(r['layouts'])} {{{', '.join(r['kinds'])}}} layouts of the "
        f"built-in teacher, each fitted {r['fit_steps']} steps on its teacher cache "
        "(`benchmarks/layout_search.py`)",
        "",
        f"- Spearman rank correlation, the DP's additive prediction vs measured held-out loss: "
        f"{r['spearman']:.3f}",
        f"- latency model vs measured whole-model streaming call: worst relative error "
        f"{_pct(r['latency_worst_relative_error'])}",
        "",
        "| latency budget (cheapest -> dearest) | DP's pick | its loss | best that fits | "
        "gap / loss range |",
        "|---|---|---|---|---|",
    ]
    for b in r["budgets"]:
        lines.append(
            f"| {b['budget_fraction']:.2f} | {'/'.join(b['dp_layers'])} | "
            f"{b['dp_measured']:.4f} | {b['best_measured']:.4f} | {_pct(b['gap_over_range'])} |"
        )
    return lines


RENDERERS = {
    "gemm": gemm_table,
    "attention": attention_table,
    "streaming": streaming_table,
    "streaming_vs_release": streaming_vs_release_table,
    "quality": quality_table,
    "coreml": coreml_table,
    "wan_vs_torch": wan_vs_torch_table,
    "resources": resources_table,
    "contention": contention_table,
    "decode_overlap": decode_overlap_table,
    "compiled_step": compiled_step_table,
    "distill": distill_table,
    "layout_search": layout_search_table,
}


def render() -> str:
    """All available result tables as markdown."""
    blocks = []
    for name, fn in RENDERERS.items():
        result = _load(name)
        if result is not None:
            blocks.append("\n".join(fn(result)))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# The README's summary: one or two rows per benchmark, the figure a user asks about first


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def quality_summary(r: dict) -> list[tuple[str, str]]:
    acc, (h, w) = r["accuracy"], r["size"]
    return [
        (
            f"built-in teacher, {len(r['clips'])} random prompts (`quality.py`)",
            f"colour {_pct(acc['colour'])}, shape {_pct(acc['shape'])}, motion "
            f"{_pct(acc['motion'])}, all three {_pct(acc['all'])}; 10 s streams: "
            f"{_pct(r['long_coherence_mean'])} of frames hold one coherent object",
        ),
        (
            "built-in teacher speed",
            f"{r['streaming_frames_per_s']:.1f} frames/s streaming at {w}x{h}; "
            f"{r['seconds_per_clip']:.2f} s per 2 s clip",
        ),
    ]


def streaming_summary(r: dict) -> list[tuple[str, str]]:
    now = r["summary"]["now"]
    return [
        (
            f"streaming {r['chunks']} chunks, preallocated caches vs concatenating (`streaming.py`)",
            f"{r['time_now_over_before']:.2f}x the time per chunk; peak memory within "
            f"{100 * now['peak_spread_from_chunk4']:.1f}% from chunk 4 on",
        )
    ]


def streaming_vs_release_summary(r: dict) -> list[tuple[str, str]]:
    return [
        (
            "streaming at Wan-1.3B width, this version vs before the architecture work "
            "(`streaming_vs_release.py`)",
            f"{r['time_now_over_before']:.2f}x the time per chunk",
        )
    ]


def attention_summary(r: dict) -> list[tuple[str, str]]:
    row = r["rows"][len(r["rows"]) // 2]
    return [
        (
            f"one attention layer, {row['tokens']} tokens (`attention.py`)",
            f"full {row['full']['seconds']:.2f} s, lcha {row['lcha']['seconds']:.2f} s "
            f"({row['full_over_lcha']:.1f}x faster), ssa {row['ssa']['seconds']:.2f} s "
            f"({row['full_over_ssa']:.1f}x)",
        )
    ]


def wan_vs_torch_summary(r: dict) -> list[tuple[str, str]]:
    rows = []
    if r.get("dit", {}).get("format") == "processes":
        d = r["dit"]["rows"]

        def span(key: str) -> str:
            lo, hi = min(row[key] for row in d), max(row[key] for row in d)
            return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"

        layers = sorted({row["layers"] for row in d})
        tokens = sorted({row["tokens"] for row in d})
        rows.append(
            (
                "Wan DiT forward vs PyTorch, each side on all cores in its own process "
                "(`wan_vs_torch.py`)",
                f"torch time / MLX time {span('torch_over_mlx_fast')} with the CPU fast path, "
                f"{span('torch_over_mlx_plain')} without it ({'-'.join(map(str, layers))} layers"
                f", {'-'.join(map(str, tokens))} tokens)",
            )
        )
    elif "dit" in r:
        ratios = ", ".join(
            f"{row['torch_over_mlx']:.2f} at {row['tokens']} tokens" for row in r["dit"]["rows"]
        )
        rows.append(
            (
                f"Wan DiT forward vs PyTorch on {r['torch_threads']} thread"
                f"{'' if r['torch_threads'] == 1 else 's'} (`wan_vs_torch.py`)",
                f"torch time / MLX time {ratios}",
            )
        )
    if "vae" in r:
        rows.append(
            (
                "Wan2.1 VAE decode vs PyTorch",
                f"torch time / MLX time {r['vae']['torch_over_mlx']:.2f}",
            )
        )
    return rows


def coreml_summary(r: dict) -> list[tuple[str, str]]:
    psnr = ", ".join(
        f"{m['precision'] if m['compression'] == 'none' else m['compression']} "
        f"{m['dit_psnr_db']:.1f} dB"
        for m in r["measured"]["modes"]
        if m["precision"] == "float16"
    )
    return [("Core ML export, DiT PSNR vs MLX (`coreml.py`)", psnr)]


def gemm_summary(r: dict) -> list[tuple[str, str]]:
    res = r["results"]
    n = max(res["mlx"]["gflops"], key=int)
    return [
        (
            "fp32 GEMM (`gemm.py`)",
            f"{res['mlx']['gflops'][n]:.0f} GFLOP/s at n = {n} (numpy "
            f"{res['numpy']['gflops'][n]:.0f}, the wheel's reference BLAS "
            f"{res['mlx_reference']['gflops'][n]:.1f})",
        )
    ]


def resources_summary(r: dict) -> list[tuple[str, str]]:
    ratios = [row["mlx_ratio" if row["kind"] == "generate" else "rss_ratio"] for row in r["rows"]]
    return [
        (
            "resource guard (`resources.py`)",
            f"estimated / measured peak memory {min(ratios):.2f}-{max(ratios):.2f}",
        )
    ]


def contention_summary(r: dict) -> list[tuple[str, str]]:
    parts = []
    for res in r["sizes"]:
        row = res["settings"]["default"]
        parts.append(
            f"{row['busy_median_s'] / row['quiet_median_s']:.1f}x at {res['size']}x{res['size']}"
        )
    return [("generation time next to a busy process / alone (`contention.py`)", ", ".join(parts))]


def decode_overlap_summary(r: dict) -> list[tuple[str, str]]:
    f = r["frames_per_s"]
    return [
        (
            "decode overlapped with denoising (`decode_overlap.py`)",
            f"{f['overlap']:.1f} vs {f['in_line']:.1f} frames/s in line ({r['ratio']:.2f}x)",
        )
    ]


def compiled_step_summary(r: dict) -> list[tuple[str, str]]:
    parts = [f"{c['compiled_over_eager']:.2f}x {name}" for name, c in r["cases"].items()]
    return [
        (
            "per-chunk step compiled / op by op (`compiled_step.py`)",
            f"{', '.join(parts)} the time per chunk (off by default)",
        )
    ]


def distill_summary(r: dict) -> list[tuple[str, str]]:
    models = r["models"]
    teacher = models.get("teacher")
    rows = []
    # The distilled students (DMD, "ar-N") are the headline; the other rows are in the table.
    shown = [n for n in models if n.startswith("ar-")] or [n for n in models if n != "teacher"]
    for name, m in models.items():
        if name not in shown or teacher is None:
            continue
        speed = m["streaming_frames_per_s"] / teacher["streaming_frames_per_s"]
        rows.append(
            (
                f"{name} vs its teacher (`distill.py`)",
                f"all three {_pct(m['accuracy']['all'])} vs {_pct(teacher['accuracy']['all'])}, "
                f"coherence {_pct(m['coherence_mean'])} vs {_pct(teacher['coherence_mean'])}, "
                f"{speed:.1f}x the streaming frames/s",
            )
        )
    return rows


def layout_search_summary(r: dict) -> list[tuple[str, str]]:
    gaps = ", ".join(_pct(b["gap_over_range"]) for b in r["budgets"])
    return [
        (
            f"layout search over {len(r['layouts'])} layouts (`layout_search.py`)",
            f"Spearman {r['spearman']:.2f}; DP pick within {gaps} of the loss range; latency "
            f"model within {_pct(r['latency_worst_relative_error'])}",
        )
    ]


SUMMARIES = {
    "quality": quality_summary,
    "streaming": streaming_summary,
    "streaming_vs_release": streaming_vs_release_summary,
    "attention": attention_summary,
    "wan_vs_torch": wan_vs_torch_summary,
    "coreml": coreml_summary,
    "gemm": gemm_summary,
    "resources": resources_summary,
    "contention": contention_summary,
    "decode_overlap": decode_overlap_summary,
    "compiled_step": compiled_step_summary,
    "distill": distill_summary,
    "layout_search": layout_search_summary,
}


def summary() -> str:
    """One table with the headline figure of each available result, for the README."""
    rows = []
    for name, fn in SUMMARIES.items():
        result = _load(name)
        if result is not None:
            rows += fn(result)
    lines = ["| benchmark | result |", "|---|---|"]
    return "\n".join(lines + [f"| {what} | {figure} |" for what, figure in rows])


def _replace_block(path: Path, text: str) -> None:
    """Replace what lies between the START and END markers of `path` (atomically)."""
    head, rest = path.read_text().split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-readme", action="store_true")
    opts = parser.parse_args()
    text = render()
    if not opts.update_readme:
        print(text)
        return
    _replace_block(README, summary())
    _replace_block(FULL, text)


if __name__ == "__main__":
    main()
