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
    """The compiled library, with the size threshold off so tiny tensors use it too."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C++ compiler on this machine: MLX's own ops are used instead")
    assert cpu_kernels.library() is not None, cpu_kernels.unavailable_reason
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS", 1)
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

    vae = _random_vae("2.1", seed=4)
    h, w = SIZES["2.1"]
    z = mx.array(rng.standard_normal((1, 3, h // 8, w // 8, 4)).astype(np.float32))
    ref = vae.decode(z)
    with cpu_kernels.enabled():
        out = vae.decode(z)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)

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
    used = []
    real_softmax = cpu_kernels.softmax_scores

    def counting(scores):
        used.append(scores.shape)
        return real_softmax(scores)

    monkeypatch.setattr(cpu_kernels, "softmax_scores", counting)
    fast = pipe.generate("a red circle", **settings)
    assert used, "the streaming pipeline should run the kernels"
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
