"""Training recipes (train/): flow objective, trainer, exact resume, atomic checkpoints, LoRA,
gradient checkpointing, accumulation, plots, the CLI and data parallel over mx.distributed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx import rng
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_model
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
from train import checkpoint as ckpt_mod
from train.data import VideoEncoder, load_source, local_slice, shapes_source, tokenize
from train.flow import (
    FlowConfig,
    FlowModel,
    flow_matching_loss,
    make_flow_loss,
    position_weights,
    sample_sigmas,
)
from train.grad_checkpoint import (
    disable_grad_checkpoint,
    enable_grad_checkpoint,
    is_grad_checkpointed,
)
from train.lora import (
    LoRAConfig,
    adapter_weights,
    apply_lora,
    fuse_lora,
    load_adapters,
    load_model_with_adapter,
    match_lora_keys,
    save_adapters,
    unfuse_lora,
    weights_hash,
)
from train.plots import save_loss_curve
from train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    in_dim=4,
    out_dim=4,
    dim=32,
    ffn_dim=64,
    freq_dim=32,
    text_dim=16,
    num_heads=2,
    layers=["lcha", "ssa"],
    text_len=8,
    frames_per_chunk=1,
)
LATENT = (3, 4, 4, 4)  # T, h, w, C: 3 chunks of 1 latent frame in streaming mode


def tiny_dit(seed: int = 0, **overrides) -> S2DiT:
    """A tiny S2DiT with every parameter random (no zero-initialised leaves)."""
    mx.random.seed(seed)
    dit = S2DiT(ModelArgs(**{**TINY, **overrides}))
    params = tree_flatten(dit.parameters())
    keys = mx.random.split(mx.random.key(seed + 100), len(params))
    dit.load_weights(
        [
            (k, 0.2 * mx.random.normal(v.shape, key=kk))
            for (k, v), kk in zip(params, keys, strict=True)
        ]
    )
    mx.eval(dit.parameters())
    return dit


def latent_data(indices):
    """Two fixed latent clips and contexts, alternating: learnable, deterministic by index."""
    base = mx.random.normal((2, *LATENT), key=mx.random.key(7))
    ctx = mx.random.normal((2, 8, 16), key=mx.random.key(8))
    return {
        "latents": mx.stack([base[i % 2] for i in indices]),
        "context": mx.stack([ctx[i % 2] for i in indices]),
    }


def make_trainer(tmp_path, dit=None, flow=None, sgd=False, **cfg) -> Trainer:
    """A trainer of a tiny DiT on latent_data; sgd=True uses plain SGD (update = -lr * grad)."""
    dit = dit if dit is not None else tiny_dit()
    cfg = {"steps": 4, "batch_size": 2, "lr": 1e-3, "progress": False, **cfg}
    return Trainer(
        FlowModel(dit),
        make_flow_loss(flow or FlowConfig(mode="streaming")),
        latent_data,
        TrainConfig(**cfg),
        tmp_path,
        checkpoint_modules=dit.blocks,
        optimizer=optim.SGD(learning_rate=cfg["lr"]) if sgd else None,
    )


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


# ----------------------------------------------------------------------------------------------
# Randomness and data


def test_keys_are_a_function_of_seed_and_index():
    a = np.array(rng.sample_keys(3, [0, 1, 2]))
    assert np.array_equal(a, np.array(rng.sample_keys(3, [0, 1, 2])))
    assert np.array_equal(a[1:], np.array(rng.sample_keys(3, [1, 2])))  # split-independent
    assert not np.array_equal(a, np.array(rng.sample_keys(4, [0, 1, 2])))
    assert len({tuple(r) for r in a}) == 3
    assert rng.step_seed(0, 1) != rng.step_seed(0, 2)


def test_local_slice_splits_global_batch():
    idx = list(range(8, 12))
    assert local_slice(idx, 0, 2) + local_slice(idx, 1, 2) == idx
    with pytest.raises(S2DiTError, match="divisible"):
        local_slice(list(range(3)), 0, 2)


def test_shapes_source_and_video_encoder_are_deterministic(tiny_model_dir):
    bundle = load_model(tiny_model_dir)
    source = shapes_source(seed=1, frames=5, height=32, width=64)
    a, b = source([3, 4]), source([3, 4])
    assert np.array_equal(np.array(a["video"]), np.array(b["video"]))
    assert a["captions"] == b["captions"] and len(a["captions"]) == 2
    assert np.array(a["video"]).min() >= -1 and np.array(a["video"]).max() <= 1
    # A user data source by "module:function" (called with the options it accepts).
    plugged = load_source("train.data:shapes_source", seed=1, frames=5, height=32, width=64)
    assert np.array_equal(np.array(plugged([4])["video"]), np.array(a["video"])[1:])
    with pytest.raises(S2DiTError, match="unknown data source"):
        load_source("nope")
    enc = VideoEncoder(bundle.vae, bundle.text_encoder, caption_dropout=0.5, seed=0)
    out = enc(a, [3, 4])
    assert out["latents"].shape == (2, 2, 4, 8, 4) and out["context"].shape[0] == 2
    # Caption dropout is decided by (seed, sample index) only.
    dropped = [rng.uniform01(0, "caption", i) < 0.5 for i in range(200)]
    assert 60 < sum(dropped) < 140
    joint = VideoEncoder(bundle.vae, bundle.text_encoder, train_text_encoder=True)(a, [3, 4])
    assert set(joint) == {"latents", "ids", "lengths"}


# ----------------------------------------------------------------------------------------------
# Flow-matching objective


class RecordingDiT(nn.Module):
    """Stands in for the S2DiT: records its inputs and returns w * x."""

    def __init__(self, frames_per_chunk: int):
        super().__init__()
        self.args = ModelArgs(**{**TINY, "frames_per_chunk": frames_per_chunk})
        self.w = mx.array(0.5)
        self.seen = {}

    def __call__(self, x, t, context, chunk_frames=None):
        self.seen = {"x": x, "t": t, "chunk_frames": chunk_frames}
        return self.w * x


def test_streaming_objective_per_chunk_noise_and_clean_context():
    dit = RecordingDiT(frames_per_chunk=2)
    x0 = mx.random.normal((6, 5, 2, 2, 4), key=mx.random.key(0))  # chunks: 2 + 2 + 1 frames
    batch = {"latents": x0, "context": mx.zeros((6, 3, 16))}
    keys = rng.sample_keys(0, range(6))
    cfg = FlowConfig(mode="streaming", clean_context_prob=1.0, t_dist="uniform")
    loss = flow_matching_loss(FlowModel(dit), batch, keys, cfg)
    t, x_t = np.array(dit.seen["t"]), np.array(dit.seen["x"])
    assert dit.seen["chunk_frames"] == 2 and t.shape == (6, 5)
    assert np.all(t[:, 0] == t[:, 1]) and np.all(t[:, 2] == t[:, 3])  # one level per chunk
    assert np.all(t[:, 0] == 0)  # every sample has >= 1 clean leading chunk (prob 1)
    assert np.all(t[:, 4] > 0)  # ... and never all chunks clean
    clean = t == 0
    assert np.allclose(x_t[clean], np.array(x0)[clean])  # clean chunks are the data itself
    # Reference loss from the recorded inputs: noisy frames only, mean per sample, then batch.
    s = t / 1000.0
    eps = (x_t - (1 - s)[..., None, None, None] * np.array(x0)) / np.maximum(s, 1e-12)[
        ..., None, None, None
    ]
    err = ((0.5 * x_t - (eps - np.array(x0))) ** 2).mean(axis=(2, 3, 4))
    keep = ~clean
    ref = ((err * keep).sum(1) / keep.sum(1)).mean()
    assert abs(float(loss) - ref) < 1e-4 * max(1.0, abs(ref))


class CallLog(RecordingDiT):
    """Keeps every call's inputs; returns w (x + its running sum over frames), a causal mix."""

    def __call__(self, x, t, context, chunk_frames=None):
        self.calls = [*getattr(self, "calls", []), (x, t)]
        return self.w * (x + mx.cumsum(x, axis=1))


