"""The opt-in CPU kernels (s2dit_mlx.kernels) against MLX's own ops: results within stated
tolerances, inputs never written, enable/disable round trips, the choice by measurement, and
the guards (traces, other dtypes, no compiler)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_DEFAULTS, make_tiny_components
from mlx.utils import tree_flatten
from test_umt5 import TINY as TINY_UMT5
from test_wan_vae import SIZES, _random_vae

from s2dit_mlx import kernels
from s2dit_mlx.kernels import choice, modules
from s2dit_mlx.kernels import cpu as cpu_kernels
from s2dit_mlx.models import layers, wan_vae
from s2dit_mlx.models.umt5 import UMT5Config, UMT5TextEncoder
from s2dit_mlx.pipeline import Pipeline


@pytest.fixture
def kernels_on(monkeypatch):
    """The compiled library, every kind pinned on, the size thresholds off (tiny tensors)."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine: MLX's own ops are used instead")
    assert cpu_kernels.library() is not None, cpu_kernels.unavailable_reason
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu_kernels, "MIN_GEMM_MACS", 1)
    monkeypatch.setattr(choice, "_pinned", dict.fromkeys(choice.KINDS, True))
    monkeypatch.setattr(choice, "_results", {})
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # they are CPU kernels (a Mac would default to Metal)
    try:
        yield cpu_kernels.library()
    finally:
        mx.set_default_device(device)


class Spy:
    """Stands in for the library and records which entry points were called."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.real, name)


def _spy(monkeypatch, real) -> Spy:
    spy = Spy(real)
    monkeypatch.setattr(cpu_kernels, "library", lambda: spy)
    return spy


def _wide(shape, seed=0) -> mx.array:
    """Values from -100 to 100 plus the ends of exp's range and beyond."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice([0.1, 3.0, 30.0], shape)
    flat = x.reshape(-1)
    flat[:6] = [0.0, -87.0, 88.0, -1e4, 1e4, -0.0]
    return mx.array(x)


def _unchanged_and_new(out: mx.array, *inputs: tuple[mx.array, np.ndarray]) -> None:
    """Every input still holds its values, and `out` shares no memory with any of them."""
    for array, before in inputs:
        np.testing.assert_array_equal(np.array(array), before)
        assert not np.shares_memory(np.asarray(out), np.asarray(array))


# ----------------------------------------------------------------------------------------------
# Elementwise kernels: SiLU, GELU (tanh), softmax


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 300])
def test_softmax_matches_mlx(kernels_on, cols):
    x = _wide((7, 3, cols))
    before = np.array(x)
    out = cpu_kernels.softmax(x)
    np.testing.assert_allclose(
        np.array(out), np.array(mx.softmax(x, axis=-1)), rtol=2e-6, atol=1e-7
    )
    np.testing.assert_allclose(np.array(out).sum(-1), 1.0, rtol=2e-6)
    _unchanged_and_new(out, (x, before))


@pytest.mark.parametrize(
    "ours, ref", [(cpu_kernels.silu, nn.silu), (cpu_kernels.gelu_tanh, nn.gelu_approx)]
)
@pytest.mark.parametrize("threads", ["1", "3"])
def test_activations_match_mlx_and_write_a_new_array(kernels_on, monkeypatch, ours, ref, threads):
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, threads)
    monkeypatch.setattr(cpu_kernels, "ELEMENTS_PER_THREAD", 64)  # 3 shares, the last short
    x = _wide((5, 1001))
    before = np.array(x)
    out = ours(x)
    np.testing.assert_allclose(np.array(out), np.array(ref(x)), rtol=3e-6, atol=1e-6)
    _unchanged_and_new(out, (x, before))


