"""Flow-matching objective for the S2DiT, bidirectional or streaming ("diffusion forcing").

x_s = (1 - s) x0 + s eps, the model is called with t = 1000 s and regresses v = eps - x0 (MSE).

- bidirectional: one s per sample, full attention over the clip;
- streaming: one s per chunk of `frames_per_chunk` latent frames, drawn independently, and the
  model runs block-causally (chunk_frames=k), so every chunk learns to denoise given earlier
  chunks at any noise level. With probability `clean_context_prob` a sample's first c chunks
  (c uniform in 1..n-1) are clean (s = 0) and left out of the loss: that is the state a
  streaming generator's cache holds (earlier chunks written at t = 0), so inference with a
  clean cache is in distribution.
- error recycling (streaming, `recycle_prob`): a generator's cache holds its own chunks, not
  ground truth, and their small errors (a blurred, shrunken or faded object) compound over a
  long stream. With probability `recycle_prob` a sample's clean context is replaced by the
  model's own prediction of it: each context chunk is noised to a level drawn uniformly in
  [0, recycle_max_sigma], and one gradient-free pass predicts x0 from it. The later chunks still
  regress the ground truth, so the model learns to restore a degraded context instead of
  copying it.
- position weights (`motion_weight`, `object_weight`): an object covers a few latent pixels, so
  the plain MSE is mostly background. Each position's error can be weighted up where the clean
  clip moves and where it differs from its frame's background (see `position_weights`).

All randomness comes from per-sample keys (s2dit_mlx.rng), so a sample's noise does not depend on
how the batch is split across processes or on where a run was resumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.sampling import shift_sigmas
from s2dit_mlx.validate import check_field_types

T_DISTS = ("logit_normal", "uniform", "shifted")
MODES = ("bidirectional", "streaming")


@dataclass
class FlowConfig:
    """How noise levels are drawn and which attention pattern the model trains with."""

    mode: str = "bidirectional"  # or "streaming"
    t_dist: str = "logit_normal"  # "uniform", or "shifted" (uniform, then the shift below)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # s' = shift s / (1 + (shift - 1) s) after drawing; 1 leaves s unchanged.
    shift: float = 1.0
    frames_per_chunk: int | None = None  # None: the model's frames_per_chunk
    clean_context_prob: float = 0.25
    recycle_prob: float = 0.0
    recycle_max_sigma: float = 0.5
    motion_weight: float = 0.0
    object_weight: float = 0.0

    def validate(self) -> None:
        """Raise S2DiTError on an unknown mode or distribution or a bad number."""
        check_field_types(self, "flow config")
        if self.mode not in MODES:
            raise S2DiTError(f"flow mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.t_dist not in T_DISTS:
            raise S2DiTError(
                f"timestep distribution must be one of {', '.join(T_DISTS)}, got {self.t_dist!r}"
            )
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise S2DiTError(f"timestep shift must be a positive number, got {self.shift!r}")
        if not 0 <= self.clean_context_prob <= 1:
            raise S2DiTError("clean_context_prob must be in [0, 1]")
        if not 0 <= self.recycle_prob <= 1:
            raise S2DiTError("recycle_prob must be in [0, 1]")
        if not 0 < self.recycle_max_sigma <= 1:
            raise S2DiTError("recycle_max_sigma must be in (0, 1]")
        if not (math.isfinite(self.motion_weight) and self.motion_weight >= 0):
            raise S2DiTError(f"motion_weight must be a number >= 0, got {self.motion_weight!r}")
        if not (math.isfinite(self.object_weight) and self.object_weight >= 0):
            raise S2DiTError(f"object_weight must be a number >= 0, got {self.object_weight!r}")
        if self.frames_per_chunk is not None and self.frames_per_chunk < 1:
            raise S2DiTError("frames_per_chunk must be at least 1")


class FlowModel(nn.Module):
    """The trained tree: the DiT, plus the text encoder when it is trained jointly."""

    def __init__(self, dit: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.dit = dit
        if text_encoder is not None:
            self.text_encoder = text_encoder

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self

    def context(self, batch: dict) -> mx.array:
        """Text embeddings: precomputed, or encoded here from token ids when trained jointly."""
        if "context" in batch:
            return batch["context"]
        if not self.trains_text_encoder:
            raise S2DiTError("batch has token ids but the text encoder is not being trained")
        return encode_tokens(self.text_encoder, batch)


def encode_tokens(text_encoder: nn.Module, batch: dict) -> mx.array:
    """Run a text encoder on train.data.tokenize's arrays ({"ids", "lengths"|"mask"})."""
    if "lengths" in batch:
        return text_encoder(batch["ids"], batch["lengths"])
    mask = batch["mask"]
    x = text_encoder(batch["ids"], mask)
    return x * mask[..., None].astype(x.dtype)  # zero past each prompt's end, as encode() does


