"""Wan DiT parity: S2DiT with every layer "full" vs diffusers WanTransformer3DModel and the
official wan22 WanModel, at tiny random configs with every parameter randomised (fp32).

Tolerance: max |ours - ref| <= 1e-4 * max |ref|.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import s2dit_mlx  # noqa: F401

# isort: split
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models.s2dit import S2DiT
from s2dit_mlx.models.wan import (
    PRESETS,
    WanExperts,
    args_from_diffusers_config,
    args_from_shapes,
    args_from_wan_config,
    find_preset,
    preset_args,
    sanitize,
    wan_model_args,
    wan_name,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-4
# wan22's model.py enters torch.amp.autocast('cuda') blocks, which warn on a CPU-only torch.
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
TEXT_LEN = 16


def sdpa(q, k, v, q_lens=None, k_lens=None, softmax_scale=None, **_):
    """Stand-in for Wan's CUDA flash_attention: [B, L, H, D] inputs, keys past k_lens masked."""
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1])[None, :] < k_lens[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        *(a.transpose(1, 2).float() for a in (q, k, v)), attn_mask=mask, scale=softmax_scale
    )
    return out.transpose(1, 2).to(q.dtype)


def load_official_wan_model():
    """wan22's wan/modules/model.py, loaded without `import wan` and with an SDPA attention."""
    if "wan.modules.model" not in sys.modules:
        spec = importlib.util.find_spec("wan")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("wan22 (official Wan code) is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        # Stub packages so relative imports resolve without running wan/__init__.py (CUDA).
        for name, path in (("wan", root), ("wan.modules", root / "modules")):
            if name not in sys.modules:
                # never executed, but with a real spec (find_spec("wan") keeps working)
                stub_spec = importlib.util.spec_from_file_location(
                    name, path / "__init__.py", submodule_search_locations=[str(path)]
                )
                sys.modules[name] = importlib.util.module_from_spec(stub_spec)
        for name in ("attention", "model"):
            mod_spec = importlib.util.spec_from_file_location(
                f"wan.modules.{name}", root / "modules" / f"{name}.py"
            )
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[f"wan.modules.{name}"] = module
            mod_spec.loader.exec_module(module)
    model = sys.modules["wan.modules.model"]
    # Set on every call: another test file may have loaded the module without the swap.
    model.flash_attention = sdpa
    return model


def randomise(module, seed: int) -> None:
    """Give every parameter of a torch module a random, non-trivial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "modulation" not in name and "scale_shift" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def to_mlx(state_dict) -> dict[str, mx.array]:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state_dict.items()}


def load_ours(args, weights: dict[str, mx.array]) -> S2DiT:
    model = S2DiT(args)
    model.load_weights(list(sanitize(weights).items()), strict=True)
    return model


CONFIGS = {
    # head_dim 16: RoPE split (8, 4, 4); head_dim 20: (8, 6, 6).
    "t2v": dict(dim=48, ffn_dim=96, num_heads=3, num_layers=2, in_dim=8, out_dim=8),
    "t2v_hd20": dict(dim=40, ffn_dim=80, num_heads=2, num_layers=2, in_dim=8, out_dim=8),
    "ti2v": dict(dim=48, ffn_dim=96, num_heads=3, num_layers=2, in_dim=12, out_dim=12),
    # Wan2.2 I2V: the conditioning (mask + image latents) is concatenated on channels.
    "i2v": dict(dim=48, ffn_dim=96, num_heads=3, num_layers=2, in_dim=20, out_dim=8),
}
TEXT_DIM, FREQ_DIM = 24, 256


def make_official(kind: str, seed: int = 0):
    c = CONFIGS[kind]
    wm = load_official_wan_model()
    model = wm.WanModel(
        model_type={"t2v_hd20": "t2v"}.get(kind, kind),
        text_len=TEXT_LEN,
        in_dim=c["in_dim"],
        dim=c["dim"],
        ffn_dim=c["ffn_dim"],
        freq_dim=FREQ_DIM,
        text_dim=TEXT_DIM,
        out_dim=c["out_dim"],
        num_heads=c["num_heads"],
        num_layers=c["num_layers"],
        cross_attn_norm=True,
    ).eval()
    randomise(model, seed)
    return model


def make_diffusers(kind: str, seed: int = 0):
    c = CONFIGS[kind]
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=c["num_heads"],
        attention_head_dim=c["dim"] // c["num_heads"],
        in_channels=c["in_dim"],
        out_channels=c["out_dim"],
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=c["ffn_dim"],
        num_layers=c["num_layers"],
        cross_attn_norm=True,
        eps=1e-6,
    ).eval()
    randomise(model, seed)
    return model


def our_args(kind: str):
    c = CONFIGS[kind]
    return wan_model_args(
        c["dim"],
        c["ffn_dim"],
        c["num_heads"],
        c["num_layers"],
        in_dim=c["in_dim"],
        out_dim=c["out_dim"],
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        text_len=TEXT_LEN,
    )


def make_inputs(kind: str, seed: int = 1):
    """Latents [B, C, T, H, W], timesteps per frame [B, T] (ints as Wan uses), text contexts."""
    rng = np.random.default_rng(seed)
    batch, frames, height, width = 2, 3, 4, 6
    x = rng.standard_normal((batch, CONFIGS[kind]["in_dim"], frames, height, width))
    if kind == "ti2v":
        # Wan2.2 TI2V image-to-video: the first (given) frame's tokens sit at t = 0.
        t = np.array([[0, 700, 700], [0, 13, 13]])
    else:
        t = np.repeat(np.array([[999], [437]]), frames, axis=1)
    contexts = [rng.standard_normal((n, TEXT_DIM)) for n in (5, 9)]  # true lengths
    return x.astype(np.float32), t, [c.astype(np.float32) for c in contexts]


def padded(contexts) -> np.ndarray:
    """Contexts zero-padded to TEXT_LEN tokens, as Wan's text encoder hands them over."""
    out = np.zeros((len(contexts), TEXT_LEN, TEXT_DIM), np.float32)
    for i, c in enumerate(contexts):
        out[i, : len(c)] = c
    return out


def run_ours(model: S2DiT, x, t, contexts) -> np.ndarray:
    out = model(
        mx.array(x.transpose(0, 2, 3, 4, 1)),
        mx.array(t.astype(np.float32)),
        mx.array(padded(contexts)),
    )
    return np.array(out).transpose(0, 4, 1, 2, 3)


def tokens_per_frame(x) -> int:
    return (x.shape[3] // 2) * (x.shape[4] // 2)


def run_official(model, x, t, contexts) -> np.ndarray:
    per_token = torch.from_numpy(np.repeat(t, tokens_per_frame(x), axis=1))
    seq_len = per_token.shape[1]
    kwargs = {}
    if model.model_type == "i2v":
        # Wan2.2 I2V concatenates the conditioning y after the noisy latents.
        x, kwargs["y"] = x[:, : model.out_dim], list(torch.from_numpy(x[:, model.out_dim :]))
    with torch.no_grad():
        out = model(
            list(torch.from_numpy(x)),
            t=per_token,
            context=[torch.from_numpy(c) for c in contexts],
            seq_len=seq_len,
            **kwargs,
        )
    return torch.stack(out).numpy()


def run_diffusers(model, x, t, contexts) -> np.ndarray:
    if (t == t[:, :1]).all():
        timestep = torch.from_numpy(t[:, 0])
    else:
        timestep = torch.from_numpy(np.repeat(t, tokens_per_frame(x), axis=1))
    with torch.no_grad():
        out = model(
            torch.from_numpy(x),
            timestep=timestep,
            encoder_hidden_states=torch.from_numpy(padded(contexts)),
            return_dict=False,
        )[0]
    return out.numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", ["t2v", "t2v_hd20", "ti2v", "i2v"])
def test_parity_with_official_wan(kind):
    ref_model = make_official(kind)
    ours = load_ours(our_args(kind), to_mlx(ref_model.state_dict()))
    x, t, contexts = make_inputs(kind)
    ref = run_official(ref_model, x, t, contexts)
    err = rel_err(run_ours(ours, x, t, contexts), ref)
    assert err <= RTOL, f"{kind}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["t2v", "t2v_hd20", "ti2v"])
def test_parity_with_diffusers(kind):
    ref_model = make_diffusers(kind)
    weights = to_mlx(ref_model.state_dict())
    assert any(k.startswith("condition_embedder.") for k in weights)  # really diffusers names
    ours = load_ours(our_args(kind), weights)
    x, t, contexts = make_inputs(kind)
    ref = run_diffusers(ref_model, x, t, contexts)
    err = rel_err(run_ours(ours, x, t, contexts), ref)
    assert err <= RTOL, f"{kind}: relative error {err:.2e}"


def test_unpadded_context_is_padded_like_wan():
    """Our model zero-pads a short context to text_len itself (skipping it moves outputs)."""
    ref_model = make_official("t2v")
    ours = load_ours(our_args("t2v"), to_mlx(ref_model.state_dict()))
    x, t, contexts = make_inputs("t2v")
    x, t, contexts = x[:1], t[:1], contexts[:1]
    ref = run_official(ref_model, x, t, contexts)
    out = ours(
        mx.array(x.transpose(0, 2, 3, 4, 1)), mx.array(t[:, 0] * 1.0), mx.array(contexts[0][None])
    )
    assert rel_err(np.array(out).transpose(0, 4, 1, 2, 3), ref) <= RTOL


def test_parity_check_detects_small_changes():
    """Negative control: a 1e-2 nudge of one block's modulation breaks the tolerance."""
    ref_model = make_official("t2v")
    weights = to_mlx(ref_model.state_dict())
    weights["blocks.1.modulation"] = weights["blocks.1.modulation"] + 1e-2
    ours = load_ours(our_args("t2v"), weights)
    x, t, contexts = make_inputs("t2v")
    assert rel_err(run_ours(ours, x, t, contexts), run_official(ref_model, x, t, contexts)) > RTOL


def test_diffusers_and_official_names_map_to_the_same_weights():
    """The diffusers state dict, renamed, carries exactly the original names (norm2 -> norm3)."""
    official = make_official("t2v").state_dict()
    converted = {wan_name(k) for k in make_diffusers("t2v").state_dict()}
    assert converted == set(official)
    assert wan_name("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert wan_name("model.diffusion_model.head.head.bias") == "head.head.bias"
    assert wan_name("scale_shift_table") == "head.modulation"
    assert wan_name("blocks.0.scale_shift_table") == "blocks.0.modulation"


def test_configs_give_the_same_args():
    official = make_official("t2v")
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    # WanModel's config.json leaves out text_dim: it comes from the weights
    from_wan = args_from_wan_config(dict(official.config), shapes)
    from_diffusers = args_from_diffusers_config(dict(make_diffusers("t2v").config))
    from_shapes = args_from_shapes(shapes, num_heads=3)
    want = our_args("t2v")
    assert from_wan == want
    from_shapes.text_len = TEXT_LEN
    assert from_shapes == want
    with pytest.raises(S2DiTError, match="ffn_dim=7 but the weights have 96"):
        args_from_wan_config({**dict(official.config), "ffn_dim": 7}, shapes)
    # diffusers configs carry no text_len (the pipeline pads to 512)
    from_diffusers.text_len = TEXT_LEN
    assert from_diffusers == want
    with pytest.raises(S2DiTError, match="I2V"):
        args_from_diffusers_config({**dict(make_diffusers("t2v").config), "image_dim": 1280})


def test_presets():
    assert find_preset(preset_args("wan2.1-t2v-1.3b")).name == "wan2.1-t2v-1.3b"
    assert find_preset(preset_args("wan2.2-t2v-a14b"), two_experts=True).boundary == 0.875
    assert find_preset(preset_args("wan2.2-t2v-a14b")).name == "wan2.1-t2v-14b"
    ti2v = PRESETS["wan2.2-ti2v-5b"]
    assert (ti2v.in_dim, ti2v.vae, ti2v.defaults["fps"]) == (48, "wan2.2", 24)
    assert preset_args("wan2.2-ti2v-5b").head_dim == 128
    with pytest.raises(S2DiTError, match="unknown Wan preset"):
        preset_args("wan9")


def test_experts_switch_at_the_boundary():
    args = our_args("t2v")
    mx.random.seed(0)
    high, low = S2DiT(args), S2DiT(args)
    experts = WanExperts(high, low, boundary=0.875, guidance=(3.0, 4.0))
    assert experts.select(875.0) == (high, 4.0)
    assert experts.select(874.9) == (low, 3.0)
    assert experts.select(mx.array([999.0, 999.0])) == (high, 4.0)
    x = mx.random.normal((1, 1, 2, 2, args.in_dim))
    ctx = mx.random.normal((1, 3, args.text_dim))
    t = mx.array([100.0])
    assert mx.array_equal(experts(x, t, ctx), low(x, t, ctx))
    with pytest.raises(S2DiTError, match="boundary"):
        WanExperts(high, low, boundary=1.5)
    # Streaming: each expert keeps its own caches; a writing pass fills both, so chunk c from
    # either expert equals that expert's block-causal pass over the whole video.
    windowed = replace(args, frames_per_chunk=1, window=2)
    pair = WanExperts(S2DiT(windowed), S2DiT(windowed), boundary=0.875)
    ts = [950.0, 100.0, 990.0, 300.0]  # high, low, high, low
    xs = mx.random.normal((1, len(ts), 2, 2, args.in_dim))
    cache = pair.make_cache()
    for c, t_c in enumerate(ts):
        got = pair(xs[:, c : c + 1], mx.array([t_c]), ctx, cache=cache, update_cache=True)
        want = pair.select(t_c)[0](xs, mx.array([ts]), ctx, chunk_frames=1)[:, c : c + 1]
        assert float(mx.abs(got - want).max()) <= 1e-4, c
    assert cache["high_noise"].frames == cache["low_noise"].frames == len(ts)
    # an nn.Module over both experts: the pipeline's set_dtype reaches both
    experts.set_dtype(mx.bfloat16)
    assert low.blocks[0].self_attn.q.weight.dtype == mx.bfloat16
    assert {k.split(".")[0] for k, _ in tree_flatten(experts.parameters())} == {
        "high_noise",
        "low_noise",
    }