def test_modules_are_plain_until_enabled_and_other_dtypes_stay_plain(kernels_on, monkeypatch):
    spy = _spy(monkeypatch, kernels_on)
    act, gelu, attend = nn.SiLU(), layers.GeluTanh(), layers.ScaledDotProductAttention()
    x = _wide((4, 64))
    act(x)
    gelu(x)
    attend(*(x.reshape(1, 1, 4, 64),) * 3, 0.1)
    assert spy.calls == []  # not enabled: MLX's own ops
    assert kernels.enable(act, gelu, attend) == 3
    act(x.astype(mx.float16))
    assert spy.calls == []  # float16: MLX's own ops
    choice.pin("silu", False)
    act(x)
    assert spy.calls == []  # the measurement said no (here: pinned)
    choice.pin("silu", True)
    act(x)
    assert spy.calls == ["s2dit_silu"]
    assert kernels.disable(act, gelu, attend) == 3
    act(x)
    assert spy.calls == ["s2dit_silu"]


def test_softmax_attention_matches_and_tiles(kernels_on, monkeypatch):
    """Softmax-kernel attention (what runs without AVX-512), query tiles of the scores."""
    monkeypatch.setattr(cpu_kernels, "gemm_available", lambda: False)
    rng = np.random.default_rng(1)
    # [B, L, H, D] transposed to [B, H, L, D], as the models pass them (strided views).
    q, k, v = (
        mx.array(rng.standard_normal((2, 40, 3, 16)).astype(np.float32)).swapaxes(1, 2)
        for _ in range(3)
    )
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.7)
    # Budget for 2*3*7*40 scores: 6 query tiles, the last one short.
    budget = 2 * 3 * 7 * 40
    out = cpu_kernels.softmax_attention(q, k, v, 0.7, budget)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=2e-6)
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", budget)
    attend = layers.ScaledDotProductAttention()
    kernels.enable(attend)
    spy = _spy(monkeypatch, kernels_on)
    via_module = attend(q, k, v, 0.7)
    assert "s2dit_softmax" in spy.calls and "s2dit_attention" not in spy.calls
    np.testing.assert_allclose(np.array(via_module), np.array(ref), rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# The GEMM: linear layers, direct convolution, attention


@pytest.fixture
def gemm(kernels_on):
    if not cpu_kernels.gemm_available():
        pytest.skip("the GEMM kernel needs AVX-512F; MLX's matmul runs instead")
    return kernels_on


def _normal(shape, seed) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _close(out: mx.array | None, ref: mx.array, tol: float = 2e-6) -> None:
    """Max error within tol of the reference's scale (float32 sums in another order)."""
    assert out is not None, "the kernel should have run"
    assert out.shape == ref.shape
    scale = float(mx.abs(ref).max())
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=0, atol=tol * scale)


# Edges of the blocking: 12-row and 32-column tiles, 96-row blocks, 384-deep K chunks,
# 512-column B blocks; 1 to 3 threads.
@pytest.mark.parametrize(
    "m, n, k, bias, threads",
    [(1, 16, 1, True, 1), (37, 45, 29, True, 1), (200, 600, 390, False, 2), (97, 33, 385, True, 3)],
)
def test_linear_matches_mlx(gemm, monkeypatch, m, n, k, bias, threads):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(threads))
    x = _normal((m, k), 1)
    w = _normal((k, n), 2).T  # a strided view (as sanitize() leaves transposed weights)
    b = _normal((n,), 3) if bias else None
    ref = x @ w.T + (b if bias else 0)
    before = [(a, np.array(a)) for a in (x, w) + ((b,) if bias else ())]
    out = cpu_kernels.linear(x, w, b)
    _close(out, ref)
    _unchanged_and_new(out, *before)
    layer = nn.Linear(k, n, bias=bias)
    layer.weight = w
    if bias:
        layer.bias = b
    kernels.enable(layer)
    assert isinstance(layer, modules.KernelLinear)
    _close(layer(x.reshape(1, m, k)), ref.reshape(1, m, n))
    assert cpu_kernels.linear(x.astype(mx.float16), w, b) is None
    assert cpu_kernels.linear(x, w[:8], None) is None  # narrow: left to OpenBLAS


