"""A whole Wan sampling loop vs diffusers' WanPipeline, at a tiny random config (fp32).

The reference is diffusers' WanPipeline over the official wan22 modules' weights (every
parameter randomised; diffusers' own converters give it the same weights): a
WanTransformer3DModel, an AutoencoderKLWan with random latent statistics, a UMT5EncoderModel
with a tokenizer trained here, and UniPCMultistepScheduler configured as diffusers' Wan
checkpoints are (flow sigmas, flow_shift). Our side converts that diffusers folder with
`python -m convert.wan`, loads it with Pipeline.from_pretrained and runs Pipeline.denoise()
(the loop generate() runs in bidirectional mode) with schedule="diffusers", the same
starting noise (`latents=`) and the same text embeddings, then Pipeline.decode().

Tolerances: final latents max |ours - ref| <= 1e-3 * max |ref|; decoded video (in [0, 1])
max |ours - ref| <= 1e-3. The solver alone: diffusers' sigmas and timesteps bitwise, one
step <= 1e-5 relative.
"""

from __future__ import annotations

import json

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from wan_tiny import (
    DIT,
    TEXT_DIM,
    TEXT_LEN,
    VAE,
    diffusers_pipeline,
    official_models,
    unipc_scheduler,
    write_tokenizer,
)

from convert import wan as convert_wan
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models.wan import WanExperts
from s2dit_mlx.pipeline import Pipeline
from s2dit_mlx.sampling import WAN_NEGATIVE_PROMPT, FlowUniPCSolver, make_solver

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("ftfy")  # diffusers' and our prompt cleaning

pytestmark = pytest.mark.filterwarnings(
    "ignore:CUDA is not available:UserWarning", "ignore::FutureWarning"
)

