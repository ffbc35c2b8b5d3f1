"""Model folders: strict loading and atomic saving (local folder or Hugging Face hub id).

A model folder holds:

    config.json                      {"model_type": "s2dit", "dit": {...}, "vae": {"type": ...},
                                      "text_encoder": {"type": ...}, "defaults": {...}}
    model.safetensors                the DiT
    vae/config.json, vae/model.safetensors
    text_encoder/config.json, text_encoder/model.safetensors

Components are looked up by their "type" in a registry ("patch" VAE, "byte" text encoder
built in); `register_component` adds more (the Wan VAE and umT5 do). Loading is strict:
any missing, unexpected or mis-shaped weight, unknown type, unreadable file or bad JSON
raises S2DiTError with one line naming the folder and the problem, and so does a weight
holding NaN or infinity (screened with one sum per weight, in the same pass as the load).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import S2DiTError
from .fsutil import atomic_dir
from .models.byte_text_encoder import ByteTextEncoder, ByteTextEncoderConfig
from .models.patch_vae import PatchVAE, PatchVAEConfig
from .models.umt5 import UMT5Config, UMT5TextEncoder
from .models.wan_vae import WanVAE, WanVAEConfig

# The built-in models shipped inside the package: the teacher (trained by train/default_model.py;
# 16 Euler steps with CFG 3 a chunk) and its distilled few-step student, the default (its card:
# docs/default-model.md). `--model builtin:teacher` names the teacher.
TEACHER_MODEL_DIR = Path(__file__).parent / "assets" / "teacher"
STUDENT_MODEL_DIR = Path(__file__).parent / "assets" / "student"
DEFAULT_MODEL_DIR = STUDENT_MODEL_DIR
BUILTIN_MODELS = {"builtin:teacher": TEACHER_MODEL_DIR, "builtin:student": STUDENT_MODEL_DIR}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*/*.json", "*/*.safetensors"]

# kind -> type name -> (config class with from_dict/to_dict, module class taking the config)
_COMPONENTS: dict[str, dict[str, tuple[type, type]]] = {
    "vae": {"patch": (PatchVAEConfig, PatchVAE), "wan": (WanVAEConfig, WanVAE)},
    "text_encoder": {
        "byte": (ByteTextEncoderConfig, ByteTextEncoder),
        "umt5": (UMT5Config, UMT5TextEncoder),
    },
}

# Generation defaults a model folder may set in config.json's "defaults"; these fill the gaps.
DEFAULTS: dict[str, Any] = {
    "height": 288,
    "width": 512,
    "frames": 81,
    "fps": 16,
    "steps": 4,
    "shift": 5.0,
    "guidance": 1.0,
    "negative_prompt": "",
    "mode": "streaming",
    "solver": "unipc",
    # the DiT's compute dtype (a converted bf16 teacher says "bfloat16"); the pipeline's own
    # `dtype` argument wins
    "dtype": "float32",
}
MODES = ("streaming", "bidirectional")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def register_component(kind: str, type_name: str, config_cls: type, model_cls: type) -> None:
    """Make `{"type": type_name}` in a model folder's `kind` entry ("vae"/"text_encoder") loadable."""
    if kind not in _COMPONENTS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {sorted(_COMPONENTS)}")
    _COMPONENTS[kind][type_name] = (config_cls, model_cls)


def component_types(kind: str) -> list[str]:
    """The registered type names of a component kind."""
    return sorted(_COMPONENTS[kind])


@dataclass
class ModelBundle:
    """Everything a Pipeline needs: the DiT, the VAE, the text encoder and the defaults."""

    dit: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    defaults: dict = field(default_factory=lambda: dict(DEFAULTS))
    config: dict = field(default_factory=dict)
    path: Path | None = None
    name: str = ""


