"""`python -m train.dit`: flow-matching training of an S2DiT, full or LoRA, on one or many processes.

Outputs in RUN_DIR:
    run.json                  the settings of the run (--resume reads them back)
    init/                     the starting model folder, when training from --config
    checkpoints/step-*/       atomic checkpoints; checkpoints/latest names the newest
    loss.json, loss.png       loss per step and its curve
    samples/step-*.gif        periodic sample videos (--sample-every)
    model/                    final model folder (full training; EMA weights with --ema),
                              each weight in the dtype it was loaded in (float16 stays float16)
    adapters/                 final LoRA adapter (adapters.safetensors + adapter_config.json)

Training runs on float32 master weights and optimizer state whatever the folder's dtype. A NaN or
infinite loss or gradient norm stops the run with one `error:` line and exit code 2, keeping the
last checkpoint (nothing is saved from the bad step); --skip-nonfinite N skips such steps instead.

RUN_DIR must be new, empty, or a run folder s2dit-mlx wrote (.s2dit marker; earlier versions:
run.json or checkpoints/), and may not be, contain or lie inside --model or --config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from s2dit_mlx.cli_args import (
    Parser,
    decay,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    text,
)
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.fsutil import check_run_dir, mark_run_dir
from s2dit_mlx.sampling import few_step_timesteps

from .checkpoint import latest_checkpoint
from .data import VideoEncoder, load_source
from .flow import T_DISTS, FlowConfig, FlowModel, make_flow_loss
from .kd import make_ode_loss
from .lora import DEFAULT_LAYERS, LoRAConfig, apply_lora, save_adapters, weights_hash
from .palette import PALETTE_BITS, palette_aware_loss, palette_targets, snap_weights
from .trainer import SCHEDULES, TrainConfig, Trainer, write_run_config

EPILOG = """\
examples:
  # LoRA on the moving-shapes data, starting from a model folder
  python -m train.dit --model models/tiny --data shapes --out runs/lora \\
      --lora --rank 8 --alpha 16 --layers "self_attn.q,self_attn.k,cross_attn.*" --steps 500

  # full training from a config (random init), streaming objective, EMA, checkpoints
  python -m train.dit --config my_config.json --data shapes --out runs/full \\
      --mode streaming --steps 2000 --batch-size 8 --ema 0.999 --checkpoint-every 200

  # continue exactly where the last checkpoint left off (settings come from run.json)
  python -m train.dit --out runs/full --resume

  # data parallel on 2 local processes (ring backend); --batch-size is the global batch
  mlx.launch --backend ring -n 2 -- python -m train.dit --model DIR --out runs/dp --batch-size 8