def _reference_conv(x, weight, bias, history, causal, padding, upsample):
    """The same convolution built from MLX ops: upsample, concatenate, pad, conv3d."""
    if upsample > 1:
        x = mx.repeat(mx.repeat(x, upsample, axis=2), upsample, axis=3)
    kt = weight.shape[1]
    if causal:
        b, _, h, w, c = x.shape
        history = mx.zeros((b, kt - 1, h, w, c)) if history is None else history
        x = mx.concatenate([history, x], axis=1)
    ph, pw = padding
    x = mx.pad(x, [(0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)])
    out = mx.conv3d(x, weight)
    return out if bias is None else out + bias


@pytest.mark.parametrize(
    "kernel, cout, history, causal, padding, upsample, threads",
    [
        ((3, 3, 3), 40, True, True, (1, 1), 1, 1),  # a Wan causal conv, cache given
        ((3, 3, 3), 3, False, True, (1, 1), 1, 2),  # the first chunk (zeros), 3-channel out
        ((3, 1, 1), 50, True, True, (0, 0), 1, 1),  # the temporal upsampling conv
        ((1, 3, 3), 33, False, False, (1, 1), 2, 2),  # 2x nearest upsample + 3x3 conv
        ((3, 3, 3), 70, False, False, (0, 0), 1, 1),  # plain valid conv
    ],
)
def test_direct_conv3d_matches_mlx(
    gemm, monkeypatch, kernel, cout, history, causal, padding, upsample, threads
):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(threads))
    kt, kh, kw = kernel
    x = _normal((2, 4, 9, 13, 20), 4)
    weight, bias = _normal((cout, kt, kh, kw, 20), 5), _normal((cout,), 6)
    hist = _normal((2, kt - 1, 9, 13, 20), 7) if history else None
    ref = _reference_conv(x, weight, bias, hist, causal, padding, upsample)
    before = [(a, np.array(a)) for a in (x, weight, bias) + ((hist,) if history else ())]
    out = cpu_kernels.conv3d(x, weight, bias, hist, causal, padding, upsample)
    no_bias = cpu_kernels.conv3d(x, weight, None, hist, causal, padding, upsample)
    _close(out, ref)
    _close(no_bias, ref - bias)
    _unchanged_and_new(out, *before)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_attention_matches_mlx(gemm, monkeypatch, threads):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", str(threads))
    monkeypatch.setattr(cpu_kernels, "ATTENTION_TILE_ELEMENTS", 37 * 12)  # 5 tiles, last short
    assert cpu_kernels.attention_tile(50, 37) == 12
    # Strided views as the models pass them: q, v from [B, L, H, D], k already [B, H, L, D].
    q = _normal((2, 50, 3, 16), 8).swapaxes(1, 2) * 3
    k = _normal((2, 3, 37, 16), 9) * 3
    v = _normal((2, 37, 3, 16), 10).swapaxes(1, 2)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4)
    before = [(a, np.array(a)) for a in (q, k, v)]
    out = cpu_kernels.attention(q, k, v, 0.4)
    attend = layers.ScaledDotProductAttention()
    kernels.enable(attend)
    via_module = attend(q, k, v, 0.4)
    # Logits up to ~40 here: float32 rounding in them moves the weights by ~1e-6 relative.
    _close(out, ref, tol=1e-5)
    _close(via_module, ref, tol=1e-5)
    _unchanged_and_new(out, *before)
    # The result is laid out as [B, L, H, D]: back to tokens without a copy.
    assert np.asarray(out.swapaxes(1, 2)).flags.c_contiguous
    # A mask (a partly filled cache slot) is MLX's.
    mask = mx.array([True] * 30 + [False] * 7)
    ref_masked = layers.attention(q, k, v, 0.4, mask)
    _close(attend(q, k, v, 0.4, mask), ref_masked, tol=0)


