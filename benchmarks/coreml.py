"""Core ML export: export time, package size and interpreter PSNR per compression mode, plus the
analytic per-chunk FLOPs and state bytes of the exported graph at 512x288 (the paper's demo size)
for a Wan-1.3B-width sandwich beside the same model with full attention everywhere.

Writes benchmarks/results/coreml.json. The measured part exports the built-in model (its DiT
and VAE, with a real prompt through its text encoder; --model for another folder, --random for
a small random-weight S2DiT instead); each saved package is loaded back from disk and run by the
numpy interpreter over several streamed chunks against MLX. The chunks are driven by the
few-step loop: this checks the network, the sampler is arithmetic outside the package.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from s2dit_mlx.coreml import cost, verify
from s2dit_mlx.coreml.export import DIT_PACKAGE, VAE_PACKAGE, export_coreml, package_size
from s2dit_mlx.coreml.interpret import Package
from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_model
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
from s2dit_mlx.sampling import few_step_timesteps

MODES = [
    ("float32", "none"),
    ("float16", "none"),
    ("float16", "int8"),
    ("float16", "palette6"),
    ("float16", "palette4"),
]


def randomise(module, seed: int) -> None:
    """Perturb every parameter so zero-initialised biases and gates take part."""
    key = mx.random.key(seed)
    params = []
    for name, p in tree_flatten(module.parameters()):
        key, sub = mx.random.split(key)
        std = float(mx.std(p)) if p.size > 1 else 0.0
        params.append((name, p + mx.random.normal(p.shape, key=sub) * (0.5 * std or 0.2)))
    module.load_weights(params, strict=True)
    mx.eval(module.parameters())


PROMPT = "a red circle moving left on a black background"


def random_model() -> tuple[S2DiT, PatchVAE, np.ndarray, tuple[int, int], str]:
    """A small random-weight sandwich with a full-attention layer, its VAE and a random text."""
    args = ModelArgs(
        in_dim=16,
        out_dim=16,
        dim=128,
        ffn_dim=384,
        freq_dim=64,
        text_dim=64,
        num_heads=4,
        layers=["lcha", "ssa", "full", "lcha"],
        text_len=32,
        frames_per_chunk=2,
        window=3,
        sink=1,
    )
    mx.random.seed(0)
    dit = S2DiT(args)
    vae = PatchVAE(PatchVAEConfig(z_dim=16, hidden_dim=64))
    randomise(dit, 1)
    randomise(vae, 2)
    rng = np.random.default_rng(0)
    context = verify.pad_context(rng.standard_normal((1, 20, 64)).astype(np.float32), 32)
    return dit, vae, context, (64, 128), "random weights"


def trained_model(folder: str) -> tuple[S2DiT, PatchVAE, np.ndarray, tuple[int, int], str]:
    """A model folder's DiT (float32) and VAE, and PROMPT through its text encoder."""
    bundle = load_model(folder)
    dit = bundle.dit
    dit.set_dtype(mx.float32)
    context = np.array(bundle.text_encoder.encode([PROMPT]).astype(mx.float32))
    context = verify.pad_context(context, dit.args.text_len)
    size = (bundle.defaults["height"], bundle.defaults["width"])
    name = "built-in teacher" if Path(folder).resolve() == TEACHER_MODEL_DIR.resolve() else folder
    return dit, bundle.vae, context, size, f'{name}, "{PROMPT}"'


def measured(chunks: int, work: Path, model: str | None) -> dict:
    """Export a model in every mode; time, size and PSNR against MLX."""
    dit, vae, context, (height, width), weights = trained_model(model) if model else random_model()
    args = dit.args
    timesteps = few_step_timesteps(4, 5.0)
    latent = (1, args.frames_per_chunk, height // vae.spatial_factor, width // vae.spatial_factor)
    noise = verify.make_noise(chunks, len(timesteps), (*latent, args.in_dim), seed=1)
    ref = list(verify.mlx_stream(dit, context, noise, timesteps))
    ref_frames = list(verify.mlx_vae_stream(vae, ref))
    rows = []
    for precision, mode in MODES:
        out = work / f"{precision}-{mode}"
        start = time.perf_counter()
        export_coreml(
            dit,
            vae,
            out,
            height=height,
            width=width,
            compress_mode=mode,
            precision=precision,
            timesteps=timesteps,
        )
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        got = list(verify.package_stream(Package(out / DIT_PACKAGE), context, noise, timesteps))
        frames = list(verify.package_vae_stream(Package(out / VAE_PACKAGE), ref))
        interp_s = time.perf_counter() - start
        rows.append(
            {
                "precision": precision,
                "compression": mode,
                "export_s": round(export_s, 2),
                "dit_package_bytes": package_size(out / DIT_PACKAGE),
                "vae_package_bytes": package_size(out / VAE_PACKAGE),
                "dit_psnr_db_per_chunk": [
                    round(verify.psnr(r, g), 2) for r, g in zip(ref, got, strict=True)
                ],
                "dit_psnr_db": round(
                    verify.psnr(np.concatenate(ref, 1), np.concatenate(got, 1)), 2
                ),
                "vae_psnr_db": round(
                    verify.psnr(np.concatenate(ref_frames, 1), np.concatenate(frames, 1)), 2
                ),
                "interpreter_s": round(interp_s, 2),
            }
        )
        print(rows[-1])
        shutil.rmtree(out, ignore_errors=True)
    return {
        "model": args.to_dict(),
        "pixels": [height, width],
        "chunks": chunks,
        "weights": weights,
        "fp32_weights_bytes": 4 * sum(p.size for _, p in tree_flatten(dit.parameters())),
        "modes": rows,
    }


def analytic(window: int, sink: int, steps: int) -> dict:
    """FLOPs and state bytes of the graph at 512x288 for a 1.3B-width sandwich vs full attention."""
    args = ModelArgs()  # Wan-1.3B widths, 10 lcha + 10 ssa + 10 lcha
    latent_h, latent_w = 288 // 8, 512 // 8
    return {
        "config": {
            "dim": args.dim,
            "ffn_dim": args.ffn_dim,
            "heads": args.num_heads,
            "layers": args.layers,
            "text_len": args.text_len,
        },
        "pixels": [288, 512],
        "latent": [latent_h, latent_w],
        "frames_per_chunk": args.frames_per_chunk,
        "window": window,
        "sink": sink,
        "steps": steps,
        **cost.summary(args, args.frames_per_chunk, latent_h, latent_w, window, sink, steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--sink", type=int, default=1)
    parser.add_argument(
        "--model",
        default=str(TEACHER_MODEL_DIR),
        help="model folder (default: the built-in teacher)",
    )
    parser.add_argument(
        "--random", action="store_true", help="a small random-weight model instead of --model"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "coreml.json"))
    opts = parser.parse_args()
    import coremltools as ct

    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "platform": f"{platform.system()} {platform.machine()}",
            "coremltools": ct.__version__,
            "mlx": mx.__version__,
            "psnr_peak": "max |MLX output|",
            "measured": measured(opts.chunks, Path(tmp), None if opts.random else opts.model),
            "analytic_512x288": analytic(opts.window, opts.sink, steps=4),
        }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