--data takes "shapes" or "package.module:function"; the function is called with any of
seed, frames, height, width it accepts and returns source(indices) -> {"video": [B,F,H,W,3]
in [-1, 1], "captions": [...]} or {"latents": [B,T,h,w,C], "context": [B,L,D]}.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.dit`."""
    p = Parser(
        prog="python -m train.dit",
        description="Train an S2DiT with flow matching (full or LoRA), with exact resume.",
        epilog=EPILOG,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="start from this model folder or Hugging Face id")
    g.add_argument(
        "--config",
        metavar="JSON",
        help="model-folder config.json (dit, vae, text_encoder, defaults) to train from scratch; "
        "files a component needs (a umT5 tokenizer) are read from the folder beside it",
    )
    g.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run folder (checkpoints, plots, samples, result)",
    )

    g.add_argument(
        "--init-from",
        metavar="TEACHER",
        help="with --config: take the VAE and text encoder of this teacher model folder, and "
        "initialise the DiT from the teacher's by parameter name (writes RUN_DIR/init_report.json)",
    )
    g.add_argument(
        "--layer-map",
        default="uniform",
        metavar="MAP",
        help="which teacher block each student block reads with --init-from: uniform, first, "
        "or teacher block indices like 0,6,12",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="shapes",
        metavar="SOURCE",
        help="'shapes', 'cache:DIR' (a teacher cache of train.teacher_cache: its x0 and text "
        "context) or 'package.module:function'",
    )
    g.add_argument(
        "--frames",
        type=positive_int,
        metavar="N",
        help="pixel frames per clip (1 + 4k for a 4x VAE; default: the model's)",
    )
    g.add_argument(
        "--height", type=positive_int, metavar="N", help="clip height in pixels (default: model's)"
    )
    g.add_argument(
        "--width", type=positive_int, metavar="N", help="clip width in pixels (default: model's)"
    )
    g.add_argument(
        "--caption-dropout",
        type=probability,
        metavar="X",
        default=0.1,
        help="probability of an empty caption, for classifier-free guidance",
    )

    g = p.add_argument_group("objective")
    g.add_argument(
        "--objective",
        choices=("flow", "ode"),
        default="flow",
        help="flow: flow matching on the clips (or a teacher cache's x0: many-step KD); ode: "
        "causal ODE regression on a teacher cache's trajectories at the few-step points of "
        "--ode-steps/--ode-shift (the few-step initialisation; the saved model samples few-step "
        "without guidance)",
    )
    g.add_argument(
        "--ode-steps",
        type=positive_int,
        default=4,
        metavar="N",
        help="with --objective ode: the student's few-step count",
    )
    g.add_argument(
        "--ode-shift",
        type=positive_float,
        metavar="S",
        help="with --objective ode: the student's timestep shift (default: the teacher cache's)",
    )
    g.add_argument(
        "--mode",
        choices=("bidirectional", "streaming"),
        help="bidirectional, or streaming (block-causal, per-chunk noise); default: model's mode",
    )
    g.add_argument(
        "--t-dist", choices=T_DISTS, default="logit_normal", help="law of the drawn noise levels"
    )
    g.add_argument(
        "--shift",
        type=positive_float,
        metavar="X",
        default=1.0,
        help="timestep shift of drawn levels (1: none)",
    )
    g.add_argument(
        "--clean-context-prob",
        type=probability,
        metavar="X",
        default=0.25,
        help="streaming: probability of clean (t=0) leading chunks",
    )
    g.add_argument(
        "--recycle-prob",
        type=probability,
        metavar="X",
        default=0.0,
        help="streaming: probability that a clean context is replaced by the model's own "
        "prediction of it (error recycling, meant against drift in long streams; one more "
        "gradient-free forward pass per step) (default 0: off)",
    )
    g.add_argument(
        "--recycle-max-sigma",
        type=probability,
        metavar="X",
        default=0.5,
        help="recycled context chunks are predicted from noise levels uniform in [0, X], X > 0",
    )
    g.add_argument(
        "--motion-weight",
        type=non_negative_float,
        metavar="A",
        default=0.0,
        help="weight each latent position's error by 1 + A x (how much the clean latent changes "
        "there between frames, over its mean), so moving objects count more than the static "
        "background (default 0: plain MSE)",
    )
    g.add_argument(
        "--object-weight",
        type=non_negative_float,
        metavar="B",
        default=0.0,
        help="add B x (how far the clean latent is from its frame's background there, over its "
        "mean) to those weights, so an object counts more than the background even once it "
        "has stopped (default 0)",
    )
    g.add_argument(
        "--train-text-encoder", action="store_true", help="train the text encoder jointly"
    )

    g = p.add_argument_group("Core ML palette")
    g.add_argument(
        "--palette-bits",
        type=non_negative_int,
        metavar="N",
        default=0,
        help="train through a 2^N-value k-means palette per weight (straight-through), N in "
        "1..8, and save the snapped weights, so `export coreml --compress paletteN` is exact "
        "(default 0: off; a fine-tune of a few hundred steps at a low lr suits it)",
    )

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    g.add_argument("--rank", type=positive_int, metavar="N", default=8, help="LoRA rank")
    g.add_argument(
        "--alpha",
        type=positive_float,
        metavar="X",
        default=16.0,
        help="LoRA alpha; update scale = alpha / rank",
    )
    g.add_argument(
        "--lora-dropout",
        type=decay,
        metavar="X",
        default=0.0,
        help="dropout on the adapter input, in [0, 1)",
    )
    g.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        metavar="PATTERNS",
        help="comma-separated layer patterns (fnmatch, per block)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--steps", type=positive_int, metavar="N", default=1000, help="optimizer updates"
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        default=4,
        help="global clips per micro-batch (all processes together)",
    )
    g.add_argument(
        "--accum", type=positive_int, metavar="N", default=1, help="micro-batches per update"
    )
    g.add_argument(
        "--lr", type=positive_float, metavar="X", default=1e-4, help="peak learning rate"
    )
    g.add_argument(
        "--warmup", type=non_negative_int, metavar="N", default=0, help="linear warmup steps"
    )
    g.add_argument(
        "--schedule", choices=SCHEDULES, default="cosine", help="learning rate after warmup"
    )
    g.add_argument(
        "--min-lr-ratio",
        type=probability,
        metavar="X",
        default=0.0,
        help="cosine floor as a fraction of --lr",
    )
    g.add_argument(
        "--weight-decay",
        type=non_negative_float,
        metavar="X",
        default=0.0,
        help="AdamW weight decay",
    )
    g.add_argument(
        "--grad-clip",
        type=non_negative_float,
        metavar="X",
        default=1.0,
        help="global gradient norm clip (0: off)",
    )
    g.add_argument(
        "--ema", type=decay, metavar="X", default=0.0, help="EMA decay, e.g. 0.999 (0: off)"
    )
    g.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute each block's activations in the backward pass (less memory)",
    )
    g.add_argument("--no-compile", action="store_true", help="run the step eagerly")
    g.add_argument(
        "--skip-nonfinite",
        type=non_negative_int,
        metavar="N",
        default=0,
        help="skip up to N steps whose loss or gradient is NaN/inf (no update) before stopping; "
        "by default the first one stops the run with an error, keeping the last checkpoint",
    )
    g.add_argument(
        "--seed",
        type=non_negative_int,
        metavar="N",
        default=0,
        help="seed of data order, noise and init",
    )

    g = p.add_argument_group("bookkeeping")
    g.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        metavar="N",
        default=0,
        help="steps between checkpoints (0: only at the end and when stopped)",
    )
    g.add_argument(
        "--keep", type=non_negative_int, metavar="N", default=2, help="checkpoints to keep (0: all)"
    )
    g.add_argument(
        "--sample-every",
        type=non_negative_int,
        metavar="N",
        default=0,
        help="steps between sample videos (0: none)",
    )
    g.add_argument(
        "--sample-prompt",
        action="append",
        type=text,
        metavar="TEXT",
        help="prompt for sample videos (repeatable; default: a red circle moving left)",
    )
    g.add_argument(
        "--sample-steps",
        type=positive_int,
        metavar="N",
        help="denoising steps of samples (default: the model's)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR's latest checkpoint"
    )
    g.add_argument(
        "--until",
        type=positive_int,
        metavar="N",
        help="stop (with a checkpoint) after this step, keeping the schedule of --steps",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# Flags that describe one invocation, not the run: never saved to or restored from run.json.
_PER_CALL = ("resume", "until")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_json = out / "run.json"
    if args.resume and run_json.is_file():
        # Saved settings become the defaults; flags given now still win.
        saved = _read_run_json(run_json)
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k not in _PER_CALL})
        args = parser.parse_args(argv)
    elif args.resume and not (args.model or args.config):
        why = "it has no run.json" if out.is_dir() else "it does not exist"
        raise S2DiTError(
            f"nothing to resume in {out}: {why} (start a run with --model DIR or --config JSON)"
        )
    return args


def _read_run_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = " ".join(str(err).split())
        raise S2DiTError(f"cannot resume: {path} is unreadable ({msg})") from None
    if not isinstance(saved, dict):
        raise S2DiTError(f"cannot resume: {path} must hold a JSON object")
    return saved


def _build_from_config(path: str, seed: int):
    """Random-initialised (dit, vae, text_encoder, defaults) from a model-folder config.json.

    Component folders beside the config (vae/, text_encoder/) complete it as in a model folder;
    files a component keeps there (the umT5 tokenizer.json) are read from them.
    """
    from s2dit_mlx.loading import build_model, read_json

    where = f"config {path}"
    folder = Path(path).parent
    mx.random.seed(seed)
    dit, vae, text_encoder, defaults = build_model(read_json(Path(path), where), where, folder)
    for kind, module in (("vae", vae), ("text_encoder", text_encoder)):
        if hasattr(module, "load_assets"):
            try:
                module.load_assets(folder / kind)
            except S2DiTError as err:
                raise S2DiTError(
                    f"{where}: {err} (it is read from the {kind}/ folder beside the config: "
                    "copy that folder there, or start from the model folder with --model)"
                ) from None
    mx.eval(dit.parameters(), vae.parameters(), text_encoder.parameters())
    return dit, vae, text_encoder, defaults


def _load_components(args: argparse.Namespace):
    """(dit, vae, text_encoder, defaults, base id, init) without writing anything.

    `init` is the folder a model built from --config must be saved to before training (None
    when nothing is to be saved: --model, or a resumed run whose init/ exists).
    """
    from s2dit_mlx.loading import load_model

    if args.model:
        b = load_model(args.model)
        return b.dit, b.vae, b.text_encoder, b.defaults, str(args.model), None
    init = Path(args.out) / "init"
    if (init / "config.json").is_file():
        b = load_model(init)
        return b.dit, b.vae, b.text_encoder, b.defaults, str(init), None
    # Every process builds the same random start (same seed); rank 0 saves it once checked.
    if args.init_from:
        dit, vae, te, defaults = _student_from_teacher(args)
    else:
        dit, vae, te, defaults = _build_from_config(args.config, args.seed)
    return dit, vae, te, defaults, str(init), init


def _student_from_teacher(args: argparse.Namespace):
    """A student DiT from --config's "dit" entry, initialised from --init-from by name, with
    the teacher's VAE, text encoder and defaults (the latents and text a cache was made in)."""
    from s2dit_mlx.loading import build_dit, load_model, read_json
    from s2dit_mlx.transfer import init_from

    where = f"config {args.config}"
    cfg = read_json(Path(args.config), where)
    teacher = load_model(args.init_from)
    mx.random.seed(args.seed)
    dit = build_dit(cfg.get("dit", cfg), where)
    report = init_from(dit, teacher.dit, _layer_map(args.layer_map))
    args._init_report = report  # written into the run folder once every check passed
    mx.eval(dit.parameters())
    return dit, teacher.vae, teacher.text_encoder, dict(teacher.defaults)


def _layer_map(text: str):
    """'uniform', 'first' or comma-separated teacher block indices."""
    if text in ("uniform", "first"):
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise S2DiTError(
            f"--layer-map takes uniform, first or teacher block indices like 0,6,12; got {text!r}"
        ) from None


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model; S2DiTError before anything is loaded or written."""
    if bool(args.model) == bool(args.config):
        raise S2DiTError("give exactly one of --model DIR or --config JSON")
    if args.init_from and not args.config:
        raise S2DiTError("--init-from initialises a new student: give it with --config JSON")
    if args.objective == "ode" and not args.data.startswith("cache:"):
        raise S2DiTError(
            "--objective ode regresses a teacher cache's trajectories: --data cache:DIR"
        )
    if args.objective == "ode" and (args.lora or args.palette_bits or args.train_text_encoder):
        raise S2DiTError(
            "--objective ode trains all DiT weights (not with --lora, --palette-bits "
            "or --train-text-encoder)"
        )
    if args.palette_bits and (args.lora or args.palette_bits not in PALETTE_BITS):
        raise S2DiTError("--palette-bits takes 1..8 and trains all weights (not with --lora)")
    if args.lora:
        _lora_config(args).validate()
    _train_config(args).validate()


def _check_sizes(dit, vae, frames: int, height: int, width: int) -> None:
    """Clip sizes the VAE and the DiT take: frames tf k + 1, sides multiples of the grid."""
    tf = vae.temporal_factor
    if frames < 1 or (frames - 1) % tf:
        examples = ", ".join(str(1 + tf * k) for k in range(1, 5))
        raise S2DiTError(
            f"frames {frames} (--frames) must be {tf}k + 1 for the model's VAE ({examples}, ...)"
        )
    multiple = vae.spatial_factor * dit.args.spatial_multiple()
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            low = value // multiple * multiple
            near = f"{low} or {low + multiple}" if low else f"{multiple}"
            raise S2DiTError(
                f"{name} {value} (--{name}) is not divisible by {multiple} (VAE factor "
                f"{vae.spatial_factor} x patch x SSA stride); try {near}"
            )


def _check_source(source, spec: str, frames: int, height: int, width: int, in_dim: int) -> None:
    """Draw sample 0 once: the source must give what the trainer reads, at the run's sizes."""
    try:
        batch = source([0])
    except Exception as err:  # the user's code: one line, before the run folder exists
        msg = " ".join(str(err).split()) or type(err).__name__
        raise S2DiTError(
            f"data source {spec!r} failed on sample 0 ({type(err).__name__}: {msg})"
        ) from None
    expected = '{"video", "captions"} or {"latents", "context" (or "ids")}'
    if not isinstance(batch, dict):
        raise S2DiTError(
            f"data source {spec!r} returned an object of type {type(batch).__name__}; expected "
            f"a dict {expected}"
        )
    if "latents" in batch:
        shape = tuple(getattr(batch["latents"], "shape", ()))
        if len(shape) != 5 or shape[-1] != in_dim or not ({"context", "ids"} & batch.keys()):
            raise S2DiTError(
                f'data source {spec!r} gave "latents" of shape {shape} with keys '
                f'{sorted(batch)}; expected [B, T, h, w, {in_dim}] latents and a "context" '
                '(or token "ids")'
            )
    elif "video" in batch and "captions" in batch:
        shape = tuple(getattr(batch["video"], "shape", ()))
        if shape[1:] != (frames, height, width, 3):
            raise S2DiTError(
                f"data source {spec!r} gave clips of shape {shape}; the run needs "
                f"[B, {frames}, {height}, {width}, 3] (--frames, --height, --width)"
            )
    else:
        raise S2DiTError(
            f"data source {spec!r} gave a dict with keys {sorted(batch)}; expected {expected}"
        )


def _lora_config(args: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(args.rank, args.alpha, args.lora_dropout, args.layers)


def _flow_config(args: argparse.Namespace, mode: str) -> FlowConfig:
    return FlowConfig(
        mode=mode,
        t_dist=args.t_dist,
        shift=args.shift,
        clean_context_prob=args.clean_context_prob,
        recycle_prob=args.recycle_prob,
        recycle_max_sigma=args.recycle_max_sigma,
        motion_weight=args.motion_weight,
        object_weight=args.object_weight,
    )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        accum=args.accum,
        lr=args.lr,
        warmup=args.warmup,
        schedule=args.schedule,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema=args.ema,
        grad_checkpoint=args.grad_checkpoint,
        compile=not args.no_compile,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep,
        sample_every=args.sample_every,
        seed=args.seed,
        progress=not args.no_progress,
        skip_nonfinite=args.skip_nonfinite,
    )


def _sample_fn(args, vae, text_encoder, defaults, size, mode):
    from s2dit_mlx.pipeline import Pipeline
    from s2dit_mlx.video_io import write_video

    prompts = args.sample_prompt or ["a red circle moving left on a black background"]

    def sample(trainer: Trainer, step: int) -> None:
        frames, height, width = size
        dit = trainer.model.dit
        te = trainer.model.text_encoder if trainer.model.trains_text_encoder else text_encoder
        out = Path(args.out) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with trainer.ema_weights():
            pipe = Pipeline(dit, vae, te, defaults=defaults)
            for i, prompt in enumerate(prompts):
                video = pipe.generate(
                    prompt,
                    frames=frames,
                    height=height,
                    width=width,
                    steps=args.sample_steps,
                    mode=mode,
                    seed=i,
                )
                write_video(out / f"step-{step:07d}-{i}.gif", video, fps=defaults["fps"])

    return sample


def run(args: argparse.Namespace) -> Trainer:
    """Build everything from parsed arguments and train; returns the finished Trainer.

    Every setting, the model, the sizes and the data source are checked before the run folder
    is written to.
    """
    group = mx.distributed.init()
    rank, world_size = group.rank(), group.size()
    _check_args(args)
    inputs = [("model folder", args.model), ("config file", args.config)]
    out = check_run_dir(args.out, inputs=inputs)
    if not args.resume and latest_checkpoint(out) is not None:
        raise S2DiTError(
            f"{out} already holds checkpoints; pass --resume to continue or choose another --out"
        )
    dit, vae, text_encoder, defaults, base_id, new_init = _load_components(args)
    frames = args.frames or defaults["frames"]
    height = args.height or defaults["height"]
    width = args.width or defaults["width"]
    mode = args.mode or defaults["mode"]
    _check_sizes(dit, vae, frames, height, width)
    flow_cfg = _flow_config(args, mode)
    flow_cfg.validate()
    source = load_source(args.data, seed=args.seed, frames=frames, height=height, width=width)
    _check_source(source, args.data, frames, height, width, dit.args.in_dim)
    ode_positions = None
    if args.data.startswith("cache:"):
        # A teacher's outputs already carry its guidance: the student samples without CFG.
        defaults = {**defaults, "guidance": 1.0}
    if args.objective == "ode":
        # The student's few-step points must lie on the teacher's kept steps.
        spec = source.cache.spec
        shift = args.ode_shift if args.ode_shift is not None else spec.shift
        points = few_step_timesteps(args.ode_steps, shift)
        ode_positions = source.cache.check_points(points)
        defaults = {**defaults, "solver": "few-step", "steps": args.ode_steps, "shift": shift,
                    "guidance": 1.0, "mode": "streaming"}  # fmt: skip

    # All checked: from here on the run folder is written.
    if new_init is not None:
        from s2dit_mlx.loading import save_model

        # Persist the random start, so a resume (or another process) sees the same frozen parts.
        if rank == 0:
            mark_run_dir(out, "train.dit")
            save_model(new_init, dit, vae, text_encoder, defaults=defaults)
            report = getattr(args, "_init_report", None)
            if report is not None:
                report.save(out / "init_report.json")
        if world_size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), stream=mx.cpu))

    fingerprint = {"lora": bool(args.lora), "train_text_encoder": bool(args.train_text_encoder)}
    lora_cfg = None
    if args.palette_bits:
        fingerprint["palette_bits"] = args.palette_bits
    if args.lora:
        lora_cfg = _lora_config(args)
        fingerprint["base_sha256"] = weights_hash(dit)
        mx.random.seed(args.seed)  # adapter init (lora_a) depends on the seed only
        apply_lora(dit, lora_cfg)
    else:
        dit.unfreeze()
    text_encoder.freeze()
    vae.freeze()
    if args.train_text_encoder:
        text_encoder.unfreeze()
    model = FlowModel(dit, text_encoder if args.train_text_encoder else None)

    train_cfg = _train_config(args)
    if ode_positions is not None:
        loss_fn = make_ode_loss(ode_positions, source.cache.spec)
    else:
        loss_fn = make_flow_loss(flow_cfg)
    if args.palette_bits:
        loss_fn = palette_aware_loss(loss_fn, args.palette_bits, palette_targets(dit))
    prepare = VideoEncoder(
        vae,
        text_encoder,
        train_text_encoder=args.train_text_encoder,
        caption_dropout=args.caption_dropout,
        seed=args.seed,
    )
    trainer = Trainer(
        model,
        loss_fn,
        source,
        train_cfg,
        out,
        prepare=prepare,
        sample_fn=_sample_fn(args, vae, text_encoder, defaults, (frames, height, width), mode),
        checkpoint_modules=dit.blocks,
        fingerprint=fingerprint,
        group=group,
    )
    if rank == 0:
        mark_run_dir(out, "train.dit")
        saved = {
            k: v for k, v in vars(args).items() if k not in _PER_CALL and not k.startswith("_")
        }
        write_run_config(out, saved)
        n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        n_all = sum(v.size for _, v in tree_flatten(model.parameters()))
        what = "DiT and text-encoder" if args.train_text_encoder else "DiT"
        print(
            f"training {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M {what} parameters "
            f"({'LoRA' if args.lora else 'full'}, {mode}) on {world_size} process(es)",
            file=sys.stderr,
        )
    if args.resume:
        if trainer.resume():
            if rank == 0:
                print(f"resumed from {trainer.last_checkpoint}", file=sys.stderr)
        elif rank == 0:
            print(f"no checkpoint in {out}; starting from step 0", file=sys.stderr)
    trainer.train(until=args.until)
    if rank == 0 and trainer.step == train_cfg.steps:
        _export(trainer, args, lora_cfg, vae, text_encoder, defaults, base_id, fingerprint)
    return trainer


def _export(trainer, args, lora_cfg, vae, text_encoder, defaults, base_id, fingerprint) -> None:
    from s2dit_mlx.loading import save_model

    out = Path(args.out)
    dit = trainer.model.dit
    te = trainer.model.text_encoder if trainer.model.trains_text_encoder else text_encoder
    with trainer.ema_weights():
        if args.palette_bits:  # the saved model is the one the forward pass trained
            snap_weights(dit, args.palette_bits, palette_targets(dit))
        # Trained as float32 masters; written in the dtype each weight was loaded in.
        with trainer.original_dtypes():
            if lora_cfg is not None:
                path = save_adapters(
                    out / "adapters", dit, lora_cfg, base_id, fingerprint.get("base_sha256", "")
                )
            else:
                path = save_model(out / "model", dit, vae, te, defaults=defaults)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""

    def body() -> None:
        run(_parse(argv))

    return run_cli(body, interrupted="interrupted (the last checkpoint is intact; use --resume)")


if __name__ == "__main__":
    sys.exit(main())
