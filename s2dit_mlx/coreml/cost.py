"""Analytic cost of one exported streaming call: FLOPs (2 per multiply-add) and state bytes.

Counts the matmul-like work of the graph emit.py writes (each attention kind counts its own:
attention/*.py `flops`; FFN, cross-attention, embeddings here); elementwise work (norms, gates)
is left out, as is usual. Pure Python: no coremltools.
"""

from __future__ import annotations

import math

from ..attention import CallShape, attention_kind
from ..cache import ChunkSchedule


def call_shape(args, frames: int, height: int, width: int, window: int, sink: int) -> CallShape:
    """The CallShape of one streaming call; height/width are latent sizes."""
    _, ph, pw = args.patch_size
    past = ChunkSchedule(window, sink).past_slots
    return CallShape(frames, height // ph, width // pw, past, args.text_len)


def call_flops(args, frames: int, height: int, width: int, window: int, sink: int) -> dict:
    """FLOPs of one denoise (or write) call on a chunk; height/width are latent sizes."""
    shape = call_shape(args, frames, height, width, window, sink)
    _, ph, pw = args.patch_size
    n, d, f_ffn, L = shape.tokens, args.dim, args.ffn_dim, args.text_len
    common = (
        2 * n * d * f_ffn * 2  # FFN
        + 2 * n * d * d * 2
        + 2 * L * d * d * 2  # cross q, o (video) and k, v (text)
        + 2 * n * L * d * 2  # cross scores and mixing
    )
    per_kind = {kind: common + attention_kind(kind).flops(args, shape) for kind in set(args.layers)}
    embed = (
        2 * n * (ph * pw * args.in_dim) * d  # patch embedding
        + 2 * n * d * (ph * pw * args.out_dim)  # head
        + 2 * L * (args.text_dim * d + d * d)  # text embedding
        + 2 * (args.freq_dim * d + d * d + d * 6 * d)  # time embedding and projection
    )
    total = embed + sum(per_kind[k] for k in args.layers)
    return {"tokens": n, "per_block": per_kind, "embeddings": embed, "total": total}


def state_bytes(args, frames: int, height: int, width: int, window: int, sink: int) -> int:
    """Bytes of the fp16 streaming state: the kinds' Core ML states, summed over the layers."""
    shape = call_shape(args, frames, height, width, window, sink)
    return sum(
        spec.nbytes
        for i, kind in enumerate(args.layers)
        for spec in attention_kind(kind).coreml_states(args, shape, i)
    )


def chunk_cost(args, frames, height, width, window, sink, steps: int) -> dict:
    """Per chunk: `steps` denoise calls + 1 write call; per latent frame too."""
    call = call_flops(args, frames, height, width, window, sink)
    per_chunk = call["total"] * (steps + 1)
    return {
        "tokens_per_chunk": call["tokens"],
        "flops_per_call": call["total"],
        "flops_per_chunk": per_chunk,
        "flops_per_latent_frame": per_chunk / frames,
        "tflops_per_chunk": round(per_chunk / 1e12, 3),
        "state_bytes": state_bytes(args, frames, height, width, window, sink),
        "state_mb": round(state_bytes(args, frames, height, width, window, sink) / 2**20, 2),
        "flops_per_block_kind": dict(call["per_block"]),
        "calls_per_chunk": steps + 1,
    }


def summary(args, frames, height, width, window, sink, steps) -> dict:
    """Cost of the sandwich beside the same model with every layer `full`."""
    from dataclasses import replace

    full = replace(args, layers=["full"] * len(args.layers))
    ours = chunk_cost(args, frames, height, width, window, sink, steps)
    teacher = chunk_cost(full, frames, height, width, window, sink, steps)
    return {
        "sandwich": ours,
        "full_attention": teacher,
        "flops_ratio_full_over_sandwich": round(
            teacher["flops_per_chunk"] / ours["flops_per_chunk"], 3
        ),
        "state_ratio_full_over_sandwich": round(
            teacher["state_bytes"] / max(ours["state_bytes"], 1), 3
        ),
        "log10_flops_per_chunk": round(math.log10(ours["flops_per_chunk"]), 3),
    }


def graph_flops(function) -> int:
    """FLOPs of the matmul-like ops of a loaded MIL function (linear, matmul, SDPA, conv)."""
    total = 0
    for op in function.operations:
        kind = op.op_type
        if kind == "linear":
            out = op.outputs[0].shape
            total += 2 * math.prod(out) * op.inputs["x"].shape[-1]
        elif kind == "matmul":
            x = op.inputs["x"].shape
            k = x[-2] if op.inputs["transpose_x"].val else x[-1]
            total += 2 * math.prod(op.outputs[0].shape) * k
        elif kind == "scaled_dot_product_attention":
            q, k = op.inputs["query"].shape, op.inputs["key"].shape
            v = op.inputs["value"].shape
            total += 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        elif kind == "conv":
            w = op.inputs["weight"].shape
            total += 2 * math.prod(op.outputs[0].shape) * math.prod(w[1:])
    return total