def test_recycled_context_is_the_models_own_prediction():
    x0 = mx.random.normal((6, 5, 2, 2, 4), key=mx.random.key(0))  # chunks: 2 + 2 + 1 frames
    batch = {"latents": x0, "context": mx.zeros((6, 3, 16))}
    keys = rng.sample_keys(0, range(6))
    plain, recycled = CallLog(frames_per_chunk=2), CallLog(frames_per_chunk=2)
    base = dict(mode="streaming", clean_context_prob=1.0, t_dist="uniform")
    flow_matching_loss(FlowModel(plain), batch, keys, FlowConfig(**base))
    cfg = FlowConfig(**base, recycle_prob=1.0, recycle_max_sigma=0.4)
    loss = flow_matching_loss(FlowModel(recycled), batch, keys, cfg)
    assert len(plain.calls) == 1 and len(recycled.calls) == 2  # one extra, gradient-free pass
    (x_r, t_r), (x_t, t) = recycled.calls
    (x_plain, t_plain) = plain.calls[0]
    assert np.array_equal(np.array(t), np.array(t_plain))  # the other draws are unchanged
    t_r, t, x_t, x_r = (np.array(a) for a in (t_r, t, x_t, x_r))
    assert t_r.min() >= 0 and t_r.max() <= 400 and np.all(t_r[:, 0] == t_r[:, 1])
    clean = t == 0
    s_r = (t_r / 1000.0)[..., None, None, None]
    own = x_r - s_r * 0.5 * (x_r + np.cumsum(x_r, axis=1))  # x0 from the recycling pass
    assert np.allclose(x_t[clean], own[clean], atol=1e-6)
    assert not np.allclose(x_t[clean], np.array(x0)[clean])
    assert np.array_equal(x_t[~clean], np.array(x_plain)[~clean])  # noisy chunks as before

    # The gradient flows through the main pass only: the recycled context is a constant.
    def main_pass_loss(w):
        s = (t / 1000.0)[..., None, None, None]
        eps = (x_t - (1 - s) * np.array(x0)) / np.maximum(s, 1e-12)
        v = w * mx.array(x_t + np.cumsum(x_t, axis=1))
        err = ((v - mx.array(eps - np.array(x0))) ** 2).mean(axis=(2, 3, 4))
        keep = mx.array(~clean).astype(mx.float32)
        return ((err * keep).sum(1) / keep.sum(1)).mean()

    def loss_of_w(w):
        recycled.w = w
        return flow_matching_loss(FlowModel(recycled), batch, keys, cfg)

    assert abs(float(loss) - float(main_pass_loss(mx.array(0.5)))) < 1e-4
    g = float(mx.grad(loss_of_w)(mx.array(0.5)))
    assert abs(g - float(mx.grad(main_pass_loss)(mx.array(0.5)))) < 1e-3 * max(1.0, abs(g))
    with pytest.raises(S2DiTError, match="recycle_prob"):
        FlowConfig(recycle_prob=1.5).validate()
    with pytest.raises(S2DiTError, match="recycle_max_sigma"):
        FlowConfig(recycle_max_sigma=0.0).validate()


