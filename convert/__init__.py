"""Converters from foreign checkpoints to s2dit-mlx model folders.

    python -m convert.wan SRC --out DIR [--dtype bf16|fp16|fp32] [-q 4|8]

`convert.weights` holds the lazy readers (safetensors, weights-only .pth) and the sharded
writer; `convert.wan` knows the Wan 2.x layouts (original and diffusers).
"""

# `python -m convert.wan` is an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py).
import s2dit_mlx._python_m  # noqa: F401
