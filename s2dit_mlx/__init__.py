"""s2dit-mlx: streaming sandwich diffusion transformer for text-to-video, in MLX."""

from . import _blas

_blas.setup()  # must run before the first `import mlx.core`

__version__ = "0.1.0"
