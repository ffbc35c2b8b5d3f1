"""s2dit-mlx: streaming sandwich diffusion transformer for text-to-video, in MLX.

from s2dit_mlx import Pipeline
pipe = Pipeline.from_pretrained("path/to/model-folder")
video = pipe.generate("a red circle moving left", seed=0)   # uint8 [F, H, W, 3]
for frames in pipe.stream("a red circle moving left"):      # as each chunk is decoded
    ...

Importing the library only imports it: no BLAS is loaded, nothing is compiled or written.
On Linux, `setup_blas()` (before the first `import mlx.core`) loads OpenBLAS for MLX's CPU
backend, and `s2dit_mlx.kernels.enable(model)` opts a model into the CPU kernels; the `s2dit`
command does both (see docs/architecture.md, "The Linux CPU path").
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_model", "save_model", "setup_blas", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import s2dit_mlx` stays cheap (the CLI's --help, s2dit info).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name in ("load_model", "save_model"):
        from . import loading

        return getattr(loading, name)
    if name == "setup_blas":
        from ._blas import setup_blas

        return setup_blas
    raise AttributeError(f"module 's2dit_mlx' has no attribute {name!r}")
