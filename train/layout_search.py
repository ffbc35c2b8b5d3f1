"""`python -m train.layout_search`: choose the student's sandwich under latency and memory budgets.

For every layer and attention kind it gathers:
- a cost: the time of one whole block of that kind in a steady-state streaming call at the
  target size on this device (its cache filled to the window), times the passes per chunk;
  or seconds per block from a cost file (e.g. measured on an iPhone: {"lcha": 0.004, ...});
- the state memory the kind keeps per layer (its fp16 streaming state, as Core ML holds it);
- a quality penalty: that layer alone is swapped to the kind in a copy of the base layout,
  initialised from the teacher by name, its attention fitted for a few steps on the teacher
  cache, and the held-out loss compared with the same fit of the unswapped layer (a control),
  so the penalty is the loss increase the swap causes.
Then the dynamic program of train/layout_dp.py picks the layout of least summed penalty within
the budgets, and the student's model-folder config is written.

    python -m train.layout_search --teacher models/teacher --cache cache/t --out layout \\
        --kinds lcha,ssa --latency 0.6 --fit-steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from s2dit_mlx.attention import CallShape, attention_kind
from s2dit_mlx.cache import ChunkSchedule
from s2dit_mlx.cli_args import Parser
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.models.s2dit import Block, S2DiT
from s2dit_mlx.transfer import init_from

from .flow import FlowConfig, FlowModel, flow_matching_loss, make_flow_loss
from .kd import cache_source
from .layout_dp import LayoutProblem, solve
from .trainer import TrainConfig, Trainer

# ----------------------------------------------------------------------------------------------
# Cost


def _block_call_seconds(args, kind: str, grid_latent: tuple[int, int], repeats: int = 9) -> float:
    """Seconds of one streaming call of a block of `kind`, its cache at steady state.

    The fastest of `repeats` calls: a slow spell of a shared machine only ever adds time.
    """
    block_args = replace(args, layers=[kind])
    mx.random.seed(0)
    block = Block(block_args, kind)
    mx.eval(block.parameters())
    _, ph, pw = args.patch_size
    h, w = grid_latent[0] // ph, grid_latent[1] // pw
    f = args.frames_per_chunk
    tokens = mx.random.normal((1, f, h * w, args.dim))
    e0 = mx.random.normal((1, f, 6, args.dim)) * 0.1
    context = mx.random.normal((1, args.text_len, args.dim))
    cache = attention_kind(kind).make_cache(block_args)
    from s2dit_mlx.attention import TokenLayout

    schedule = ChunkSchedule(args.window, args.sink)
    fill = (schedule.past_slots if schedule.bounded else 2) + 1
    for c in range(fill):  # fill the window: the cost of a long stream, not of its start
        layout = TokenLayout((f, h, w), c * f, None, cache, True)
        mx.eval(block(tokens, e0, context, layout), cache.arrays())
    times = []
    for _ in range(repeats):
        layout = TokenLayout((f, h, w), fill * f, None, cache, False)
        start = time.perf_counter()
        mx.eval(block(tokens, e0, context, layout))
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def measure_costs(
    args, kinds: list[str], latent_size: tuple[int, int], passes: int
) -> dict[str, float]:
    """Seconds per chunk of one block of each kind (all layers of a kind cost the same)."""
    return {k: passes * _block_call_seconds(args, k, latent_size) for k in kinds}


def state_bytes(args, kind: str, latent_size: tuple[int, int]) -> int:
    """Bytes of a layer's fp16 streaming state (what the Core ML export holds)."""
    _, ph, pw = args.patch_size
    past = ChunkSchedule(args.window, args.sink).past_slots if args.window else 0
    shape = CallShape(
        args.frames_per_chunk, latent_size[0] // ph, latent_size[1] // pw, past or 0, args.text_len
    )
    return sum(s.nbytes for s in attention_kind(kind).coreml_states(args, shape, 0))


# ----------------------------------------------------------------------------------------------
# Quality


