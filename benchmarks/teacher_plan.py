"""Memory and time per stage of distilling Wan2.1-T2V-1.3B into an S2DiT at 1.3B widths, on a Mac.

Writes benchmarks/results/teacher_plan.json and prints the markdown table of
docs/distillation.md. Nothing here runs a real teacher: the figures are estimates from the
same models of work and memory the library uses elsewhere (s2dit_mlx/coreml/cost.py's FLOP
count per DiT call, s2dit_mlx/resources.py's activation model), at an assumed sustained
throughput of the Mac's GPU (`--tflops`, default 8: an M-series Max in bfloat16 through MLX,
about half its peak). Memory counts weights, optimizer state (float32 masters, AdamW moments
and gradients: 16 bytes per trained parameter) and the largest call's activations; a 64 GB Mac
leaves ~48 GB to one process comfortably.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
from s2dit_mlx.coreml.cost import call_flops
from s2dit_mlx.models.s2dit import ModelArgs
from s2dit_mlx.models.wan import preset_args
from s2dit_mlx.resources import dit_call_memory

GB = 1e9
UMT5_XXL_PARAMS = 5.68e9  # the encoder of umT5-XXL (24 layers, d 4096, ff 10240, 256k vocab)
WAN21_VAE_PARAMS = 127e6


def params(args: ModelArgs) -> float:
    """Parameters of a DiT (all linears and the modulation), counted from its shapes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from s2dit_mlx.models.s2dit import S2DiT

    mx.random.seed(0)
    with mx.stream(mx.cpu):
        model = S2DiT(replace(args, layers=args.layers[:2]))
        per_two = sum(v.size for _, v in tree_flatten(model.parameters()))
        model = S2DiT(replace(args, layers=args.layers[:1]))
        per_one = sum(v.size for _, v in tree_flatten(model.parameters()))
    block = per_two - per_one
    return per_one - block + block * len(args.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=8.0, help="sustained TFLOP/s assumed")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--frames", type=int, default=33, help="pixel frames per cached clip")
    parser.add_argument("--teacher-steps", type=int, default=24, help="a multiple of the student's")
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2000, help="teacher cache size")
    parser.add_argument("--kd-steps", type=int, default=3000)
    parser.add_argument("--ode-steps", type=int, default=2000)
    parser.add_argument("--dmd-iterations", type=int, default=600)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "teacher_plan.json")
    )
    opts = parser.parse_args()

    rate = opts.tflops * 1e12
    teacher = preset_args("wan2.1-t2v-1.3b")
    teacher.frames_per_chunk = 3
    student = ModelArgs(window=3, sink=1, frames_per_chunk=3)  # Wan-1.3B widths, 10/10/10 sandwich
    lh, lw = opts.height // 8, opts.width // 8
    latent = 1 + (opts.frames - 1) // 4
    chunks = -(-latent // student.frames_per_chunk)
    p_teacher, p_student = params(teacher), params(student)
    bf16 = 2

    # FLOPs of one call: the bidirectional teacher over the whole clip; the student per chunk.
    teacher_call = call_flops(teacher, latent, lh, lw, 1, 0)["total"]
    student_chunk = call_flops(
        student, student.frames_per_chunk, lh, lw, student.window, student.sink
    )["total"]
    student_clip = call_flops(student, latent, lh, lw, 1, 0)["total"]  # block-causal training
    text = 2 * UMT5_XXL_PARAMS * 512
    act_teacher = dit_call_memory(teacher, 2, latent, lh, lw, 1, bf16)
    act_student = dit_call_memory(student, 1, latent, lh, lw, 1, bf16)
    weights = {
        "teacher": p_teacher * bf16,
        "teacher_int8": p_teacher * 1.06,
        "student": p_student * bf16,
        "umt5": UMT5_XXL_PARAMS * bf16,
        "vae": WAN21_VAE_PARAMS * bf16,
    }
    trained = p_student * 16  # float32 masters + gradient + AdamW moments
    d, r = teacher.dim, 64  # a rank-64 LoRA critic on q/k/v/o, cross-attention and the FFN
    lora = len(teacher.layers) * (8 * r * 2 * d + 2 * r * (d + teacher.ffn_dim))

    stages = []

    def stage(name, memory, flops, note):
        stages.append(
            {"stage": name, "memory_gb": memory / GB, "hours": flops / rate / 3600, "note": note}
        )

    stage(
        "teacher cache",
        weights["teacher"] + weights["umt5"] + weights["vae"] + sum(act_teacher.values()),
        opts.samples * (opts.teacher_steps * 2 * teacher_call + text),
        f"{opts.samples} clips of {opts.frames} frames at {opts.width}x{opts.height}, "
        f"{opts.teacher_steps} steps with CFG (2 passes each); split over machines with --shard i/n",
    )
    stage(
        "layout search",
        weights["teacher"] + trained + sum(act_student.values()) * 3,
        2 * 30 * 40 * 3 * student_clip,
        "30 layers x 2 kinds, 40 fitting steps each (the same-step controls add a third)",
    )
    stage(
        "S2DiT-KD (flow on cached x0)",
        trained + sum(act_student.values()) * 3,
        opts.kd_steps * 3 * student_clip,
        f"{opts.kd_steps} steps, batch 1 (gradient checkpointing: --grad-checkpoint)",
    )
    stage(
        "ODE regression",
        trained + sum(act_student.values()) * 3,
        opts.ode_steps * chunks * 4 * student_chunk,
        f"{opts.ode_steps} steps, batch 1, {chunks} chunks each",
    )
    rollout = chunks * (opts.student_steps + 1) * student_chunk
    scores = 3 * teacher_call  # real score with CFG (2) and the critic (1)
    critic = 3 * teacher_call  # the critic's flow loss, forward and backward
    vjp = chunks * 3 * student_chunk / 5  # the generator's exit passes, every 5th iteration
    stage(
        "DMD (S2DiT-AR)",
        weights["teacher_int8"]
        + weights["teacher"]
        + trained
        + lora * 16
        + sum(act_teacher.values()) * 3,
        opts.dmd_iterations * (rollout + scores + critic + vjp),
        f"{opts.dmd_iterations} iterations; int8 real score, LoRA critic (--critic-lora 64)",
    )
    result = {
        "benchmark": "teacher_plan",
        "assumptions": {
            "tflops": opts.tflops,
            "size": [opts.height, opts.width],
            "frames": opts.frames,
            "teacher_params": p_teacher,
            "student_params": p_student,
        },
        "stages": stages,
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| stage | peak memory | time on one Mac | what |")
    print("|---|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s['memory_gb']:.0f} GB | {s['hours']:.1f} h | {s['note']} |")


if __name__ == "__main__":
    main()
