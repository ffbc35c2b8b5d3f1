"""Shared helpers for parity tests against the official Wan code (wan22) and diffusers.

- `load_wan_module("modules/vae2_1.py")`: one module file of the installed `wan` package,
  loaded by path (never `import wan`: its __init__ needs CUDA), cached per path.
- `randomize_torch_(module, seed)`: overwrite EVERY parameter (Wan zero-inits some, e.g. the
  VAE attention proj and head.head), so a parity test can see every weight.
- `torch_state_to_mx(sd)`: a PyTorch state dict as float32 MLX arrays (layouts unchanged;
  the model's sanitize() does the transposes).
- `to_torch_video` / `from_torch_video`: channels-last [B, F, H, W, C] <-> [B, C, F, H, W].
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_LOADED: dict[str, object] = {}


def wan_dir() -> Path:
    """The installed `wan` package folder (pytest.skip when wan22 is not installed)."""
    # find_spec on a top-level package locates it without running wan/__init__ (CUDA imports).
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official Wan code (wan22) not installed")
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _no_cuda_device():
    # wan/modules/t5.py calls torch.cuda.current_device() at import time.
    import torch

    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = original


def load_wan_module(rel: str):
    """Load one file of the official Wan code, e.g. "modules/vae2_1.py" (cached)."""
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    if rel not in _LOADED:
        path = wan_dir() / rel
        name = "_wan_ref_" + rel.replace("/", "_").removesuffix(".py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with _no_cuda_device():
            spec.loader.exec_module(mod)
        _LOADED[rel] = mod
    return _LOADED[rel]


def randomize_torch_(module, seed: int = 0, bias_std: float = 0.2) -> None:
    """Overwrite every parameter: weights N(0, 1/fan_in), biases N(0, bias_std), norm gains
    U(0.5, 1.5) (1-D `weight`/`gamma` of norms and any parameter named gamma)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "weight" and p.ndim == 1):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif leaf == "bias" or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * bias_std)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def torch_state_to_mx(state: dict) -> dict:
    """A PyTorch state dict -> {name: float32 mx.array}, layouts unchanged."""
    import mlx.core as mx

    return {k: mx.array(v.detach().float().cpu().numpy()) for k, v in state.items()}


def to_torch_video(x) -> object:
    """Channels-last [B, F, H, W, C] (numpy or mx) -> float32 torch [B, C, F, H, W]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32))).permute(
        0, 4, 1, 2, 3
    )


def from_torch_video(t) -> np.ndarray:
    """Torch [B, C, F, H, W] -> numpy channels-last [B, F, H, W, C] float32."""
    return t.detach().float().permute(0, 2, 3, 4, 1).cpu().numpy()