# ----------------------------------------------------------------------------------------------
# Reading


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def read_json(path: Path, where: str) -> dict:
    """A JSON object from `path`; S2DiTError (prefixed by `where`) when missing or invalid."""
    if not path.is_file():
        raise S2DiTError(f"{where}: {path.name} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise S2DiTError(
            f"{where}: {path.name} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise S2DiTError(f"{where}: cannot read {path.name}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise S2DiTError(f"{where}: {path.name} must hold a JSON object")
    return data


def _read_sharded(index: Path, where: str, file: str) -> dict[str, mx.array]:
    """The shards named in a `*.safetensors.index.json` (as convert/ and transformers write)."""
    weight_map = read_json(index, where).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise S2DiTError(f"{where}: {index.name} has no valid weight_map")
    folder = file.rpartition("/")[0]
    weights: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard.startswith("."):
            raise S2DiTError(f"{where}: {index.name} names a shard outside its folder: {shard}")
        weights.update(read_weights(index.parent / shard, where, f"{folder}/{shard}".lstrip("/")))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise S2DiTError(
            f"{where}: weight {missing[0]} listed in {index.name} is not in {weight_map[missing[0]]}"
        )
    return weights


def read_weights(path: Path, where: str, file: str | None = None) -> dict[str, mx.array]:
    """The weights in `path` (a safetensors file, or the shards its `.index.json` names).

    The one weight reader: model folders, component folders and converted Wan folders.
    """
    file = file or path.name
    index = path.with_name(path.name + ".index.json")
    if not path.is_file() and index.is_file():
        return _read_sharded(index, where, file)
    if not path.is_file():
        raise S2DiTError(f"{where}: weights file {file} is missing")
    try:
        weights = mx.load(str(path), format="safetensors")
    except Exception as err:  # mlx raises RuntimeError/ValueError for corrupt files
        raise S2DiTError(
            f"{where}: {file} is not a readable safetensors file ({_one_line(err)})"
        ) from None
    if not isinstance(weights, dict):
        raise S2DiTError(f"{where}: {file} holds no weight dict")
    return weights


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def _check_quantization(quantization: Any, where: str) -> dict | None:
    if quantization is None:
        return None
    if (
        not isinstance(quantization, dict)
        or quantization.get("bits") not in (2, 3, 4, 5, 6, 8)
        or quantization.get("group_size") not in (32, 64, 128)
    ):
        raise S2DiTError(
            f'{where}: "quantization" must be {{"group_size": 32|64|128, "bits": 2-8}}, '
            f"got {quantization!r}"
        )
    return quantization


def load_weights_strict(
    module: nn.Module,
    path: Path,
    where: str,
    file: str | None = None,
    quantization: dict | None = None,
) -> None:
    """Load safetensors (one file or shards with an index) into module, strictly.

    Raises S2DiTError on any key or shape mismatch. `where` prefixes every message (e.g.
    "model folder X"); `file` names the file in it. With `quantization` ({"group_size",
    "bits"}), the Linear layers whose weights come with `.scales` become QuantizedLinear first.
    """
    file = file or path.name
    weights = read_weights(path, where, file)
    if hasattr(module, "sanitize"):
        weights = module.sanitize(weights)
    if quantization:
        nn.quantize(
            module,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
        raise S2DiTError(f"{where}: weight {missing[0]} is missing from {file}{more}")
    if unexpected:
        more = f" ({len(unexpected)} unexpected in all)" if len(unexpected) > 1 else ""
        raise S2DiTError(f"{where}: unexpected weight {unexpected[0]} in {file}{more}")
    for name in sorted(expected):
        got, want = weights[name].shape, expected[name].shape
        if tuple(got) != tuple(want):
            raise S2DiTError(
                f"{where}: weight {name} in {file} has shape {_shape(got)}, expected {_shape(want)}"
            )
    for name, w in weights.items():
        packed = w.dtype == mx.uint32 and f"{name.rpartition('.')[0]}.scales" in weights
        if not mx.issubdtype(w.dtype, mx.floating) and not packed:
            raise S2DiTError(f"{where}: weight {name} in {file} has non-float dtype {w.dtype}")
    module.load_weights(list(weights.items()), strict=True)
    sums = _weight_sums(weights)
    mx.eval(module.parameters(), sums)  # one pass reads the weights and screens them
    _check_finite(weights, sums, where, file)


def _weight_sums(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    # One sum per floating weight, evaluated with the load: a NaN or an infinity makes it
    # non-finite. A plain sum is 3-5x cheaper on the CPU than isfinite(w).all().
    return {n: w.sum() for n, w in weights.items() if mx.issubdtype(w.dtype, mx.floating)}


def _check_finite(
    weights: dict[str, mx.array], sums: dict[str, mx.array], where: str, file: str
) -> None:
    """Raise S2DiTError naming the first weight (by name) that holds a NaN or an infinity."""
    if not sums or mx.isfinite(mx.stack(list(sums.values()))).all().item():
        return
    # A non-finite sum can also be an overflow (many large float16 values): check exactly.
    for name in sorted(sums):
        w = weights[name]
        if not mx.isfinite(sums[name]).item() and not mx.isfinite(w).all().item():
            what = "NaN" if mx.isnan(w).any().item() else "infinite"
            raise S2DiTError(
                f"{where}: weight {name} in {file} holds {what} values (a diverged training "
                "run or a broken conversion); the model cannot generate from it"
            )


def build_dit(cfg: Any, where: str) -> nn.Module:
    """A random-initialised S2DiT from a "dit" config dict."""
    from .models.s2dit import ModelArgs, S2DiT  # imported late: keeps `import loading` light

    if not isinstance(cfg, dict):
        raise S2DiTError(f'{where}: config.json needs a "dit" object')
    try:
        return S2DiT(ModelArgs.from_dict(cfg))
    except S2DiTError as err:
        raise S2DiTError(f"{where}: {err}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise S2DiTError(f'{where}: invalid "dit" config ({_one_line(err)})') from None


def build_component(kind: str, cfg: Any, where: str) -> nn.Module:
    """A random-initialised VAE or text encoder ("vae" / "text_encoder") from its config dict."""
    if not isinstance(cfg, dict):
        raise S2DiTError(f"{where}: the {kind} config must be a JSON object")
    type_name = cfg.get("type")
    if type_name not in _COMPONENTS[kind]:
        known = ", ".join(component_types(kind))
        raise S2DiTError(f"{where}: unknown {kind} type {type_name!r} (known: {known})")
    config_cls, model_cls = _COMPONENTS[kind][type_name]
    try:
        config = config_cls.from_dict(cfg)
        return model_cls(config)
    except S2DiTError as err:
        raise S2DiTError(f"{where}: {err}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise S2DiTError(f"{where}: invalid {kind} config ({_one_line(err)})") from None


def check_defaults(defaults: Any, where: str) -> dict:
    """A folder's generation defaults merged over DEFAULTS, every value checked."""
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        raise S2DiTError(f'{where}: "defaults" in config.json must be a JSON object')
    merged = {**DEFAULTS, **{k: v for k, v in defaults.items() if k in DEFAULTS}}
    for key in ("height", "width", "frames", "steps"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise S2DiTError(f"{where}: default {key} must be a positive integer, got {value!r}")
    for key in ("fps", "shift", "guidance"):
        value = merged[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise S2DiTError(f"{where}: default {key} must be a number, got {value!r}")
    if merged["mode"] not in MODES:
        raise S2DiTError(
            f"{where}: default mode must be one of {', '.join(MODES)}, got {merged['mode']!r}"
        )
    if not isinstance(merged["negative_prompt"], str):
        raise S2DiTError(f"{where}: default negative_prompt must be a string")
    if merged["dtype"] not in DTYPE_NAMES:
        raise S2DiTError(
            f"{where}: default dtype must be one of {', '.join(DTYPE_NAMES)}, got {merged['dtype']!r}"
        )
    return merged


def _looks_like_hub_id(name: str) -> bool:
    # "owner/name" (optionally name alone); never an absolute, home or dotted relative path.
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and not (
        name.startswith(".") or "/." in name or ".." in name
    )


def resolve_model_path(path_or_hub_id: str | os.PathLike) -> Path:
    """A built-in model's name, a local model folder, or the local snapshot of a Hugging Face hub
    repository."""
    name = os.fspath(path_or_hub_id)
    if not name.strip():
        raise S2DiTError("model path is empty")
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    if name.startswith("builtin:"):
        raise S2DiTError(
            f"no built-in model {name}; the built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise S2DiTError(f"model path {name} is a file, expected a model folder")
        return local
    if not _looks_like_hub_id(name):
        raise S2DiTError(f"model folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # network, auth, offline cache misses, bad ids
        raise S2DiTError(
            f"model {name} is neither a local folder nor a downloadable Hugging Face repository "
            f"({type(err).__name__}: {_one_line(err)})"
        ) from None


def _component_cfg(config: dict, kind: str, folder: Path | None, where: str) -> Any:
    """A component's config: the folder's own config.json over the top-level entry."""
    cfg = config[kind]
    sub = folder / kind / CONFIG_NAME if folder is not None else None
    if sub is not None and sub.is_file():
        sub_cfg = read_json(sub, where)
        cfg = {**cfg, **sub_cfg} if isinstance(cfg, dict) else sub_cfg
    return cfg


def _components(config: dict, where: str, folder: Path | None) -> tuple:
    """(vae, text_encoder, defaults) of a config.json dict, random weights, entries checked."""
    for kind in ("dit", "vae", "text_encoder"):
        if kind not in config:
            raise S2DiTError(f'{where}: config.json has no "{kind}" entry')
    model_type = config.get("model_type", "s2dit")
    if model_type != "s2dit":
        raise S2DiTError(f"{where}: model_type {model_type!r} is not supported (expected 's2dit')")
    defaults = check_defaults(config.get("defaults"), where)
    vae = build_component("vae", _component_cfg(config, "vae", folder, where), where)
    text_encoder = build_component(
        "text_encoder", _component_cfg(config, "text_encoder", folder, where), where
    )
    return vae, text_encoder, defaults


def build_model(config: dict, where: str, folder: Path | None = None) -> tuple:
    """(dit, vae, text_encoder, defaults) from a model-folder config.json dict, random weights.

    `folder`: where the component folders' own config.json files are read from.
    """
    vae, text_encoder, defaults = _components(config, where, folder)
    dit = build_dit(config["dit"], where)
    _check_compatible(dit, vae, text_encoder, where)
    return dit, vae, text_encoder, defaults


def _load_assets(module, folder: Path, where: str) -> None:
    # Files a component keeps beside its weights (the umT5 tokenizer.json).
    if hasattr(module, "load_assets"):
        try:
            module.load_assets(folder)
        except S2DiTError as err:
            raise S2DiTError(f"{where}: {err}") from None


def load_component(kind: str, folder: str | os.PathLike, where: str | None = None) -> nn.Module:
    """A component folder (RUN/vae of train.vae, a model folder's vae/ or text_encoder/)."""
    folder = Path(folder)
    where = where or f"{kind} folder {folder}"
    if not folder.is_dir():
        raise S2DiTError(f"{where}: no such folder")
    module = build_component(kind, read_json(folder / CONFIG_NAME, where), where)
    load_weights_strict(module, folder / WEIGHTS_NAME, where)
    _load_assets(module, folder, where)
    return module


def _load_dit(config: dict, path: Path, where: str, dit: nn.Module | None = None) -> nn.Module:
    """The DiT of a folder (into `dit` when given): one S2DiT, or a Wan2.2 A14B's two experts."""
    quantization = _check_quantization(config.get("quantization"), where)
    experts = _check_experts(config.get("experts"), where)
    dit = dit if dit is not None else build_dit(config["dit"], where)
    load_weights_strict(dit, path / WEIGHTS_NAME, where, WEIGHTS_NAME, quantization)
    if experts is None:
        return dit
    # Wan2.2 A14B: `dit` is the high-noise expert, the low-noise one sits in a subfolder.
    from .models.wan import WanExperts

    low = build_dit(config["dit"], where)
    sub = experts["low_noise"] + "/"
    load_weights_strict(low, path / sub / WEIGHTS_NAME, where, sub + WEIGHTS_NAME, quantization)
    return WanExperts(dit, low, experts["boundary"], tuple(experts["guidance"]))


def load_dit(path_or_hub_id: str | os.PathLike) -> nn.Module:
    """Only the DiT of a model folder (e.g. one converted with `--only dit`)."""
    path = resolve_model_path(path_or_hub_id)
    where = f"model folder {os.fspath(path_or_hub_id)}"
    config = read_json(path / CONFIG_NAME, where)
    if "dit" not in config:
        raise S2DiTError(f'{where}: config.json has no "dit" entry')
    return _load_dit(config, path, where)


def load_model(path_or_hub_id: str | os.PathLike) -> ModelBundle:
    """Load a model folder (local path or hub id) strictly into a ModelBundle."""
    path = resolve_model_path(path_or_hub_id)
    where = f"model folder {os.fspath(path_or_hub_id)}"
    config = read_json(path / CONFIG_NAME, where)
    dit, vae, text_encoder, defaults = build_model(config, where, path)
    quantization = _check_quantization(config.get("quantization"), where)
    dit = _load_dit(config, path, where, dit)
    for module, kind in ((vae, "vae"), (text_encoder, "text_encoder")):
        sub = kind + "/"
        file = path / sub / WEIGHTS_NAME
        load_weights_strict(module, file, where, sub + WEIGHTS_NAME, quantization)
        _load_assets(module, path / kind, where)
    return ModelBundle(
        dit=dit,
        vae=vae,
        text_encoder=text_encoder,
        defaults=defaults,
        config=config,
        path=path,
        name=os.fspath(path_or_hub_id),
    )


def _check_experts(experts: Any, where: str) -> dict | None:
    if experts is None:
        return None
    ok = (
        isinstance(experts, dict)
        and isinstance(experts.get("boundary"), (int, float))
        and 0 < experts["boundary"] < 1
        and isinstance(experts.get("guidance"), list)
        and len(experts["guidance"]) == 2
        and all(isinstance(g, (int, float)) for g in experts["guidance"])
        and isinstance(experts.get("low_noise"), str)
        and re.fullmatch(r"[A-Za-z0-9_-]+", experts["low_noise"]) is not None
    )
    if not ok:
        raise S2DiTError(
            f'{where}: "experts" must be {{"boundary": 0..1, "guidance": [low, high], '
            f'"low_noise": "<subfolder>"}}, got {experts!r}'
        )
    return experts


def _check_compatible(dit, vae, text_encoder, where: str) -> None:
    args = dit.args
    # Wan2.2 I2V adds a 4-channel mask and the image latents to the DiT input.
    if vae.z_dim != args.out_dim or args.in_dim not in (vae.z_dim, 2 * vae.z_dim + 4):
        raise S2DiTError(
            f"{where}: VAE z_dim {vae.z_dim} does not match the DiT's in_dim/out_dim "
            f"{args.in_dim}/{args.out_dim}"
        )
    if text_encoder.dim != args.text_dim:
        raise S2DiTError(
            f"{where}: text encoder dim {text_encoder.dim} does not match the DiT's text_dim "
            f"{args.text_dim}"
        )


# ----------------------------------------------------------------------------------------------
# Saving


def _component_config(module) -> dict:
    cfg = module.config.to_dict()
    if "type" not in cfg:
        raise ValueError(f"{type(module).__name__}.config.to_dict() has no 'type'")
    return cfg


def _save_weights(module: nn.Module, path: Path) -> None:
    weights = dict(tree_flatten(module.parameters()))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def save_model(
    path: str | os.PathLike,
    dit: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    defaults: dict | None = None,
) -> Path:
    """Save a model folder atomically (written beside the target, then swapped into place).

    An existing folder at `path` is replaced, once the new one is complete, only if it is a
    model folder s2dit-mlx wrote and holds no other files; anything else raises S2DiTError
    (fsutil's output rule).
    """
    target = Path(path).expanduser()
    merged = check_defaults(defaults or {}, f"model folder {target}")
    vae_cfg, text_cfg = _component_config(vae), _component_config(text_encoder)
    config = {
        "model_type": "s2dit",
        "dit": dit.args.to_dict(),
        "vae": vae_cfg,
        "text_encoder": text_cfg,
        "defaults": merged,
    }
    with atomic_dir(target, "model") as tmp:
        (tmp / "vae").mkdir()
        (tmp / "text_encoder").mkdir()
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / "vae" / CONFIG_NAME, vae_cfg)
        _write_json(tmp / "text_encoder" / CONFIG_NAME, text_cfg)
        _save_weights(dit, tmp / WEIGHTS_NAME)
        _save_weights(vae, tmp / "vae" / WEIGHTS_NAME)
        _save_weights(text_encoder, tmp / "text_encoder" / WEIGHTS_NAME)
        for module, kind in ((vae, "vae"), (text_encoder, "text_encoder")):
            if hasattr(module, "save_assets"):  # e.g. the umT5 tokenizer.json
                module.save_assets(tmp / kind)
    return target


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