def moving_dot(frames: int = 4, size: int = 4) -> np.ndarray:
    """[1, T, size, size, 2] latents: a flat background and a bright dot one pixel right per frame."""
    x = np.full((1, frames, size, size, 2), 0.3, np.float32)
    for f in range(frames):
        x[0, f, 1, f % size] = 2.0
    return x


def test_motion_weights_favour_what_moves():
    x0 = moving_dot()
    w = np.array(position_weights(mx.array(x0), 3.0))
    assert w.shape == (1, 4, 4, 4) and abs(w.mean() - 1.0) < 1e-5  # mean 1 per sample
    moving = np.zeros((4, 4, 4), bool)
    for f in range(4):  # the dot's pixel, and where it was or will be a frame away
        moving[f, 1, max(f - 1, 0) : f + 2] = True
    assert w[0][moving].min() > 3 * w[0][~moving].max()
    assert np.allclose(w[0][~moving], w[0][~moving][0])  # the static background: one weight
    still = np.repeat(x0[:, :1], 4, axis=1)  # a static clip: all weights 1
    assert np.allclose(np.array(position_weights(mx.array(still), 3.0)), 1.0)


def test_object_weights_keep_a_stopped_object():
    """The presence term weights the dot where it is, moving or not, over a uniform background."""
    x0 = moving_dot()
    still = np.repeat(x0[:, :1], 4, axis=1)  # the dot parked at (1, 0)
    w = np.array(position_weights(mx.array(still), 3.0, 2.0))
    assert abs(w.mean() - 1.0) < 1e-5
    dot = np.zeros((4, 4, 4), bool)
    dot[:, 1, 0] = True
    assert w[0][dot].min() > 3 * w[0][~dot].max()
    assert np.allclose(w[0][~dot], w[0][~dot][0])
    # Presence alone on the moving clip: the dot's current pixel only, not where it was.
    w = np.array(position_weights(mx.array(x0), 0.0, 2.0))
    here = np.zeros((4, 4, 4), bool)
    for f in range(4):
        here[f, 1, f] = True
    assert w[0][here].min() > 3 * w[0][~here].max()
    assert np.allclose(w[0][~here], w[0][~here][0])
    # A blank clip has nothing to weight.
    assert np.allclose(np.array(position_weights(mx.ones((1, 3, 4, 4, 2)), 0.0, 2.0)), 1.0)


def test_motion_weighted_loss():
    """Weight 0 and a static clip give the plain MSE; on a moving clip, errors on the dot count."""
    keys = rng.sample_keys(0, range(1))
    ctx = mx.zeros((1, 3, 16))
    base = dict(mode="streaming", clean_context_prob=0.0, t_dist="uniform")

    def loss(x0, weight, model, presence=0.0):
        batch = {"latents": mx.array(x0), "context": ctx}
        cfg = FlowConfig(**base, motion_weight=weight, object_weight=presence)
        return float(flow_matching_loss(FlowModel(model), batch, keys, cfg))

    dit = RecordingDiT(frames_per_chunk=1)
    x0 = moving_dot()
    still = np.repeat(x0[:, :1], 4, axis=1)
    assert abs(loss(still, 3.0, dit) - loss(still, 0.0, dit)) < 1e-6
    assert abs(loss(x0, 3.0, dit) - loss(x0, 0.0, dit)) > 1e-3

    class OffBy(RecordingDiT):
        """Exact but for one error, `where`: on the dot it costs more than on the background."""

        def __init__(self, where):
            super().__init__(frames_per_chunk=1)
            self.where = where

        def __call__(self, x, t, context, chunk_frames=None):
            s = (t / 1000.0)[..., None, None, None]
            eps = (x - (1 - s) * mx.array(x0)) / s
            return eps - mx.array(x0) + mx.array(self.where)

    on_dot, on_background = np.zeros_like(x0), np.zeros_like(x0)
    on_dot[0, 2, 1, 2], on_background[0, 2, 3, 3] = 1.0, 1.0
    plain = loss(x0, 0.0, OffBy(on_dot))
    assert abs(plain - loss(x0, 0.0, OffBy(on_background))) < 1e-6
    assert loss(x0, 3.0, OffBy(on_dot)) > 2 * plain > 4 * loss(x0, 3.0, OffBy(on_background))
    # The presence weight alone, on the same errors: the dot counts more, the background less.
    assert (
        loss(x0, 0.0, OffBy(on_dot), 3.0) > 2 * plain > 4 * loss(x0, 0.0, OffBy(on_background), 3.0)
    )
    with pytest.raises(S2DiTError, match="motion_weight"):
        FlowConfig(motion_weight=-1.0).validate()
    with pytest.raises(S2DiTError, match="object_weight"):
        FlowConfig(object_weight=float("nan")).validate()


def test_bidirectional_objective_one_level_per_sample():
    dit = RecordingDiT(frames_per_chunk=1)
    x0 = mx.random.normal((4, 3, 2, 2, 4), key=mx.random.key(1))
    flow_matching_loss(
        FlowModel(dit),
        {"latents": x0, "context": mx.zeros((4, 3, 16))},
        rng.sample_keys(0, range(4)),
        FlowConfig(mode="bidirectional"),
    )
    assert dit.seen["t"].shape == (4,) and dit.seen["chunk_frames"] is None
    assert float(dit.seen["t"].min()) > 0


def test_timestep_distributions():
    k = mx.random.key(0)
    u = np.array(sample_sigmas(k, 4000, FlowConfig(t_dist="uniform")))
    sh = np.array(sample_sigmas(k, 4000, FlowConfig(t_dist="shifted", shift=3.0)))
    ln = np.array(sample_sigmas(k, 4000, FlowConfig(t_dist="logit_normal")))
    assert 0.47 < u.mean() < 0.53 and u.min() >= 0 and u.max() <= 1
    assert np.allclose(sh, 3 * u / (1 + 2 * u), atol=1e-6)  # same draws, warped
    assert 0.47 < np.median(ln) < 0.53 and ln.std() < u.std()  # logit-normal: concentrated
    with pytest.raises(S2DiTError, match="distribution"):
        FlowConfig(t_dist="beta").validate()


