"""Wan VAE 2.1 / 2.2 in MLX against diffusers `AutoencoderKLWan` and the official Wan code.

Tiny random configs, every parameter randomised (incl. the attention proj Wan zero-inits).
Parity tolerance: max |ours - reference| <= 1e-4 in fp32 (measured ~5e-6 on outputs of
magnitude ~1-3).
"""

import inspect

import numpy as np
import pytest

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten
from wan_refs import (
    from_torch_video,
    load_wan_module,
    randomize_torch_,
    to_torch_video,
    torch_state_to_mx,
)

from s2dit_mlx.cache import ConvHistories
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models import wan_vae
from s2dit_mlx.models.wan_vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    _Tiling,
)

TOL = 1e-4  # parity: max abs error vs either reference, fp32
STREAM_TOL = 1e-6  # same ops on the same shapes: a streamed decode equals a one-shot decode

# Tiny versions of the two published architectures (same depth, 4 levels, 2 res blocks).
TINY = {
    "2.1": dict(version="2.1", base_dim=8, z_dim=4),
    "2.2": dict(version="2.2", base_dim=8, decoder_base_dim=12, z_dim=6, patch_size=2),
}
# Pixel sizes: 9 frames -> 3 latent frames of 2x3 (H != W, so a swapped axis shows).
SIZES = {"2.1": (16, 24), "2.2": (32, 48)}


def _stats(z_dim: int, seed: int = 0) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=z_dim).tolist(), rng.uniform(0.5, 2.0, size=z_dim).tolist()


def _config(which: str, **overrides) -> WanVAEConfig:
    kw = dict(TINY[which])
    mean, std = _stats(kw["z_dim"])
    return WanVAEConfig(**{**kw, "latents_mean": mean, "latents_std": std, **overrides})


def _random_vae(version: str, seed: int = 0, **overrides) -> WanVAE:
    """Our tiny VAE with every parameter random (weights N(0, 1/fan_in), gains U(0.5, 1.5))."""
    vae = WanVAE(_config(version, **overrides))
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(vae.parameters()):
        if name.endswith("gamma"):
            v = rng.uniform(0.5, 1.5, p.shape)
        elif name.endswith("bias"):
            v = 0.2 * rng.standard_normal(p.shape)
        else:  # MLX layout: fan_in is everything but the output axis
            v = rng.standard_normal(p.shape) / np.sqrt(np.prod(p.shape[1:]))
        params.append((name, mx.array(v.astype(np.float32))))
    vae.load_weights(params, strict=True)
    return vae


def _video(version: str, batch: int = 1, frames: int = 9, seed: int = 1) -> np.ndarray:
    h, w = SIZES[version]
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(batch, frames, h, w, 3)).astype(np.float32)


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------------------------
# References


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def _diffusers_vae(version: str, torch, seed: int = 3):
    diffusers = pytest.importorskip("diffusers")
    cfg = _config(version)
    kw = dict(
        base_dim=cfg.base_dim,
        decoder_base_dim=cfg.decoder_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=cfg.dim_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=cfg.temperal_downsample,
        latents_mean=cfg.latents_mean,
        latents_std=cfg.latents_std,
    )
    if version == "2.2":
        kw.update(
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
        )
    ref = diffusers.AutoencoderKLWan(**kw).eval()
    randomize_torch_(ref, seed)
    return ref


def _wan_vae(version: str, torch, seed: int = 4):
    cfg = _config(version)
    kw = dict(
        dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=cfg.dim_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=cfg.temperal_downsample,
    )
    if version == "2.1":
        ref = load_wan_module("modules/vae2_1.py").WanVAE_(**kw)
    else:
        ref = load_wan_module("modules/vae2_2.py").WanVAE_(dec_dim=cfg.decoder_base_dim, **kw)
    ref.eval()
    randomize_torch_(ref, seed)
    return ref


def _ours_from(ref, version: str) -> WanVAE:
    """Our VAE holding the reference's weights, through sanitize() and a strict load."""
    vae = WanVAE(_config(version))
    vae.load_weights(list(vae.sanitize(torch_state_to_mx(ref.state_dict())).items()), strict=True)
    return vae


# ----------------------------------------------------------------------------------------------
# Config


