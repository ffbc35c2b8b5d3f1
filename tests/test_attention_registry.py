"""A fourth attention kind, defined and registered here, works everywhere without library edits.

`local`: softmax attention that sees only its own chunk and the one before (a window of 2
chunks, no sink, whatever the model's window): a temporally local attention with its own
schedule. Registered from this file, it must go through the config, the model, streaming with
a cache (equal to one block-causal pass), the cost model (equal to the exported graph's FLOPs)
and the Core ML export (the saved package, run by our interpreter, matching MLX).
"""

from __future__ import annotations

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.attention import AttentionKind, attention_kinds, register_attention
from s2dit_mlx.attention.common import (
    ProjectedAttention,
    SoftmaxCore,
    TokenLayout,
    projection_flops,
    rope_flops,
    softmax_flops,
)
from s2dit_mlx.attention.registry import CallShape, unregister_attention
from s2dit_mlx.cache import ChunkSchedule, KVCache
from s2dit_mlx.coreml.shapes import kv_state_specs
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

LOCAL = ChunkSchedule(window=2, sink=0)
STREAM_TOL = 1e-4


class LocalAttention(ProjectedAttention):
    """Softmax attention over the current chunk and the previous one only."""

    def __init__(self, args):
        super().__init__(args)
        self.core = SoftmaxCore(args, schedule=LOCAL)

    def __call__(self, x: mx.array, layout: TokenLayout) -> mx.array:
        q, k, v = (self.heads(a) for a in self.qkv(x))
        return self.o(self.core(q, k, v, layout).reshape(x.shape))


def local_flops(args, shape: CallShape) -> int:
    n = shape.tokens
    keys = n * (LOCAL.past_slots + 1)
    return projection_flops(args, n) + rope_flops(args, n) + softmax_flops(args, n, keys)


def local_states(args, shape: CallShape, layer: int) -> list:
    return kv_state_specs(args, layer, shape.tokens, LOCAL.past_slots)


def emit_local(ctx, args, layer, x, grid, shapes):
    from s2dit_mlx.coreml import emit

    prefix = f"blocks.{layer}.self_attn"
    q, k, v = (emit.split_heads(a, args.num_heads) for a in emit.qkv(ctx, args, x, prefix))
    tables = emit.rope_tables(ctx, args, grid)
    q, k = emit.apply_rope(ctx, q, tables), emit.apply_rope(ctx, k, tables)
    out = emit.softmax_with_window(ctx, args, layer, q, k, v, shapes, schedule=LOCAL)
    return emit.linear(ctx, emit.merge_heads(out), prefix + ".o")


@pytest.fixture
def local_kind():
    kind = register_attention(
        AttentionKind(
            name="local",
            module=LocalAttention,
            make_cache=lambda args: KVCache(LOCAL),
            flops=local_flops,
            coreml_states=local_states,
            emit_coreml=emit_local,
        )
    )
    yield kind
    unregister_attention("local")


def tiny_model(layers, seed=0, **kw) -> S2DiT:
    """A tiny S2DiT with every parameter randomised."""
    args = dict(
        in_dim=4,
        out_dim=4,
        dim=32,
        ffn_dim=48,
        freq_dim=16,
        text_dim=8,
        num_heads=2,
        layers=layers,
        text_len=6,
        frames_per_chunk=2,
        window=3,
        sink=1,
    )
    args.update(kw)
    mx.random.seed(seed)
    model = S2DiT(ModelArgs(**args))
    params = tree_flatten(model.parameters())
    model.load_weights([(n, mx.random.normal(p.shape) * 0.3) for n, p in params])
    mx.eval(model.parameters())
    return model