def test_training_lowers_the_loss(tmp_path):
    dit = tiny_dit()
    model = FlowModel(dit)
    cfg = FlowConfig(mode="streaming")
    batch, keys = latent_data(list(range(16))), rng.sample_keys(123, range(16))
    before = float(flow_matching_loss(model, batch, keys, cfg))
    trainer = make_trainer(tmp_path, dit, cfg, steps=30, batch_size=4, lr=3e-3, warmup=3)
    trainer.train()
    after = float(flow_matching_loss(model, batch, keys, cfg))
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    history = json.loads((tmp_path / "loss.json").read_text())
    assert history["loss"] == trainer.losses and len(history["step"]) == 30


# ----------------------------------------------------------------------------------------------
# Exact resume and atomic checkpoints


@pytest.mark.parametrize("variant", ["full-streaming-accum-ema", "lora-dropout-bidirectional"])
def test_resume_equals_uninterrupted(tmp_path, variant):
    """N steps in one go == N/2 steps, a fresh process-like restart, then N/2 more (bitwise)."""
    lora = variant.startswith("lora")
    # The streaming variant recycles context, whose extra draws must also resume exactly.
    flow = FlowConfig(mode="bidirectional") if lora else FlowConfig("streaming", recycle_prob=0.5)
    cfg = dict(steps=6, warmup=2, schedule="cosine", ema=0.0 if lora else 0.9, grad_clip=0.5)
    cfg["accum"] = 1 if lora else 2

    def fresh():
        dit = tiny_dit()
        if lora:
            mx.random.seed(5)
            apply_lora(dit, LoRAConfig(rank=2, alpha=4.0, dropout=0.2, layers="self_attn.q,ffn.*"))
        return dit

    full = make_trainer(tmp_path / "a", fresh(), flow, **cfg)
    full.train()
    first = make_trainer(tmp_path / "b", fresh(), flow, **cfg)
    first.train(until=3)
    assert first.step == 3 and ckpt_mod.latest_checkpoint(tmp_path / "b").name == "step-0000003"
    second = make_trainer(tmp_path / "b", fresh(), flow, **cfg)
    assert second.resume() and second.step == 3
    second.train()
    assert second.losses == full.losses  # bit for bit
    assert len(set(full.losses)) == 6
    a, b = flat(full.model.trainable_parameters()), flat(second.model.trainable_parameters())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    if full.ema is not None:
        assert all(np.array_equal(np.array(full.ema[k]), np.array(second.ema[k])) for k in a)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=0)
    trainer.train(until=2)
    good = ckpt_mod.latest_checkpoint(tmp_path)
    assert good.name == "step-0000002"

    real = ckpt_mod.write_arrays

    def dying(path, arrays):
        if path.name == "optimizer.safetensors":
            real(path, arrays)
            raise OSError("simulated crash mid-save")
        real(path, arrays)

    monkeypatch.setattr(ckpt_mod, "write_arrays", dying)
    with pytest.raises(OSError, match="simulated"):
        trainer.train(until=3)
    monkeypatch.setattr(ckpt_mod, "write_arrays", real)
    assert ckpt_mod.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "checkpoints" / "step-0000003").exists()
    # What a hard kill leaves behind: a temp folder and a folder without trainer_state.json.
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000004-dead").mkdir()
    (root / ".tmp-step-0000004-dead" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "step-0000005").mkdir()
    (root / "step-0000005" / "model.safetensors").write_bytes(b"partial")
    assert ckpt_mod.latest_checkpoint(tmp_path) == good
    (root / "latest").unlink()  # even without the pointer the newest complete folder is used
    assert ckpt_mod.latest_checkpoint(tmp_path) == good

    resumed = make_trainer(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=0)
    assert resumed.resume() and resumed.step == 2
    assert resumed.losses == trainer.losses[:2]
    resumed.train(until=3)
    assert not (root / ".tmp-step-0000004-dead").exists()  # stale temps cleaned by the next save


def test_corrupt_or_mismatched_checkpoint_is_one_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, steps=2)
    trainer.train()
    path = ckpt_mod.latest_checkpoint(tmp_path)
    other = make_trainer(tmp_path, dit=tiny_dit(dim=48, num_heads=2))
    with pytest.raises(S2DiTError) as err:
        other.resume()
    assert "does not match the model" in str(err.value) and "\n" not in str(err.value)
    bigger_batch = make_trainer(tmp_path, batch_size=4)
    with pytest.raises(S2DiTError, match="batch_size=2"):
        bigger_batch.resume()
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(S2DiTError) as err:
        make_trainer(tmp_path).resume()
    assert "model.safetensors is not a readable safetensors file" in str(err.value)
    assert "\n" not in str(err.value)


def test_keep_prunes_old_checkpoints(tmp_path):
    make_trainer(tmp_path, steps=4, checkpoint_every=1, keep_checkpoints=2).train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000003", "step-0000004"]


# ----------------------------------------------------------------------------------------------
# Accumulation, EMA, gradient checkpointing