def test_published_presets():
    c21, c22 = WanVAEConfig.wan21(), WanVAEConfig.wan22()
    c21.validate()
    c22.validate()
    assert (c21.z_dim, c21.temporal_factor, c21.spatial_factor) == (16, 4, 8)
    assert (c22.z_dim, c22.temporal_factor, c22.spatial_factor) == (48, 4, 16)
    assert (c22.base_dim, c22.dec_dim, c22.patch_size, c22.io_channels) == (160, 256, 2, 12)
    vae = WanVAE(WanVAEConfig(base_dim=16))  # small widths build (the built-in default VAE)
    assert (vae.z_dim, vae.temporal_factor, vae.spatial_factor) == (16, 4, 8)
    assert vae.num_latent_frames(81) == 21 and vae.num_pixel_frames(21) == 81


def test_config_roundtrip_and_errors():
    cfg = _config("2.2")
    d = cfg.to_dict()
    assert d["type"] == "wan" and d["version"] == "2.2"
    assert WanVAEConfig.from_dict({**d, "unknown_key": 1}) == cfg
    bad = [
        dict(version="3.0"),
        dict(type="patch"),
        dict(base_dim=0),
        dict(latents_mean=[0.0] * 5),
        dict(latents_std=[1.0] * 5 + [-1.0]),
        dict(attn_scales=[0.5]),
        dict(temperal_downsample=[True]),
        dict(dim_mult=[1, 3, 4, 4]),  # 2.2: the shortcut channel groups no longer divide
    ]
    for overrides in bad:
        with pytest.raises(S2DiTError):
            WanVAE(_config("2.2", **overrides))


