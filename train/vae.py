"""`python -m train.vae`: train a (small) Wan-architecture VAE on moving-shapes clips.

Loss: L1 + MSE reconstruction of the causal encode/decode round trip, plus a small KL term
on the posterior. Checkpoints, resume, EMA, progress and the loss curve come from
train.trainer; the result is a component folder (config.json + model.safetensors) with the
latent mean/std measured on training clips written into its config.

    python -m train.vae --out runs/vae --base-dim 8 --steps 1200 --frames 5 --crop 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from s2dit_mlx import rng
from s2dit_mlx.cli_args import (
    Parser,
    decay,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.fsutil import atomic_dir, check_run_dir, mark_run_dir
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig
from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig

from .data import shapes_source
from .trainer import TrainConfig, Trainer, write_run_config

STATS_FRAMES = 9  # clip length of the latent statistics


def vae_loss(vae, batch: dict, keys: mx.array, kl_weight: float) -> mx.array:
    """Reconstruction (MSE + 0.1 L1), plus kl_weight * KL(q(z|x) || N(0, 1)) for the Wan VAE.

    MSE leads: with small objects on flat backgrounds, an L1-led loss sits at the median
    (background everywhere) for hundreds of steps.
    """
    video = batch["video"]
    out = vae(video)
    recon = out[0] if isinstance(out, tuple) else out
    diff = recon.astype(mx.float32) - video
    loss = (diff * diff).mean() + 0.1 * mx.abs(diff).mean()
    if isinstance(out, tuple):  # Wan VAE: (recon, mean, log-variance)
        _, mu, logvar = out
        loss = loss + kl_weight * 0.5 * (mu * mu + mx.exp(logvar) - logvar - 1).mean()
    return loss


def raw_latents(vae, video: mx.array) -> mx.array:
    """Un-normalised latents (the Wan VAE's posterior mean; the patch VAE's code)."""
    if isinstance(vae, WanVAE):
        return vae.encode_moments(video)[0]
    return vae.encoder(vae.patchify(video))


def cropped_shapes_source(seed: int, frames: int, size: int, crop: int):
    """Shapes clips cut to crop x crop windows around the object (the VAE is convolutional,
    so it trains on small windows at the real pixel scale, ~(size/crop)^2 times cheaper)."""
    from s2dit_mlx.world.shapes import ShapesDataset

    dataset = ShapesDataset(height=size, width=size, frames=frames, seed=seed)

    def source(indices) -> dict:
        clips = []
        for i in indices:
            video, _, attrs = dataset.sample(i)
            mid = frames // 2
            cx, cy = attrs["path"]["cx"][mid], attrs["path"]["cy"][mid]
            jx = (rng.uniform01(seed, "crop-x", i) - 0.5) * crop / 2
            jy = (rng.uniform01(seed, "crop-y", i) - 0.5) * crop / 2
            x0 = int(np.clip(round(cx + jx - crop / 2), 0, size - crop))
            y0 = int(np.clip(round(cy + jy - crop / 2), 0, size - crop))
            clips.append(video[:, y0 : y0 + crop, x0 : x0 + crop])
        video = np.stack(clips).astype(np.float32) / 127.5 - 1.0
        return {"video": mx.array(video)}

    return source


def latent_stats(vae: WanVAE, source, indices: list[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw posterior means over some clips."""
    mus = []
    for i in indices:
        mu = raw_latents(vae, source([i])["video"])
        mus.append(np.array(mu.reshape(-1, mu.shape[-1])))
    z = np.concatenate(mus)
    return z.mean(0).tolist(), (z.std(0) + 1e-6).tolist()