def held_out_loss(student, batch: dict, keys: mx.array, flow: FlowConfig) -> float:
    """The streaming flow loss of a fixed held-out batch (fixed noise: comparable across models)."""
    return float(flow_matching_loss(FlowModel(student), batch, keys, flow))


def fit_layers(
    student, layers: list[int], source, steps: int, lr: float, seed: int, workdir: Path
) -> None:
    """Train only these layers' self-attention for `steps` steps of the streaming flow loss."""
    if not layers or steps == 0:
        return
    student.freeze()
    for layer in layers:
        student.blocks[layer].self_attn.unfreeze()
    flow = FlowConfig(mode="streaming", clean_context_prob=0.5)
    cfg = TrainConfig(steps=steps, batch_size=2, lr=lr, seed=seed, progress=False, compile=False)
    Trainer(FlowModel(student), make_flow_loss(flow), source, cfg, workdir).train()
    student.unfreeze()


def layer_penalties(
    teacher,
    base_args,
    kinds: list[str],
    source,
    held_out: dict,
    steps: int,
    lr: float,
    workdir: Path,
    log=None,
) -> np.ndarray:
    """[layers, kinds] held-out loss increase of swapping one layer, against a same-step control."""
    flow = FlowConfig(mode="streaming", clean_context_prob=0.5)
    keys = mx.stack([mx.random.key(1000 + i) for i in range(held_out["latents"].shape[0])])
    layers = len(base_args.layers)
    penalty = np.zeros((layers, len(kinds)))

    def trial(layout: list[str], layer: int, tag: str) -> float:
        mx.random.seed(0)
        student = S2DiT(replace(base_args, layers=layout))
        init_from(student, teacher, "uniform")
        fit_layers(student, [layer], source, steps, lr, 0, workdir / tag)
        return held_out_loss(student, held_out, keys, flow)

    for i in range(layers):
        control = trial(list(base_args.layers), i, f"control-{i}")
        for j, kind in enumerate(kinds):
            layout = list(base_args.layers)
            layout[i] = kind
            loss = control if kind == base_args.layers[i] else trial(layout, i, f"{kind}-{i}")
            penalty[i, j] = loss - control
            if log:
                log(f"layer {i} {kind}: held-out loss {loss:.5f} (control {control:.5f})")
    return penalty


# ----------------------------------------------------------------------------------------------
# CLI


def _budget(text: str, reference: float, what: str) -> float:
    """'0.6x' (a fraction of the reference: every layer at its dearest kind) or an absolute number."""
    try:
        return float(text[:-1]) * reference if text.endswith("x") else float(text)
    except ValueError:
        raise S2DiTError(f"--{what} takes a number or a fraction like 0.6x, got {text!r}") from None