def test_normalisation_constants_match_references(torch):
    diffusers = pytest.importorskip("diffusers")
    # diffusers' defaults are Wan 2.1's.
    defaults = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
    assert defaults["latents_mean"].default == WAN21_LATENTS_MEAN
    assert defaults["latents_std"].default == WAN21_LATENTS_STD
    for rel, cls, mean, std in (
        ("modules/vae2_1.py", "Wan2_1_VAE", WAN21_LATENTS_MEAN, WAN21_LATENTS_STD),
        ("modules/vae2_2.py", "Wan2_2_VAE", WAN22_LATENTS_MEAN, WAN22_LATENTS_STD),
    ):
        mod = load_wan_module(rel)
        original = mod._video_vae
        mod._video_vae = lambda **kw: torch.nn.Identity()  # skip the checkpoint load
        try:
            wrapper = getattr(mod, cls)(device="cpu")
        finally:
            mod._video_vae = original
        ref_mean, ref_inv_std = (t.numpy() for t in wrapper.scale)  # [mean, 1 / std]
        np.testing.assert_array_equal(ref_mean, np.float32(mean))
        np.testing.assert_allclose(ref_inv_std, 1.0 / np.float32(std), rtol=1e-6)
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_published_architecture_names_and_shapes(version, torch):
    """The full-size published VAEs: every reference parameter maps onto ours, same shape."""
    diffusers = pytest.importorskip("diffusers")
    cfg = WanVAEConfig.wan21() if version == "2.1" else WanVAEConfig.wan22()
    ours = {k: v.shape for k, v in tree_flatten(WanVAE(cfg).parameters())}  # lazy, no memory

    def mapped(state):
        # Zero-stride stand-ins: sanitize only reshapes/transposes, so nothing is allocated.
        fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
        return {k: tuple(v.shape) for k, v in WanVAE(cfg).sanitize(fake).items()}

    with torch.device("meta"):
        if version == "2.1":
            d = diffusers.AutoencoderKLWan()
            w = load_wan_module("modules/vae2_1.py").WanVAE_(
                dim=96, z_dim=16, temperal_downsample=[False, True, True]
            )
        else:
            d = diffusers.AutoencoderKLWan(
                base_dim=160,
                decoder_base_dim=256,
                z_dim=48,
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
            )
            w = load_wan_module("modules/vae2_2.py").WanVAE_(
                dim=160, dec_dim=256, z_dim=48, temperal_downsample=[False, True, True]
            )
    assert WanVAEConfig.from_diffusers_config(dict(d.config)).version == version
    assert mapped(d.state_dict()) == ours
    assert mapped(w.state_dict()) == ours


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_matches_diffusers(version, torch):
    ref = _diffusers_vae(version, torch)
    cfg = WanVAEConfig.from_diffusers_config(dict(ref.config))
    assert cfg == _config(version)
    vae = _ours_from(ref, version)
    # 5 frames (2 latent frames) keep the slow torch reference short; the official-Wan test
    # below runs 9 (3 latent frames: a cache carried past a non-first frame).
    video = _video(version, frames=5)
    with torch.no_grad():
        post = ref.encode(to_torch_video(video)).latent_dist
    mu, logvar = vae.encode_moments(mx.array(video))
    assert _max_err(mu, from_torch_video(post.mean)) <= TOL
    assert _max_err(logvar, from_torch_video(post.logvar)) <= TOL
    # encode() normalises with the config's constants, as a diffusers pipeline does.
    mean, std = np.float32(cfg.latents_mean), np.float32(cfg.latents_std)
    z = vae.encode(mx.array(video))
    assert _max_err(z, (from_torch_video(post.mean) - mean) / std) <= TOL

    zn = np.random.default_rng(5).standard_normal(z.shape).astype(np.float32)
    with torch.no_grad():
        expected = from_torch_video(ref.decode(to_torch_video(zn * std + mean)).sample)
    # diffusers clamps to [-1, 1]: make sure enough is left unclamped to compare.
    assert (np.abs(expected) < 0.99).mean() > 0.5
    assert expected.shape == (1, 5, *SIZES[version], 3)
    assert _max_err(vae.decode(mx.array(zn)), expected) <= TOL
    # Streaming: separate calls of 1 latent frame each give 1 then 4 frames.
    dec = vae.decoder()
    a, b = dec.decode(mx.array(zn[:, :1])), dec.decode(mx.array(zn[:, 1:]))
    assert (a.shape[1], b.shape[1]) == (1, 4)
    assert _max_err(mx.concatenate([a, b], axis=1), expected) <= TOL


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_matches_official_wan(version, torch, monkeypatch):
    ref = _wan_vae(version, torch)
    vae = _ours_from(ref, version)
    cfg = vae.config
    mean, std = np.float32(cfg.latents_mean), np.float32(cfg.latents_std)
    scale = [torch.from_numpy(mean), 1.0 / torch.from_numpy(std)]
    video = _video(version)
    with torch.no_grad():
        expected_z = from_torch_video(ref.encode(to_torch_video(video), scale))
    z = vae.encode(mx.array(video))
    assert _max_err(z, expected_z) <= TOL

    zn = np.random.default_rng(6).standard_normal(z.shape).astype(np.float32)
    with torch.no_grad():  # WanVAE_.decode does not clamp: compare the raw frames
        expected = from_torch_video(ref.decode(to_torch_video(zn), scale))
    assert np.abs(expected).max() > 1.5  # a real unclamped comparison
    assert _max_err(vae.decode(mx.array(zn), clip=False), expected) <= TOL
    dec = vae.decoder()  # one latent frame per call, across separate calls
    frames = [dec.decode(mx.array(zn[:, i : i + 1]), clip=False) for i in range(zn.shape[1])]
    assert [f.shape[1] for f in frames] == [1, 4, 4]
    assert _max_err(mx.concatenate(frames, axis=1), expected) <= TOL
    # The low-memory conv path (one matmul per kernel tap) that large frames take.
    monkeypatch.setattr(wan_vae, "_CONV_UNFOLD_BUDGET", 0)
    assert _max_err(vae.decode(mx.array(zn), clip=False), expected) <= TOL


