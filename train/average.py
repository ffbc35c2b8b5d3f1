"""`python -m train.average`: a weighted average of finished model folders (a "model soup").

Continuations of one run sit in one basin of the loss, so the average of their weights is a
model of its own that often keeps what each was best at (Wortsman et al. 2022, "Model soups").
The built-in default model averages a continuation with the best motion and one with the
most coherent long streams. The DiT and the text encoder are averaged; the VAE, whose
latents every DiT was trained on, must be the same in all folders and is kept as it is.

    python -m train.average runs/o2/model runs/o1/model --out runs/soup
    python -m train.average a b c --weights 2 1 1 --out runs/soup --overwrite

--out must be a new or empty folder, or (with --overwrite) a model folder s2dit-mlx wrote;
it may not be, contain or lie inside one of the input folders.
"""

from __future__ import annotations

import argparse
import math
import sys

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx.cli_args import Parser, non_negative_float
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.fsutil import check_inputs, check_output_dir
from s2dit_mlx.loading import ModelBundle, load_model, save_model


def _tokenizer_file(bundle: ModelBundle) -> str | None:
    tokenizer = getattr(bundle.text_encoder, "tokenizer", None)
    return None if tokenizer is None else tokenizer.backend.to_str()


def check_averageable(bundles: list[ModelBundle], names: list[str]) -> None:
    """Raise S2DiTError unless the folders differ only in DiT and text-encoder weights."""
    first, name0 = bundles[0], names[0]
    for bundle, name in zip(bundles, names, strict=True):
        if bundle.config.get("quantization"):
            raise S2DiTError(f"{name} is quantized; average the float models, then quantize")
        if bundle.config.get("experts"):
            raise S2DiTError(f"{name} has two DiT experts; averaging supports one-DiT folders")
    for bundle, name in zip(bundles[1:], names[1:], strict=True):
        for kind in ("dit", "text_encoder"):
            if bundle.config.get(kind) != first.config.get(kind):
                raise S2DiTError(f"{name} and {name0} have different {kind} configs")
        if _tokenizer_file(bundle) != _tokenizer_file(first):
            raise S2DiTError(f"{name} and {name0} have different tokenizers")
        mine, theirs = (dict(tree_flatten(m.vae.parameters())) for m in (bundle, first))
        same_vae = mine.keys() == theirs.keys() and all(
            mx.array_equal(value, theirs[key]).item() for key, value in mine.items()
        )
        if not same_vae:
            raise S2DiTError(
                f"{name} and {name0} have different VAEs (average continuations of one run, "
                "whose DiTs read the same latents)"
            )


def normalised_weights(weights: list[float] | None, count: int) -> list[float]:
    """Weights that sum to 1 (equal when None); raises S2DiTError on a bad list."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise S2DiTError(f"--weights takes one number per model ({count}), got {len(weights)}")
    if not all(w >= 0 and math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise S2DiTError(f"--weights takes finite numbers >= 0 with a positive sum (got {weights})")
    total = sum(weights)
    return [w / total for w in weights]


def _average_module(modules: list, weights: list[float]) -> None:
    """Set modules[0]'s parameters to the weighted mean of all (float32 sums, own dtypes)."""
    trees = [dict(tree_flatten(m.parameters())) for m in modules]
    averaged = {}
    for key, value in trees[0].items():
        total = sum(
            w * tree[key].astype(mx.float32) for w, tree in zip(weights, trees, strict=True)
        )
        averaged[key] = total.astype(value.dtype)
    modules[0].update(tree_unflatten(list(averaged.items())))
    mx.eval(modules[0].parameters())


def average_models(bundles: list[ModelBundle], weights: list[float]) -> ModelBundle:
    """The first bundle with its DiT and text encoder set to the weighted average of all."""
    for kind in ("dit", "text_encoder"):
        _average_module([getattr(b, kind) for b in bundles], weights)
    return bundles[0]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m train.average`."""
    p = Parser(
        prog="python -m train.average",
        description="Average the DiT and text-encoder weights of model folders that share one "
        "VAE (continuations of one run) and write the result as a new model folder, with the "
        "first folder's sampling defaults.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more model folders")
    p.add_argument(
        "--out",
        required=True,
        help="where to write the averaged model folder (new, empty, or see --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a model folder s2dit-mlx wrote (nothing else is replaced)",
    )
    p.add_argument(
        "--weights",
        type=non_negative_float,
        nargs="+",
        metavar="W",
        help="one weight per model, scaled to sum to 1 (default: equal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run_cli(lambda: average_cli(build_parser().parse_args(argv)))


def average_cli(args: argparse.Namespace) -> None:
    """Average the named folders into --out."""
    if len(args.models) < 2:
        raise S2DiTError("give two or more model folders to average")
    weights = normalised_weights(args.weights, len(args.models))
    inputs = [("model folder", m) for m in args.models]
    check_output_dir(args.out, "model", inputs=inputs, overwrite=args.overwrite)
    bundles = [load_model(m) for m in args.models]
    # Hub ids resolve to local snapshots only now; those must not be --out either.
    check_inputs(args.out, [("model folder", b.path) for b in bundles])
    check_averageable(bundles, args.models)
    soup = average_models(bundles, weights)
    path = save_model(args.out, soup.dit, soup.vae, soup.text_encoder, soup.defaults)
    parts = ", ".join(f"{w:.3f} x {m}" for w, m in zip(weights, args.models, strict=True))
    print(f"wrote {path} = {parts}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
