"""The vectorised CPU kernels (s2dit_mlx.kernels.cpu) against MLX's own ops, and their guards."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_DEFAULTS, make_tiny_components
from test_umt5 import TINY as TINY_UMT5
from test_wan_vae import SIZES, _random_vae

from s2dit_mlx.kernels import cpu as cpu_kernels
from s2dit_mlx.models import layers
from s2dit_mlx.models.umt5 import UMT5Config, UMT5TextEncoder
from s2dit_mlx.pipeline import Pipeline


@pytest.fixture
def kernels(monkeypatch):
    """The compiled library, with the size thresholds off so tiny tensors use it too."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine: MLX's own ops are used instead")
    assert cpu_kernels.library() is not None, cpu_kernels.unavailable_reason
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(cpu_kernels, "MIN_GEMM_MACS", 1)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # they are CPU kernels (a Mac would default to Metal)
    try:
        yield cpu_kernels.library()
    finally:
        mx.set_default_device(device)


def _wide(shape, seed=0) -> mx.array:
    """Values from -100 to 100 plus the ends of exp's range and beyond."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice([0.1, 3.0, 30.0], shape)
    flat = x.reshape(-1)
    flat[:6] = [0.0, -87.0, 88.0, -1e4, 1e4, -0.0]
    return mx.array(x)


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 300])
def test_softmax_matches_mlx(kernels, cols):
    x = _wide((7, 3, cols))
    ref = mx.softmax(x, axis=-1)
    scores = x * 1.0
    with cpu_kernels.enabled():
        assert cpu_kernels.softmax_scores(scores)
    np.testing.assert_allclose(np.array(scores), np.array(ref), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(scores).sum(-1), 1.0, rtol=2e-6)


@pytest.mark.parametrize(
    "ours, ref", [(cpu_kernels.silu, nn.silu), (cpu_kernels.gelu_tanh, nn.gelu_approx)]
)
def test_activations_match_mlx_and_leave_shared_input_alone(kernels, ours, ref):
    x = _wide((5, 1001))
    before = np.array(x)
    with cpu_kernels.enabled():
        out = ours(x)
    expected = np.array(ref(x))
    np.testing.assert_allclose(np.array(out), expected, rtol=3e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(x), before)  # not fresh: x is copied, not overwritten
    # fresh=True overwrites the given array (the caller's own new buffer) with the result.
    y = x * 1.0
    with cpu_kernels.enabled():
        assert ours(y, fresh=True) is y
    np.testing.assert_allclose(np.array(y), expected, rtol=3e-6, atol=1e-6)


def test_off_outside_enabled_and_for_other_dtypes(kernels, monkeypatch):
    calls = []
    real = kernels

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(cpu_kernels, "library", lambda: Spy())
    x = _wide((4, 64))
    cpu_kernels.silu(x)
    cpu_kernels.gelu_tanh(x)
    layers.attention(*(x.reshape(1, 1, 4, 64),) * 3, 0.1)
    assert calls == []  # not enabled: MLX's own ops
    with cpu_kernels.enabled():
        cpu_kernels.silu(x.astype(mx.float16))
        assert calls == []  # float16: MLX's own ops
        with cpu_kernels.enabled(False):
            cpu_kernels.silu(x)
        assert calls == []
        cpu_kernels.silu(x)
    assert calls == ["s2dit_silu"]


def test_attention_matches_and_tiles(kernels, monkeypatch):
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
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", 2 * 3 * 7 * 40)
    with cpu_kernels.enabled():
        out = layers.attention(q, k, v, 0.7)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# The GEMM: linear layers, direct convolution, attention


@pytest.fixture
def gemm(kernels):
    if not cpu_kernels.gemm_available():
        pytest.skip("the GEMM kernel needs AVX-512F; MLX's matmul runs instead")
    return kernels


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
    with cpu_kernels.enabled():
        out = cpu_kernels.linear(x, w, b)
        layer = layers.Linear(k, n, bias=bias)
        layer.weight = w
        if bias:
            layer.bias = b
        from_layer = layer(x.reshape(1, m, k))
    _close(out, ref)
    _close(from_layer, ref.reshape(1, m, n))
    assert cpu_kernels.linear(x, w, b) is None  # not enabled
    with cpu_kernels.enabled():
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
    with cpu_kernels.enabled():
        out = cpu_kernels.conv3d(x, weight, bias, hist, causal, padding, upsample)
        no_bias = cpu_kernels.conv3d(x, weight, None, hist, causal, padding, upsample)
    _close(out, ref)
    _close(no_bias, ref - bias)


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
    with cpu_kernels.enabled():
        out = cpu_kernels.attention(q, k, v, 0.4)
        via_layers = layers.attention(q, k, v, 0.4)
    # Logits up to ~40 here: float32 rounding in them moves the weights by ~1e-6 relative.
    _close(out, ref, tol=1e-5)
    _close(via_layers, ref, tol=1e-5)
    # The result is laid out as [B, L, H, D]: back to tokens without a copy.
    assert np.asarray(out.swapaxes(1, 2)).flags.c_contiguous


def test_attention_tiles_are_whole_micro_tiles():
    """About 2^18 scores per tile, in whole 12-row micro-kernel tiles, never more than lq."""
    assert cpu_kernels.attention_tile(4680, 4680) == 60  # 56 by size alone
    assert cpu_kernels.attention_tile(1560, 1560) == 168
    assert cpu_kernels.attention_tile(5, 4680) == 5
    assert cpu_kernels.attention_tile(10**6, 10**6) == 12


def test_traced_code_falls_back(kernels):
    """Inside mx.compile nothing can be evaluated: the kernels step aside, results still match."""
    x = _wide((3, 100))

    def f(a):
        return cpu_kernels.gelu_tanh(a * 2.0, fresh=True)

    with cpu_kernels.enabled():
        out = mx.compile(f)(x)
    np.testing.assert_allclose(np.array(out), np.array(nn.gelu_approx(x * 2.0)), rtol=1e-6)


def test_models_match_with_and_without_kernels(kernels):
    """The tiny S2DiT (lcha/ssa/full), Wan VAE decode and umT5 (gated GELU and gated SiLU)
    agree with the kernels on and off."""
    dit, _, _ = make_tiny_components(seed=3)
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((1, 3, 4, 8, 4)).astype(np.float32))
    t = mx.array([700.0])
    ctx = mx.array(rng.standard_normal((1, 16, 16)).astype(np.float32))
    ref = dit(x, t, ctx)
    with cpu_kernels.enabled():
        out = dit(x, t, ctx)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)

    for version in ("2.1", "2.2"):
        vae = _random_vae(version, seed=4)
        h, w = SIZES[version]
        factor = vae.spatial_factor
        z = mx.array(rng.standard_normal((1, 3, h // factor, w // factor, vae.z_dim)))
        ref = vae.decode(z.astype(mx.float32))
        video = mx.array(rng.uniform(-1, 1, (1, 9, h, w, 3)).astype(np.float32))
        ref_z = vae.encode(video)
        with cpu_kernels.enabled():
            out = vae.decode(z.astype(mx.float32))
            enc = vae.encode(video)
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(enc), np.array(ref_z), rtol=1e-5, atol=1e-5)

    ids = mx.array(rng.integers(0, TINY_UMT5["vocab_size"], (2, 24)))
    for kind in ("gated-gelu", "gated-silu"):
        mx.random.seed(6)
        encoder = UMT5TextEncoder(UMT5Config(**TINY_UMT5, feed_forward_proj=kind))
        ref = encoder(ids)
        with cpu_kernels.enabled():
            out = encoder(ids)
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)


def test_pipeline_uses_them_and_generates_the_same_video(kernels, tiny_model_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(str(tiny_model_dir))
    settings = {k: v for k, v in TINY_DEFAULTS.items() if k != "fps"}
    settings.update(seed=5, guidance=2.0)
    used = set()
    real, real_library = kernels, cpu_kernels.library

    class Spy:
        def __getattr__(self, name):
            used.add(name)
            return getattr(real, name)

    monkeypatch.setattr(cpu_kernels, "library", lambda: Spy())
    fast = pipe.generate("a red circle", **settings)
    # Attention (the GEMM one, or the softmax kernel without AVX-512) and the activations.
    assert {"s2dit_attention", "s2dit_softmax_rows"} & used, used
    assert {"s2dit_silu", "s2dit_gelu_tanh"} <= used, used
    monkeypatch.setattr(cpu_kernels, "library", real_library)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        assert cpu_kernels.status() == f"off: disabled ({cpu_kernels.DISABLE_ENV} is set)"
        slow = pipe.generate("a red circle", **settings)
    finally:
        cpu_kernels.library.cache_clear()
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is not None
        built = list((tmp_path / "s2dit_mlx" / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"] and built[0].name.startswith("cpu_kernels-")
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