def test_original_and_diffusers_names_load_the_same_weights(torch):
    """Wan2.1_VAE.pth names vs diffusers' own converter of them: identical MLX weights."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = _wan_vae("2.1", torch)
    state = ref.state_dict()
    vae = WanVAE(_config("2.1"))
    from_original = vae.sanitize(torch_state_to_mx(state))
    from_diffusers = vae.sanitize(torch_state_to_mx(convert_wan_vae_to_diffusers(dict(state))))
    assert sorted(from_original) == sorted(from_diffusers)
    for k, v in from_original.items():
        assert v.shape == from_diffusers[k].shape and bool(mx.array_equal(v, from_diffusers[k])), k
    # Our own saved weights pass through unchanged.
    vae.load_weights(list(from_original.items()), strict=True)
    own = dict(tree_flatten(vae.parameters()))
    again = vae.sanitize(own)
    assert sorted(again) == sorted(own)
    assert all(again[k] is own[k] for k in own)


# ----------------------------------------------------------------------------------------------
# Causal caches and chunking


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_streaming_decoder_matches_one_shot_decode(version):
    vae = _random_vae(version)
    h, w = (s // vae.spatial_factor for s in SIZES[version])
    z = mx.random.normal((1, 5, h, w, vae.z_dim), key=mx.random.key(0))
    full = vae.decode(z)
    assert full.shape[1] == 17
    dec = vae.decoder()
    parts = [dec.decode(z[:, a:b]) for a, b in ((0, 2), (2, 3), (3, 5))]
    assert [p.shape[1] for p in parts] == [5, 4, 8]
    assert _max_err(mx.concatenate(parts, axis=1), full) <= STREAM_TOL
    with pytest.raises(S2DiTError):  # a chunk of another size cannot continue this video
        dec.decode(z[:, :, :1])
    dec.reset()  # a new video starts from an empty cache
    assert _max_err(dec.decode(z), full) <= STREAM_TOL
    # A decoder that saw another video first differs (the cache is really used).
    other = vae.decoder()
    other.decode(z)
    assert _max_err(other.decode(z[:, :1]), full[:, :1]) > 1e-2


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_pass_sizes_agree(version):
    """Wan's chunking (1 frame, then 4 per latent frame) equals bigger passes and one pass."""
    vae = _random_vae(version)
    video = mx.array(_video(version))
    z1 = vae.encode(video)  # Wan's chunks: 1, 4, 4 frames
    assert z1.shape[1] == 3
    assert _max_err(vae.encode(video, frames_per_pass=2), z1) <= TOL  # 1, 8 frames
    assert _max_err(vae.encode(video, frames_per_pass=None), z1) <= TOL
    out1 = vae.decode(z1, clip=False)
    assert _max_err(vae.decode(z1, frames_per_pass=2, clip=False), out1) <= TOL
    assert _max_err(vae.decode_full(z1), out1) <= TOL
    recon, mu, logvar = vae(video)  # training path: one pass each way
    assert recon.shape == video.shape and mu.shape == logvar.shape == z1.shape
    assert _max_err(recon, out1) <= TOL


