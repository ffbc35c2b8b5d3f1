"""S2DiT shapes, dtypes, causality and streaming equivalence at tiny random configs."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx import generation, sampling
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.generation import Sampler, SeededNoise
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

STREAM_TOL = 1e-4  # fp32 max abs error, streaming vs one block-causal pass

SANDWICHES = [["full"], ["lcha"], ["ssa"], ["lcha", "ssa", "full", "lcha"]]
WINDOWS = [(None, 0), (2, 1), (1, 0), (3, 2)]


def tiny_model(layers, window=None, sink=0, chunk=2, seed=0, **kw) -> S2DiT:
    """A tiny S2DiT with every parameter randomised."""
    args = ModelArgs(
        in_dim=4,
        out_dim=4,
        dim=24,
        ffn_dim=40,
        freq_dim=16,
        text_dim=8,
        num_heads=2,
        layers=layers,
        text_len=6,
        frames_per_chunk=chunk,
        window=window,
        sink=sink,
        **kw,
    )
    mx.random.seed(seed)
    model = S2DiT(args)
    params = tree_flatten(model.parameters())
    model.load_weights([(n, mx.random.normal(p.shape) * 0.3) for n, p in params])
    return model


def inputs(frames=7, height=4, width=8, seed=1):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, frames, height, width, 4)).astype(np.float32))
    t = mx.array((rng.random((1, frames)) * 1000).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
    return x, t, ctx


def stream_pass(model, x, t, ctx, chunk):
    cache = model.make_cache()
    outs = []
    for s in range(0, x.shape[1], chunk):
        outs.append(
            model(x[:, s : s + chunk], t[:, s : s + chunk], ctx, cache=cache, update_cache=True)
        )
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("layers", SANDWICHES, ids="-".join)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_shapes_and_dtypes(layers, dtype):
    model = tiny_model(layers, window=2, sink=1)
    model.set_dtype(dtype)
    x, t, ctx = inputs(frames=5, height=4, width=12)
    for kwargs in ({}, {"chunk_frames": 2}):
        out = model(x.astype(dtype), t, ctx.astype(dtype), **kwargs)
        assert out.shape == x.shape
        assert out.dtype == dtype
        assert bool(mx.all(mx.isfinite(out)))
    cache = model.make_cache()
    out = model(x[:, :2].astype(dtype), t[:, :1].reshape(1), ctx.astype(dtype), cache=cache)
    assert out.shape == (1, 2, 4, 12, 4) and out.dtype == dtype


@pytest.mark.parametrize("layers", SANDWICHES, ids="-".join)
@pytest.mark.parametrize("window,sink", WINDOWS)
def test_streaming_equals_block_causal_pass(layers, window, sink):
    model = tiny_model(layers, window=window, sink=sink)
    x, t, ctx = inputs(frames=7)  # 7 frames in chunks of 2: the last chunk is short
    full = model(x, t, ctx, chunk_frames=2)
    streamed = stream_pass(model, x, t, ctx, 2)
    err = float(mx.abs(streamed - full).max())
    assert err <= STREAM_TOL, err


@pytest.mark.parametrize("layers", SANDWICHES, ids="-".join)
@pytest.mark.parametrize("window,sink", [(None, 0), (2, 1)])
def test_later_chunks_never_change_earlier_outputs(layers, window, sink):
    model = tiny_model(layers, window=window, sink=sink)
    x, t, ctx = inputs(frames=8)
    before = model(x, t, ctx, chunk_frames=2)
    changed = mx.concatenate([x[:, :4], x[:, 4:] + 5.0], axis=1)
    t_changed = mx.concatenate([t[:, :4], 1000 - t[:, 4:]], axis=1)
    after = model(changed, t_changed, ctx, chunk_frames=2)
    assert float(mx.abs(after[:, :4] - before[:, :4]).max()) == 0.0
    # The change must reach the later chunks, or this test proves nothing.
    assert float(mx.abs(after[:, 4:] - before[:, 4:]).max()) > 1e-3


def test_bidirectional_pass_sees_the_future():
    model = tiny_model(["full", "lcha"])
    x, t, ctx = inputs(frames=4)
    before = model(x, t, ctx)
    after = model(mx.concatenate([x[:, :2], x[:, 2:] + 5.0], axis=1), t, ctx)
    assert float(mx.abs(after[:, :2] - before[:, :2]).max()) > 1e-3


@pytest.mark.parametrize("layers", [["full"], ["ssa"]], ids="-".join)
def test_window_limits_what_softmax_layers_see(layers):
    x, t, ctx = inputs(frames=8)
    unbounded = tiny_model(layers)(x, t, ctx, chunk_frames=2)
    windowed = tiny_model(layers, window=2)(x, t, ctx, chunk_frames=2)
    # Chunks 0 and 1 see the same keys either way; chunk 2 onwards loses chunk 0.
    assert float(mx.abs(windowed[:, :4] - unbounded[:, :4]).max()) <= STREAM_TOL
    assert float(mx.abs(windowed[:, 4:] - unbounded[:, 4:]).max()) > 1e-3


def test_cache_memory_is_bounded():
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=1)
    x, t, ctx = inputs(frames=12)
    cache = model.make_cache()
    sizes = []
    for s in range(12):
        model(x[:, s : s + 1], t[:, s : s + 1], ctx, cache=cache, update_cache=True)
        mx.eval(cache.arrays())
        sizes.append(cache.nbytes())
    # Preallocated: flat from the first chunk, at sink + window - 1 kept slots plus one scratch
    # slot per softmax layer (float32 keys and values of 1 x 4 x 8 / patch 2 x 2 tokens, and a
    # quarter of that for SSA); plus LCHA's sums and its 2 conv frames.
    assert len(set(sizes)) == 1, sizes
    args = model.args
    full_tokens, ssa_tokens = 1 * 2 * 4, 1 * 2 * 4 // 4
    kv = 2 * 4 * args.dim * (args.sink + args.window) * (full_tokens + ssa_tokens)
    heads, hd = args.num_heads, args.head_dim
    lcha = 4 * (heads * hd * hd + heads * hd) + 4 * 2 * full_tokens * args.dim
    assert sizes[0] == kv + lcha, (sizes[0], kv, lcha)


def test_unbounded_window_grows_and_lcha_state_does_not():
    x, t, ctx = inputs(frames=6)
    for layers, grows in ((["full"], True), (["lcha"], False)):
        model = tiny_model(layers, chunk=1)
        cache = model.make_cache()
        sizes = []
        for s in range(6):
            model(x[:, s : s + 1], t[:, s : s + 1], ctx, cache=cache, update_cache=True)
            sizes.append(cache.nbytes())
        assert (sizes[-1] > sizes[1]) == grows, (layers, sizes)


def stream_latents(model, ctx, frames, sampler, seed, neg=None, size=(4, 4)):
    """Clean latent chunks of the generation core as numpy arrays."""
    chunks = generation.stream(
        model, ctx, frames, size, sampler, noise=SeededNoise(seed), neg_context=neg
    )
    return [np.array(c.latents) for c in chunks]


FEW_STEP_4 = Sampler("few-step", steps=4, shift=5.0)  # [1000, 937.5, 833.3, 625]


def stream(model, frames, seed=3):
    ctx = mx.array(np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32))
    return stream_latents(model, ctx, frames, FEW_STEP_4, seed), ctx


def test_generator_future_frames_never_change_past_ones():
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    short, _ = stream(model, 3)
    long, _ = stream(model, 9)
    assert [c.shape[1] for c in short] == [2, 1]
    assert [c.shape[1] for c in long] == [2, 2, 2, 2, 1]
    np.testing.assert_array_equal(short[0], long[0])
    other_seed, _ = stream(model, 3, seed=4)
    assert np.abs(other_seed[0] - short[0]).max() > 1e-3


def two_cache_guided_stream(model, ctx, neg, frames, timesteps, guidance, seed):
    """Reference guidance: the prompt and the negative prompt each with its own cache."""
    caches = [model.make_cache(), model.make_cache()]
    key, done, chunks = mx.random.key(seed), 0, []
    while done < frames:
        n = min(model.args.frames_per_chunk, frames - done)
        shape = (1, n, 4, 4, model.args.in_dim)
        key, sub = mx.random.split(key)
        x = mx.random.normal(shape, key=sub)
        for i, t in enumerate(timesteps):
            t_vec = mx.full((1,), t)
            v_pos, v_neg = (
                model(x, t_vec, c, cache=k) for c, k in zip((ctx, neg), caches, strict=True)
            )
            x0 = x - t / 1000.0 * (v_neg + guidance * (v_pos - v_neg))
            if i + 1 < len(timesteps):
                key, sub = mx.random.split(key)
                s_next = timesteps[i + 1] / 1000.0
                x = (1.0 - s_next) * x0 + s_next * mx.random.normal(shape, key=sub)
        for c, k in zip((ctx, neg), caches, strict=True):
            model(x0, mx.zeros((1,)), c, cache=k, update_cache=True)
        chunks.append(np.array(x0))
        done += n
    return chunks


def test_guided_stream_batches_both_prompts_like_two_caches():
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    rng = np.random.default_rng(5)
    ctx, neg = (mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32)) for _ in range(2))
    guided = Sampler("few-step", steps=3, shift=2.0, guidance=4.0)
    timesteps = guided.timesteps()
    got = stream_latents(model, ctx, 5, guided, seed=2, neg=neg)
    want = two_cache_guided_stream(model, ctx, neg, 5, timesteps, 4.0, seed=2)
    assert [c.shape[1] for c in got] == [2, 2, 1]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max())
    unguided = stream_latents(model, ctx, 5, Sampler("few-step", 3, 2.0), seed=2)
    assert np.abs(unguided[-1] - got[-1]).max() > 1e-2  # guidance changes the result
    # A negative context of another length cannot be stacked: two caches, same answer.
    longer = mx.concatenate([neg, mx.zeros((1, 1, 8))], axis=1)
    got = stream_latents(model, ctx, 5, guided, seed=2, neg=longer)
    want = two_cache_guided_stream(model, ctx, longer, 5, timesteps, 4.0, seed=2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max())


def test_generator_state_equals_one_block_causal_pass():
    """The clean passes that fill the cache equal one block-causal pass over the clean video."""
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    chunks, ctx = stream(model, 7)
    video = mx.array(np.concatenate(chunks, axis=1))
    zeros = mx.zeros((1, video.shape[1]))
    full = model(video, zeros, ctx, chunk_frames=2)
    streamed = stream_pass(model, video, zeros, ctx, 2)
    assert float(mx.abs(streamed - full).max()) <= STREAM_TOL


def test_solver_stream_equals_block_causal_denoising():
    """Streaming with an ODE solver per chunk equals denoising each chunk by block-causal passes.

    The reference never touches a cache: chunk c is integrated by Euler steps written out here,
    each step one no-cache block-causal pass over [the clean chunks so far (t = 0), chunk c (t)],
    with guidance as two separate passes.
    """
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    rng = np.random.default_rng(6)
    ctx, neg = (mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32)) for _ in range(2))
    steps, shift, guidance, frames = 4, 2.0, 3.0, 7
    euler = Sampler("euler", steps, shift, guidance)
    got = stream_latents(model, ctx, frames, euler, seed=9, neg=neg)
    sigmas = sampling.shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift)
    key, clean, want = mx.random.key(9), None, []
    for start in range(0, frames, 2):
        n = min(2, frames - start)
        key, sub = mx.random.split(key)
        x = mx.random.normal((1, n, 4, 4, 4), key=sub)
        for s0, s1 in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = np.trunc(1000.0 * s0)  # Wan's integer model timesteps
            video = x if clean is None else mx.concatenate([clean, x], axis=1)
            t_frames = mx.array([[0.0] * start + [t] * n])
            v_pos, v_neg = (
                model(video, t_frames, c, chunk_frames=2)[:, start:] for c in (ctx, neg)
            )
            x = x + float(np.float32(s1) - np.float32(s0)) * (v_neg + guidance * (v_pos - v_neg))
        want.append(np.array(x))
        clean = x if clean is None else mx.concatenate([clean, x], axis=1)
    assert [c.shape[1] for c in got] == [2, 2, 2, 1]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(w).max())
    few_step = stream_latents(model, ctx, frames, Sampler("few-step", 4, 1.0), seed=9)
    assert np.abs(few_step[0] - got[0]).max() > 1e-2  # a different sampler


@pytest.mark.parametrize(
    "sampler, match",
    [
        (Sampler("rk4"), "solver must be one of euler, unipc, few-step"),
        (Sampler("euler", steps=0), "steps must be a positive integer"),
        (Sampler("euler", shift=0.0), "shift must be a positive number"),
        (Sampler("euler", guidance=-1.0), "guidance must be a finite number"),
        (Sampler("euler", points=(1000.0,)), "explicit timesteps need the few-step"),
        (Sampler.few_step([1000.0, 1000.0]), "strictly decreasing"),
        (Sampler.few_step([1200.0, 500.0]), "fall in"),
    ],
)
def test_stream_validates_its_sampler(sampler, match):
    model = tiny_model(["lcha"], chunk=2)
    with pytest.raises(S2DiTError, match=match):
        next(
            generation.stream(model, mx.zeros((1, 3, 8)), 2, (4, 4), sampler, noise=SeededNoise(0))
        )


def test_saved_and_restored_stream_continues_bit_identically(tmp_path):
    """Save the stream state after chunk 2, restore it (and branch it), continue: same bytes."""
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    rng = np.random.default_rng(7)
    ctx, neg = (mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32)) for _ in range(2))
    guided = Sampler("few-step", steps=3, shift=3.0, guidance=2.0)
    whole = stream_latents(model, ctx, 11, guided, seed=5, neg=neg)
    state = generation.new_stream_state(model, SeededNoise(5), True, ctx, neg)
    first = generation.stream(model, ctx, 11, (4, 4), guided, neg_context=neg, state=state)
    head = [np.array(next(first).latents) for _ in range(2)]
    state.save(tmp_path / "stream.safetensors")
    branch = state.copy()
    rest = [np.array(c.latents) for c in first]
    restored = generation.StreamState.load(tmp_path / "stream.safetensors")
    again = generation.stream(model, ctx, 11, (4, 4), guided, neg_context=neg, state=restored)
    resumed = [np.array(c.latents) for c in again]
    branched = generation.stream(model, ctx, 11, (4, 4), guided, neg_context=neg, state=branch)
    for got in (head + rest, head + resumed, head + [np.array(c.latents) for c in branched]):
        assert len(got) == len(whole) == 6
        for g, w in zip(got, whole, strict=True):
            np.testing.assert_array_equal(g, w)
    # The test can fail: a state restored without its noise keys continues differently.
    lost = generation.StreamState.load(tmp_path / "stream.safetensors")
    lost.noise = SeededNoise(6)
    other = generation.stream(model, ctx, 11, (4, 4), guided, neg_context=neg, state=lost)
    assert np.abs(np.array(next(other).latents) - whole[2]).max() > 1e-3


def test_the_write_pass_waits_for_the_next_chunk(tmp_path, monkeypatch):
    """A stream's last chunk makes no write pass; continuing the stream writes it first, so a
    stream stopped at 6 frames and continued to 11 (through a saved state) equals one run to 11,
    and so does a state saved the earlier way (the chunk already written, nothing pending)."""
    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    ctx = mx.array(np.random.default_rng(2).standard_normal((1, 3, 8)).astype(np.float32))
    calls = []
    forward = S2DiT.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("update_cache", False))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(S2DiT, "__call__", counted)
    whole = stream_latents(model, ctx, 11, FEW_STEP_4, seed=5)  # 6 chunks
    assert len(calls) == 6 * 4 + 5 and sum(calls) == 5
    calls.clear()
    state = generation.new_stream_state(model, SeededNoise(5), False, ctx, None)
    results = list(generation.stream(model, ctx, 6, (4, 4), FEW_STEP_4, state=state))
    head = [np.array(c.latents) for c in results]
    assert [c.passes for c in results] == [4, 5, 5]
    assert len(calls) == 3 * 4 + 2 and state.pending is not None
    np.testing.assert_array_equal(np.array(state.pending), head[-1])
    state.save(tmp_path / "pending.safetensors")
    old_way = generation.StreamState.load(tmp_path / "pending.safetensors")
    zero = mx.zeros((1,), dtype=mx.float32)
    model(old_way.pending, zero, ctx, cache=old_way.cache, update_cache=True)
    old_way.pending = None
    old_way.save(tmp_path / "written.safetensors")
    for name in ("pending", "written"):
        restored = generation.StreamState.load(tmp_path / f"{name}.safetensors")
        assert (restored.pending is None) == (name == "written")
        calls.clear()
        rest = generation.stream(model, ctx, 11, (4, 4), FEW_STEP_4, state=restored)
        got = head + [np.array(c.latents) for c in rest]
        assert len(calls) == 3 * 4 + 2 + (name == "pending")
        assert len(got) == len(whole)
        for g, w in zip(got, whole, strict=True):
            np.testing.assert_array_equal(g, w)


def test_config_errors_are_one_line():
    with pytest.raises(S2DiTError, match="unknown block type 'mamba'"):
        ModelArgs.from_dict({"layers": ["lcha", "mamba"]})
    with pytest.raises(S2DiTError, match="heads"):
        ModelArgs.from_dict({"dim": 30, "num_heads": 4})
    with pytest.raises(S2DiTError, match="window"):
        ModelArgs.from_dict({"window": 0})
    model = tiny_model(["ssa"])
    x, t, ctx = inputs(frames=2, height=6, width=8)  # 6 is not a multiple of patch 2 x stride 2
    with pytest.raises(S2DiTError, match="multiple of 4"):
        model(x, t, ctx)


def test_args_round_trip():
    args = ModelArgs(dim=48, num_heads=4, layers=["ssa", "lcha"], window=3, sink=1)
    again = ModelArgs.from_dict(args.to_dict())
    assert again == args


@pytest.mark.parametrize(
    "layers, window, sink, sampler, neg_len",
    [
        (["lcha", "ssa", "full"], 2, 1, Sampler("few-step", steps=3, shift=3.0), None),
        (["full", "lcha"], 3, 0, Sampler("euler", steps=3, shift=2.0, guidance=3.0), 3),
        (["ssa", "lcha"], 2, 1, Sampler("few-step", steps=2, shift=2.0, guidance=2.0), 4),
        (["lcha", "full"], None, 0, Sampler("euler", steps=2, shift=2.0), None),
    ],
)
def test_compiled_chunk_step_equals_eager(monkeypatch, layers, window, sink, sampler, neg_len):
    """stream(compile=True): one traced graph per chunk from the second on, the same latents."""
    model = tiny_model(layers, window=window, sink=sink, chunk=2)
    rng = np.random.default_rng(8)
    ctx = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
    neg = None
    if neg_len is not None:  # 3: stacked with the prompt in one batch; 4: a second cache
        neg = mx.array(rng.standard_normal((1, neg_len, 8)).astype(np.float32))
    eager = stream_latents(model, ctx, 9, sampler, seed=4, neg=neg)
    traces = []
    trace = generation._CompiledChunk._pass
    monkeypatch.setattr(
        generation._CompiledChunk, "_pass", lambda self, *a: traces.append(1) or trace(self, *a)
    )
    chunks = generation.stream(
        model, ctx, 9, (4, 4), sampler, noise=SeededNoise(4), neg_context=neg, compile=True
    )
    compiled = [np.array(c.latents) for c in chunks]
    # Chunk 1 fills the text side eagerly; unbounded caches grow, and a pass that grows them
    # changes the state's shapes: the next pass is traced again.
    assert len(compiled) == 5
    assert len(traces) == 4 if window else 4 <= len(traces) <= 8
    for g, w in zip(compiled, eager, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())


def test_compiled_step_resumes_a_saved_stream_and_skips_eager_kernels(tmp_path):
    """A restored stream (no text side cached yet) compiles from its second chunk; a model
    holding eager CPU kernels is never traced."""
    from s2dit_mlx import kernels

    model = tiny_model(["lcha", "ssa", "full"], window=2, sink=1, chunk=2)
    ctx = mx.array(np.random.default_rng(9).standard_normal((1, 3, 8)).astype(np.float32))
    whole = stream_latents(model, ctx, 11, FEW_STEP_4, seed=5)
    state = generation.new_stream_state(model, SeededNoise(5), False, ctx, None)
    first = generation.stream(model, ctx, 11, (4, 4), FEW_STEP_4, state=state, compile=True)
    head = [np.array(next(first).latents) for _ in range(3)]
    state.save(tmp_path / "stream.safetensors")
    restored = generation.StreamState.load(tmp_path / "stream.safetensors")
    rest = generation.stream(model, ctx, 11, (4, 4), FEW_STEP_4, state=restored, compile=True)
    got = head + [np.array(c.latents) for c in rest]
    for g, w in zip(got, whole, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())
    assert generation._compilable(model)
    try:
        assert kernels.enable(model) > 0
        assert not generation._compilable(model)
    finally:
        kernels.disable(model)