def test_attention_tiles_are_whole_micro_tiles():
    """About 2^18 scores per tile, in whole 12-row micro-kernel tiles, never more than lq."""
    assert cpu_kernels.attention_tile(4680, 4680) == 60  # 56 by size alone
    assert cpu_kernels.attention_tile(1560, 1560) == 168
    assert cpu_kernels.attention_tile(5, 4680) == 5
    assert cpu_kernels.attention_tile(10**6, 10**6) == 12


def test_traced_code_falls_back(kernels_on):
    """Inside mx.compile nothing can be evaluated: the kernels step aside, results still match."""
    x = _wide((3, 100))
    gelu = layers.GeluTanh()
    kernels.enable(gelu)

    def f(a):
        return gelu(a * 2.0)

    out = mx.compile(f)(x)
    np.testing.assert_allclose(np.array(out), np.array(nn.gelu_approx(x * 2.0)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Whole models: enable / disable round trips


def _tiny_dit_inputs(rng):
    x = mx.array(rng.standard_normal((1, 3, 4, 8, 4)).astype(np.float32))
    t = mx.array([700.0])
    ctx = mx.array(rng.standard_normal((1, 16, 16)).astype(np.float32))
    return x, t, ctx


def test_enable_disable_round_trip(kernels_on, monkeypatch):
    """Every swappable module of a model changes class and back; the objects and their
    weights stay; kinds select; S2DIT_NO_CPU_KERNELS swaps nothing."""
    dit, vae, text = make_tiny_components(seed=3)
    ids_before = {name: id(m) for name, m in dit.named_modules()}
    params_before = {k: np.array(v) for k, v in tree_flatten(dit.parameters())}
    plain = {name: type(m) for name, m in dit.named_modules()}
    swappable = sum(type(m) in modules.SWAPS for _, m in dit.named_modules())
    assert swappable > 0
    assert kernels.enable(dit) == swappable
    assert kernels.enable(dit) == 0  # already kernel-backed
    kinds = kernels.enabled_kinds(dit)
    assert {"linear", "attention", "softmax", "gelu_tanh"} <= kinds
    for name, m in dit.named_modules():
        if plain[name] in modules.SWAPS:
            assert type(m) is modules.SWAPS[plain[name]][0] and isinstance(m, plain[name])
    assert kernels.disable(dit) == swappable
    assert {name: type(m) for name, m in dit.named_modules()} == plain
    assert {name: id(m) for name, m in dit.named_modules()} == ids_before
    for k, v in tree_flatten(dit.parameters()):
        np.testing.assert_array_equal(np.array(v), params_before[k])
    assert kernels.enabled_kinds(dit) == set()
    # Only the kinds asked for; None entries are skipped.
    kernels.enable(dit, None, kinds=["gelu_tanh"])
    assert kernels.enabled_kinds(dit) == {"gelu_tanh"}
    kernels.disable(dit, None)
    with pytest.raises(ValueError, match="unknown kernel kinds"):
        kernels.enable(dit, kinds=["gemm"])
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.enable(dit, vae, text) == 0


def test_models_match_with_and_without_kernels(kernels_on):
    """The tiny S2DiT (lcha/ssa/full), Wan VAE decode and encode, and umT5 (gated GELU and
    gated SiLU) agree with the kernels enabled and after disable()."""
    dit, _, _ = make_tiny_components(seed=3)
    rng = np.random.default_rng(2)
    x, t, ctx = _tiny_dit_inputs(rng)
    ref = dit(x, t, ctx)
    kernels.enable(dit)
    out = dit(x, t, ctx)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)
    kernels.disable(dit)
    np.testing.assert_array_equal(np.array(dit(x, t, ctx)), np.array(ref))

    for version in ("2.1", "2.2"):
        vae = _random_vae(version, seed=4)
        h, w = SIZES[version]
        factor = vae.spatial_factor
        z = mx.array(rng.standard_normal((1, 3, h // factor, w // factor, vae.z_dim)))
        ref = vae.decode(z.astype(mx.float32))
        video = mx.array(rng.uniform(-1, 1, (1, 9, h, w, 3)).astype(np.float32))
        ref_z = vae.encode(video)
        assert kernels.enable(vae) > 0
        assert any(isinstance(m, modules.KernelCausalConv3d) for _, m in vae.named_modules())
        out = vae.decode(z.astype(mx.float32))
        enc = vae.encode(video)
        kernels.disable(vae)
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(enc), np.array(ref_z), rtol=1e-5, atol=1e-5)

    ids = mx.array(rng.integers(0, TINY_UMT5["vocab_size"], (2, 24)))
    for kind in ("gated-gelu", "gated-silu"):
        mx.random.seed(6)
        encoder = UMT5TextEncoder(UMT5Config(**TINY_UMT5, feed_forward_proj=kind))
        ref = encoder(ids)
        kernels.enable(encoder)
        out = encoder(ids)
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)


def test_streaming_decode_continues_across_enable(gemm):
    """Module identity is kept, so a Wan VAE stream's conv histories (keyed by module) carry
    over when the kernels are switched on between chunks."""
    vae = _random_vae("2.1", seed=5)
    h, w = SIZES["2.1"]
    z = mx.array(np.random.default_rng(3).standard_normal((1, 3, h // 8, w // 8, vae.z_dim)))
    z = z.astype(mx.float32)
    whole = vae.decode(z)
    decoder = vae.decoder()
    first = decoder.decode(z[:, :1])
    kernels.enable(vae)
    rest = decoder.decode(z[:, 1:])
    kernels.disable(vae)
    streamed = mx.concatenate([first, rest], axis=1)
    np.testing.assert_allclose(np.array(streamed), np.array(whole), rtol=1e-5, atol=1e-5)


def test_pipeline_with_them_generates_the_same_video(kernels_on, tiny_model_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(str(tiny_model_dir))
    settings = {k: v for k, v in TINY_DEFAULTS.items() if k != "fps"}
    settings.update(seed=5, guidance=2.0)
    slow = pipe.generate("a red circle", **settings)
    spy = _spy(monkeypatch, kernels_on)
    assert kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder) > 0
    fast = pipe.generate("a red circle", **settings)
    # Attention (the GEMM one, or the softmax kernel without AVX-512) and the activations.
    assert {"s2dit_attention", "s2dit_softmax"} & set(spy.calls), spy.calls
    assert {"s2dit_silu", "s2dit_gelu_tanh"} <= set(spy.calls), spy.calls
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1
    kernels.disable(pipe.dit, pipe.vae, pipe.text_encoder)
    spy.calls.clear()
    pipe.generate("a red circle", **settings)
    assert spy.calls == []


# ----------------------------------------------------------------------------------------------
# The choice by measurement


def test_choice_keeps_a_kernel_only_where_it_is_faster(monkeypatch):
    """Each kind is measured once per process, at its first use; the kernel runs only when it
    took at most 1 / MARGIN of the library's time; the report lists the figures."""
    monkeypatch.setattr(choice, "_pinned", {})
    monkeypatch.setattr(choice, "_results", {})
    monkeypatch.setattr(cpu_kernels, "library", lambda: object())
    monkeypatch.setattr(cpu_kernels, "gemm_available", lambda: True)
    timings = {"silu": (1.0, 5.0), "gelu_tanh": (1.0, 1.05), "linear": (2.0, 1.0)}
    calls = []

    def fake_best(fn):
        return fn()

    def fake_problem(kind):
        calls.append(kind)
        ours, theirs = timings[kind]
        return "[8]", "GFLOP", 10.0, lambda: ours, lambda: theirs

    monkeypatch.setattr(choice, "_best", fake_best)
    monkeypatch.setattr(choice, "_problem", fake_problem)
    assert choice.use("silu") is True  # 5x faster
    assert choice.use("gelu_tanh") is False  # within the margin
    assert choice.use("linear") is False  # slower
    assert choice.use("silu") is True and calls == ["silu", "gelu_tanh", "linear"]
    lines = [m.line() for m in choice.measurements()]
    assert lines[0] == "linear: library (kernel 5 GFLOP/s, library 10 GFLOP/s on [8])"
    assert lines[1] == "silu: kernel (kernel 10 GFLOP/s, library 2 GFLOP/s on [8])"
    choice.pin("linear", True)
    assert choice.use("linear") is True
    choice.pin("linear", None)  # measured again
    assert choice.use("linear") is False and calls.count("linear") == 2


def test_without_a_compiler_everything_stays_plain(monkeypatch, tmp_path):
    """No compiler on PATH: nothing is built, every kind decides "library", models still run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    monkeypatch.setattr(choice, "_pinned", {})
    monkeypatch.setattr(choice, "_results", {})
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 1)
    cpu_kernels.library.cache_clear()
    try:
        dit, _, _ = make_tiny_components(seed=3)
        x, t, ctx = _tiny_dit_inputs(np.random.default_rng(2))
        ref = dit(x, t, ctx)
        kernels.enable(dit)
        np.testing.assert_array_equal(np.array(dit(x, t, ctx)), np.array(ref))
        measured = choice.measurements()
        assert measured and all(not m.use_kernel for m in measured)
        assert "no C++ compiler" in measured[0].line()
        assert "no C++ compiler" in "\n".join(kernels.report())
        assert not (tmp_path / "s2dit_mlx").exists()
    finally:
        cpu_kernels.library.cache_clear()


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library_status().startswith("not built yet")
        assert not (tmp_path / "s2dit_mlx").exists()  # asking did not build it
        assert cpu_kernels.library() is not None
        built = list((tmp_path / "s2dit_mlx" / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"] and built[0].name.startswith("cpu_kernels-")
        assert cpu_kernels.library_status() == f"loaded ({built[0]})"
        # A compiler that fails leaves nothing behind and reports why.
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
        monkeypatch.setenv("CXX", "false")
        monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: "/bin/false")
        assert cpu_kernels.library() is None
        assert cpu_kernels.unavailable_reason.startswith("build failed")
        assert list((tmp_path / "other" / "s2dit_mlx" / "kernels").iterdir()) == []
    finally:
        cpu_kernels.library.cache_clear()


def test_env_turns_the_library_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        assert cpu_kernels.unavailable_reason == f"disabled ({cpu_kernels.DISABLE_ENV} is set)"
        assert kernels.report() == [f"CPU kernels: off ({cpu_kernels.DISABLE_ENV} is set)"]
    finally:
        cpu_kernels.library.cache_clear()


def test_resampler_and_conv_modules_swap(gemm):
    """The Wan VAE's upsampler and causal convs have kernel-backed subclasses."""
    assert modules.SWAPS[wan_vae.Resample][0] is modules.KernelResample
    assert modules.SWAPS[wan_vae.CausalConv3d][0] is modules.KernelCausalConv3d
    up = wan_vae.Resample(20, "upsample2d")
    x = _normal((1, 2, 5, 6, 20), 11)
    ref = up(x, None)
    kernels.enable(up)
    _close(up(x, None), ref, tol=1e-5)


def test_info_reports_blas_and_each_kind(monkeypatch):
    """`s2dit info --kernels`: BLAS and why, then every kind measured here, with its speeds."""
    from s2dit_mlx import info

    monkeypatch.setattr(choice, "_pinned", {})
    monkeypatch.setattr(choice, "_results", {})
    before = "\n".join(info.info_lines(gemm=False))
    assert "measured against MLX's own op at its first use" in before
    text = "\n".join(info.info_lines(gemm=False, measure_kernels=True))
    assert "BLAS: " in text and "usable CPUs: " in text and "CPU kernels: opt-in" in text
    for kind in choice.KINDS:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{kind}: "))
        assert line.strip().startswith((f"{kind}: kernel (", f"{kind}: library (")), line
        if cpu_kernels.library() is not None and (
            kind not in choice.GEMM_KINDS or cpu_kernels.gemm_available()
        ):
            assert " on " in line and "/s" in line, line  # both sides timed