def test_patchify_channel_order_matches_references(torch):
    """Wan 2.2 packs 2x2 pixels as channels in (c, w, h) order (not (c, h, w))."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as dwan

    vae = WanVAE(_config("2.2"))
    video = np.arange(2 * 3 * 4 * 6 * 3, dtype=np.float32).reshape(2, 3, 4, 6, 3)
    ours = np.array(vae.patchify(mx.array(video)))
    wan = load_wan_module("modules/vae2_2.py").patchify(to_torch_video(video), 2)
    np.testing.assert_array_equal(ours, from_torch_video(wan))
    np.testing.assert_array_equal(ours, from_torch_video(dwan.patchify(to_torch_video(video), 2)))
    # pixel (h=0, w=1) of channel 0 lands in packed channel 0*4 + w*2 + h = 2
    assert ours[0, 0, 0, 0, 2] == video[0, 0, 0, 1, 0]
    np.testing.assert_array_equal(np.array(vae.unpatchify(mx.array(ours))), video)


def test_batch_items_are_independent():
    vae = _random_vae("2.2")
    video = _video("2.2", batch=2, frames=5)
    z = vae.encode(mx.array(video))
    z1 = vae.encode(mx.array(video[1:]))
    assert _max_err(z[1:], z1) <= 1e-5
    out = vae.decode(z, clip=False)
    assert _max_err(out[1:], vae.decode(z1, clip=False)) <= 1e-5
    assert _max_err(out[0], out[1]) > 1e-2


def test_first_frame_is_encoded_on_its_own():
    """Causality: latent frame 0 depends on pixel frame 0 only; frame k on frames <= 4k."""
    vae = _random_vae("2.2")
    video = _video("2.2")
    z = np.array(vae.encode(mx.array(video)))
    changed = video.copy()
    changed[:, 5:] = 0.0  # frames 5..8 belong to latent frame 2
    z2 = np.array(vae.encode(mx.array(changed)))
    assert _max_err(z[:, :2], z2[:, :2]) == 0.0
    assert _max_err(z[:, 2], z2[:, 2]) > 1e-3


@pytest.mark.parametrize(
    "shape,kernel,stride",
    [
        ((2, 4, 7, 9, 5), (3, 3, 3), 1),
        ((1, 3, 6, 5, 4), (3, 1, 1), 1),
        ((3, 8, 6, 4), (3, 3), 1),
        ((1, 5, 7, 9, 4), (3, 1, 1), (2, 1, 1)),
        ((3, 9, 8, 4), (3, 3), 2),
    ],
)
def test_low_memory_conv_matches_mlx_conv(shape, kernel, stride, monkeypatch):
    x = mx.random.normal(shape, key=mx.random.key(7))
    w = mx.random.normal((6, *kernel, shape[-1]), key=mx.random.key(8))
    conv = mx.conv3d if len(shape) == 5 else mx.conv2d
    st = (stride,) * len(kernel) if isinstance(stride, int) else stride
    expected = conv(x, w, st)
    monkeypatch.setattr(wan_vae, "_CONV_UNFOLD_BUDGET", 0)
    assert _max_err(wan_vae._conv(x, w, stride), expected) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Spatial tiling


class _Upsample:
    """Pointwise stand-in for the decoder: nearest upsampling (exact under any tiling)."""

    def __init__(self, s):
        self.s = s

    def __call__(self, x, cache, first):
        return mx.repeat(mx.repeat(x, self.s, axis=2), self.s, axis=3)


class _Pool:
    """Pointwise stand-in for the encoder: s x s average pooling."""

    def __init__(self, s):
        self.s = s

    def __call__(self, x, cache, first):
        b, t, h, w, c = x.shape
        return x.reshape(b, t, h // self.s, self.s, w // self.s, self.s, c).mean(axis=(3, 5))


def test_tile_blending_is_exact_for_pointwise_nets():
    x = mx.random.normal((2, 3, 11, 14, 5), key=mx.random.key(1))
    tiling = _Tiling.plan(11, 14, tile=5, stride=3, scale=4)
    assert len(tiling.tiles) == 3 * 4  # starts 0, 3, (flush) 6 x 0, 3, 6, (flush) 9
    total = sum(np.array(w)[0, 0, :, :, 0].sum() for w in tiling.weights)
    assert abs(total - 11 * 14 * 16) < 1e-3  # weights sum to one per output pixel
    out = tiling.run(x, _Upsample(4), [ConvHistories() for _ in tiling.tiles], True)
    assert _max_err(out, _Upsample(4)(x, None, True)) <= 1e-6
    x = mx.random.normal((1, 2, 48, 40, 3), key=mx.random.key(2))
    tiling = _Tiling.plan(48, 40, tile=16, stride=8, scale=1 / 8)
    out = tiling.run(x, _Pool(8), [ConvHistories() for _ in tiling.tiles], True)
    assert _max_err(out, _Pool(8)(x, None, True)) <= 1e-6


# (pixels: frame size, tile, stride) and the measured PSNR floor of tiled vs untiled decode.
TILING = {"2.1": (64, 48, 16, 23.0), "2.2": (96, 64, 32, 18.0)}


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_decode_and_encode_roughly_match_untiled(version):
    vae = _random_vae(version)
    sf = vae.spatial_factor
    size, tile, stride, min_psnr = TILING[version]
    z = mx.random.normal((1, 2, size // sf, size // sf, vae.z_dim), key=mx.random.key(3))
    yy, xx = np.meshgrid(np.linspace(0, 3, size), np.linspace(0, 3, size), indexing="ij")
    video = np.stack(
        [np.sin(xx + 0.3 * t + c) * np.cos(yy - c) for t in range(5) for c in range(3)]
    ).reshape(5, 3, size, size)
    video = mx.array(video.transpose(0, 2, 3, 1)[None].astype(np.float32))
    full, full_z = vae.decode(z), vae.encode(video)

    vae.enable_tiling(tile, stride)
    tiled = vae.decode(z)
    dec = vae.decoder()  # tiled streaming across calls == tiled one-shot
    streamed = mx.concatenate([dec.decode(z[:, :1]), dec.decode(z[:, 1:])], axis=1)
    tiled_z = vae.encode(video)
    vae.disable_tiling()

    assert _max_err(streamed, tiled) <= STREAM_TOL
    # Random weights see far (no locality learnt), so seams show, but the blend stays close:
    # measured PSNR 26.7 dB (2.1) / 20.6 dB (2.2); misplaced tiles would give < 10 dB.
    mse = float(np.mean((np.array(tiled) - np.array(full)) ** 2))
    psnr = 10 * np.log10(4.0 / mse)
    assert min_psnr < psnr < 80, psnr  # < 80: the tiled path really ran
    enc_err = np.abs(np.array(tiled_z) - np.array(full_z))
    assert enc_err.mean() < 0.3 * np.array(full_z).std()  # measured 0.16 / 0.09
    with pytest.raises(S2DiTError):
        vae.enable_tiling(60, 32)


# ----------------------------------------------------------------------------------------------
# Interface


def test_input_errors():
    vae = _random_vae("2.1")
    with pytest.raises(S2DiTError):
        vae.encode(mx.zeros((1, 8, 32, 32, 3)))  # frames must be 1 + 4k
    with pytest.raises(S2DiTError):
        vae.encode(mx.zeros((1, 5, 36, 32, 3)))  # not divisible by 8
    with pytest.raises(S2DiTError):
        vae.encode(mx.zeros((1, 5, 32, 32)))
    with pytest.raises(S2DiTError):
        vae.decode(mx.zeros((1, 2, 4, 4, 5)))  # z_dim is 4
    assert vae.decode(mx.zeros((1, 0, 4, 4, 4))).shape == (1, 0, 32, 32, 3)


def test_normalize_roundtrip_and_bf16():
    vae = _random_vae("2.1")
    z = mx.random.normal((1, 2, 4, 4, 4), key=mx.random.key(4))
    assert _max_err(vae.denormalize(vae.normalize(z)), z) <= 1e-5
    expected = (np.array(z) - np.float32(vae.config.latents_mean)) / np.float32(
        vae.config.latents_std
    )
    assert _max_err(vae.normalize(z), expected) <= 1e-6
    full = vae.decode(z)
    vae.set_dtype(mx.bfloat16)
    half = vae.decode(z)
    assert half.dtype == mx.float32 and _max_err(half, full) < 0.1


def test_model_folder_and_pipeline(tmp_path, monkeypatch):
    """Registered as VAE type "wan", a tiny Wan VAE saves, loads and generates."""
    from s2dit_mlx import loading
    from s2dit_mlx.loading import load_model, register_component, save_model
    from s2dit_mlx.models.byte_text_encoder import ByteTextEncoder, ByteTextEncoderConfig
    from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
    from s2dit_mlx.pipeline import Pipeline

    # Registered for this test only (the package registers it in loading.py).
    monkeypatch.setitem(loading._COMPONENTS, "vae", dict(loading._COMPONENTS["vae"]))
    register_component("vae", "wan", WanVAEConfig, WanVAE)
    mx.random.seed(0)
    vae = _random_vae("2.1")
    dit = S2DiT(
        ModelArgs(
            in_dim=4,
            out_dim=4,
            dim=32,
            ffn_dim=64,
            freq_dim=32,
            text_dim=16,
            num_heads=2,
            layers=["full", "full"],
            text_len=16,
            frames_per_chunk=2,
        )
    )
    text = ByteTextEncoder(ByteTextEncoderConfig(dim=16, num_layers=1, num_heads=2, max_len=16))
    defaults = dict(height=32, width=32, frames=9, steps=1)
    save_model(tmp_path / "m", dit, vae, text, defaults=defaults)
    bundle = load_model(tmp_path / "m")
    assert isinstance(bundle.vae, WanVAE) and bundle.vae.config == vae.config
    z = mx.random.normal((1, 2, 4, 4, 4), key=mx.random.key(5))
    assert _max_err(bundle.vae.decode(z), vae.decode(z)) == 0.0
    video = Pipeline.from_bundle(bundle).generate("a red ball", seed=1)
    assert video.shape == (9, 32, 32, 3) and video.dtype == np.uint8
