"""Shared fixtures: a tiny random-weight S2DiT model folder for CLI and loading tests."""

from __future__ import annotations

# isort: off
from s2dit_mlx import setup_blas

# The test run is an entry point: OpenBLAS for MLX before anything imports mlx.core
# (s2dit_mlx/_blas.py); `import s2dit_mlx` alone loads nothing.
setup_blas()

# isort: on
import mlx.core as mx
import pytest

from s2dit_mlx.loading import save_model
from s2dit_mlx.models.byte_text_encoder import ByteTextEncoder, ByteTextEncoderConfig
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

# Small enough that one CLI generation takes a fraction of a second on a CPU.
TINY_DIT = dict(
    in_dim=4,
    out_dim=4,
    dim=32,
    ffn_dim=64,
    freq_dim=32,
    text_dim=16,
    num_heads=2,
    layers=["lcha", "ssa", "full"],
    text_len=16,
    frames_per_chunk=2,
    window=2,
    sink=1,
)
TINY_VAE = dict(z_dim=4, hidden_dim=16)
TINY_TEXT = dict(dim=16, num_layers=1, num_heads=2, max_len=16)
# frames 9 -> 3 latent frames -> 2 chunks of (2, 1); 32x64 is the smallest size the
# VAE (8) x patch (2) x SSA stride (2) allows.
TINY_DEFAULTS = dict(height=32, width=64, frames=9, fps=8, steps=2, guidance=1.0)


def make_tiny_components(seed: int = 0):
    """A tiny random-weight (dit, vae, text_encoder) triple."""
    mx.random.seed(seed)
    dit = S2DiT(ModelArgs(**TINY_DIT))
    vae = PatchVAE(PatchVAEConfig(**TINY_VAE))
    text_encoder = ByteTextEncoder(ByteTextEncoderConfig(**TINY_TEXT))
    mx.eval(dit.parameters(), vae.parameters(), text_encoder.parameters())
    return dit, vae, text_encoder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (DiT with an lcha/ssa/full sandwich, patch VAE, byte encoder)."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    dit, vae, text_encoder = make_tiny_components()
    save_model(path, dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    return path