def test_accumulation_equals_bigger_batch(tmp_path):
    # SGD: the update is lr * mean gradient, so a sum-instead-of-mean bug would show (Adam is
    # scale invariant and would hide it). AdamW is checked against a looser bound below.
    a = make_trainer(tmp_path / "a", batch_size=4, accum=1, steps=2, sgd=True, lr=0.05)
    b = make_trainer(tmp_path / "b", batch_size=2, accum=2, steps=2, sgd=True, lr=0.05)
    p0 = flat(a.model.parameters())
    a.train()
    b.train()
    assert np.allclose(a.losses, b.losses, atol=1e-6)
    pa, pb = flat(a.model.parameters()), flat(b.model.parameters())
    assert max(np.abs(pa[k] - pb[k]).max() for k in pa) < 1e-6
    assert max(np.abs(pa[k] - p0[k]).max() for k in pa) > 1e-3  # the step did move them
    c = make_trainer(tmp_path / "c", batch_size=4, accum=1, steps=1)
    d = make_trainer(tmp_path / "d", batch_size=2, accum=2, steps=1)
    c.train()
    d.train()
    pc, pd = flat(c.model.parameters()), flat(d.model.parameters())
    # Adam's first step is ~lr * sign(g): only gradients near eps can differ, by << lr.
    assert max(np.abs(pc[k] - pd[k]).max() for k in pc) < 2e-5


def test_ema_follows_the_weights(tmp_path):
    trainer = make_trainer(tmp_path, ema=0.75, steps=1)
    p0 = flat(trainer.model.trainable_parameters())
    trainer.train()
    p1 = flat(trainer.model.trainable_parameters())
    for k, v in trainer.ema.items():
        assert np.allclose(np.array(v), 0.75 * p0[k] + 0.25 * p1[k], atol=1e-7)
    with trainer.ema_weights():
        inside = flat(trainer.model.trainable_parameters())
    after = flat(trainer.model.trainable_parameters())
    k = next(iter(p1))
    assert np.array_equal(inside[k], np.array(trainer.ema[k])) and np.array_equal(after[k], p1[k])


def test_grad_checkpoint_gives_same_loss_and_gradients():
    dit = tiny_dit()
    other = tiny_dit()  # another instance of the same classes must stay untouched
    model = FlowModel(dit)
    batch, keys = latent_data([0, 1]), rng.sample_keys(0, [0, 1])
    cfg = FlowConfig(mode="streaming")
    fn = nn.value_and_grad(model, lambda m, b, k: flow_matching_loss(m, b, k, cfg))
    loss0, g0 = fn(model, batch, keys)
    names = [k for k, _ in tree_flatten(dit.parameters())]
    enable_grad_checkpoint(dit.blocks)
    assert all(is_grad_checkpointed(b) for b in dit.blocks)
    assert not any(is_grad_checkpointed(b) for b in other.blocks)
    assert [k for k, _ in tree_flatten(dit.parameters())] == names
    loss1, g1 = fn(model, batch, keys)
    assert abs(float(loss0) - float(loss1)) < 1e-6
    f0, f1 = flat(g0), flat(g1)
    assert max(np.abs(f0[k] - f1[k]).max() for k in f0) < 1e-5
    disable_grad_checkpoint(dit.blocks)
    assert not any(is_grad_checkpointed(b) for b in dit.blocks)


def test_trainer_with_grad_checkpoint_and_text_encoder(tmp_path, tiny_model_dir):
    bundle = load_model(tiny_model_dir)
    model = FlowModel(bundle.dit, bundle.text_encoder)
    source = shapes_source(seed=0, frames=5, height=32, width=64)
    te_before = flat(bundle.text_encoder.parameters())
    trainer = Trainer(
        model,
        make_flow_loss(FlowConfig(mode="streaming")),
        source,
        TrainConfig(steps=2, batch_size=2, lr=1e-3, grad_checkpoint=True, progress=False),
        tmp_path,
        prepare=VideoEncoder(bundle.vae, bundle.text_encoder, train_text_encoder=True),
        checkpoint_modules=bundle.dit.blocks,
    )
    trainer.train()
    assert all(np.isfinite(trainer.losses))
    te_after = flat(bundle.text_encoder.parameters())
    assert any(not np.array_equal(te_before[k], te_after[k]) for k in te_before)
    assert set(tokenize(bundle.text_encoder, ["a"])) == {"ids", "lengths"}


# ----------------------------------------------------------------------------------------------
# LoRA


def _inputs(seed=0):
    x = mx.random.normal((1, *LATENT), key=mx.random.key(seed))
    ctx = mx.random.normal((1, 8, 16), key=mx.random.key(seed + 1))
    return x, mx.array([400.0]), ctx


def _randomise_adapters(dit, seed=3):
    weights = adapter_weights(dit)
    keys = mx.random.split(mx.random.key(seed), len(weights))
    dit.load_weights(
        [
            (k, 0.3 * mx.random.normal(v.shape, key=kk))
            for (k, v), kk in zip(weights.items(), keys, strict=True)
        ],
        strict=False,
    )


def test_lora_patterns_select_layers():
    dit = tiny_dit()
    keys = match_lora_keys(dit, ["self_attn.q", "cross_attn.*", "ffn.*"])
    assert "blocks.0.self_attn.q" in keys and "blocks.1.self_attn.q" in keys
    assert "blocks.0.self_attn.k" not in keys
    assert {f"blocks.1.cross_attn.{p}" for p in "qkvo"} <= set(keys)
    assert "blocks.0.ffn.0" in keys and "blocks.0.ffn.2" in keys
    assert not any("norm" in k for k in keys)  # RMSNorms match "cross_attn.*" but are not linear
    assert match_lora_keys(dit, ["text_embedding.0"]) == ["text_embedding.0"]
    with pytest.raises(S2DiTError, match="matches no linear layer"):
        match_lora_keys(dit, ["self_attn.nope"])


