"""The `s2dit` command line: one parser for every command.

    s2dit generate PROMPT -o OUT ...        a video from a text prompt
    s2dit convert wan SRC --out DIR ...     a Wan 2.x checkpoint -> a model folder
    s2dit train dit|vae|... ...             training, fine-tuning, distillation
    s2dit export coreml --out DIR ...       Core ML packages for an iPhone app
    s2dit info                              MLX, device, BLAS, CPU kernels, GEMM speed

`convert` and `train` commands run their module's own parser and `main` under the name
`s2dit convert wan`, `s2dit train dit`, ... (`python -m convert.wan` and `python -m train.*`
are the same commands), so each command's options and help are written once. Nothing heavier
than argparse is imported until a command runs, so `s2dit --help` is instant. `main` first
loads OpenBLAS for MLX on Linux (`_blas.setup_blas`: entry points only); `generate` opts its
models into the CPU kernels when MLX runs on the CPU (s2dit_mlx/kernels).

Every user error (bad sizes, a broken model folder, an unwritable output path, ...) ends as one
line `error: ...` on stderr with exit code 2 and no output file; Ctrl-C exits with 130
(errors.run_cli).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .cli_args import Parser, invoked_as, positive_float, text
from .errors import EXIT_ERROR, S2DiTError, run_cli

# `s2dit GROUP NAME ...` -> (the module whose parser and main run it, its summary line)
MODULE_COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "convert": {
        "wan": (
            "convert.wan",
            "a Wan 2.1 / 2.2 checkpoint (original or diffusers layout) -> a model folder",
        ),
    },
    "train": {
        "dit": ("train.dit", "train or fine-tune a DiT by flow matching (full or LoRA)"),
        "vae": ("train.vae", "train a video VAE (Wan architecture or the small patch VAE)"),
        "fuse": ("train.fuse", "merge a LoRA adapter into its model folder"),
        "average": ("train.average", "average model folders that share one VAE (a model soup)"),
        "default-model": ("train.default_model", "the built-in teacher's whole recipe"),
        "teacher-cache": ("train.teacher_cache", "run a teacher once and cache its trajectories"),
        "dmd": ("train.dmd", "distribution matching distillation with self-forcing rollout"),
        "layout-search": (
            "train.layout_search",
            "choose the attention kind of each layer under latency and memory budgets",
        ),
    },
}
GROUP_HELP = {
    "convert": "convert a checkpoint into a model folder",
    "train": "train, fine-tune and distil models",
}

GENERATE_EPILOG = """\
Settings you leave out come from the model folder's config.json "defaults".

examples:
  s2dit generate "a red circle moving left on a black background" -o circle.mp4
  s2dit generate "waves at dusk" --model ./my-model -o waves.mp4 --stream --seed 7
  s2dit generate "a paper boat" --model ./my-model -o boat.gif --frames 17
  s2dit generate "a paper boat" --model ./my-model -o frames/   # PNG frames

