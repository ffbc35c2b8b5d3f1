"""Distribution Matching Distillation with Self-Forcing rollout (S2DiT-AR).

Three networks:
- the generator: the few-step streaming student (ODE-initialised), trained;
- the real score: the frozen teacher, with classifier-free guidance;
- the fake score (critic): a copy of the teacher (all weights, or LoRA adapters) trained with
  the flow loss on the generator's own samples, so it tracks their distribution.

Each iteration the generator rolls out a video chunk by chunk through its streaming cache, on
its own outputs (Self-Forcing): every chunk starts from noise, runs the few-step list and
exits at a random step, whose x0 is the chunk; the clean chunk is written into the cache
(without gradient). The DMD gradient of the video is (fake x0 - real x0) / mean |x - real x0|
at a random noise level; the generator loss is 0.5 ||x - sg(x - grad)||^2, whose gradient
reaches the parameters through the exit passes only. The critic learns every iteration, the
generator every `critic_ratio`-th (5 by default), AdamW with betas (0, 0.999), clipped.

Memory: the rollout runs without autodiff (recording each chunk's exit input and a snapshot
of its cache), the DMD gradient w.r.t. the video comes from forward passes of the frozen nets,
and then one vjp per chunk through its exit pass accumulates the parameter gradient, which
equals plain autodiff through the whole rollout (tested to 1e-5).

All randomness is keyed by (seed, iteration, sample), so a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx import rng
from s2dit_mlx.cli_args import Parser
from s2dit_mlx.config import ConfigBase
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.generation import SeededNoise
from s2dit_mlx.sampling import shift_sigmas


@dataclass
class DMDConfig(ConfigBase):
    """Settings of a DMD run."""

    config_name: ClassVar[str] = "DMD config"

    points: tuple[float, ...]  # the generator's few-step timesteps, 1000 first
    frames: int  # latent frames per rollout
    latent_height: int
    latent_width: int
    iterations: int = 1000  # critic updates
    batch_size: int = 1
    guidance: float = 3.0  # the real score's CFG (higher oversaturates)
    critic_ratio: int = 5  # the generator learns every critic_ratio-th iteration
    lr_generator: float = 2e-6
    lr_critic: float = 4e-7
    beta2: float = 0.999  # beta1 is 0 (DMD's choice)
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    ema: float = 0.0  # EMA decay of the generator (0: off)
    t_min: float = 20.0  # DMD noise levels are drawn in [t_min, t_max] (model t)
    t_max: float = 980.0
    t_shift: float = 1.0  # >1 draws noisy levels more often (shape and motion are set there)
    score_chunk_frames: int | None = None  # block-causal score passes (streaming teacher)
    seed: int = 0

    def validate(self) -> None:
        """Raise S2DiTError naming the first bad setting."""
        pts = list(self.points)
        if (
            not pts
            or any(not 0 < t <= 1000 for t in pts)
            or any(a <= b for a, b in zip(pts, pts[1:], strict=False))
        ):
            raise S2DiTError(f"generator timesteps must fall in (0, 1000], decreasing, got {pts}")
        for name in (
            "frames",
            "latent_height",
            "latent_width",
            "iterations",
            "batch_size",
            "critic_ratio",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise S2DiTError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr_generator", "lr_critic"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise S2DiTError(f"{name} must be a positive number, got {value!r}")
        if not 0 <= self.beta2 < 1 or not 0 <= self.ema < 1:
            raise S2DiTError("beta2 and ema must lie in [0, 1)")
        if not 0 < self.t_min < self.t_max <= 1000:
            raise S2DiTError(
                f"DMD noise range needs 0 < t_min < t_max <= 1000, got {self.t_min}, {self.t_max}"
            )
        if not (math.isfinite(self.t_shift) and self.t_shift > 0):
            raise S2DiTError(f"t_shift must be a positive number, got {self.t_shift!r}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise S2DiTError(f"guidance must be a number >= 0, got {self.guidance!r}")


@dataclass
class ExitRecord:
    """One chunk's exit pass: its input, timestep and the cache it read (a snapshot)."""

    x: mx.array
    t: float
    cache: object
    start: int  # first latent frame of the chunk