def run(args: argparse.Namespace) -> dict:
    """Gather costs and penalties, solve, write OUT/config.json and OUT/layout_search.json."""
    from s2dit_mlx.loading import load_model

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in kinds:
        attention_kind(kind)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "layout_search.json").is_file():
        raise S2DiTError(f"--out {out} holds other files; choose a new folder")
    bundle = load_model(args.teacher)
    teacher = bundle.dit
    base = teacher.args
    if args.layers:
        base = replace(base, layers=[k.strip() for k in args.layers.split(",")])
    base.validate()
    source = cache_source(args.cache, seed=args.seed)
    spec = source.cache.spec
    latent = (spec.latent_height, spec.latent_width)
    passes = args.passes
    if args.cost_file:
        try:
            per_block = json.loads(Path(args.cost_file).read_text(encoding="utf-8"))
            costs = {k: passes * float(per_block[k]) for k in kinds}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise S2DiTError(
                f"cost file {args.cost_file} must map each kind to seconds per block ({err})"
            ) from None
    else:
        costs = measure_costs(base, kinds, latent, passes)
    layers = len(base.layers)
    latency = np.array([[costs[k] for k in kinds]] * layers)
    memory = np.array([[state_bytes(base, k, latent) for k in kinds]] * layers, dtype=np.float64)
    dearest = float(latency.max(axis=1).sum())
    latency_budget = _budget(args.latency, dearest, "latency")
    memory_budget = (
        None
        if args.memory is None
        else _budget(args.memory, float(memory.max(axis=1).sum()), "memory")
    )
    problem = LayoutProblem(
        kinds,
        latency,
        memory,
        np.zeros_like(latency),
        latency_budget,
        memory_budget,
        args.max_switches,
    )
    problem.validate()  # impossible budgets fail here, before the slow fits
    held = source(list(range(len(source.cache) - args.held_out, len(source.cache))))
    workdir = out / "fits"
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda m: print(m, file=sys.stderr)) if not args.quiet else None
    problem.penalty = layer_penalties(
        teacher, base, kinds, source, held, args.fit_steps, args.lr, workdir, log
    )
    choice = solve(problem, args.resolution)
    student_args = replace(base, layers=choice.layers)
    config = {
        "model_type": "s2dit",
        "dit": student_args.to_dict(),
        "vae": bundle.config["vae"],
        "text_encoder": bundle.config["text_encoder"],
        "defaults": bundle.defaults,
    }
    report = {
        "kinds": kinds,
        "layers": choice.layers,
        "predicted_penalty": choice.penalty,
        "latency_s_per_chunk": choice.latency,
        "latency_budget": latency_budget,
        "memory_bytes": choice.memory,
        "memory_budget": memory_budget,
        "costs_s_per_chunk": costs,
        "state_bytes": {k: int(memory[0, j]) for j, k in enumerate(kinds)},
        "penalty": problem.penalty.tolist(),
        "fit_steps": args.fit_steps,
        "passes_per_chunk": passes,
        "cost_source": args.cost_file or "measured on this device",
    }
    for name, data in (("config.json", config), ("layout_search.json", report)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / name)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"layout {choice.layers}: predicted loss increase {choice.penalty:+.5f}, "
        f"{choice.latency:.3f} s per chunk (budget {latency_budget:.3f}); wrote {out / 'config.json'}",
        file=sys.stderr,
    )
    return report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.layout_search`."""
    p = Parser(
        prog="python -m train.layout_search",
        description="Choose the sandwich layout (one attention kind per layer) under latency and "
        "memory budgets, from measured costs and per-layer quality penalties.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the teacher model folder")
    p.add_argument(
        "--cache", required=True, metavar="CACHE", help="its teacher cache (train.teacher_cache)"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where config.json and layout_search.json go"
    )
    p.add_argument(
        "--kinds", default="lcha,ssa,full", help="candidate kinds (default lcha,ssa,full)"
    )
    p.add_argument("--layers", help="base layout to swap from (default: the teacher's)")
    p.add_argument(
        "--latency",
        default="0.6x",
        help="seconds per chunk, or a fraction of the dearest layout like 0.6x (default 0.6x)",
    )
    p.add_argument("--memory", help="state bytes, or a fraction like 0.5x (default: no bound)")
    p.add_argument(
        "--max-switches", type=int, help="most changes of kind between neighbours (default: any)"
    )
    p.add_argument(
        "--cost-file", help="JSON of seconds per block for each kind (default: measure here)"
    )
    p.add_argument(
        "--passes",
        type=int,
        default=5,
        help="model passes per chunk (few-step steps + 1; default 5)",
    )
    p.add_argument(
        "--fit-steps", type=int, default=40, help="steps fitting each swapped layer (default 40)"
    )
    p.add_argument(
        "--lr", type=float, default=3e-4, help="learning rate of the fits (default 3e-4)"
    )
    p.add_argument(
        "--held-out", type=int, default=4, help="cache samples kept out for the loss (default 4)"
    )
    p.add_argument(
        "--resolution", type=int, default=2000, help="budget quantisation steps (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""

    def body() -> int:
        run(build_parser().parse_args(argv))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
