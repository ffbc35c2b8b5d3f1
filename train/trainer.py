"""A generic MLX trainer: compiled step, AdamW with warmup + cosine, gradient accumulation,
gradient checkpointing, EMA, data parallel over mx.distributed, atomic checkpoints and an
exact resume.

Precision: the trainable weights are trained as float32 masters whatever their stored dtype
(train.precision), so the optimizer state and the EMA are float32; `original_dtypes()` puts
each weight back in its own dtype for writing a model folder. A step whose loss or global
gradient norm is not finite stops the run with NonFiniteError (no checkpoint is written after
it), or with `skip_nonfinite` > 0 is skipped (no update) up to that many times.

The model is any nn.Module whose trainable parameters are what is trained (freeze the rest,
e.g. for LoRA); `loss_fn(model, batch, keys) -> scalar` gets a batch dict of arrays and one
PRNG key per sample (s2dit_mlx.rng), so a step's randomness is a function of (seed, step) only.

Determinism contract (what makes `resume` exact): the data of micro-step m are the global
samples [m B, (m + 1) B); sample n's noise is keyed by (seed, n); MLX's global generator
(dropout) is reseeded from (seed, step) before every step. A checkpoint therefore only
needs the weights, the optimizer state, the EMA and the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from s2dit_mlx import rng
from s2dit_mlx.config import ConfigBase
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.validate import check_field_types

from .checkpoint import (
    CHECKPOINTS,
    check_weights,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from .data import global_indices, local_slice
from .grad_checkpoint import enable_grad_checkpoint
from .plots import save_loss_curve, save_loss_history
from .precision import NonFiniteError, cast_like, nonfinite_names, use_float32_masters

SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation and bookkeeping settings of a run."""

    config_name: ClassVar[str] = "train config"

    steps: int = 1000  # optimizer updates
    batch_size: int = 1  # global samples per micro-batch, split evenly over processes
    accum: int = 1  # micro-batches per optimizer update
    lr: float = 1e-4
    warmup: int = 0  # linear warmup steps
    schedule: str = "cosine"  # after warmup: "cosine" (to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    ema: float = 0.0  # EMA decay of the trainable weights (e.g. 0.999); 0 disables
    grad_checkpoint: bool = False
    compile: bool = True
    checkpoint_every: int = 0  # 0: only at the end (and when stopped early)
    keep_checkpoints: int = 2  # 0 keeps all
    sample_every: int = 0  # 0: never
    seed: int = 0
    progress: bool = True
    skip_nonfinite: int = 0  # steps with a non-finite loss/gradient to skip before stopping

    def validate(self) -> None:
        """Raise S2DiTError naming the first bad setting."""
        check_field_types(self, "train config")
        for name in ("steps", "batch_size", "accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise S2DiTError(f"{name} must be a positive integer, got {v!r}")
        for name in (
            "warmup",
            "checkpoint_every",
            "keep_checkpoints",
            "sample_every",
            "seed",
            "skip_nonfinite",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise S2DiTError(f"{name} must be a non-negative integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise S2DiTError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise S2DiTError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.ema < 1:
            raise S2DiTError(f"ema decay must be in [0, 1), got {self.ema!r}")
        if self.grad_clip < 0:
            raise S2DiTError("grad_clip must be >= 0")


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Learning rate at optimizer step k (0-based): linear warmup, then cosine or constant."""

    def schedule(step: mx.array) -> mx.array:
        k = step.astype(mx.float32)
        factor = mx.array(1.0)
        if cfg.warmup > 0:
            factor = mx.minimum((k + 1) / cfg.warmup, 1.0)
        if cfg.schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup)
            progress = mx.clip((k - cfg.warmup) / span, 0.0, 1.0)
            cos = 0.5 * (1 + mx.cos(math.pi * progress))
            factor = factor * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)
        return cfg.lr * factor

    return schedule


def build_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW (bias-corrected, as in PyTorch, so early steps move by ~lr) on cfg's schedule."""
    return optim.AdamW(
        learning_rate=lr_schedule(cfg),
        betas=[cfg.beta1, cfg.beta2],
        weight_decay=cfg.weight_decay,
        bias_correction=True,
    )


def _set_leaf(tree, name: str, value: mx.array) -> None:
    """tree[a][b]... = value for a flat tree_flatten name "a.b..." (lists indexed by int)."""
    *path, last = name.split(".")
    for part in path:
        tree = tree[int(part)] if isinstance(tree, list) else tree.setdefault(part, {})
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def _copy(tree):
    return tree_map(lambda a: mx.array(a), tree)


def _select(ok: mx.array, new, old) -> None:
    """new[k] = where(ok, new[k], old[k]) for every array leaf, in place (nested dicts/lists)."""
    for k, v in list(new.items() if isinstance(new, dict) else enumerate(new)):
        if isinstance(v, mx.array):
            new[k] = mx.where(ok, v, old[k])
        elif isinstance(v, (dict, list)):
            _select(ok, v, old[k])


def _global_norm(grad) -> mx.array:
    return mx.sqrt(sum((g.astype(mx.float32).square().sum() for _, g in tree_flatten(grad)), 0.0))


class Trainer:
    """Runs, checkpoints and resumes the training of one model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, dict, mx.array], mx.array],
        data: Callable[[list[int]], dict],
        config: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        prepare: Callable[[dict, list[int]], dict] | None = None,
        sample_fn: Callable[[Trainer, int], object] | None = None,
        checkpoint_modules: Iterable[nn.Module] | None = None,
        fingerprint: dict | None = None,
        group: mx.distributed.Group | None = None,
        optimizer: optim.Optimizer | None = None,
    ):
        config.validate()
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.config = config
        self.out_dir = Path(out_dir)
        self.prepare = prepare
        self.sample_fn = sample_fn
        # Facts that must match on resume (e.g. the base model's hash for a LoRA run).
        self.fingerprint = dict(fingerprint or {})
        self.group = group or mx.distributed.init()
        self.rank, self.world_size = self.group.rank(), self.group.size()
        if config.batch_size % self.world_size:
            raise S2DiTError(
                f"batch size {config.batch_size} must be divisible by the number of "
                f"processes ({self.world_size})"
            )
        if config.grad_checkpoint:
            if checkpoint_modules is None:
                raise S2DiTError("gradient checkpointing needs the modules to checkpoint")
            enable_grad_checkpoint(checkpoint_modules)
        if not tree_flatten(model.trainable_parameters()):
            raise S2DiTError("the model has no trainable parameters")
        # Train float32 masters (float16 AdamW turns the weights into NaN); the stored dtypes
        # come back when a model folder is written (original_dtypes).
        self.saved_dtypes = use_float32_masters(model)
        # Any MLX optimizer may be passed in; by default AdamW on the config's schedule.
        self.optimizer = optimizer if optimizer is not None else build_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.ema = _copy(dict(tree_flatten(model.trainable_parameters()))) if config.ema else None
        self.step = 0
        self.losses: list[float] = []
        self.skipped: list[int] = []  # steps skipped for a non-finite loss or gradient
        self.last_checkpoint: Path | None = None
        self._step_fn = None

    # ------------------------------------------------------------------------------------------
    # The compiled step

    def _build_step(self):
        model, opt, cfg = self.model, self.optimizer, self.config
        loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        group = self.group
        skip = cfg.skip_nonfinite > 0

        def step(batch, keys, prev_grad, prev_loss, do_update):
            loss, grad = loss_and_grad(model, batch, keys)
            total = loss if prev_loss is None else prev_loss + loss
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            if not do_update:
                return total, grad, None, None
            # The loss rides along in the gradients' all-reduce, so every process sees the same
            # (global) loss and norm and takes the same decision.
            both = average_gradients({"grad": grad, "loss": total}, group=group)
            grad = both["grad"]
            if cfg.accum > 1:
                grad = tree_map(lambda g: g / cfg.accum, grad)
            if cfg.grad_clip > 0:
                grad, norm = optim.clip_grad_norm(grad, cfg.grad_clip)
            else:
                norm = _global_norm(grad)
            ok = mx.logical_and(mx.isfinite(norm), mx.isfinite(both["loss"]))
            if skip:  # keep the old weights and optimizer state when the step is bad
                old_params = model.trainable_parameters()
                old_state = tree_map(lambda a: a, opt.state)
            opt.update(model, grad)
            if skip:
                new_params = model.trainable_parameters()
                _select(ok, new_params, old_params)
                model.update(new_params)
                _select(ok, opt.state, old_state)
            return total, None, norm, ok

        if cfg.compile:
            # As mlx-lm does: the model, optimizer and random state flow in and out of the graph.
            state = [model.state, opt.state, mx.random.state]
            step = partial(mx.compile, inputs=state, outputs=state)(step)
        return step

    def _micro_batch(self, micro: int) -> tuple[dict, mx.array]:
        idx = local_slice(global_indices(micro, self.config.batch_size), self.rank, self.world_size)
        batch = self.data(idx)
        if self.prepare is not None:
            batch = self.prepare(batch, idx)
        return batch, rng.sample_keys(self.config.seed, idx)

    def _update_ema(self, ok: mx.array | None = None) -> None:
        d = self.config.ema
        params = dict(tree_flatten(self.model.trainable_parameters()))
        new = {k: d * self.ema[k] + (1 - d) * params[k] for k in self.ema}
        if ok is not None:  # a skipped step leaves the EMA as it was
            new = {k: mx.where(ok, v, self.ema[k]) for k, v in new.items()}
        self.ema = new

    def train_step(self) -> float:
        """One optimizer update (accum micro-batches); returns the mean loss over all processes.

        Raises NonFiniteError when the loss or the gradient norm is not finite (unless the
        step may be skipped: then nothing is updated and the step only counts).
        """
        if self._step_fn is None:
            self._step_fn = self._build_step()
        cfg = self.config
        mx.random.seed(rng.step_seed(cfg.seed, self.step))
        grad, total, norm, ok = None, None, None, None
        for a in range(cfg.accum):
            batch, keys = self._micro_batch(self.step * cfg.accum + a)
            total, grad, norm, ok = self._step_fn(batch, keys, grad, total, a == cfg.accum - 1)
            if grad is not None:
                mx.eval(grad, total)
        if self.ema is not None:
            self._update_ema(ok if cfg.skip_nonfinite else None)
        # The finiteness flag and the norm are scalars of this same evaluation: no extra sync.
        mx.eval(self.model.state, self.optimizer.state, total, norm, ok, self.ema or [])
        if self.world_size > 1:
            total = mx.distributed.all_sum(total, group=self.group, stream=mx.cpu)
        value = total.item() / (cfg.accum * self.world_size)
        self.step += 1
        self.losses.append(value)
        if not ok.item():
            self._nonfinite_step(value, norm.item())
        return value

    def _nonfinite_step(self, loss: float, norm: float) -> None:
        """Count a skipped step, or stop with one line naming the last good checkpoint."""
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        allowed = self.config.skip_nonfinite
        if len(self.skipped) < allowed:
            self.skipped.append(self.step)
            if self.rank == 0:
                print(
                    f"warning: step {self.step}: {what}; step skipped, weights unchanged "
                    f"({len(self.skipped)} of at most {allowed} skipped)",
                    file=sys.stderr,
                )
            return
        if self.last_checkpoint is not None:
            where = f"the last good checkpoint is {self.last_checkpoint}"
            how = "resume with --resume and a lower --lr, or --skip-nonfinite N"
        else:
            where = "no checkpoint was written yet"
            how = "try a lower --lr, or --skip-nonfinite N"
        if allowed:
            where = f"{allowed} skipped steps were allowed; {where}"
        raise NonFiniteError(f"step {self.step}: {what}; training stopped; {where} ({how})")

    # ------------------------------------------------------------------------------------------
    # Loop

    def train(self, until: int | None = None) -> list[float]:
        """Train up to step `until` (default: config.steps); returns the whole loss history."""
        cfg = self.config
        until = cfg.steps if until is None else min(until, cfg.steps)
        self.model.train()
        bar = None
        if cfg.progress and self.rank == 0 and self.step < until:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train", leave=True)
        try:
            while self.step < until:
                loss = self.train_step()
                if bar is not None:
                    lr = float(self.optimizer.learning_rate.item())
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or (
                    self.step == until
                ):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return self.losses

    def sample(self) -> None:
        """Run the user's sample function (rank 0 only) in eval mode."""
        if self.sample_fn is None or self.rank != 0:
            return
        self.model.eval()
        try:
            self.sample_fn(self, self.step)
        finally:
            self.model.train()

    @contextlib.contextmanager
    def original_dtypes(self) -> Iterator[None]:
        """Temporarily cast the trained weights back to their stored dtypes (to write a folder).

        Raises NonFiniteError naming the first weight that the cast makes non-finite (a float16
        weight beyond +-65504), so no such folder is written.
        """
        current = dict(tree_flatten(self.model.trainable_parameters()))
        cast = {k: v.astype(self.saved_dtypes[k]) for k, v in current.items()}
        changed = {k: v for k, v in cast.items() if v.dtype != current[k].dtype}
        bad = nonfinite_names(cast)
        if bad:
            raise NonFiniteError(
                f"weight {bad[0]} is not finite in {cast[bad[0]].dtype} ({len(bad)} in all; "
                "the float32 weights are in the checkpoint); the model folder was not written"
            )
        self.model.load_weights(list(changed.items()), strict=False)
        try:
            yield
        finally:
            self.model.load_weights([(k, current[k]) for k in changed], strict=False)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        current = list(tree_flatten(self.model.trainable_parameters()))
        self.model.load_weights(list(self.ema.items()), strict=False)
        try:
            yield
        finally:
            self.model.load_weights(current, strict=False)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        """The JSON part of a checkpoint."""
        cfg = self.config
        return {
            "step": self.step,
            "seed": cfg.seed,
            "samples_seen": self.step * cfg.accum * cfg.batch_size,
            "world_size": self.world_size,
            "rng": "counter-based: noise keyed by (seed, sample index), dropout by (seed, step)",
            "loss_history": self.losses,
            "skipped_steps": self.skipped,
            "weights": "float32 masters",
            "config": cfg.to_dict(),
            "fingerprint": self.fingerprint,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0), the loss history and the loss curve; all ranks wait.

        Raises NonFiniteError (on every rank: they hold the same weights) instead of writing
        a checkpoint whose weights, optimizer state or EMA hold a NaN or an infinity.
        """
        path = None
        arrays = {
            "model": dict(tree_flatten(self.model.trainable_parameters())),
            "optimizer": dict(tree_flatten(self.optimizer.state)),
        }
        if self.ema is not None:
            arrays["ema"] = self.ema
        for stem, weights in arrays.items():
            bad = nonfinite_names(weights)
            if bad:
                where = self.last_checkpoint or "none was written yet"
                raise NonFiniteError(
                    f"step {self.step}: {stem} weight {bad[0]} is not finite ({len(bad)} in "
                    f"all); training stopped without writing a checkpoint; the last good "
                    f"checkpoint: {where} (try a lower --lr)"
                )
        if self.rank == 0:
            path = save_checkpoint(
                self.out_dir, self.step, arrays, self.state_dict(), self.config.keep_checkpoints
            )
            save_loss_history(self.losses, self.out_dir / "loss.json")
            save_loss_curve(self.losses, self.out_dir / "loss.png")
        if self.world_size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group, stream=mx.cpu))
        # Every process knows it, for the message of a later non-finite stop.
        self.last_checkpoint = self.out_dir / CHECKPOINTS / step_dir_name(self.step)
        return path

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load `path` or the run folder's latest checkpoint; False when there is none."""
        ckpt = Path(path) if path is not None else latest_checkpoint(self.out_dir)
        if ckpt is None:
            return False
        arrays, state = load_checkpoint(ckpt)
        where = f"checkpoint {ckpt}"
        cfg = self.config
        saved = state.get("config", {})
        for name in ("batch_size", "accum", "seed"):
            if name in saved and saved[name] != getattr(cfg, name):
                raise S2DiTError(
                    f"{where} was trained with {name}={saved[name]}, this run asks for "
                    f"{getattr(cfg, name)}; resume with the same value"
                )
        for k, v in self.fingerprint.items():
            got = state.get("fingerprint", {}).get(k)
            if got is not None and got != v:
                raise S2DiTError(f"{where} does not match this run: {k} differs ({got} vs {v})")
        if "model" not in arrays or "optimizer" not in arrays:
            raise S2DiTError(f"{where} is incomplete (model or optimizer weights missing)")
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        check_weights(arrays["model"], expected, where)
        opt_expected = dict(tree_flatten(self.optimizer.state))
        check_weights(
            {k: v for k, v in arrays["optimizer"].items() if k in opt_expected},
            opt_expected,
            where + " optimizer state",
        )
        if self.ema is not None and "ema" in arrays:
            check_weights(arrays["ema"], expected, where + " EMA")
        # Earlier versions stored the weights and state in the model's own dtype (e.g.
        # float16): cast them to the float32 masters'.
        arrays["model"] = cast_like(arrays["model"], expected)
        arrays["optimizer"] = cast_like(arrays["optimizer"], opt_expected)
        if "ema" in arrays:
            arrays["ema"] = cast_like(arrays["ema"], expected)
        for stem in (
            ("model", "optimizer", "ema") if self.ema is not None else ("model", "optimizer")
        ):
            bad = nonfinite_names(arrays.get(stem, {}))
            if bad:
                raise NonFiniteError(
                    f"{where} holds non-finite values ({stem} weight {bad[0]}, {len(bad)} in "
                    "all) and cannot be resumed; start a new run (earlier versions wrote NaN "
                    "checkpoints when fully fine-tuning a float16 model)"
                )
        self.model.load_weights(list(arrays["model"].items()), strict=False)
        # Set the leaves in place: a compiled step holds a reference to the state tree, and
        # the tree keeps entries (empty dicts) that tree_flatten does not write out.
        for name, value in arrays["optimizer"].items():
            _set_leaf(self.optimizer.state, name, value)
        if self.ema is not None:
            self.ema = dict(arrays["ema"]) if "ema" in arrays else _copy(dict(arrays["model"]))
        self.step = int(state["step"])
        self.losses = [float(x) for x in state.get("loss_history", [])][: self.step]
        self.skipped = [int(s) for s in state.get("skipped_steps", []) if int(s) <= self.step]
        self.last_checkpoint = ckpt
        mx.eval(self.model.parameters(), self.optimizer.state, self.ema or [])
        return True


def write_run_config(out_dir: str | os.PathLike, data: dict) -> Path:
    """Save the run's settings (e.g. CLI arguments) as RUN_DIR/run.json."""
    path = Path(out_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".run.json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