LATENT_RTOL = 1e-3
VIDEO_ATOL = 1e-3
# 9 frames -> 3 latent frames; 32x48 pixels -> 4x6 latents -> 2x3 patches per frame.
FRAMES, HEIGHT, WIDTH = 9, 32, 48
LATENT_SHAPE = (1, 3, HEIGHT // 8, WIDTH // 8, VAE["z_dim"])  # ours: [B, T, h, w, C]


def rel_err(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_torch_latents(x: np.ndarray):
    """Ours [B, T, h, w, C] -> diffusers [B, C, T, h, w]."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def from_torch_latents(t) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 4, 1)


def embeddings(seed: int, length: int) -> np.ndarray:
    """[1, 512, text_dim], zero past `length` tokens: what both text encoders produce."""
    out = np.zeros((1, TEXT_LEN, TEXT_DIM), np.float32)
    out[0, :length] = np.random.default_rng(seed).standard_normal((length, TEXT_DIM))
    return out


def convert(src, out):
    convert_wan.convert(src, out, dtype="fp32", log=None)
    return Pipeline.from_pretrained(str(out))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(diffusers WanPipeline, our Pipeline) over the same weights; random latent stats."""
    root = tmp_path_factory.mktemp("wan_pipe")
    tok = write_tokenizer(root / "tok")
    rng = np.random.default_rng(7)
    z = VAE["z_dim"]
    ref = diffusers_pipeline(
        tok,
        official_models(seed=0),
        latents_mean=rng.uniform(-0.5, 0.5, z).round(4).tolist(),
        latents_std=rng.uniform(0.5, 2.0, z).round(4).tolist(),
        shift=3.0,
    )
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(str(root / "diffusers"))
    return ref, convert(root / "diffusers", root / "ours")


def run_reference(ref, noise, steps, guidance, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(final latents, video in [0, 1]) from one diffusers WanPipeline call, channels-last."""
    seen = {}

    def keep_latents(pipe, i, t, tensors):
        seen["latents"] = tensors["latents"]  # after the step: the last one is the final
        return tensors

    with torch.no_grad():
        video = ref(
            latents=to_torch_latents(noise),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
            callback_on_step_end=keep_latents,
            **kw,
        ).frames
    return from_torch_latents(seen["latents"]), np.asarray(video, np.float32)


def run_ours(pipe, noise, steps, guidance, shift, **kw) -> tuple[np.ndarray, np.ndarray]:
    latents = pipe.denoise(
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=steps,
        guidance=guidance,
        shift=shift,
        solver="unipc",
        latents=mx.array(noise),
        schedule="diffusers",
        **kw,
    )
    video = (pipe.decode(latents) + 1.0) / 2.0  # diffusers' postprocessing: [-1, 1] -> [0, 1]
    return np.array(latents), np.array(video)


def noise(seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LATENT_SHAPE).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The solver alone


@pytest.mark.parametrize("steps, shift", [(5, 3.0), (50, 5.0), (40, 12.0), (3, 1.0)])
def test_diffusers_unipc_schedule_and_steps(steps, shift):
    sched = unipc_scheduler(shift)
    sched.set_timesteps(steps)
    ours = FlowUniPCSolver(steps, shift, schedule="diffusers")
    # Same noise levels and model timesteps, bit for bit.
    assert np.array_equal(ours.sigmas, sched.sigmas.numpy())
    assert np.array_equal(ours.timesteps.astype(np.int64), sched.timesteps.numpy())
    # Wan's own grid differs (why the option exists), and stays the default.
    assert np.abs(FlowUniPCSolver(steps, shift).sigmas - ours.sigmas).max() > 1e-4
    assert make_solver("unipc", steps, shift).schedule == "wan"

    rng = np.random.default_rng(steps)
    x = rng.standard_normal((1, 4, 3, 2, 5)).astype(np.float32)  # diffusers layout
    x_ref, x_ours = torch.from_numpy(x), mx.array(x.transpose(0, 2, 3, 4, 1))
    worst = 0.0
    for t in sched.timesteps:
        v = rng.standard_normal(x.shape).astype(np.float32)
        x_ref = sched.step(torch.from_numpy(v), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(mx.array(v.transpose(0, 2, 3, 4, 1)), x_ours)
        worst = max(worst, rel_err(np.array(x_ours), from_torch_latents(x_ref)))
    assert worst <= 1e-5, f"UniPC step relative error {worst:.2e}"


def test_unknown_schedule_is_one_clear_error():
    with pytest.raises(S2DiTError, match="unknown UniPC schedule"):
        FlowUniPCSolver(4, 5.0, schedule="karras")
    with pytest.raises(S2DiTError, match="Euler"):
        make_solver("euler", 4, 5.0, schedule="diffusers")


# ----------------------------------------------------------------------------------------------
# The whole loop


@pytest.fixture(scope="module")
def injected(setup):
    """Noise, embeddings and diffusers' result for 5 steps at guidance 5, shift 3."""
    ref, _ = setup
    x = noise()
    cond, uncond = embeddings(1, 9), embeddings(2, 14)
    ref_lat, ref_video = run_reference(
        ref,
        x,
        5,
        5.0,
        prompt_embeds=torch.from_numpy(cond),
        negative_prompt_embeds=torch.from_numpy(uncond),
    )
    return x, cond, uncond, ref_lat, ref_video


def test_injected_embeddings_match_diffusers(setup, injected):
    _, pipe = setup
    x, cond, uncond, ref_lat, ref_video = injected
    lat, video = run_ours(
        pipe, x, 5, 5.0, 3.0, context=mx.array(cond), negative_context=mx.array(uncond)
    )
    assert video.shape == ref_video.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    err = rel_err(lat, ref_lat)
    assert err <= LATENT_RTOL, f"latents relative error {err:.2e}"
    assert np.abs(lat - x).max() > 0.5  # the loop moved the latents far from the noise
    video_err = float(np.abs(video - ref_video).max())
    assert video_err <= VIDEO_ATOL, f"video error {video_err:.2e}"
    assert 0.05 < ref_video.std()  # not a flat (all-clipped) video


def test_prompts_through_both_text_encoders_match_diffusers(setup):
    ref, pipe = setup
    x = noise(12)
    prompt = "a cat runs on the grass &amp; waves\n crash"
    steps, guidance = 4, 4.0
    ref_lat, _ = run_reference(
        ref, x, steps, guidance, prompt=prompt, negative_prompt=WAN_NEGATIVE_PROMPT
    )
    lat, _ = run_ours(pipe, x, steps, guidance, 3.0, prompt=prompt)  # Wan's default negative
    err = rel_err(lat, ref_lat)
    assert err <= LATENT_RTOL, f"latents relative error {err:.2e}"


def test_wan_schedule_is_not_diffusers(setup, injected):
    """A control: with Wan's own noise levels the same loop lands elsewhere."""
    _, pipe = setup
    x, cond, uncond, ref_lat, _ = injected
    lat = pipe.denoise(
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=5,
        guidance=5.0,
        shift=3.0,
        latents=mx.array(x),
        context=mx.array(cond),
        negative_context=mx.array(uncond),
    )
    assert rel_err(np.array(lat), ref_lat) > 10 * LATENT_RTOL


def test_two_experts_match_diffusers(tmp_path):
    """Wan2.2 A14B: expert switch at boundary 0.875, per-expert guidance (4.0 high, 3.0 low)."""
    tok = write_tokenizer(tmp_path / "tok")
    high = official_models(seed=0)
    low_dit = official_models(seed=3)[0]
    ref = diffusers_pipeline(tok, high, second=low_dit, boundary=0.875, shift=12.0)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(str(tmp_path / "diffusers"))
    index = json.loads((tmp_path / "diffusers" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875
    pipe = convert(tmp_path / "diffusers", tmp_path / "ours")
    assert isinstance(pipe.dit, WanExperts)
    assert (pipe.dit.guidance_high, pipe.dit.guidance_low) == (4.0, 3.0)

    x = noise(13)
    cond, uncond = embeddings(4, 6), embeddings(5, 10)
    steps = 6  # at shift 12 the first steps sit above t = 875, the last ones below
    sched = unipc_scheduler(12.0)
    sched.set_timesteps(steps)
    above = (sched.timesteps >= 875).sum().item()
    assert 0 < above < steps
    ref_lat, _ = run_reference(
        ref,
        x,
        steps,
        4.0,
        guidance_scale_2=3.0,
        prompt_embeds=torch.from_numpy(cond),
        negative_prompt_embeds=torch.from_numpy(uncond),
    )
    # guidance left at the folder's default: each expert uses its own scale
    latents = pipe.denoise(
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=steps,
        shift=12.0,
        latents=mx.array(x),
        context=mx.array(cond),
        negative_context=mx.array(uncond),
        schedule="diffusers",
    )
    err = rel_err(np.array(latents), ref_lat)
    assert err <= LATENT_RTOL, f"latents relative error {err:.2e}"


def test_denoise_checks_injected_shapes(setup):
    _, pipe = setup
    small = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=1, guidance=1.0)
    with pytest.raises(S2DiTError, match="latents must have shape"):
        pipe.denoise(latents=mx.zeros((1, 2, 4, 6, VAE["z_dim"])), **small)
    with pytest.raises(S2DiTError, match="context must be"):
        pipe.denoise(context=mx.zeros((TEXT_LEN, TEXT_DIM)), **small)
    with pytest.raises(S2DiTError, match="bidirectional"):
        pipe.denoise(mode="streaming", **small)
    assert pipe.dit.args.in_dim == DIT["in_dim"]
