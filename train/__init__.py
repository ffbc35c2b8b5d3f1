"""Training recipes for s2dit-mlx: flow matching (full or LoRA), checkpoints, data parallel.

CLI: `python -m train.dit --help` (train a DiT), `python -m train.fuse --help` (merge an adapter).
"""

# isort: off
# `python -m train.X` is an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py).
import s2dit_mlx._python_m  # noqa: F401

# isort: on
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .flow import FlowConfig, FlowModel, flow_matching_loss, make_flow_loss
from .grad_checkpoint import disable_grad_checkpoint, enable_grad_checkpoint
from .lora import (
    LoRAConfig,
    apply_lora,
    fuse_lora,
    load_adapters,
    load_model_with_adapter,
    save_adapters,
    unfuse_lora,
)
from .trainer import TrainConfig, Trainer

__all__ = [
    "FlowConfig",
    "FlowModel",
    "LoRAConfig",
    "TrainConfig",
    "Trainer",
    "apply_lora",
    "disable_grad_checkpoint",
    "enable_grad_checkpoint",
    "flow_matching_loss",
    "fuse_lora",
    "latest_checkpoint",
    "load_adapters",
    "load_checkpoint",
    "load_model_with_adapter",
    "make_flow_loss",
    "save_adapters",
    "save_checkpoint",
    "unfuse_lora",
]
