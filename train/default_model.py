"""`python -m train.default_model`: train the built-in teacher model from nothing.

The same code paths a user runs on a real teacher, at a size a 2-core CPU trains in under two
hours, on the procedural moving-shapes world (s2dit_mlx.world.shapes):

1. a Unigram tokenizer (`tokenizers`) with one piece per word of every caption the world can
   produce (--tokenizer words, as the shipped model), or trained on them by tokenizers'
   UnigramTrainer (--tokenizer unigram, the earlier model's; it cuts captions);
2. a small VAE (train.vae; the causal patch VAE with MLP blocks by default, or --vae-arch wan
   for the Wan architecture at a small width), unless --vae names a trained one;
3. the latents of N training clips, encoded once and cached;
4. the streaming S2DiT sandwich (LCHA + SSA) and a small umT5 text encoder, trained jointly
   with the diffusion-forcing flow objective (train.dit);
5. the model folder, weights in float16, copied to s2dit_mlx/assets/teacher (--install).

    python -m train.default_model --out runs/default --install

The shipped model is one run and twelve continuations (--init) of it, on the shipped VAE
(this recipe's VAE stage), and the average of the last two (train.average); about 7 h 7 min
on 2 CPU cores and 13 minutes on one H100 (MLX's CUDA backend, g2 and g3). The first three
runs predate --background-dropout; w5 and the GPU runs train on 5 s clips, whose motions
stop after 2 s; g4 and g6, back on 2 s clips, bring the motion back, g9, on both, the long
streams, m1, with the motion-weighted loss, the motion, o1 and o2, with the object weight as
well, the 10 s coherence, and their average keeps o1's motion and most of o2's coherence
(docs/default-model.md):

    python -m train.default_model --out runs/w1 --vae s2dit_mlx/assets/teacher/vae \
        --background-dropout 0
    python -m train.default_model --out runs/w2 --init runs/w1/model --seed 1 --steps 2500 \
        --lr 5e-4 --background-dropout 0
    python -m train.default_model --out runs/w3 --init runs/w2/model --seed 2 --steps 2200 \
        --lr 5e-4 --ema 0.999 --background-dropout 0
    python -m train.default_model --out runs/w4 --init runs/w3/model --seed 3 --steps 600 \
        --lr 2e-4 --ema 0.99
    python -m train.default_model --out runs/w5 --init runs/w4/model --seed 4 --clip-frames 81 \
        --batch-size 8 --steps 2600 --lr 3e-4 --ema 0.999 --stream-sink 0
    python -m train.default_model --out runs/g2 --init runs/w5/model --sink 1 --stream-sink 0 \
        --seed 20 --clips 16000 --clip-frames 81 --workers 14 --batch-size 64 --steps 2500 \
        --lr 4e-4 --ema 0.999
    mkdir -p runs/g3 && cp runs/g2/latents.npz runs/g3/
    python -m train.default_model --out runs/g3 --init runs/g2/model --sink 1 --stream-sink 0 \
        --seed 21 --clips 16000 --clip-frames 81 --batch-size 64 --steps 3800 --lr 3e-4 \
        --ema 0.999
    python -m train.default_model --out runs/g4 --init runs/g3/model --sink 1 --stream-sink 0 \
        --seed 22 --clips 4000 --clip-frames 33 --batch-size 8 --steps 1500 --lr 1e-4 \
        --ema 0.999
    python -m train.default_model --out runs/g6 --init runs/g4/model --sink 1 --stream-sink 0 \
        --seed 24 --clips 8000 --clip-frames 33 --batch-size 8 --steps 2500 --lr 1e-4 \
        --ema 0.999 --t-shift 3
    mkdir -p runs/g9 && cp runs/w5/latents.npz runs/g9/long_latents.npz
    python -m train.default_model --out runs/g9 --init runs/g6/model --sink 1 --stream-sink 0 \
        --seed 27 --clips 8000 --clip-frames 33 --long-clips 4000 --long-every 3 \
        --batch-size 8 --steps 2000 --lr 1e-4 --ema 0.999 --t-shift 3
    python -m train.default_model --out runs/m1 --init runs/g9/model --sink 1 --stream-sink 0 \
        --seed 30 --clips 8000 --clip-frames 33 --long-clips 4000 --long-every 3 \
        --batch-size 8 --steps 2000 --lr 1e-4 --ema 0.999 --t-shift 3 --motion-weight 2
    python -m train.default_model --out runs/o1 --init runs/m1/model --sink 1 --stream-sink 0 \
        --seed 31 --clips 8000 --clip-frames 33 --long-clips 4000 --long-every 3 \
        --batch-size 8 --steps 2000 --lr 1e-4 --ema 0.999 --t-shift 3 --motion-weight 2 \
        --object-weight 2
    python -m train.default_model --out runs/o2 --init runs/o1/model --sink 1 --stream-sink 0 \
        --seed 32 --clips 8000 --clip-frames 33 --long-clips 4000 --long-every 2 \
        --batch-size 8 --steps 2000 --lr 1e-4 --ema 0.999 --t-shift 3 --motion-weight 2 \
        --object-weight 3
    python -m train.average runs/o2/model runs/o1/model --weights 0.7 0.3 \
        --out s2dit_mlx/assets/teacher --overwrite

From w5 on, runs train with one sink chunk and stream without it (--stream-sink 0 writes only
the saved folder's layout): 10 s streams stay coherent longer (docs/default-model.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from s2dit_mlx import rng
from s2dit_mlx.cli_args import (
    Parser,
    decay,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.fsutil import check_run_dir, mark_run_dir
from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_component, load_model, save_model
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
from s2dit_mlx.models.umt5 import UMT5Config, UMT5TextEncoder
from s2dit_mlx.tokenizer import Tokenizer, train_tokenizer, word_tokenizer
from s2dit_mlx.world.shapes import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    ShapesDataset,
    caption,
    parse_prompt,
)

from .palette import PALETTE_BITS

LATENTS_ENV = "S2DIT_DEFAULT_LATENTS"
BACKGROUND_DROPOUT_ENV = "S2DIT_DEFAULT_BACKGROUND_DROPOUT"
LONG_MIX_ENV = "S2DIT_DEFAULT_LONG_MIX"  # JSON {"path", "every", "batch"} of --long-clips
SIZE, FPS, CLIP_FRAMES = 64, 16, 33  # 64x64, 2-second training clips (9 latent frames)

DEFAULTS = {
    "height": SIZE,
    "width": SIZE,
    "frames": CLIP_FRAMES,
    "fps": FPS,
    # Not distilled: each chunk is integrated by Euler, an ODE solver (benchmarks/quality.py on
    # the w4 model: the few-step re-noising sampler of distilled students gives 31% all
    # three right and 33% 10 s coherence, Euler 37.5% and 54%). Euler, not UniPC (the same
    # within one clip in 40 prompts), so the Core ML app loop computes the same thing. CFG 3
    # and shift 3 beat CFG 8 and shift 1 on motion (an earlier checkpoint, 40 prompts: 82.5%
    # against 47.5%).
    "steps": 16,
    "shift": 3.0,
    "guidance": 3.0,
    "negative_prompt": "",
    "mode": "streaming",
    "solver": "euler",
    # float16 weights (half the download), float32 compute
    "dtype": "float32",
}


def all_captions() -> list[str]:
    """Every caption of the shapes world (the tokenizer's training corpus)."""
    combos = itertools.product(COLOURS, SHAPES, MOTIONS, [None, *BACKGROUNDS])
    return [
        caption({"colour": c, "shape": s, "motion": m, "background": b}) for c, s, m, b in combos
    ]


def text_encoder_config(vocab_size: int) -> UMT5Config:
    """A small umT5 (same architecture as Wan's umT5-XXL, a few hundred times smaller)."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        text_len=16,
    )


def dit_args(z_dim: int, text_dim: int) -> ModelArgs:
    """The default S2DiT: a 6-layer LCHA/SSA sandwich on 8x8 latents, 2x2 patches."""
    return ModelArgs(
        in_dim=z_dim,
        out_dim=z_dim,
        dim=128,
        ffn_dim=384,
        freq_dim=64,
        text_dim=text_dim,
        num_heads=4,
        layers=["lcha", "lcha", "ssa", "ssa", "lcha", "lcha"],
        patch_size=(1, 2, 2),
        text_len=16,
        frames_per_chunk=3,
        window=2,
        sink=1,
    )


def encode_latents(
    vae,
    count: int,
    seed: int,
    path: Path,
    frames: int = CLIP_FRAMES,
    batch: int = 8,
    workers: int = 1,
) -> Path:
    """Encode `count` clips once (normalised posterior means) and cache them with captions.

    Every motion spans CLIP_FRAMES (2 s); longer clips go on past it as a long stream does
    (objects stop at the frame edge, growth stops), so the model learns what follows.
    `workers` processes draw the clips (each a pure function of its index, so the cache is the
    same for any number); this process encodes them in order.
    """
    if path.exists():
        cached, wanted = np.load(path)["latents"], vae.num_latent_frames(frames)
        if cached.shape[1] != wanted:
            raise S2DiTError(
                f"{path} holds clips of {cached.shape[1]} latent frames, not the "
                f"{wanted} of {frames}-frame clips; use a new --out"
            )
        return path
    data = ShapesDataset(
        height=SIZE, width=SIZE, frames=frames, seed=seed, motion_frames=CLIP_FRAMES
    )
    chunks = [list(range(s, min(s + batch, count))) for s in range(0, count, batch)]
    latents, captions = [], []
    with contextlib.ExitStack() as stack:
        drawn: Iterable = map(data.batch, chunks)
        if workers > 1:
            # spawn, not fork: a forked child of a process holding MLX (or a GPU) state is unsafe
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx))
            drawn = _in_order(pool, data.batch, chunks, ahead=2 * workers)
        for video, caps in tqdm(drawn, total=len(chunks), desc="encoding clips", unit="batch"):
            z = vae.encode(mx.array(video))
            latents.append(np.array(z.astype(mx.float16)))
            captions += caps
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, latents=np.concatenate(latents), captions=np.array(captions))
    os.replace(tmp, path)
    return path


def _in_order(pool: ProcessPoolExecutor, fn, items: list, ahead: int) -> Iterator:
    """fn over items in `pool`, in order, with at most `ahead` results drawn but not yet read.

    (pool.map would draw them all at once: gigabytes of clips when the encoder is slower.)
    """
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def without_background(text: str) -> str:
    """A caption with its background clause cut: "a red circle moving left" (as users write)."""
    return caption({**parse_prompt(text), "background": None})


def latents_source(seed: int = 0, caption_dropout: float = 0.1, **_ignored):
    """train.dit data source over the cached latents (path in $S2DIT_DEFAULT_LATENTS).

    Returns {"latents", "ids", "mask"}: the text encoder trains jointly, so captions are only
    tokenized here. A caption is dropped (-> "") with probability caption_dropout, and loses its
    background clause with probability $S2DIT_DEFAULT_BACKGROUND_DROPOUT (default 0), by index.
    With $S2DIT_DEFAULT_LONG_MIX set (--long-clips), every `every`-th batch of `batch` samples
    comes from the long-clip cache instead, walked in order; a batch is all one length.
    """
    background_dropout = float(os.environ.get(BACKGROUND_DROPOUT_ENV, "0"))
    path = Path(os.environ[LATENTS_ENV])
    short = _cached_clips(path)
    tokenizer = Tokenizer.from_file(path.parent / "tokenizer.json", text_len=16)
    mix = json.loads(os.environ.get(LONG_MIX_ENV) or "null")
    long = _cached_clips(Path(mix["path"])) if mix else None

    def text(i: int, full: str) -> str:
        if rng.uniform01(seed, "caption", i) < caption_dropout:
            return ""
        if rng.uniform01(seed, "background", i) < background_dropout:
            return without_background(full)
        return full

    def source(indices) -> dict:
        latents, captions = short
        picks = [i % len(captions) for i in indices]
        if mix:
            # indices hold one batch (or a process's slice of it): its number decides its length
            batch, every = mix["batch"], mix["every"]
            number = indices[0] // batch
            if number % every == every - 1:
                latents, captions = long
                # the (number // every)-th long batch: long clips in order
                shift = (number // every - number) * batch
                picks = [(i + shift) % len(captions) for i in indices]
        ids, mask = tokenizer([text(i, captions[p]) for i, p in zip(indices, picks, strict=True)])
        return {
            "latents": mx.array(latents[picks].astype(np.float32)),
            "ids": mx.array(ids),
            "mask": mx.array(mask),
        }

    return source


def _cached_clips(path: Path) -> tuple[np.ndarray, list[str]]:
    """The (latents, captions) of one encode_latents cache."""
    cached = np.load(path)
    return cached["latents"], [str(c) for c in cached["captions"]]


def build_init(
    out: Path, vae_dir: Path, seed: int, tokenizer_kind: str = "words", sink: int | None = None
) -> Path:
    """The starting model folder: trained VAE, fresh tokenizer, random text encoder and DiT.

    `sink` replaces dit_args' sink chunks (streaming cache and block-causal training mask).
    """
    init = out / "init"
    if (init / "config.json").exists():
        return init
    if tokenizer_kind == "words":
        tokenizer = word_tokenizer(all_captions(), path=out / "tokenizer.json")
    else:
        tokenizer = train_tokenizer(all_captions(), vocab_size=64, path=out / "tokenizer.json")
    te_cfg = text_encoder_config(tokenizer.vocab_size)
    mx.random.seed(seed)
    text_encoder = UMT5TextEncoder(te_cfg)
    text_encoder.set_tokenizer(Tokenizer.from_file(out / "tokenizer.json", text_len=16))
    vae = load_component("vae", vae_dir)
    args = dit_args(vae.z_dim, te_cfg.d_model)
    if sink is not None:
        args.sink = sink
    dit = S2DiT(args)
    save_model(init, dit, vae, text_encoder, defaults=DEFAULTS)
    return init


def save_as(bundle, target: Path, dtype: mx.Dtype) -> Path:
    """Save a loaded model bundle with every floating weight stored as `dtype`."""
    for module in (bundle.dit, bundle.vae, bundle.text_encoder):
        module.set_dtype(dtype)
    return save_model(target, bundle.dit, bundle.vae, bundle.text_encoder, bundle.defaults)


def to_float16(
    model_dir: Path, target: Path, defaults: dict | None = None, sink: int | None = None
) -> Path:
    """Copy a model folder with every floating weight stored as float16 (half the size).

    `defaults` replaces the folder's sampling defaults (the recipe's own, for its result), and
    `sink` the sink chunks of its streaming cache.
    """
    bundle = load_model(model_dir)
    if defaults is not None:
        bundle.defaults = dict(defaults)
    if sink is not None:
        bundle.dit.args.sink = sink
    return save_as(bundle, target, mx.float16)


def continue_from(model_dir: Path, out: Path, sink: int | None = None) -> Path:
    """The starting folder of a run that continues a finished model: float32, its tokenizer.

    `sink` replaces the model's sink chunks (streaming cache and block-causal training mask).
    """
    init = out / "init"
    if (init / "config.json").exists():
        return init
    bundle = load_model(model_dir)
    if sink is not None:
        bundle.dit.args.sink = sink
    if getattr(bundle.text_encoder, "tokenizer", None) is None:
        raise S2DiTError(f"--init: {model_dir} has no text-encoder tokenizer")
    bundle.text_encoder.tokenizer.save(out / "tokenizer.json")  # latents_source reads it
    return save_as(bundle, init, mx.float32)  # train in float32 even from a float16 folder


def check_init_folder(model_dir: Path) -> None:
    """S2DiTError unless `model_dir` loads and its text encoder has a tokenizer (for --init)."""
    bundle = load_model(model_dir)
    if getattr(bundle.text_encoder, "tokenizer", None) is None:
        raise S2DiTError(
            f"--init: {model_dir} has no text-encoder tokenizer (the recipe tokenizes captions "
            "for a umT5 text encoder)"
        )


def check_vae_folder(vae_dir: Path, clip_frames: Iterable[int]) -> None:
    """S2DiTError unless `vae_dir` is a VAE component folder that encodes clips this long."""
    where = f"--vae {vae_dir}"
    if not vae_dir.is_dir():
        raise S2DiTError(f"{where}: no such folder (give RUN_DIR/vae of a train.vae run)")
    vae = load_component("vae", vae_dir, where)
    tf = vae.temporal_factor
    for frames in clip_frames:
        if (frames - 1) % tf:
            raise S2DiTError(f"{where}: this VAE needs {tf}k + 1 frames per clip, not {frames}")


def trimmed_captions(tokenizer: Tokenizer) -> int:
    """How many captions of the world need more ids (EOS included) than the encoder reads."""
    ids = tokenizer.backend.encode_batch(all_captions(), add_special_tokens=False)
    return sum(len(e.ids) + 1 > tokenizer.text_len for e in ids)


def folder_mb(path: Path) -> float:
    """Size of a folder in MB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.default_model`."""
    p = Parser(
        prog="python -m train.default_model",
        description="Train the built-in default S2DiT on the moving-shapes world.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run folder (VAE run, tokenizer, latents, DiT runs, the model folder)",
    )
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="a trained VAE component folder (RUN_DIR/vae of train.vae); skips the VAE stage",
    )
    p.add_argument(
        "--init",
        metavar="MODEL_DIR",
        help="continue a finished model folder (its VAE, text encoder and DiT) with a fresh "
        "schedule and fresh clips (use a new --seed); skips the VAE stage",
    )
    p.add_argument(
        "--tokenizer",
        choices=["words", "unigram"],
        default="words",
        help="words: one piece per word, every caption read whole (the shipped model); "
        "unigram: tokenizers' UnigramTrainer, whose sub-word pieces make captions longer than "
        "the 16 ids the encoder reads (the earlier model); ignored with --init, which keeps "
        "the model's tokenizer",
    )
    p.add_argument(
        "--vae-steps", type=positive_int, default=3000, help="VAE steps when --vae is not given"
    )
    p.add_argument(
        "--vae-arch", choices=["wan", "patch"], default="patch", help="VAE to train without --vae"
    )
    p.add_argument(
        "--vae-mlp-blocks",
        type=non_negative_int,
        default=2,
        help="patch VAE: residual MLP blocks per side",
    )
    p.add_argument("--clips", type=positive_int, default=4000, help="training clips to encode")
    p.add_argument(
        "--clip-frames",
        type=positive_int,
        default=CLIP_FRAMES,
        help=f"frames per training clip, 1 + 4k (default {CLIP_FRAMES}, 2 s); a motion spans "
        f"{CLIP_FRAMES} frames and longer clips show what follows in a long stream (objects "
        "stop at the frame edge), with more chunks of streaming context",
    )
    p.add_argument(
        "--long-clips",
        type=non_negative_int,
        default=0,
        help="also encode this many long clips (--long-clip-frames, drawn with --seed + 1) and "
        "train every --long-every-th batch on them: short clips teach the motions, long ones "
        "the streaming that follows (default 0: off)",
    )
    p.add_argument(
        "--long-clip-frames",
        type=positive_int,
        default=81,
        help="frames per long clip, 1 + 4k (default 81, 5 s)",
    )
    p.add_argument(
        "--long-every",
        type=positive_int,
        default=4,
        help="every Nth batch is long clips, N >= 2 (default 4)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes drawing the training clips (the same clips for any number; drawing "
        "them is most of the encoding time when a GPU encodes) (default 1)",
    )
    p.add_argument(
        "--steps",
        type=non_negative_int,
        default=3000,
        help="DiT training steps (0 with --init: skip the DiT stage, e.g. to run only the "
        "palette stage on a folder from train.average)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="DiT training clips per step"
    )
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of the DiT")
    p.add_argument("--ema", type=decay, default=0.0, help="EMA decay of the DiT (0: off)")
    p.add_argument(
        "--palette-steps",
        type=non_negative_int,
        default=300,
        help="last stage: palette-aware DiT fine-tune steps, so the Core ML palette export of "
        "the model is exact (train.dit --palette-bits; 0: skip)",
    )
    p.add_argument(
        "--palette-bits",
        type=non_negative_int,
        default=6,
        help="palette size 2^N of that stage, 1..8",
    )
    p.add_argument("--palette-lr", type=positive_float, default=1e-4, help="peak lr of that stage")
    p.add_argument(
        "--background-dropout",
        type=probability,
        default=0.2,
        help="probability that a training caption loses its background clause, so prompts "
        'without one ("a red circle moving left") are in distribution (default 0.2)',
    )
    p.add_argument(
        "--t-shift",
        type=positive_float,
        default=1.0,
        help="shift of the training noise levels (train.dit --shift): 3 matches the sampler's "
        "default and trains the near-pure-noise steps where a clip's layout is decided "
        "(default 1)",
    )
    p.add_argument(
        "--recycle-prob",
        type=probability,
        default=0.0,
        help="probability that a clean streaming context is the model's own prediction of it "
        "(train.dit --recycle-prob; 1.8x the step time here; it made the built-in model's "
        "long streams worse, see docs/default-model.md) (default 0: off)",
    )
    p.add_argument(
        "--motion-weight",
        type=non_negative_float,
        default=0.0,
        help="extra loss weight where the clip moves (train.dit --motion-weight) (default 0)",
    )
    p.add_argument(
        "--object-weight",
        type=non_negative_float,
        default=0.0,
        help="extra loss weight where the object is, moving or not (train.dit --object-weight) "
        "(default 0)",
    )
    p.add_argument(
        "--sink",
        type=non_negative_int,
        help="first chunks every later chunk's softmax attention keeps seeing, in training "
        "and in the saved model's streaming cache (default: the --init model's, else 1)",
    )
    p.add_argument(
        "--stream-sink",
        type=non_negative_int,
        help="sink chunks of the saved model's streaming cache only; training keeps --sink "
        "(the shipped model: trained with 1, streams with 0) (default: as trained)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the VAE run, the clips and the DiT init (use a new one with --init)",
    )
    p.add_argument("--resume", action="store_true", help="continue the VAE and DiT runs in RUN_DIR")
    p.add_argument(
        "--install",
        action="store_true",
        help="copy the result into the package as the built-in teacher (builtin:teacher)",
    )
    return p


def vae_stage(args: argparse.Namespace, out: Path) -> Path:
    """Train the VAE with train.vae (or continue it with --resume); returns its folder."""
    from . import vae as train_vae

    vae_dir = out / "vae_run" / "vae"
    if (vae_dir / "config.json").exists():
        return vae_dir
    vae_argv = [
        "--out", str(out / "vae_run"), "--arch", args.vae_arch, "--steps", str(args.vae_steps),
        "--batch-size", "16", "--frames", "9", "--crop", "0", "--lr", "1e-3",
        "--warmup", "50", "--checkpoint-every", "250", "--seed", str(args.seed),
    ]  # fmt: skip
    if args.vae_arch == "patch":
        vae_argv += ["--hidden-dim", "256", "--mlp-blocks", str(args.vae_mlp_blocks)]
    if args.resume:
        vae_argv.append("--resume")  # from step 0 when the VAE run has no checkpoint yet
    # run(), not main(): an error or Ctrl-C reaches this command's run_cli as one line
    path = _stage("VAE", lambda: train_vae.run(train_vae.build_parser().parse_args(vae_argv)))
    print(f"VAE written to {path}")
    return vae_dir


def dit_stage(args: argparse.Namespace, model: Path, run_dir: Path, settings: list[str]) -> Path:
    """Run train.dit on the cached latents with the recipe's shared flags; returns its model."""
    from . import dit as train_dit

    dit_argv = [
        "--model", str(model), "--out", str(run_dir), "--data",
        "train.default_model:latents_source", "--mode", "streaming", "--train-text-encoder",
        "--batch-size", str(args.batch_size), "--clean-context-prob", "0.5",
        "--t-dist", "logit_normal", "--shift", str(args.t_shift),
        "--recycle-prob", str(args.recycle_prob), "--motion-weight", str(args.motion_weight),
        "--object-weight", str(args.object_weight), *settings,
    ]  # fmt: skip
    if args.resume:
        dit_argv.append("--resume")
    _stage(f"DiT ({run_dir.name})", lambda: train_dit.run(train_dit._parse(dit_argv)))
    return run_dir / "model"


def _stage(name: str, body: Callable[[], Any]) -> Any:
    """body(), with the stage named in its error."""
    try:
        return body()
    except S2DiTError as err:
        raise S2DiTError(f"{name} stage: {err}") from None


def palette_stage(args: argparse.Namespace, out: Path, trained: Path) -> Path:
    """Fine-tune `trained` through its own k-means weight palettes; returns the snapped folder."""
    settings = [
        "--steps", str(args.palette_steps), "--lr", str(args.palette_lr),
        "--warmup", str(min(50, args.palette_steps // 5)), "--checkpoint-every", "100",
        "--seed", str(args.seed + 1), "--palette-bits", str(args.palette_bits),
    ]  # fmt: skip
    return dit_stage(args, trained, out / "palette", settings)


def run(args: argparse.Namespace) -> Path:
    """All stages; returns the final float16 model folder."""
    if args.init and args.vae:
        raise S2DiTError("give --init or --vae, not both (--init brings its own VAE)")
    if args.palette_steps and args.palette_bits not in PALETTE_BITS:
        raise S2DiTError("--palette-bits takes 1..8 (or skip the stage with --palette-steps 0)")
    for flag, frames in (
        ("--clip-frames", args.clip_frames),
        ("--long-clip-frames", args.long_clip_frames),
    ):
        if frames < 5 or (frames - 1) % 4:
            raise S2DiTError(f"{flag} takes 1 + 4k frames, k >= 1 (got {frames})")
    if args.long_clips < 0 or args.long_every < 2:
        raise S2DiTError(
            f"--long-clips takes a count >= 0 and --long-every a period >= 2 "
            f"(got {args.long_clips} and {args.long_every})"
        )
    if not 0 <= args.background_dropout <= 1:
        raise S2DiTError("--background-dropout takes a probability in [0, 1]")
    for flag, sink in (("--sink", args.sink), ("--stream-sink", args.stream_sink)):
        if sink is not None and sink < 0:
            raise S2DiTError(f"{flag} takes a number of chunks >= 0 (got {sink})")
    if args.workers < 1:
        raise S2DiTError(f"--workers takes a number of processes >= 1 (got {args.workers})")
    if not 0 <= args.recycle_prob <= 1:
        raise S2DiTError("--recycle-prob takes a probability in [0, 1]")
    for flag, weight in (
        ("--motion-weight", args.motion_weight),
        ("--object-weight", args.object_weight),
    ):
        if not (weight >= 0 and math.isfinite(weight)):
            raise S2DiTError(f"{flag} takes a finite number >= 0 (got {weight})")
    if not (args.t_shift > 0 and math.isfinite(args.t_shift)):
        raise S2DiTError(f"--t-shift takes a finite number > 0 (got {args.t_shift})")
    if args.steps < 0 or (args.steps == 0 and not args.init):
        raise S2DiTError(
            f"--steps takes a count >= 1, or 0 with --init to skip the DiT stage (got {args.steps})"
        )
    if args.init and not (Path(args.init) / "config.json").is_file():
        raise S2DiTError(f"--init: no model folder at {args.init} (config.json missing)")
    # Where the run may write first (a path check), then what the inputs hold.
    inputs = [("--init model folder", args.init), ("--vae folder", args.vae)]
    out = check_run_dir(args.out, inputs=inputs)
    if args.init:
        check_init_folder(Path(args.init))
    if args.vae:
        check_vae_folder(Path(args.vae), (args.clip_frames, args.long_clip_frames))
    mark_run_dir(out, "train.default_model")
    if args.init:
        init = continue_from(Path(args.init), out, args.sink)
    else:
        vae_dir = Path(args.vae) if args.vae else vae_stage(args, out)
        init = build_init(out, vae_dir, args.seed, args.tokenizer, args.sink)
    bundle = load_model(init)
    trimmed = trimmed_captions(bundle.text_encoder.tokenizer)
    if trimmed:
        print(
            f"warning: the tokenizer cuts {trimmed} of {len(all_captions())} captions to "
            f"{bundle.text_encoder.tokenizer.text_len} ids, so the model never reads their ends "
            "(a new run with --tokenizer words keeps every caption whole)",
            file=sys.stderr,
        )
    latents = encode_latents(
        bundle.vae,
        args.clips,
        args.seed,
        out / "latents.npz",
        args.clip_frames,
        workers=args.workers,
    )
    os.environ[LATENTS_ENV] = str(latents)
    os.environ[LONG_MIX_ENV] = ""
    if args.long_clips:
        long = encode_latents(
            bundle.vae,
            args.long_clips,
            args.seed + 1,
            out / "long_latents.npz",
            args.long_clip_frames,
            workers=args.workers,
        )
        mix = {"path": str(long), "every": args.long_every, "batch": args.batch_size}
        os.environ[LONG_MIX_ENV] = json.dumps(mix)
    os.environ[BACKGROUND_DROPOUT_ENV] = str(args.background_dropout)
    settings = [
        "--steps", str(args.steps), "--lr", str(args.lr), "--warmup", "100",
        "--checkpoint-every", "250", "--seed", str(args.seed), "--ema", str(args.ema),
    ]  # fmt: skip
    trained = dit_stage(args, init, out / "dit", settings) if args.steps else init
    if args.palette_steps:
        trained = palette_stage(args, out, trained)
    # The recipe's sampling defaults, also when --init started from a folder with others.
    final = to_float16(trained, out / "model", DEFAULTS, args.stream_sink)
    print(f"model folder {final}: {folder_mb(final):.1f} MB")
    if args.install:
        to_float16(final, TEACHER_MODEL_DIR)
        print(f"installed as the built-in teacher (--model builtin:teacher): {TEACHER_MODEL_DIR}")
    return final


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""

    def body() -> None:
        run(build_parser().parse_args(argv))

    return run_cli(body, interrupted="interrupted (the last checkpoint is intact; use --resume)")


if __name__ == "__main__":
    sys.exit(main())
