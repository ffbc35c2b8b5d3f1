"""Tiny random Wan 2.1 checkpoints (DiT, VAE, umT5, tokenizer) in both layouts, for tests.

Every parameter is randomised (wan_refs.randomize_torch_) in the official wan22 modules, and
the diffusers modules get the same weights through diffusers' own converters, so:

- `official_models(seed)`: the official WanModel and WanVAE_ and a transformers
  UMT5EncoderModel (the umT5 encoder diffusers uses);
- `diffusers_pipeline(...)`: a diffusers WanPipeline built from them (optionally a second
  transformer for the Wan2.2 A14B expert switch);
- `write_original(root, ...)` / `write_diffusers(root, ...)`: the same weights (and the same
  tokenizer: training one is not bit-reproducible) as a Wan original-layout folder or a
  diffusers-layout folder, ready for `python -m convert.wan`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from wan_refs import load_wan_module, randomize_torch_

# DiT: head_dim 16 (RoPE split 8/4/4); z_dim 4 latents; 512 text tokens as in Wan.
DIT = dict(dim=48, ffn_dim=96, num_heads=3, num_layers=2, in_dim=4, out_dim=4)
TEXT_DIM, FREQ_DIM, TEXT_LEN = 32, 64, 512
VAE = dict(dim=8, z_dim=4, temperal_downsample=[False, True, True])
T5 = dict(
    vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)  # fmt: skip
TOKENIZER_TEXTS = ["a cat runs on the grass", "waves crash on the beach at sunset", "一只猫"] * 4
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# transformers UMT5 encoder block names -> Wan's models_t5 .pth names
_T5_LAYER = {
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.0.layer_norm": "norm1",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}


def official_wan_module():
    """wan22's wan/modules/model.py without `import wan` (its __init__ needs CUDA)."""
    if "wan.modules.model" in sys.modules:
        return sys.modules["wan.modules.model"]
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("wan22 (official Wan code) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("wan", root), ("wan.modules", root / "modules")):
        if name not in sys.modules:
            # never executed, with a real spec so relative imports resolve
            stub = importlib.util.spec_from_file_location(
                name, path / "__init__.py", submodule_search_locations=[str(path)]
            )
            sys.modules[name] = importlib.util.module_from_spec(stub)
    for name in ("attention", "model"):
        mod_spec = importlib.util.spec_from_file_location(
            f"wan.modules.{name}", root / "modules" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[f"wan.modules.{name}"] = module
        mod_spec.loader.exec_module(module)
    return sys.modules["wan.modules.model"]  # only its weights are used: no attention swap


def official_models(seed: int = 0):
    """(WanModel, WanVAE_, UMT5EncoderModel): tiny, every parameter random."""
    transformers = pytest.importorskip("transformers")
    dit = (
        official_wan_module()
        .WanModel(
            model_type="t2v",
            text_len=TEXT_LEN,
            in_dim=DIT["in_dim"],
            dim=DIT["dim"],
            ffn_dim=DIT["ffn_dim"],
            freq_dim=FREQ_DIM,
            text_dim=TEXT_DIM,
            out_dim=DIT["out_dim"],
            num_heads=DIT["num_heads"],
            num_layers=DIT["num_layers"],
        )
        .eval()
    )
    randomize_torch_(dit, seed)
    vae = load_wan_module("modules/vae2_1.py").WanVAE_(**VAE).eval()
    randomize_torch_(vae, seed + 1)
    t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5)).eval()
    randomize_torch_(t5, seed + 2)
    return dit, vae, t5


def diffusers_transformer(official_dit):
    """A diffusers WanTransformer3DModel holding the official model's weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = diffusers.WanTransformer3DModel(
        num_attention_heads=DIT["num_heads"],
        attention_head_dim=DIT["dim"] // DIT["num_heads"],
        in_channels=DIT["in_dim"],
        out_channels=DIT["out_dim"],
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=DIT["ffn_dim"],
        num_layers=DIT["num_layers"],
    ).eval()
    state = convert_wan_transformer_to_diffusers(dict(official_dit.state_dict()))
    model.load_state_dict(state, strict=True)
    return model


def diffusers_vae(official_vae, latents_mean=None, latents_std=None):
    """A diffusers AutoencoderKLWan holding the official VAE's weights (identity stats)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    z = VAE["z_dim"]
    model = diffusers.AutoencoderKLWan(
        base_dim=VAE["dim"],
        z_dim=z,
        temperal_downsample=VAE["temperal_downsample"],
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * z,
    ).eval()
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(official_vae.state_dict())))
    return model


def write_tokenizer(folder: Path) -> Path:
    """A trained tiny umT5-style tokenizer.json (+ the config transformers needs to read it)."""
    from s2dit_mlx.tokenizer import train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(TOKENIZER_TEXTS, vocab_size=T5["vocab_size"], path=folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return folder


def unipc_scheduler(shift: float):
    """diffusers' UniPCMultistepScheduler as the diffusers Wan checkpoints configure it."""
    import diffusers

    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        num_train_timesteps=1000,
        solver_order=2,
    )


def diffusers_pipeline(
    tokenizer_dir: Path,
    models=None,
    *,
    second=None,
    boundary: float | None = None,
    latents_mean=None,
    latents_std=None,
    shift: float = 5.0,
    seed: int = 0,
):
    """A diffusers WanPipeline over the official weights (`second`: A14B low-noise WanModel)."""
    import diffusers
    import transformers

    dit, vae, t5 = models if models is not None else official_models(seed)
    return diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        text_encoder=t5,
        vae=diffusers_vae(vae, latents_mean, latents_std),
        scheduler=unipc_scheduler(shift),
        transformer=diffusers_transformer(dit),
        transformer_2=diffusers_transformer(second) if second is not None else None,
        boundary_ratio=boundary,
    )


def _t5_to_wan_names(state: dict) -> dict:
    out = {}
    for name, w in state.items():
        if name == "shared.weight":
            out["token_embedding.weight"] = w
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = w
        elif name.startswith("encoder.block."):
            _, _, i, rest = name.split(".", 3)
            out[f"blocks.{i}.{_T5_LAYER[rest.removesuffix('.weight')]}.weight"] = w
    return out


def write_original(root: Path, models, tokenizer_dir: Path) -> Path:
    """A Wan original-layout folder: config.json + diffusion_pytorch_model.safetensors,
    Wan2.1_VAE.pth, the umT5 .pth and google/umt5-xxl/ (a copy of tokenizer_dir)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    dit, vae, t5 = models
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(state, str(root / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "WanModel", **dict(dit.config)}
    (root / "config.json").write_text(json.dumps(config, default=list))
    torch.save(vae.state_dict(), root / "Wan2.1_VAE.pth")
    torch.save(_t5_to_wan_names(t5.state_dict()), root / T5_FILE)
    shutil.copytree(tokenizer_dir, root / "google" / "umt5-xxl")
    return root


def write_diffusers(root: Path, models, tokenizer_dir: Path) -> Path:
    """The same weights as a diffusers-layout folder (WanPipeline.save_pretrained)."""
    diffusers_pipeline(tokenizer_dir, models).save_pretrained(str(root))
    return root