def inputs(frames=7, height=4, width=8, seed=1):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, frames, height, width, 4)).astype(np.float32))
    t = mx.array((rng.random((1, frames)) * 1000).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
    return x, t, ctx


def test_unregistered_kind_is_refused_and_registered_one_accepted(local_kind):
    assert "local" in attention_kinds()
    args = ModelArgs.from_dict({"layers": ["lcha", "local", "ssa"], "dim": 32, "num_heads": 2})
    assert args.layers == ["lcha", "local", "ssa"]
    with pytest.raises(S2DiTError, match="unknown block type 'global'.*local"):
        ModelArgs.from_dict({"layers": ["global"]})


def test_streaming_with_the_new_kind_equals_one_block_causal_pass(local_kind):
    model = tiny_model(["local", "lcha", "local", "ssa"])
    x, t, ctx = inputs(frames=9)  # 9 frames in chunks of 2: 5 chunks, the last one short
    full = model(x, t, ctx, chunk_frames=2)
    cache = model.make_cache()
    outs = [
        model(x[:, s : s + 2], t[:, s : s + 2], ctx, cache=cache, update_cache=True)
        for s in range(0, 9, 2)
    ]
    err = float(mx.abs(mx.concatenate(outs, axis=1) - full).max())
    assert err <= STREAM_TOL, err


def test_the_new_kind_is_local_in_time(local_kind):
    """With `local` layers only, chunk 3 sees chunks 2 and 3: chunk 0 cannot reach it."""
    model = tiny_model(["local", "local"])
    x, t, ctx = inputs(frames=8)
    before = model(x, t, ctx, chunk_frames=2)
    far = mx.concatenate([x[:, :2] + 5.0, x[:, 2:]], axis=1)
    near = mx.concatenate([x[:, :4], x[:, 4:6] + 5.0, x[:, 6:]], axis=1)
    assert float(mx.abs(model(far, t, ctx, chunk_frames=2)[:, 6:] - before[:, 6:]).max()) == 0.0
    assert float(mx.abs(model(near, t, ctx, chunk_frames=2)[:, 6:] - before[:, 6:]).max()) > 1e-3


def test_cost_and_core_ml_export_of_the_new_kind(local_kind, tmp_path):
    ct = pytest.importorskip("coremltools")
    del ct
    from s2dit_mlx.coreml import cost, verify
    from s2dit_mlx.coreml.emit import dit_state_specs
    from s2dit_mlx.coreml.export import DIT_PACKAGE, export_coreml
    from s2dit_mlx.coreml.interpret import Package
    from s2dit_mlx.coreml.shapes import StreamShapes

    model = tiny_model(["local", "lcha", "local"], text_dim=8, text_len=6)
    args = model.args
    out = tmp_path / "export"
    export_coreml(model, None, out, height=32, width=64, precision="float32", spatial_factor=8)
    package = Package(out / DIT_PACKAGE)
    # Cost: the analytic count equals the exported graph's matmul FLOPs, state bytes the specs.
    counted = cost.graph_flops(package.program.functions["denoise"])
    assert counted == cost.call_flops(args, 2, 4, 8, window=3, sink=1)["total"]
    specs = dit_state_specs(args, StreamShapes(2, 4, 8, window=3, sink=1, text_len=6))
    assert cost.state_bytes(args, 2, 4, 8, 3, 1) == sum(s.nbytes for s in specs)
    local_keys = [s for s in specs if s.name == "l0_keys"][0]
    assert local_keys.shape == (1, 2, LOCAL.past_slots * 2 * 2 * 4, args.head_dim)
    # The package, streamed over 5 chunks with its states carried, matches MLX.
    context = verify.pad_context(np.random.default_rng(2).standard_normal((1, 4, 8)), 6)
    timesteps = [1000.0, 750.0, 500.0]
    noise = verify.make_noise(5, len(timesteps), (1, 2, 4, 8, 4), seed=3)
    want = list(verify.mlx_stream(model, context, noise, timesteps))
    got = list(verify.package_stream(package, context, noise, timesteps))
    for c, (w, g) in enumerate(zip(want, got, strict=True)):
        assert verify.psnr(w, g) >= 60.0, (c, verify.psnr(w, g))