def test_lora_trains_only_adapters(tmp_path):
    dit = tiny_dit()
    apply_lora(dit, LoRAConfig(rank=4, alpha=8.0, layers="self_attn.q,self_attn.v,ffn.*"))
    trainable = {k for k, _ in tree_flatten(dit.trainable_parameters())}
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    before = flat(dit.parameters())
    trainer = make_trainer(tmp_path, dit, steps=3, lr=1e-2)
    trainer.train()
    after = flat(dit.parameters())
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith((".lora_a", ".lora_b")) for k in changed)
    assert any(k.endswith(".lora_b") for k in changed)  # lora_b starts at 0 and moved
    saved = ckpt_mod.load_checkpoint(ckpt_mod.latest_checkpoint(tmp_path))[0]["model"]
    assert set(saved) == {f"dit.{k}" for k in trainable}  # checkpoints hold adapters only


def test_lora_fuse_unfuse_and_adapter_files(tmp_path):
    dit = tiny_dit()
    base_hash = weights_hash(dit)
    x, t, ctx = _inputs()
    ref_base = np.array(dit(x, t, ctx))
    cfg = LoRAConfig(rank=4, alpha=8.0, layers="self_attn.*,cross_attn.q,ffn.0")
    apply_lora(dit, cfg)
    _randomise_adapters(dit)
    assert weights_hash(dit) == base_hash  # adapters excluded, base names unchanged
    dit.eval()
    unfused = np.array(dit(x, t, ctx))
    assert np.abs(unfused - ref_base).max() > 1e-3  # the adapters do something
    save_adapters(tmp_path / "ad", dit, cfg, base_id="tiny", base_sha256=base_hash)
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["lora_parameters"]["rank"] == 4 and meta["lora_parameters"]["scale"] == 2.0
    assert meta["base_model"] == {"id": "tiny", "sha256": base_hash}

    removed = fuse_lora(dit)
    fused = np.array(dit(x, t, ctx))
    assert not adapter_weights(dit)
    assert np.abs(fused - unfused).max() <= 1e-5
    unfuse_lora(dit, removed)
    assert np.abs(np.array(dit(x, t, ctx)) - unfused).max() <= 1e-5
    fuse_lora(dit)

    fresh = tiny_dit()
    load_adapters(fresh, tmp_path / "ad")
    fresh.eval()
    assert np.abs(np.array(fresh(x, t, ctx)) - unfused).max() <= 1e-6
    with pytest.raises(S2DiTError, match="different base model"):
        load_adapters(tiny_dit(seed=1), tmp_path / "ad")


def test_adapter_onto_model_folder_and_fuse_cli(tmp_path, tiny_model_dir):
    from train import fuse as fuse_cli

    bundle = load_model(tiny_model_dir)
    cfg = LoRAConfig(rank=2, alpha=2.0, layers="self_attn.q,cross_attn.v")
    sha = weights_hash(bundle.dit)
    apply_lora(bundle.dit, cfg)
    _randomise_adapters(bundle.dit)
    save_adapters(tmp_path / "ad", bundle.dit, cfg, str(tiny_model_dir), sha)
    x = mx.random.normal((1, 3, 4, 8, 4), key=mx.random.key(0))
    t, ctx = mx.array([500.0]), mx.random.normal((1, 5, 16), key=mx.random.key(1))
    unfused = np.array(load_model_with_adapter(tiny_model_dir, tmp_path / "ad").dit(x, t, ctx))
    fused = np.array(load_model_with_adapter(tiny_model_dir, tmp_path / "ad", True).dit(x, t, ctx))
    assert np.abs(fused - unfused).max() <= 1e-5
    assert fuse_cli.main(["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "ad"),
                          "--out", str(tmp_path / "fused")]) == 0  # fmt: skip
    out = np.array(load_model(tmp_path / "fused").dit(x, t, ctx))
    assert np.abs(out - unfused).max() <= 1e-5


def _soup_ingredients(tmp_path):
    """Three tiny model folders: a and b share a VAE, c has its own."""
    from conftest import TINY_DEFAULTS, make_tiny_components

    from s2dit_mlx.loading import save_model

    dit_a, vae, text_a = make_tiny_components(seed=0)
    dit_b, _, text_b = make_tiny_components(seed=1)
    dit_c, vae_c, text_c = make_tiny_components(seed=2)
    save_model(tmp_path / "a", dit_a, vae, text_a, defaults=TINY_DEFAULTS)
    save_model(tmp_path / "b", dit_b, vae, text_b, defaults={**TINY_DEFAULTS, "guidance": 4.0})
    save_model(tmp_path / "c", dit_c, vae_c, text_c, defaults=TINY_DEFAULTS)
    return [load_model(tmp_path / n) for n in "abc"]


def test_average_cli_writes_the_weighted_mean(tmp_path, capsys):
    from train import average

    a, b, _ = _soup_ingredients(tmp_path)
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "3", "1"]
    assert average.main([*argv, "--out", str(tmp_path / "soup")]) == 0, capsys.readouterr().err
    soup = load_model(tmp_path / "soup")
    assert soup.defaults == a.defaults  # the first folder's sampling defaults
    for kind in ("dit", "text_encoder"):
        mine, first = (dict(tree_flatten(getattr(m, kind).parameters())) for m in (soup, a))
        second = dict(tree_flatten(getattr(b, kind).parameters()))
        assert mine.keys() == first.keys()
        for name, value in mine.items():
            want = 0.75 * np.array(first[name]) + 0.25 * np.array(second[name])
            assert np.abs(np.array(value) - want).max() <= 1e-6, name
        assert any(not np.allclose(np.array(mine[n]), np.array(first[n])) for n in mine)
    for name, value in tree_flatten(soup.vae.parameters()):
        assert np.array_equal(
            np.array(value), np.array(dict(tree_flatten(a.vae.parameters()))[name])
        )
    # Equal weights by default, in any order of the folders.
    out_ab, out_ba = tmp_path / "ab", tmp_path / "ba"
    assert average.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_ab)]) == 0
    assert average.main([str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(out_ba)]) == 0
    x = mx.random.normal((1, 3, 4, 8, 4), key=mx.random.key(0))
    t, ctx = mx.array([500.0]), mx.random.normal((1, 5, 16), key=mx.random.key(1))
    ab, ba = (np.array(load_model(p).dit(x, t, ctx)) for p in (out_ab, out_ba))
    assert np.abs(ab - ba).max() <= 1e-5


