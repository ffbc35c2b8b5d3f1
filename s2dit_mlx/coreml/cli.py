"""`s2dit export coreml`: a model folder -> Core ML packages + manifest for an iPhone app.

`add_export_parser` adds the `export` command to the `s2dit` parser (s2dit_mlx/cli.py);
`main(argv)` takes the arguments after `s2dit export` (so argv starts with "coreml"). Every
user error is one `error: ...` line on stderr, exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from ..cli_args import text
from ..errors import EXIT_ERROR, S2DiTError

COMPRESSIONS = ("none", "int8", "palette6", "palette4")

EPILOG = """\
Sizes you leave out come from the model folder (defaults.height/width, dit.frames_per_chunk,
dit.window). The folder DIR gets S2DiT.mlpackage (functions denoise and write, streaming
state as fp16 Core ML states), VAEDecoder.mlpackage and manifest.json (shapes, state sizes,
schedule, fps, the loop). With --prompt, the text encoder output is saved as prompt.f16
(the text encoder itself stays on the Mac). DIR must be new or empty, or an earlier export
to replace with --overwrite; s2dit never replaces anything else.

examples:
  s2dit export coreml --model ./my-model --out ./ios-model
  s2dit export coreml --model ./my-model --out ./ios-model --compress palette6 --prompt "a red fox"
"""


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add `export` and its formats (today `coreml`) to the `s2dit` sub-command group."""
    export = subparsers.add_parser(
        "export",
        help="export a model for another runtime (Core ML for iPhone)",
        description="Export a model for another runtime.",
    )
    export.set_defaults(func=lambda _args: export.print_help() or EXIT_ERROR)
    add_coreml_parser(export.add_subparsers(dest="format", metavar="FORMAT"))
    return export


def add_coreml_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `coreml` sub-command (options and handler) to an `export` sub-parser group."""
    p = subparsers.add_parser(
        "coreml",
        help="export to Core ML packages for iOS 18 (stateful streaming)",
        description="Export a model folder to Core ML packages with a stateful streaming cache.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--model",
        "-m",
        metavar="MODEL",
        help="model folder, Hugging Face repository id or builtin:teacher (default: the built-in "
        "model, the 3-step student)",
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it is an earlier Core ML export (nothing else is replaced)",
    )
    p.add_argument("--height", type=int, metavar="PX", help="frame height in pixels")
    p.add_argument("--width", type=int, metavar="PX", help="frame width in pixels")
    p.add_argument("--chunk-frames", type=int, metavar="N", help="latent frames per chunk")
    p.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="softmax layers see the last N chunks (the current one included), >= 2",
    )
    p.add_argument("--sink", type=int, metavar="N", help="first chunks always kept visible")
    p.add_argument(
        "--compress",
        choices=COMPRESSIONS,
        default="none",
        help="weight compression: int8 per channel (affine; the DiT's timestep, modulation and "
        "head weights stay float16), 6- or 4-bit k-means palettes",
    )
    p.add_argument(
        "--precision",
        choices=("float16", "float32"),
        default="float16",
        help="compute precision of the graph (states are always float16)",
    )
    p.add_argument(
        "--steps", type=int, metavar="N", help="sampling steps per chunk (default: the model's)"
    )
    p.add_argument(
        "--prompt", type=text, metavar="TEXT", help="also save this prompt's text embeddings"
    )
    p.add_argument(
        "--negative-prompt",
        type=text,
        metavar="TEXT",
        help="also save a negative prompt's embeddings (for guidance)",
    )
    p.add_argument(
        "--skip-vae",
        action="store_true",
        help="export the DiT only (e.g. for a VAE type the exporter does not support yet)",
    )
    p.add_argument(
        "--allow-large",
        action="store_true",
        help="export even when the estimated peak memory exceeds the memory available",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no summary line")
    p.set_defaults(func=cmd_export_coreml)
    return p


def cmd_export_coreml(args: argparse.Namespace) -> int:
    """Load the model folder, export it, print one summary line."""
    from ._ct import require

    require()  # fail early and clearly when coremltools is missing
    import numpy as np

    from ..loading import load_model
    from ..sampling import FEW_STEP, FlowEulerSolver, few_step_timesteps
    from .export import check_export, check_target, export_coreml

    if not args.model:
        from ..loading import DEFAULT_MODEL_DIR

        args.model = str(DEFAULT_MODEL_DIR)
    check_target(args.out, args.model, overwrite=args.overwrite, flag="--out")
    bundle = load_model(args.model)
    defaults = bundle.defaults
    height = args.height if args.height is not None else defaults["height"]
    width = args.width if args.width is not None else defaults["width"]
    vae = None if args.skip_vae else bundle.vae
    shapes = check_export(
        bundle.dit,
        vae,
        height,
        width,
        args.chunk_frames,
        args.window,
        args.sink,
        args.compress,
        args.precision,
        bundle.vae.spatial_factor,
    )
    from .. import resources

    estimate = resources.estimate_export(
        bundle.dit, vae, shapes, height, width, args.precision, args.compress
    )
    resources.check(estimate, allow=args.allow_large)
    steps = args.steps if args.steps is not None else defaults["steps"]
    if steps < 1:
        raise S2DiTError(f"steps must be a positive integer, got {steps}")
    shift = defaults["shift"]
    # The app runs the model's few-step sampler, or Euler for a model that samples with an ODE
    # solver (UniPC's multistep corrector is not worth an app's code at these step counts).
    schedule = {"steps": steps, "shift": shift, "sampler": FEW_STEP}
    if defaults["solver"] == FEW_STEP:
        timesteps = few_step_timesteps(steps, shift)
    else:
        euler = FlowEulerSolver(steps, shift)
        timesteps = [float(t) for t in euler.timesteps]
        schedule.update(sampler="euler", sigmas=[float(s) for s in euler.sigmas])
    prompts = {}
    if args.prompt is not None:
        prompts["prompt"] = bundle.text_encoder.encode([args.prompt])
    if args.negative_prompt is not None:
        prompts["negative_prompt"] = bundle.text_encoder.encode([args.negative_prompt])
    manifest = export_coreml(
        bundle.dit,
        vae,
        args.out,
        height=height,
        width=width,
        chunk_frames=args.chunk_frames,
        window=args.window,
        sink=args.sink,
        compress_mode=args.compress,
        precision=args.precision,
        timesteps=timesteps,
        schedule=schedule,
        fps=float(defaults["fps"]),
        guidance=float(defaults["guidance"]),
        prompts={k: np.array(v) for k, v in prompts.items()},
        model_name=args.model,
        spatial_factor=bundle.vae.spatial_factor,
    )
    if not args.quiet:
        dit = manifest["packages"]["dit"]
        print(
            f"wrote {args.out}: S2DiT.mlpackage ({dit['size_bytes'] / 1e6:.1f} MB, "
            f"{len(dit['states'])} states, {dit['state_bytes'] / 1e6:.2f} MB of state), "
            f"{'' if vae is None else 'VAEDecoder.mlpackage, '}manifest.json; {manifest['video']['width']}x"
            f"{manifest['video']['height']}, {manifest['latent']['frames_per_chunk']} latent "
            f"frames per chunk, {args.compress}, {args.precision}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`s2dit export ...` (argv after `export`); returns the exit code."""
    from ..cli import main as s2dit_main

    return s2dit_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
