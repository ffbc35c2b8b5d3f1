"""`python -m train.fuse`: merge a LoRA adapter into a model folder's DiT and save a new folder.

--out must be a new or empty folder, or (with --overwrite) a model folder s2dit-mlx wrote;
it may not be, contain or lie inside the base model folder or the adapter folder.
"""

from __future__ import annotations

import argparse
import sys

from s2dit_mlx.cli_args import Parser
from s2dit_mlx.errors import run_cli
from s2dit_mlx.fsutil import check_inputs, check_output_dir

from .lora import fuse_lora, load_adapters, read_adapter_config


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.fuse`."""
    p = Parser(
        prog="python -m train.fuse",
        description="Merge a LoRA adapter (adapters.safetensors + adapter_config.json) into the "
        "DiT of a model folder and write the result as a new model folder.",
    )
    p.add_argument("--model", required=True, help="base model folder or Hugging Face id")
    p.add_argument("--adapter", required=True, help="adapter folder (from python -m train.dit)")
    p.add_argument(
        "--out",
        required=True,
        help="where to write the fused model folder (new, empty, or see --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a model folder s2dit-mlx wrote (nothing else is replaced)",
    )
    p.add_argument(
        "--no-check-base",
        action="store_true",
        help="load the adapter even if it was trained on a different base model",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run_cli(lambda: fuse_cli(build_parser().parse_args(argv)))


def fuse_cli(args: argparse.Namespace) -> None:
    """Fuse --adapter into --model and write --out."""
    from s2dit_mlx.loading import load_model, save_model

    inputs = [("model folder", args.model), ("adapter folder", args.adapter)]
    check_output_dir(args.out, "model", inputs=inputs, overwrite=args.overwrite)
    read_adapter_config(args.adapter)  # a missing or broken adapter fails before the model loads
    bundle = load_model(args.model)
    check_inputs(args.out, [("model folder", bundle.path)])  # a hub id's local snapshot
    load_adapters(
        bundle.dit,
        args.adapter,
        check_base=not args.no_check_base,
        override_hint="pass --no-check-base",
    )
    fuse_lora(bundle.dit)
    path = save_model(
        args.out, bundle.dit, bundle.vae, bundle.text_encoder, defaults=bundle.defaults
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