def sample_sigmas(key: mx.array, n: int, cfg: FlowConfig) -> mx.array:
    """n noise levels s in [0, 1] from one key."""
    if cfg.t_dist == "logit_normal":
        s = mx.sigmoid(cfg.logit_mean + cfg.logit_std * mx.random.normal((n,), key=key))
    else:
        s = mx.random.uniform(shape=(n,), key=key)
    if cfg.shift != 1.0:
        s = shift_sigmas(s, cfg.shift)
    return s


def _draw(key: mx.array, shape: tuple, n_chunks: int, cfg: FlowConfig, streaming: bool):
    """Per-sample draws: noise, per-chunk s, and a per-chunk clean (t = 0) context mask."""
    k_s, k_eps, k_clean, k_len = mx.random.split(key, 4)
    eps = mx.random.normal(shape, key=k_eps)
    if not streaming:
        s = mx.broadcast_to(sample_sigmas(k_s, 1, cfg), (n_chunks,))
        return eps, s, mx.zeros((n_chunks,), dtype=mx.bool_)
    s = sample_sigmas(k_s, n_chunks, cfg)
    if n_chunks < 2 or cfg.clean_context_prob == 0:
        return eps, s, mx.zeros((n_chunks,), dtype=mx.bool_)
    use = mx.random.uniform(key=k_clean) < cfg.clean_context_prob
    prefix = mx.random.randint(1, n_chunks, key=k_len)  # 1..n-1 clean chunks
    clean = mx.logical_and(use, mx.arange(n_chunks) < prefix)
    return eps, mx.where(clean, 0.0, s), clean