def test_average_keeps_bfloat16_weights(tmp_path):
    """Sums in float32, stored back in each weight's own dtype; VAEs compared in bfloat16."""
    from conftest import TINY_DEFAULTS, make_tiny_components

    from s2dit_mlx.loading import save_model
    from train import average

    (dit_a, vae, text_a), (dit_b, _, text_b) = make_tiny_components(0), make_tiny_components(1)
    for module in (dit_a, vae, text_a, dit_b, text_b):
        module.set_dtype(mx.bfloat16)
    save_model(tmp_path / "a", dit_a, vae, text_a, defaults=TINY_DEFAULTS)
    save_model(tmp_path / "b", dit_b, vae, text_b, defaults=TINY_DEFAULTS)
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "soup")]
    assert average.main(argv) == 0
    soup = dict(tree_flatten(load_model(tmp_path / "soup").dit.parameters()))
    a, b = (dict(tree_flatten(m.parameters())) for m in (dit_a, dit_b))
    for name, value in soup.items():
        assert value.dtype == mx.bfloat16, name
        want = (0.5 * a[name].astype(mx.float32) + 0.5 * b[name].astype(mx.float32)).astype(
            mx.bfloat16
        )
        assert mx.array_equal(value, want).item(), name


@pytest.mark.parametrize(
    ("models", "flags", "message"),
    [
        ("ac", [], "/a have different VAEs"),
        ("a", [], "give two or more model folders to average"),
        ("ab", ["--weights", "1"], "--weights takes one number per model (2), got 1"),
        ("ab", ["--weights", "1", "-1"], "argument --weights: expected a finite number >= 0"),
        ("ab", ["--weights", "0", "0"], "--weights takes finite numbers >= 0"),
        ("ax", [], "model folder"),
    ],
)
def test_average_cli_refuses_bad_input(tmp_path, capsys, models, flags, message):
    """One error line, exit 2, and no output folder."""
    from train import average

    _soup_ingredients(tmp_path)
    argv = [str(tmp_path / m) for m in models] + flags + ["--out", str(tmp_path / "soup")]
    assert average.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "soup").exists()


def test_average_refuses_other_architectures(tmp_path):
    from train.average import check_averageable

    a, b, _ = _soup_ingredients(tmp_path)
    b.config["dit"] = {**b.config["dit"], "dim": 64}
    with pytest.raises(S2DiTError, match="different dit configs"):
        check_averageable([a, b], ["a", "b"])
    b.config = {**a.config, "quantization": {"group_size": 32, "bits": 4}}
    with pytest.raises(S2DiTError, match="quantized"):
        check_averageable([a, b], ["a", "b"])


# ----------------------------------------------------------------------------------------------
# Plots


