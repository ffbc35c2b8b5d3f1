"""s2dit-mlx: streaming sandwich diffusion transformer for text-to-video, in MLX.

from s2dit_mlx import Pipeline
pipe = Pipeline.from_pretrained("path/to/model-folder")
video = pipe.generate("a red circle moving left", seed=0)   # uint8 [F, H, W, 3]
for frames in pipe.stream("a red circle moving left"):      # as each chunk is decoded
    ...
"""

from . import _blas

_blas.setup()  # must run before the first `import mlx.core`

__version__ = "0.1.0"
__all__ = ["Pipeline", "load_model", "save_model", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import s2dit_mlx` stays cheap (the CLI's --help, s2dit info).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name in ("load_model", "save_model"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 's2dit_mlx' has no attribute {name!r}")