def flow_matching_loss(model: FlowModel, batch: dict, keys: mx.array, cfg: FlowConfig) -> mx.array:
    """Mean over samples of the per-sample velocity MSE (noisy chunks only); keys: [B, 2].

    Runs in float32 whatever the dtype of the latents and the text embeddings (a float16 VAE
    or text encoder gives float16 ones), as the trainer's float32 master weights do.
    """
    x0 = batch["latents"].astype(mx.float32)
    dit = model.dit
    b, frames = x0.shape[:2]
    streaming = cfg.mode == "streaming"
    k = cfg.frames_per_chunk or dit.args.frames_per_chunk
    n_chunks = -(-frames // k) if streaming else 1
    eps, s_chunk, clean = mx.vmap(lambda kk: _draw(kk, x0.shape[1:], n_chunks, cfg, streaming))(
        keys
    )
    # Per latent frame: chunk c covers frames [c k, (c + 1) k).
    frame_chunk = mx.arange(frames) // k if streaming else mx.zeros((frames,), dtype=mx.int32)
    s = s_chunk[:, frame_chunk]  # [B, T]
    keep = 1.0 - clean[:, frame_chunk].astype(mx.float32)  # [B, T]
    s5 = s.reshape(b, frames, 1, 1, 1).astype(x0.dtype)
    x_t = (1 - s5) * x0 + s5 * eps.astype(x0.dtype)
    t = 1000.0 * (s if streaming else s[:, 0])
    context = model.context(batch).astype(mx.float32)
    if streaming and cfg.recycle_prob > 0:
        x_t = _recycle_context(dit, x0, x_t, context, keys, clean, frame_chunk, k, cfg)
    v = dit(x_t, t, context, chunk_frames=k if streaming else None)
    target = eps - x0
    sq = (v.astype(mx.float32) - target.astype(mx.float32)) ** 2  # [B, T, H, W, C]
    if cfg.motion_weight > 0 or cfg.object_weight > 0:
        sq = sq * position_weights(x0, cfg.motion_weight, cfg.object_weight)[..., None]
    err = sq.mean(axis=(2, 3, 4))  # [B, T]
    per_sample = (err * keep).sum(axis=1) / mx.maximum(keep.sum(axis=1), 1.0)
    return per_sample.mean()


def position_weights(x0: mx.array, motion: float, presence: float = 0.0) -> mx.array:
    """Per-position loss weights [B, T, H, W], mean 1 per sample: more where x0 moves or stands out.

    w = 1 + motion x change / mean(change) + presence x deviation / mean(deviation), where change
    is how much the clean latent changes at a position between neighbouring frames and deviation
    how far it is from its frame's background (the median over positions, per channel): an
    object that has stopped no longer changes, but it still stands out from the background.
    """
    x = mx.stop_gradient(x0.astype(mx.float32))
    b, frames, height, width, c = x.shape
    w = mx.ones((b, frames, height, width))

    def scaled(v: mx.array) -> mx.array:
        return v / mx.maximum(v.mean(axis=(1, 2, 3), keepdims=True), 1e-6)

    if motion > 0 and frames > 1:
        step = mx.abs(x[:, 1:] - x[:, :-1]).mean(axis=-1)  # [B, T-1, H, W]: change f -> f+1
        before = mx.concatenate([step[:, :1], step], axis=1)  # frame 0 reuses its next change
        after = mx.concatenate([step, step[:, -1:]], axis=1)
        w = w + motion * scaled(mx.maximum(before, after))
    if presence > 0:
        n = height * width
        flat = mx.sort(x.reshape(b, frames, n, c), axis=2)
        median = 0.5 * (flat[:, :, (n - 1) // 2] + flat[:, :, n // 2])  # [B, T, C]
        w = w + presence * scaled(mx.abs(x - median[:, :, None, None]).mean(axis=-1))
    return w / w.mean(axis=(1, 2, 3), keepdims=True)


def _recycle_context(dit, x0, x_t, context, keys, clean, frame_chunk, k, cfg) -> mx.array:
    """x_t with the clean context of recycled samples replaced by the model's own x0 prediction."""

    def draw(key: mx.array):
        # A key of its own (split from the sample's), so the other draws stay as they were.
        k_use, k_sigma, k_eps = mx.random.split(mx.random.split(key)[1], 3)
        use = mx.random.uniform(key=k_use) < cfg.recycle_prob
        sigma = cfg.recycle_max_sigma * mx.random.uniform(shape=clean.shape[1:], key=k_sigma)
        return use, sigma, mx.random.normal(x0.shape[1:], key=k_eps)

    use, sigma, eps = mx.vmap(draw)(keys)
    b, frames = x0.shape[:2]
    s = sigma[:, frame_chunk].reshape(b, frames, 1, 1, 1).astype(x0.dtype)
    x_r = (1 - s) * x0 + s * eps.astype(x0.dtype)
    t_r = 1000.0 * sigma[:, frame_chunk]
    v_r = dit(x_r, t_r, mx.stop_gradient(context), chunk_frames=k)
    x0_hat = mx.stop_gradient(x_r - s * v_r.astype(x0.dtype))
    swap = mx.logical_and(use[:, None], clean)[:, frame_chunk].reshape(b, frames, 1, 1, 1)
    return mx.where(swap, x0_hat, x_t)


def make_flow_loss(cfg: FlowConfig):
    """loss_fn(model, batch, keys) for the Trainer."""
    cfg.validate()

    def loss_fn(model: FlowModel, batch: dict, keys: mx.array) -> mx.array:
        return flow_matching_loss(model, batch, keys, cfg)

    return loss_fn
