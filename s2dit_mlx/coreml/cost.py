"""Analytic cost of one exported streaming call: FLOPs (2 per multiply-add) and state bytes.

Counts the matmul-like work of the graph emit.py writes (projections, attention scores and
mixing, LCHA feature maps and sums, the depthwise conv, FFN, cross-attention, embeddings);
elementwise work (norms, RoPE, gates) is left out, as is usual. Pure Python: no coremltools.
"""

from __future__ import annotations

import math


def call_flops(args, frames: int, height: int, width: int, window: int, sink: int) -> dict:
    """FLOPs of one denoise (or write) call on a chunk; height/width are latent sizes."""
    _, ph, pw = args.patch_size
    h, w = height // ph, width // pw
    n = frames * h * w  # tokens of the chunk
    d, f_ffn, L = args.dim, args.ffn_dim, args.text_len
    feature = args.lcha_feature_dim or args.head_dim
    kt, kh, kw = args.lcha_conv_kernel
    slots = sink + window - 1
    per_kind = {}
    hd = args.head_dim
    common = (
        2 * n * d * d * 4  # q, k, v, o projections
        + 2 * n * d * f_ffn * 2  # FFN
        + 2 * n * d * d * 2
        + 2 * L * d * d * 2  # cross q, o (video) and k, v (text)
        + 2 * n * L * d * 2  # cross scores and mixing
    )
    for kind in set(args.layers):
        # RoPE is emitted as a matmul with a pair-rotation matrix: 2 * tokens * dim * head_dim.
        if kind == "full":
            extra = 2 * n * (n * (slots + 1)) * d * 2 + 2 * n * d * hd * 2
        elif kind == "ssa":
            m = n // (args.ssa_stride**2)
            extra = 2 * m * (m * (slots + 1)) * d * 2 + 2 * m * d * hd * 2
        else:  # lcha
            heads = args.num_heads
            extra = (
                2 * n * d * feature * 2  # feature maps of q and k (per head, head_dim -> F)
                + 2 * n * feature * d * 2  # phi(k)^T v and phi(q) S
                + 2 * n * feature * heads  # denominator phi(q) z
                + 2 * n * heads * feature * feature * 2 * int(args.lcha_rope)  # RoPE on phi
                + 2 * n * d * kt * kh * kw  # depthwise conv
                + 2 * n * d * d  # conv_proj
            )
        per_kind[kind] = common + extra
    embed = (
        2 * n * (ph * pw * args.in_dim) * d  # patch embedding
        + 2 * n * d * (ph * pw * args.out_dim)  # head
        + 2 * L * (args.text_dim * d + d * d)  # text embedding
        + 2 * (args.freq_dim * d + d * d + d * 6 * d)  # time embedding and projection
    )
    total = embed + sum(per_kind[k] for k in args.layers)
    return {"tokens": n, "per_block": per_kind, "embeddings": embed, "total": total}


def state_bytes(args, frames: int, height: int, width: int, window: int, sink: int) -> int:
    """Bytes of the fp16 streaming state (what emit.dit_state_specs allocates)."""
    _, ph, pw = args.patch_size
    h, w = height // ph, width // pw
    slots = sink + window - 1
    feature = args.lcha_feature_dim or args.head_dim
    kt = args.lcha_conv_kernel[0]
    total = 0
    for kind in args.layers:
        if kind in ("full", "ssa"):
            s = args.ssa_stride if kind == "ssa" else 1
            total += 2 * slots * frames * (h // s) * (w // s) * args.dim
        else:
            total += args.num_heads * feature * (args.head_dim + 1)
            total += args.dim * max(kt - 1, 0) * h * w
    return 2 * total


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
