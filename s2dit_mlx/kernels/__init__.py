"""Hand-written kernels for where MLX's own ops are slow (see cpu.py)."""