def _sample_keys(seed: int, stream: str, step: int, batch: int) -> mx.array:
    return mx.stack([rng.key(seed, stream, step, i) for i in range(batch)])


def exit_steps(seed: int, step: int, chunks: int, points: int) -> list[int]:
    """The step each chunk of this iteration exits at (one draw per chunk, shared by the batch)."""
    return [int(rng.uniform01(seed, "exit", step, c) * points) for c in range(chunks)]


def rollout(
    generator, context: mx.array, cfg: DMDConfig, step: int
) -> tuple[mx.array, list[ExitRecord]]:
    """Self-Forcing rollout without autodiff: the video [B, T, h, w, C] and each chunk's exit."""
    b = context.shape[0]
    f = generator.args.frames_per_chunk
    chunks = -(-cfg.frames // f)
    exits = exit_steps(cfg.seed, step, chunks, len(cfg.points))
    noise = SeededNoise(keys=_sample_keys(cfg.seed, "noise", step, b))
    cache = generator.make_cache()
    outs, records = [], []
    for c in range(chunks):
        start = c * f
        shape = (
            b,
            min(f, cfg.frames - start),
            cfg.latent_height,
            cfg.latent_width,
            generator.args.in_dim,
        )
        x = noise.draw(shape)
        for i, t in enumerate(cfg.points):
            if i == exits[c]:
                records.append(ExitRecord(x, t, cache.copy(), start))
            v = generator(x, mx.full((b,), t), context, cache=cache)
            x0 = x - (t / 1000.0) * v
            if i == exits[c]:
                break
            s = cfg.points[i + 1] / 1000.0
            x = (1.0 - s) * x0 + s * noise.draw(shape)
            mx.eval(x)
        x0 = mx.stop_gradient(x0)
        generator(x0, mx.zeros((b,)), context, cache=cache, update_cache=True)
        mx.eval(x0, cache.arrays())
        outs.append(x0)
    return mx.concatenate(outs, axis=1), records


def _x0(model, x_t, t, context, chunk_frames):
    v = model(x_t, t, context, chunk_frames=chunk_frames)
    return x_t - (t / 1000.0).reshape(-1, 1, 1, 1, 1) * v


def dmd_gradient(
    video, teacher, critic, context, neg_context, cfg: DMDConfig, step: int
) -> tuple[mx.array, dict]:
    """The DMD gradient w.r.t. the video (frozen nets, no autodiff) and its statistics."""
    b = video.shape[0]
    t, x_t, _ = _noised(video, cfg, "dmd", step)
    cf = cfg.score_chunk_frames
    real = _x0(teacher, x_t, t, context, cf)
    if cfg.guidance != 1.0:
        neg = mx.broadcast_to(neg_context, (b, *neg_context.shape[1:]))
        real_u = _x0(teacher, x_t, t, neg, cf)
        real = real_u + cfg.guidance * (real - real_u)
    fake = _x0(critic, x_t, t, context, cf)
    scale = mx.abs(video - real).mean(axis=(1, 2, 3, 4), keepdims=True)
    grad = (fake - real) / scale
    mx.eval(grad)
    return grad, {"dmd_loss": float(0.5 * (grad**2).mean()), "t_mean": float(t.mean())}


def generator_grads(generator, records: list[ExitRecord], context: mx.array, cotangent: mx.array):
    """Parameter gradient of <cotangent, video>: one vjp through each chunk's exit pass."""
    params = generator.trainable_parameters()
    names, leaves = zip(*tree_flatten(params), strict=True)
    total = None
    for rec in records:
        b, f = rec.x.shape[:2]

        def exit_pass(*values, rec=rec, b=b):
            generator.update(tree_unflatten(list(zip(names, values, strict=True))))
            v = generator(rec.x, mx.full((b,), rec.t), context, cache=rec.cache.copy())
            return [rec.x - (rec.t / 1000.0) * v]

        cot = cotangent[:, rec.start : rec.start + f]
        _, grads = mx.vjp(exit_pass, list(leaves), [cot])
        total = grads if total is None else [a + g for a, g in zip(total, grads, strict=True)]
        mx.eval(total)
    generator.update(params)
    return tree_unflatten(list(zip(names, total, strict=True)))


def _noised(video, cfg: DMDConfig, stream: str, step: int):
    """(t [B], x_t, eps): the video noised at a level per sample, drawn in [t_min, t_max]
    after the shift u -> shift u / (1 + (shift - 1) u) (shift 1: uniform)."""
    b = video.shape[0]
    keys = _sample_keys(cfg.seed, stream, step, b)
    u = mx.stack([mx.random.uniform(key=mx.random.split(k)[0]) for k in keys])
    u = shift_sigmas(u, cfg.t_shift)
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * u
    eps = mx.stack([mx.random.normal(video.shape[1:], key=mx.random.split(k)[1]) for k in keys])
    s = (t / 1000.0).reshape(b, 1, 1, 1, 1)
    return t, (1.0 - s) * video + s * eps, eps


def flow_loss(critic, video, context, cfg: DMDConfig, step: int) -> mx.array:
    """The critic's flow-matching loss on the generator's (detached) samples."""
    t, x_t, eps = _noised(video, cfg, "critic", step)
    v = critic(x_t, t, context, chunk_frames=cfg.score_chunk_frames)
    return ((v - (eps - video)) ** 2).mean()


def make_optimizer(lr: float, cfg: DMDConfig) -> optim.Optimizer:
    """AdamW with DMD's betas (0, beta2)."""
    return optim.AdamW(learning_rate=lr, betas=[0.0, cfg.beta2], weight_decay=cfg.weight_decay)


class DMD:
    """A DMD run: the three networks, both optimizers, the EMA and the iteration counter."""

    def __init__(
        self,
        generator: nn.Module,
        teacher: nn.Module,
        critic: nn.Module,
        contexts: Callable[[list[int]], mx.array],
        neg_context: mx.array,
        cfg: DMDConfig,
    ):
        cfg.validate()
        self.generator, self.teacher, self.critic = generator, teacher, critic
        self.contexts, self.neg_context, self.cfg = contexts, neg_context, cfg
        teacher.freeze()
        if not tree_flatten(generator.trainable_parameters()):
            raise S2DiTError("the generator has no trainable parameters")
        if not tree_flatten(critic.trainable_parameters()):
            raise S2DiTError("the critic has no trainable parameters")
        self.opt_generator = make_optimizer(cfg.lr_generator, cfg)
        self.opt_critic = make_optimizer(cfg.lr_critic, cfg)
        self.opt_generator.init(generator.trainable_parameters())
        self.opt_critic.init(critic.trainable_parameters())
        self.ema = dict(tree_flatten(generator.trainable_parameters())) if cfg.ema else None
        if self.ema is not None:
            self.ema = {k: mx.array(v) for k, v in self.ema.items()}
        self.step = 0
        self.history: list[dict] = []
        self._critic_grad = nn.value_and_grad(
            critic, lambda m, video, ctx, step: flow_loss(m, video, ctx, self.cfg, step)
        )

    def generator_turn(self) -> bool:
        """Whether this iteration also updates the generator."""
        return self.step % self.cfg.critic_ratio == 0

    def iteration(self) -> dict:
        """One iteration: a rollout, the generator update (on its turn), the critic update."""
        cfg, step = self.cfg, self.step
        indices = list(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
        context = self.contexts(indices)
        video, records = rollout(self.generator, context, cfg, step)
        stats = {"step": step}
        if self.generator_turn():
            grad, info = dmd_gradient(
                video, self.teacher, self.critic, context, self.neg_context, cfg, step
            )
            stats.update(info)
            grads = generator_grads(self.generator, records, context, grad / grad.size)
            stats["generator_grad_norm"] = self._update(self.generator, self.opt_generator, grads)
            if self.ema is not None:
                d = cfg.ema
                params = dict(tree_flatten(self.generator.trainable_parameters()))
                self.ema = {k: d * self.ema[k] + (1 - d) * params[k] for k in self.ema}
                mx.eval(self.ema)
        loss, grads = self._critic_grad(self.critic, mx.stop_gradient(video), context, step)
        stats["critic_loss"] = float(loss)
        stats["critic_grad_norm"] = self._update(self.critic, self.opt_critic, grads)
        self.step += 1
        self.history.append(stats)
        return stats

    def _update(self, model, opt, grads) -> float:
        if self.cfg.grad_clip > 0:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.grad_clip)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        norm = float(norm)
        if not math.isfinite(norm):
            raise S2DiTError(
                f"iteration {self.step}: a non-finite gradient (norm {norm}); stopping"
            )
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        return norm

    # -- checkpoints

    def arrays(self) -> dict[str, dict[str, mx.array]]:
        """Every array of the run, by checkpoint file."""
        out = {
            "generator": dict(tree_flatten(self.generator.trainable_parameters())),
            "critic": dict(tree_flatten(self.critic.trainable_parameters())),
            "generator_optimizer": dict(tree_flatten(self.opt_generator.state)),
            "critic_optimizer": dict(tree_flatten(self.opt_critic.state)),
        }
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def state_dict(self) -> dict:
        """The JSON part of a checkpoint."""
        return {"step": self.step, "config": self.cfg.to_dict(), "history": self.history}

    def load(self, arrays: dict, state: dict, where: str) -> None:
        """Restore what `arrays()` / `state_dict()` saved."""
        from .checkpoint import check_weights
        from .trainer import _set_leaf

        for name, model in (("generator", self.generator), ("critic", self.critic)):
            if name not in arrays:
                raise S2DiTError(f"{where} has no {name} weights")
            check_weights(
                arrays[name], dict(tree_flatten(model.trainable_parameters())), f"{where} {name}"
            )
            model.load_weights(list(arrays[name].items()), strict=False)
        for name, opt in (
            ("generator_optimizer", self.opt_generator),
            ("critic_optimizer", self.opt_critic),
        ):
            for key, value in arrays.get(name, {}).items():
                _set_leaf(opt.state, key, value)
        if self.ema is not None:
            self.ema = dict(
                arrays.get("ema", dict(tree_flatten(self.generator.trainable_parameters())))
            )
        self.step = int(state["step"])
        self.history = list(state.get("history", []))[: self.step]
        mx.eval(
            self.generator.parameters(),
            self.critic.parameters(),
            self.opt_generator.state,
            self.opt_critic.state,
        )


# ----------------------------------------------------------------------------------------------
# CLI: python -m train.dmd

EPILOG = """\
examples:
  # after the ODE initialisation (train.dit --objective ode) of a few-step student
  python -m train.dmd --generator runs/ode/model --teacher models/teacher --cache cache/t \\
      --out runs/dmd --iterations 600 --guidance 3 --ema 0.99 --checkpoint-every 100
  python -m train.dmd --out runs/dmd --resume      # continues exactly where it stopped

The generator must be a few-step student (its folder's defaults: solver few-step); its
timesteps are its defaults' steps and shift. Text embeddings come from the teacher cache
(no text encoder or VAE runs during training); the critic starts as a copy of the teacher.
"""


def _cache_contexts(cache):
    """contexts(indices) over the teacher cache's prompts (index mod its size)."""
    size = len(cache)

    def contexts(indices: list[int]) -> mx.array:
        return cache.samples([int(i) % size for i in indices])["context"]

    return contexts


def build_run(args) -> tuple[DMD, dict]:
    """Load the three networks and the data; returns the DMD run and what saving needs."""
    import copy

    from s2dit_mlx.loading import load_model
    from s2dit_mlx.sampling import FEW_STEP, few_step_timesteps

    from .lora import LoRAConfig, apply_lora
    from .teacher_cache import TeacherCache

    gen_bundle = load_model(args.generator)
    d = gen_bundle.defaults
    if d["solver"] != FEW_STEP:
        raise S2DiTError(
            f"{args.generator} samples with {d['solver']!r}; DMD trains a few-step student "
            "(defaults.solver few-step): run the ODE initialisation first"
        )
    teacher_bundle = load_model(args.teacher)
    cache = TeacherCache(args.cache)
    spec = cache.spec
    generator, teacher = gen_bundle.dit, teacher_bundle.dit
    if hasattr(teacher, "select"):
        raise S2DiTError("a two-expert teacher is not supported as the real score yet; use one DiT")
    for what, model in (("generator", generator), ("teacher", teacher)):
        if (
            model.args.in_dim != spec.channels
            or model.args.text_dim != cache.samples([0])["context"].shape[-1]
        ):
            raise S2DiTError(
                f"the {what} does not match the teacher cache (latent channels or text width)"
            )
    generator.set_dtype(mx.float32)
    teacher.set_dtype(mx.float32)
    critic = copy.deepcopy(teacher)
    teacher.freeze()
    if args.critic_lora:
        apply_lora(critic, LoRAConfig(rank=args.critic_lora, alpha=2.0 * args.critic_lora))
    else:
        critic.unfreeze()
    if args.quantize_teacher:
        nn.quantize(
            teacher,
            bits=args.quantize_teacher,
            class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0,
        )
    generator.unfreeze()
    t_defaults = teacher_bundle.defaults
    guidance = args.guidance if args.guidance is not None else float(t_defaults["guidance"])
    neg = teacher_bundle.text_encoder.encode([t_defaults["negative_prompt"]]).astype(mx.float32)
    cfg = DMDConfig(
        points=tuple(few_step_timesteps(d["steps"], d["shift"])),
        frames=args.frames or spec.frames,
        latent_height=spec.latent_height,
        latent_width=spec.latent_width,
        iterations=args.iterations,
        batch_size=args.batch_size,
        guidance=guidance,
        critic_ratio=args.critic_ratio,
        lr_generator=args.lr_generator,
        lr_critic=args.lr_critic,
        grad_clip=args.grad_clip,
        ema=args.ema,
        t_min=args.t_min,
        t_max=args.t_max,
        t_shift=args.t_shift,
        score_chunk_frames=teacher.args.frames_per_chunk
        if t_defaults["mode"] == "streaming"
        else None,
        seed=args.seed,
    )
    run = DMD(generator, teacher, critic, _cache_contexts(cache), neg, cfg)
    return run, {"bundle": gen_bundle}


def _save_model(run: DMD, out: Path, bundle) -> Path:
    from s2dit_mlx.loading import save_model

    generator = run.generator
    current = list(tree_flatten(generator.trainable_parameters()))
    if run.ema is not None:
        generator.load_weights(list(run.ema.items()), strict=False)
    try:
        defaults = {**bundle.defaults, "guidance": 1.0, "mode": "streaming"}
        return save_model(out / "model", generator, bundle.vae, bundle.text_encoder, defaults)
    finally:
        generator.load_weights(current, strict=False)


def train(args) -> DMD:
    """Run (or resume) DMD; writes checkpoints, loss.json/png and RUN/model at the end."""
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .plots import save_loss_curve, save_loss_history
    from .trainer import write_run_config

    out = Path(args.out)
    if args.resume and not (out / "run.json").is_file():
        raise S2DiTError(f"nothing to resume in {out} (no run.json)")
    if not args.resume and latest_checkpoint(out) is not None:
        raise S2DiTError(
            f"{out} already holds checkpoints; pass --resume to continue or choose another --out"
        )
    for name in ("generator", "teacher", "cache"):
        if getattr(args, name, None) is None:
            raise S2DiTError(f"--{name} is required")
    run, extra = build_run(args)
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            arrays, state = load_checkpoint(ckpt)
            run.load(arrays, state, f"checkpoint {ckpt}")
    else:
        write_run_config(out, {k: v for k, v in vars(args).items() if k not in _PER_CALL})
    cfg = run.cfg
    until = cfg.iterations if args.until is None else min(args.until, cfg.iterations)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=run.step, unit="it", desc="dmd")

    def checkpoint() -> None:
        save_checkpoint(out, run.step, run.arrays(), run.state_dict(), args.keep)
        losses = [h["critic_loss"] for h in run.history]
        save_loss_history(losses, out / "loss.json")
        save_loss_curve(losses, out / "loss.png", title="critic flow loss")

    try:
        while run.step < until:
            stats = run.iteration()
            if bar is not None:
                shown = {"critic": f"{stats['critic_loss']:.4f}"}
                if "dmd_loss" in stats:
                    shown["dmd"] = f"{stats['dmd_loss']:.4f}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if args.checkpoint_every and run.step % args.checkpoint_every == 0 and run.step < until:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    checkpoint()
    if run.step == cfg.iterations:
        path = _save_model(run, out, extra["bundle"])
        print(f"wrote {path}", file=sys.stderr)
    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.dmd`."""
    p = Parser(
        prog="python -m train.dmd",
        description="Distribution Matching Distillation with Self-Forcing rollout: a few-step "
        "streaming student learns from a teacher (real score) and a critic (fake score).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--generator", metavar="DIR", help="the few-step student to train (model folder)"
    )
    p.add_argument("--teacher", metavar="DIR", help="the teacher model folder (real score)")
    p.add_argument(
        "--cache", metavar="CACHE", help="teacher cache giving prompts, text embeddings and sizes"
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder")
    p.add_argument("--iterations", type=int, default=600, help="critic updates (default 600)")
    p.add_argument("--batch-size", type=int, default=1, help="videos per iteration (default 1)")
    p.add_argument("--frames", type=int, help="latent frames per rollout (default: the cache's)")
    p.add_argument("--guidance", type=float, help="the real score's CFG (default: the teacher's)")
    p.add_argument(
        "--critic-ratio",
        type=int,
        default=5,
        help="critic updates per generator update (default 5)",
    )
    p.add_argument("--lr-generator", type=float, default=2e-6, help="(default 2e-6)")
    p.add_argument("--lr-critic", type=float, default=4e-7, help="(default 4e-7)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="global norm clip (default 10)")
    p.add_argument(
        "--ema", type=float, default=0.99, help="generator EMA decay, 0: off (default 0.99)"
    )
    p.add_argument(
        "--t-min", type=float, default=20.0, help="lowest DMD noise level t (default 20)"
    )
    p.add_argument(
        "--t-max", type=float, default=980.0, help="highest DMD noise level t (default 980)"
    )
    p.add_argument(
        "--t-shift",
        type=float,
        default=1.0,
        help="shift of the DMD and critic noise levels: >1 favours noisy levels, where shape "
        "and motion are decided (default 1: uniform in [t-min, t-max])",
    )
    p.add_argument(
        "--critic-lora",
        type=int,
        default=0,
        metavar="RANK",
        help="train LoRA adapters of this rank on the critic instead of all its weights (default 0: all)",
    )
    p.add_argument(
        "--quantize-teacher",
        type=int,
        default=0,
        choices=(0, 4, 8),
        help="quantize the frozen teacher's linears to save memory (default 0: off)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="iterations between checkpoints (default 100)",
    )
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2, 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint"
    )
    p.add_argument("--until", type=int, help="stop (with a checkpoint) after this iteration")
    p.add_argument("--no-progress", action="store_true")
    return p


# Flags of one invocation, never saved to or restored from run.json.
_PER_CALL = ("resume", "until")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments; with --resume, RUN_DIR/run.json's settings are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run_json = Path(args.out) / "run.json"
    if args.resume and run_json.is_file():
        saved = json.loads(run_json.read_text(encoding="utf-8"))
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in _PER_CALL})
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""

    def body() -> int:
        train(parse_args(argv))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