Output kind follows the path: .mp4 (H.264), .gif, a folder (trailing slash or no suffix)
of PNG frames, a pattern like frames/f_%05d.png, or .png for a single frame. A JSON
sidecar with the prompt, seed, settings, timings and peak memory is written beside it
(out.mp4 -> out.json); it replaces only a sidecar s2dit wrote, never another file.
"""

# Generation.summary() figures recorded under the sidecar's "timings"
TIMINGS = (
    "text_encode_s",
    "denoise_s",
    "decode_s",
    "first_frames_s",
    "generate_s",
    "chunk_s",
    "chunk_decode_s",
)

NO_MODEL = (
    "the built-in model is missing from this installation; pass --model with a model folder "
    "or a Hugging Face repository id (see s2dit generate --help)"
)


def build_parser() -> argparse.ArgumentParser:
    """The `s2dit` argument parser (`convert` and `train` commands only list their names here:
    `main` hands them to their module before this parser sees them)."""
    parser = Parser(
        prog="s2dit",
        description="S2DiT streaming text-to-video generation, native in MLX.",
        epilog="Run 's2dit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"s2dit-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    for group, commands in MODULE_COMMANDS.items():
        _add_group(sub, group, GROUP_HELP[group], commands)
    from .coreml.cli import add_export_parser  # no coremltools import until the command runs

    add_export_parser(sub)
    info = sub.add_parser(
        "info",
        help="show the MLX version, device, BLAS, CPU kernels and measured GEMM speed",
        description="Show the MLX version, device, the BLAS in use and why, the CPU kernels "
        "(library, threads, which kinds run and their measured speeds) and a measured fp32 "
        "GEMM rate.",
    )
    info.add_argument("--no-gemm", action="store_true", help="skip the GEMM measurement")
    info.add_argument(
        "--kernels",
        action="store_true",
        help="build the CPU kernels if needed and time each kind against MLX's own op now "
        "(generate does this at first use)",
    )
    info.set_defaults(func=cmd_info)
    return parser


def _add_group(sub, group: str, summary: str, commands: dict[str, tuple[str, str]]) -> None:
    """`s2dit GROUP` with one entry per module command, for `s2dit GROUP --help`."""
    p = sub.add_parser(
        group,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"Run 's2dit {group} COMMAND --help' for the options of a command.",
    )
    p.set_defaults(func=lambda _args: p.print_help() or EXIT_ERROR)
    names = p.add_subparsers(dest="name", metavar="COMMAND")
    for name, (_module, help_line) in commands.items():
        names.add_parser(name, help=help_line, add_help=False)


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate a video from a text prompt",
        description="Generate a video from a text prompt.",
        epilog=GENERATE_EPILOG,
    )
    gen.add_argument("prompt", type=text, help="what the video should show")
    gen.add_argument(
        "--model",
        "-m",
        metavar="MODEL",
        help="model folder, Hugging Face repository id, or builtin:teacher (default: the "
        "built-in moving-shapes model, a 3-step student distilled from that teacher)",
    )
    gen.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="PATH",
        help="output path: out.mp4, out.gif, frames/ (PNG frames) or frames/f_%%05d.png",
    )
    gen.add_argument(
        "--frames", type=int, metavar="N", help="number of frames, 4k + 1 (e.g. 17, 33, 81)"
    )
    gen.add_argument("--height", type=int, metavar="PX", help="frame height in pixels")
    gen.add_argument("--width", type=int, metavar="PX", help="frame width in pixels")
    gen.add_argument(
        "--steps", type=int, metavar="N", help="denoising steps (per chunk when streaming)"
    )
    gen.add_argument(
        "--seed", type=int, metavar="N", help="random seed (default: a random one, recorded)"
    )
    gen.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance scale (1 = no guidance)",
    )
    gen.add_argument(
        "--negative-prompt",
        type=text,
        metavar="TEXT",
        help="what the video should not show (with guidance)",
    )
    gen.add_argument(
        "--shift", type=float, metavar="S", help="timestep shift of the noise schedule"
    )
    gen.add_argument(
        "--mode",
        choices=["streaming", "bidirectional"],
        help="streaming: chunk by chunk with a cache; bidirectional: whole video at once",
    )
    gen.add_argument(
        "--solver",
        choices=["euler", "unipc", "few-step"],  # sampling.SAMPLERS (not imported: fast --help)
        help="euler or unipc: an ODE solver over the whole video (bidirectional) or each chunk "
        "(streaming); few-step: the re-noising sampler of distilled students (streaming only)",
    )
    gen.add_argument(
        "--fps", type=positive_float, metavar="FPS", help="frames per second of the output video"
    )
    gen.add_argument(
        "--stream",
        action="store_true",
        help="write frames as soon as each chunk is decoded, with a live frames/s figure",
    )
    gen.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="precision of the diffusion transformer (default: the model folder's, else float32)",
    )
    gen.add_argument(
        "--allow-large",
        action="store_true",
        help="run even when the estimated peak memory exceeds the memory available or the "
        "estimated time exceeds a day (the estimate is printed when it is over a minute)",
    )
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    gen.set_defaults(func=cmd_generate)


def _versions() -> dict:
    import mlx.core as mx
    import numpy as np

    return {
        "s2dit_mlx": __version__,
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def _remove_output(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _probe_writable(out: Path) -> None:
    # os.access says yes to root even on read-only mounts; creating a file is the real test.
    parent = out.absolute().parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".s2dit-probe-"):
            pass
    except OSError as err:
        raise S2DiTError(
            f"output directory is not writable: {parent} ({err.strerror or err})"
        ) from None


def _memory(gb: float | None) -> str:
    if gb is None:
        return "unknown"
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"


def _check_resources(pipe, settings, allow: bool, quiet: bool) -> None:
    """Refuse (S2DiTError) a generation that will not fit; say how long a long one takes."""
    from . import resources

    estimate = resources.estimate_generate(pipe, settings)
    resources.check(estimate, allow=allow)
    if not quiet and estimate.seconds is not None and estimate.seconds > resources.NOTE_SECONDS:
        print(f"note: estimated {estimate.summary()} (a rough estimate)", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    """`s2dit generate`: prompt -> video file + JSON sidecar."""
    if not args.model:
        from .loading import DEFAULT_MODEL_DIR

        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise S2DiTError(NO_MODEL)
        args.model = str(DEFAULT_MODEL_DIR)
    import numpy as np

    from . import kernels, video_io
    from .fsutil import check_inputs
    from .pipeline import Pipeline

    # The output first: a bad path fails before the (slow) model load.
    out = video_io.check_output_path(args.output)
    check_inputs(out, [("model folder", args.model)], "-o")
    video_io.check_sidecar(out)
    _probe_writable(out)

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype)  # None: the folder's dtype
    # The Linux CPU fast path (off with S2DIT_NO_CPU_KERNELS=1; each kernel still runs only
    # where it measures faster on this machine).
    kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)
    load_s = time.perf_counter() - start
    check_inputs(out, [("model folder", pipe.path)], "-o")  # a hub id's local snapshot
    fps = args.fps if args.fps is not None else pipe.defaults["fps"]
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise S2DiTError(f"the model folder's fps must be a positive number, got {fps!r}")

    # Validated settings (the folder's defaults filled in) and the encoded prompt.
    run = pipe.start(
        args.prompt,
        progress=not args.quiet,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**32),
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        shift=args.shift,
        mode=args.mode,
        solver=args.solver,
    )
    settings = run.settings
    video_io.check_frame_count(out, settings.frames)
    _check_resources(pipe, settings, args.allow_large, args.quiet)

    t0 = time.perf_counter()
    write_s = None
    if args.stream:
        with video_io.VideoWriter(out, fps=fps) as writer:
            for chunk in run:
                writer.write(chunk.frames)
            frames_written = writer.frames_written
    else:
        video = np.concatenate([chunk.frames for chunk in run], axis=0)
        t_write = time.perf_counter()
        video_io.write_video(out, video, fps=fps)
        frames_written = video.shape[0]
        write_s = time.perf_counter() - t_write
    wall_s = time.perf_counter() - t0

    stats = run.summary()
    timings = {
        "load_s": load_s,
        **{key: stats[key] for key in TIMINGS},
        "write_s": write_s,
        "wall_s": wall_s,
    }
    meta = {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": settings.seed,
        "model": args.model,
        "model_path": str(pipe.path) if pipe.path is not None else None,
        "output": os.fspath(out),
        "settings": {
            **{
                k: v
                for k, v in settings.to_dict().items()
                if k not in ("prompt", "negative_prompt", "seed")
            },
            "fps": fps,
            "stream": bool(args.stream),
        },
        "frames_written": frames_written,
        "timings": {k: v for k, v in timings.items() if v is not None},
        "frames_per_s": stats["frames_per_s"],
        "wall_frames_per_s": frames_written / wall_s if wall_s > 0 else None,
        "peak_memory_gb": stats["peak_memory_gb"],
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        sidecar = video_io.write_metadata(out, meta)
    except (OSError, S2DiTError):  # e.g. a foreign out.json appeared while generating
        _remove_output(out)  # no half-finished result: the video without its record goes too
        raise
    if not args.quiet:
        h, w = settings.height, settings.width
        print(
            f"wrote {out}: {frames_written} frames {w}x{h} at {fps:g} fps in {wall_s:.2f} s "
            f"({meta['wall_frames_per_s']:.2f} frames/s, peak memory "
            f"{_memory(meta['peak_memory_gb'])}, seed {settings.seed}); metadata: {sidecar}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """`s2dit info`: versions, device, BLAS, GEMM speed."""
    from .info import info_lines

    for line in info_lines(gemm=not args.no_gemm, measure_kernels=args.kernels):
        print(line)
    return 0


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` chose, e.g. `s2dit export coreml`'s."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) is None:
            return parser
        parser = sub.choices[getattr(args, sub.dest)]


def _run_module(group: str, name: str, argv: list[str]) -> int:
    """`s2dit GROUP NAME ARGV`: the module's own main, its parser named `s2dit GROUP NAME`."""
    module = MODULE_COMMANDS[group][name][0]
    with invoked_as(f"python -m {module}", f"s2dit {group} {name}"):
        return importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `s2dit` console script; returns the exit code."""
    from ._blas import setup_blas

    setup_blas()  # an entry point: OpenBLAS before anything imports mlx.core (see _blas.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[1] in MODULE_COMMANDS.get(argv[0], {}):
        return run_cli(lambda: _run_module(argv[0], argv[1], argv[2:]))
    parser = build_parser()

    def body() -> int:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the command's own parser, so the hint is its --help
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.print_help()
            return EXIT_ERROR
        return args.func(args)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