def save_component(vae, out: Path) -> Path:
    """Write the VAE as a model-folder component (config.json + model.safetensors), atomically."""
    with atomic_dir(out, "vae") as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(vae.parameters())))
        (tmp / "config.json").write_text(json.dumps(vae.config.to_dict(), indent=2) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.vae`."""
    p = Parser(
        prog="python -m train.vae",
        description="Train a small Wan-architecture VAE on procedural moving-shapes clips.",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument(
        "--arch",
        choices=["wan", "patch"],
        default="wan",
        help="wan: Wan 2.1 VAE architecture; patch: the small causal patch VAE",
    )
    p.add_argument(
        "--base-dim", type=positive_int, default=8, help="Wan VAE: width of the first level"
    )
    p.add_argument("--hidden-dim", type=positive_int, default=256, help="patch VAE: hidden width")
    p.add_argument(
        "--mlp-blocks",
        type=non_negative_int,
        default=0,
        help="patch VAE: residual MLP blocks on each side",
    )
    p.add_argument("--z-dim", type=positive_int, default=16, help="latent channels")
    p.add_argument(
        "--res-blocks", type=positive_int, default=1, help="Wan VAE: residual blocks per level"
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=64,
        help="frame height and width in pixels, a multiple of the VAE's spatial factor (8)",
    )
    p.add_argument(
        "--frames",
        type=positive_int,
        default=5,
        help="frames per training clip, 4k + 1 (the VAE's temporal factor is 4)",
    )
    p.add_argument(
        "--crop",
        type=non_negative_int,
        default=32,
        help="train on crop x crop windows around the object, a multiple of 8 "
        "(0 or >= --size: whole frames)",
    )
    p.add_argument(
        "--kl-weight",
        type=non_negative_float,
        default=1e-5,
        help="Wan VAE: weight of the KL term of the posterior",
    )
    p.add_argument("--steps", type=positive_int, default=1500, help="optimizer updates")
    p.add_argument("--batch-size", type=positive_int, default=2, help="clips per step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=50, help="linear warmup steps")
    p.add_argument("--ema", type=decay, default=0.0, help="EMA decay, e.g. 0.999 (0: off)")
    p.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=100,
        help="steps between checkpoints (0: only at the end)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of data and init")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_sizes(cfg, frames: int, size: int, crop: int) -> None:
    """Clip sizes the VAE takes; S2DiTError before anything is trained or written."""
    tf, sf = cfg.temporal_factor, cfg.spatial_factor
    if (frames - 1) % tf:
        examples = ", ".join(str(1 + tf * k) for k in range(1, 5))
        raise S2DiTError(f"--frames {frames} must be {tf}k + 1 for this VAE ({examples}, ...)")
    # Statistics are measured on 9-frame clips.
    if (STATS_FRAMES - 1) % tf:
        raise S2DiTError(
            f"a VAE with temporal factor {tf} cannot encode {STATS_FRAMES}-frame clips"
        )
    for flag, value in (("--size", size), ("--crop", crop if 0 < crop < size else size)):
        if value % sf:
            low = value // sf * sf
            near = f"{low} or {low + sf}" if low else f"{sf}"
            raise S2DiTError(
                f"{flag} {value} is not a multiple of the VAE's spatial factor {sf}; try {near}"
            )


def run(args: argparse.Namespace) -> Path:
    """Train, then write RUN_DIR/vae (the component folder with measured latent stats)."""
    out_dir = check_run_dir(args.out)  # new, empty, or one of our run folders
    if args.arch == "wan":
        cfg = WanVAEConfig(base_dim=args.base_dim, z_dim=args.z_dim, num_res_blocks=args.res_blocks)
        model_cls = WanVAE
    else:
        cfg = PatchVAEConfig(
            z_dim=args.z_dim, hidden_dim=args.hidden_dim, mlp_blocks=args.mlp_blocks
        )
        model_cls = PatchVAE
    cfg.validate()
    check_sizes(cfg, args.frames, args.size, args.crop)
    mx.random.seed(args.seed)
    vae = model_cls(cfg)
    if args.crop and args.crop < args.size:
        source = cropped_shapes_source(args.seed, args.frames, args.size, args.crop)
    else:
        source = shapes_source(
            seed=args.seed, frames=args.frames, height=args.size, width=args.size
        )
    full_source = shapes_source(
        seed=args.seed, frames=STATS_FRAMES, height=args.size, width=args.size
    )
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        ema=args.ema,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        progress=not args.no_progress,
    )
    trainer = Trainer(
        vae,
        lambda m, b, k: vae_loss(m, b, k, args.kl_weight),
        source,
        train_cfg,
        out_dir,
        fingerprint={"vae": cfg.to_dict()},
    )  # checks the settings before anything is written
    mark_run_dir(out_dir, "train.vae")
    write_run_config(out_dir, vars(args))
    if args.resume:
        trainer.resume()
    trainer.train()
    with trainer.ema_weights():
        # Held-out clips (indices past anything trained on) for the latent statistics.
        held_out = list(range(10**7, 10**7 + 16))
        mean, std = latent_stats(vae, full_source, held_out)
        # The stats only enter config.json (normalisation is derived from the config on load).
        vae.config.latents_mean, vae.config.latents_std = mean, std
        return save_component(vae, out_dir / "vae")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_cli(lambda: print(f"VAE written to {run(build_parser().parse_args(argv))}"))


if __name__ == "__main__":
    sys.exit(main())