def test_loss_curve_png_with_and_without_matplotlib(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from train import plots

    losses = list(np.linspace(2.0, 0.5, 40) + 0.1 * np.sin(np.arange(40)))
    a = save_loss_curve(losses, tmp_path / "a.png")

    def no_matplotlib(*_args):
        raise ImportError("matplotlib")

    monkeypatch.setattr(plots, "_plot_matplotlib", no_matplotlib)
    b = save_loss_curve(losses, tmp_path / "b.png")
    for p in (a, b):
        img = iio.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and (img < 128).any()  # something is drawn


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_lora_run_samples_and_exact_resume(tmp_path, tiny_model_dir, capsys):
    from train import dit as cli

    common = ["--model", str(tiny_model_dir), "--data", "shapes", "--steps", "4",
              "--batch-size", "2", "--lora", "--rank", "2", "--layers", "self_attn.q,ffn.*",
              "--mode", "streaming", "--no-progress", "--lr", "1e-3"]  # fmt: skip
    whole = tmp_path / "whole"
    assert cli.main([*common, "--out", str(whole), "--sample-every", "4"]) == 0
    assert (whole / "adapters" / "adapters.safetensors").is_file()
    assert (whole / "loss.png").is_file() and (whole / "samples" / "step-0000004-0.gif").is_file()

    split = tmp_path / "split"
    assert cli.main([*common, "--out", str(split), "--until", "2"]) == 0
    assert not (split / "adapters").exists()  # not finished yet
    assert cli.main(["--out", str(split), "--resume"]) == 0  # settings come from run.json
    a = json.loads((whole / "loss.json").read_text())["loss"]
    b = json.loads((split / "loss.json").read_text())["loss"]
    assert len(a) == 4 and a == b

    capsys.readouterr()
    assert cli.main([*common, "--out", str(whole)]) == 2  # would clobber a run
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--resume" in err and "\n" not in err
    assert cli.main(["--help"]) == 0


def test_cli_full_training_from_config_writes_model_folder(tmp_path, tiny_model_dir):
    from train import dit as cli

    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    code = cli.main(["--config", str(tmp_path / "config.json"), "--out", str(out), "--steps", "2",
                     "--batch-size", "2", "--ema", "0.5", "--no-progress", "--grad-checkpoint",
                     "--train-text-encoder"])  # fmt: skip
    assert code == 0
    bundle = load_model(out / "model")  # loadable by s2dit generate --model
    init = load_model(out / "init")
    changed = flat(bundle.dit.parameters())["blocks.0.self_attn.q.weight"]
    assert not np.array_equal(changed, flat(init.dit.parameters())["blocks.0.self_attn.q.weight"])


# ----------------------------------------------------------------------------------------------
# Data parallel


WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
import s2dit_mlx  # noqa
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
import test_train as T

group = mx.distributed.init()
trainer = T.make_trainer(__import__("pathlib").Path({out!r}), steps=2, batch_size=4, lr=0.05,
                         sgd=True)
trainer.train()
if group.rank() == 0:
    params = {{k: np.array(v).tolist() for k, v in tree_flatten(trainer.model.parameters())}}
    json.dump({{"size": group.size(), "losses": trainer.losses, "params": params}},
              open({result!r}, "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_two_processes_equals_one_with_double_batch(tmp_path):
    """mlx.launch (ring backend, 2 local processes, batch 2 each) == 1 process with batch 4.

    Plain SGD, so the parameters after two updates compare the averaged gradients themselves.
    """
    script = tmp_path / "worker.py"
    result = tmp_path / "result.json"
    tests_dir = str(Path(__file__).parent)
    script.write_text(
        textwrap.dedent(
            WORKER.format(tests=tests_dir, out=str(tmp_path / "dp"), result=str(result))
        )
    )
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port()),
           "--", sys.executable, str(script)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(result.read_text())
    assert got["size"] == 2

    single = make_trainer(tmp_path / "single", steps=2, batch_size=4, lr=0.05, sgd=True)
    single.train()
    assert np.allclose(got["losses"], single.losses, atol=1e-5)
    ref = flat(single.model.parameters())
    err = max(np.abs(np.array(got["params"][k]) - ref[k]).max() for k in ref)
    assert err <= 1e-5, err


# ----------------------------------------------------------------------------------------------
# Palette-aware training (Core ML palettisation)


def test_kmeans_snap_gives_a_small_palette_of_nearest_centroids(monkeypatch):
    from train import palette as palette_module
    from train.palette import kmeans_snap

    w = mx.random.normal((48, 64), key=mx.random.key(0))
    snapped = np.array(kmeans_snap(w, 3))
    palette = np.unique(snapped)
    assert snapped.shape == (48, 64) and len(palette) <= 8
    nearest = palette[np.abs(np.array(w)[..., None] - palette).argmin(axis=-1)]
    np.testing.assert_array_equal(snapped, nearest)  # every entry at its nearest centroid
    # Lloyd from quantiles beats 8 evenly spaced levels over the range on a Gaussian.
    levels = np.linspace(np.array(w).min(), np.array(w).max(), 8)
    uniform = levels[np.abs(np.array(w)[..., None] - levels).argmin(axis=-1)]
    err = np.mean((snapped - np.array(w)) ** 2)
    assert err < 0.8 * np.mean((uniform - np.array(w)) ** 2)
    # The same result with the N x k comparison done in slices.
    monkeypatch.setattr(palette_module, "CHUNK_ELEMENTS", 8 * 1000)
    np.testing.assert_array_equal(np.array(kmeans_snap(w, 3)), snapped)


def test_palette_aware_loss_runs_on_snapped_weights_and_trains_raw_ones(tmp_path):
    from train.palette import kmeans_snap, palette_aware_loss, palette_targets

    dit = tiny_dit()
    names = palette_targets(dit, min_size=256)
    assert names and all(n.endswith("weight") for n in names)
    cfg = FlowConfig(mode="streaming")
    plain, aware = make_flow_loss(cfg), palette_aware_loss(make_flow_loss(cfg), 2, names)
    batch, keys = latent_data([0, 1]), rng.sample_keys(5, [0, 1])
    raw = flat(dit.parameters())
    got = float(aware(FlowModel(dit), batch, keys))
    assert flat(dit.parameters()).keys() == raw.keys()
    for name, value in flat(dit.parameters()).items():
        np.testing.assert_array_equal(value, raw[name])  # raw weights restored after the call
    snapped = tiny_dit()
    snapped.load_weights([(n, kmeans_snap(mx.array(raw[n]), 2)) for n in names], strict=False)
    want = float(plain(FlowModel(snapped), batch, keys))
    assert abs(got - want) <= 1e-5 * abs(want)  # the forward pass saw the 4-value palettes
    assert abs(float(plain(FlowModel(dit), batch, keys)) - want) > 1e-3

    trainer = Trainer(
        FlowModel(dit), aware, latent_data, TrainConfig(steps=3, batch_size=2, lr=1e-2,
        progress=False), tmp_path, optimizer=optim.SGD(learning_rate=1e-2),
    )  # fmt: skip
    trainer.train()
    after = flat(dit.parameters())
    for name in names:  # the straight-through gradient moved the raw (unsnapped) weights
        assert not np.array_equal(after[name], raw[name])
        assert len(np.unique(after[name])) > 4


def test_cli_palette_bits_saves_snapped_weights(tmp_path, tiny_model_dir, capsys):
    from train import dit as cli
    from train.palette import palette_targets

    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--no-progress", "--palette-bits", "3", "--lr", "1e-3"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    saved = load_model(out / "model").dit
    names = palette_targets(saved)
    assert names  # the tiny model has weights the export would palettise
    params = flat(saved.parameters())
    assert all(len(np.unique(params[n])) <= 8 for n in names)
    assert any(len(np.unique(v)) > 8 for n, v in params.items() if n not in names and v.size > 8)
    bad = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), "--lora",
           "--palette-bits", "6"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--palette-bits" in err[0]
