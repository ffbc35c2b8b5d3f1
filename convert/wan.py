"""Convert a Wan 2.x checkpoint (original or diffusers layout) into an s2dit-mlx model folder.

    python -m convert.wan SRC --out DIR [--dtype bf16|fp16|fp32] [-q 4|8]

SRC is a local folder or a Hugging Face hub id, in either layout:

- original:  config.json + diffusion_pytorch_model*.safetensors (+ .index.json) for the DiT
             (Wan2.2 A14B: high_noise_model/ and low_noise_model/), Wan2.1_VAE.pth or
             Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer);
- diffusers: model_index.json, transformer/ (A14B: + transformer_2/), vae/, text_encoder/,
             tokenizer/.

Tensors are read one at a time and written shard by shard, so a 14B model converts in a
few GB of memory. The output folder:

    config.json                       dit / vae / text_encoder configs, generation defaults,
                                      "quantization", "experts" (A14B), "wan" (provenance)
    model.safetensors                 the DiT (A14B: the high-noise expert), or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json
    low_noise/model*.safetensors      A14B only: the low-noise expert
    vae/config.json, vae/model.safetensors
    text_encoder/config.json, text_encoder/model*.safetensors, text_encoder/tokenizer.json
    conversion_report.json            source files, tensor counts, unused source tensors
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from s2dit_mlx.cli_args import Parser
from s2dit_mlx.errors import S2DiTError, run_cli
from s2dit_mlx.fsutil import atomic_dir, check_inputs, check_output_dir
from s2dit_mlx.models import wan
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT

from .weights import (
    COMPUTE_DTYPES,
    DTYPES,
    ShardWriter,
    WeightSet,
    open_sharded,
    open_weight_file,
    parse_size,
    quantize_weight,
    should_quantize_linear,
)

DIT_STEM = "diffusion_pytorch_model"
LOW_NOISE_DIR = "low_noise"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILES = {"Wan2.1_VAE.pth": "wan2.1", "Wan2.2_VAE.pth": "wan2.2"}
# What to fetch from a hub repository, per component (both layouts); configs always.
HUB_PATTERNS = {
    "dit": [
        "*.json",
        f"{DIT_STEM}*.safetensors",
        f"high_noise_model/{DIT_STEM}*",
        f"low_noise_model/{DIT_STEM}*",
        "transformer/*",
        "transformer_2/*",
    ],
    "vae": [*VAE_FILES, "vae/*"],
    "text_encoder": [T5_FILE, "google/umt5-xxl/*", "text_encoder/*", "tokenizer/*"],
}
# Small tensors that stay float32 whatever --dtype says: the time embedding MLP and the
# AdaLN modulation tables (Wan and diffusers keep these in fp32 too).
KEEP_FP32 = re.compile(r"^(time_embedding\.|time_projection\.)|modulation$")
QUANTIZED_PREFIXES = {"dit": ("blocks.",), "text_encoder": ("blocks.",)}
COMPONENTS = ("dit", "vae", "text_encoder")
GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports


# ----------------------------------------------------------------------------------------------
# What the source folder holds


@dataclass
class DitSource:
    """One DiT (or one expert) in the source."""

    folder: Path
    weights: WeightSet
    config: dict | None
    layout: str  # "original" or "diffusers"


@dataclass
class WanCheckpoint:
    """The parts of a Wan checkpoint folder, in either layout."""

    root: Path
    layout: str
    dits: list[DitSource]  # one, or (high-noise, low-noise) for A14B
    boundary: float | None = None
    vae: Path | None = None  # a .pth file or a diffusers vae/ folder
    text_encoder: Path | None = None  # a .pth file or a diffusers text_encoder/ folder
    tokenizer: Path | None = None  # a folder with tokenizer.json (or spiece.model)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise S2DiTError(f"{path} is not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise S2DiTError(f"{path} must hold a JSON object")
    return data


def _dit_source(folder: Path) -> DitSource | None:
    weights = open_sharded(folder, DIT_STEM)
    if weights is None:
        return None
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    cls = (config or {}).get("_class_name")
    if cls is not None and cls not in ("WanModel", "WanTransformer3DModel"):
        raise S2DiTError(f"{folder} holds a {cls}, not a Wan DiT (WanModel/WanTransformer3DModel)")
    diffusers = cls == "WanTransformer3DModel" or any(
        wan.is_diffusers_name(k) for k in weights.keys()
    )
    return DitSource(folder, weights, config, "diffusers" if diffusers else "original")


def _need_dit(folder: Path, what: str) -> DitSource:
    dit = _dit_source(folder)
    if dit is None:
        raise S2DiTError(f"{folder} has no {DIT_STEM}*.safetensors ({what})")
    return dit


def inspect_checkpoint(root: Path) -> WanCheckpoint:
    """Find the DiT(s), VAE, text encoder and tokenizer in a Wan checkpoint folder."""
    if (root / "model_index.json").is_file() or (root / "transformer").is_dir():
        index = (
            _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        )
        cls = index.get("_class_name", "WanPipeline")
        if not (cls.startswith("Wan") and cls.endswith("Pipeline")):
            raise S2DiTError(f"{root} holds a diffusers {cls}, not a Wan pipeline")
        dits = [_need_dit(root / "transformer", "diffusers transformer/")]
        boundary = index.get("boundary_ratio")
        if (root / "transformer_2").is_dir():
            dits.append(_need_dit(root / "transformer_2", "diffusers transformer_2/"))
            boundary = boundary or 0.875
        return WanCheckpoint(
            root,
            "diffusers",
            dits,
            boundary=boundary if len(dits) == 2 else None,
            vae=root / "vae" if (root / "vae").is_dir() else None,
            text_encoder=root / "text_encoder" if (root / "text_encoder").is_dir() else None,
            tokenizer=root / "tokenizer" if (root / "tokenizer").is_dir() else None,
        )
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        dits = [
            _need_dit(root / "high_noise_model", "the A14B high-noise expert"),
            _need_dit(root / "low_noise_model", "the A14B low-noise expert"),
        ]
        task = (dits[0].config or {}).get("model_type", "t2v")
        boundary = 0.900 if task == "i2v" else 0.875  # wan/configs: i2v-A14B, t2v-A14B
    else:
        dit = _dit_source(root)
        if dit is None:
            raise S2DiTError(
                f"{root} is not a Wan checkpoint: no {DIT_STEM}*.safetensors, "
                "high_noise_model/, transformer/ or model_index.json"
            )
        dits, boundary = [dit], None
    vae = next((root / name for name in VAE_FILES if (root / name).is_file()), None)
    tokenizer = root / "google" / "umt5-xxl"
    return WanCheckpoint(
        root,
        dits[0].layout,
        dits,
        boundary=boundary,
        vae=vae,
        text_encoder=root / T5_FILE if (root / T5_FILE).is_file() else None,
        tokenizer=tokenizer if tokenizer.is_dir() else None,
    )


def hub_patterns(components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """allow_patterns for snapshot_download: the Wan files of these components only."""
    return [p for c in COMPONENTS if c in components for p in HUB_PATTERNS[c]]


def resolve_source(src: str | os.PathLike, components: tuple[str, ...] = COMPONENTS) -> Path:
    """A local checkpoint folder, or the snapshot of a hub repository (Wan files only)."""
    name = os.fspath(src)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise S2DiTError(f"{name} is a file; give the checkpoint folder")
        return local
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) or ".." in name:
        raise S2DiTError(f"checkpoint folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=hub_patterns(components)))
    except Exception as err:  # network, auth, offline cache misses, bad ids
        raise S2DiTError(
            f"{name} is neither a local folder nor a downloadable Hugging Face repository "
            f"({type(err).__name__}: {' '.join(str(err).split())})"
        ) from None


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class ComponentReport:
    """What one component's conversion read and wrote."""

    kind: str
    source: list[str]
    tensors_read: int = 0
    tensors_written: int = 0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # source tensors with no place in ours
    quantized: int = 0


@dataclass
class ConversionReport:
    """The whole conversion: where from, where to, each component."""

    source: str
    layout: str
    out: str
    preset: str | None
    dtype: str
    quantization: dict | None
    components: list[ComponentReport] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [
            f"converted {self.source} ({self.layout} layout"
            + (f", {self.preset}" if self.preset else "")
            + f") -> {self.out}"
        ]
        for c in self.components:
            q = f", {c.quantized} quantized" if c.quantized else ""
            out.append(
                f"  {c.kind}: {c.tensors_read} tensors read, {c.tensors_written} written{q}, "
                f"{c.bytes_written / 2**20:.1f} MiB in {len(c.files)} file(s)"
            )
            if c.unused:
                more = f" (+{len(c.unused) - 5} more)" if len(c.unused) > 5 else ""
                out.append(f"    unused source tensors: {', '.join(c.unused[:5])}{more}")
        return out


# ----------------------------------------------------------------------------------------------
# Components


def _placeholders(shapes: dict[str, tuple[int, ...]]) -> dict[str, mx.array]:
    # Lazy zeros, never evaluated: they let a module's sanitize() show how it renames and
    # reshapes each tensor without reading a byte of the checkpoint.
    return {name: mx.zeros(shape, dtype=mx.float32) for name, shape in shapes.items()}


def _check_shape(what: str, name: str, got, target: str, want) -> None:
    if tuple(got) != tuple(want):
        raise S2DiTError(
            f"{what}: tensor {name} becomes {target} of shape {tuple(got)}, but the model needs "
            f"{tuple(want)} (a different architecture or size)"
        )


def _plan(
    weights: WeightSet,
    rename: Callable[[dict], dict],
    expected: dict[str, tuple[int, ...]],
    what: str,
    whole: bool = False,
) -> tuple[dict[str, list[str]], list[str]]:
    """Map source tensors to the names they become; check names and shapes up front.

    Returns (source name -> target names, unused source names). With `whole`, rename sees
    every tensor at once; the mapping is then {"*": targets} and unused names are ours.
    """
    mapping, unused, produced = {}, [], {}
    if whole:
        out = rename(_placeholders(weights.shapes()))
        unused = [t for t in out if t not in expected]
        for t in out:
            if t in expected:
                _check_shape(what, t, out[t].shape, t, expected[t])
                produced[t] = t
        mapping = {"*": [t for t in out if t in expected]}
    for name, shape in ({} if whole else weights.shapes()).items():
        out = rename(_placeholders({name: shape}))
        targets = [t for t in out if t in expected]
        if not targets:
            unused.append(name)
            continue
        for t in targets:
            _check_shape(what, name, out[t].shape, t, expected[t])
            if t in produced:
                raise S2DiTError(f"{what}: both {produced[t]} and {name} map to {t}")
            produced[t] = name
        mapping[name] = targets
    missing = sorted(set(expected) - set(produced))
    if missing:
        more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
        raise S2DiTError(f"{what}: the checkpoint has no tensor for {missing[0]}{more}")
    return mapping, unused


def _write_component(
    kind: str,
    weights: WeightSet,
    rename: Callable[[dict], dict],
    expected: dict[str, tuple[int, ...]],
    folder: Path,
    *,
    dtype: mx.Dtype,
    quantization: dict | None,
    shard_bytes: int,
    metadata: dict,
    keep_fp32: re.Pattern | None = None,
    what: str = "",
    whole: bool = False,
) -> ComponentReport:
    """Convert one component's tensors (lazily, shard by shard) into folder/model*.safetensors."""
    mapping, unused = _plan(weights, rename, expected, what or kind, whole)
    report = ComponentReport(kind, [str(p) for p in weights.paths], unused=sorted(unused))
    writer = ShardWriter(folder, "model", shard_bytes, metadata)
    prefixes = QUANTIZED_PREFIXES.get(kind, ())
    for name, targets in mapping.items():
        if whole:
            out = rename({k: weights.get(k) for k in weights.keys()})
            report.tensors_read += len(weights.keys())
        else:
            out = rename({name: weights.get(name)})
            report.tensors_read += 1
        for target in targets:
            w = out[target]
            if mx.issubdtype(w.dtype, mx.floating):
                keep = keep_fp32 is not None and keep_fp32.search(target)
                w = w.astype(mx.float32 if keep else dtype)
            if quantization and should_quantize_linear(
                target, w.shape, quantization["group_size"], prefixes
            ):
                parts = quantize_weight(target, w, quantization["group_size"], quantization["bits"])
                report.quantized += 1
            else:
                parts = {target: w}
            for part_name, part in parts.items():
                writer.add(part_name, part)
                report.tensors_written += 1
    report.files = [p.name for p in writer.close()]
    report.bytes_written = writer.total_bytes
    return report


def dit_args(dit: DitSource) -> ModelArgs:
    """ModelArgs of a source DiT from its config.json and weight shapes."""
    shapes = {wan.wan_name(k): v for k, v in dit.weights.shapes().items()}
    if any("img_emb" in k or "k_img" in k for k in shapes):
        raise S2DiTError(
            f"{dit.folder}: Wan2.1 image-to-video (CLIP image branch) is not supported"
        )
    where = f"{dit.folder}/config.json"
    if dit.layout == "diffusers" and dit.config is not None:
        return wan.args_from_diffusers_config(dit.config, where)
    if dit.config is not None:
        # (source shapes: the patch embedding is still in PyTorch's O, I, D, H, W layout)
        return wan.args_from_wan_config(dit.config, shapes, where)
    return wan.args_from_shapes(shapes)


def _expected(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def _convert_dit(dit: DitSource, args: ModelArgs, folder: Path, **kw) -> ComponentReport:
    expected = _expected(S2DiT(args))  # lazy: parameters are never evaluated
    return _write_component(
        "dit",
        dit.weights,
        wan.sanitize,
        expected,
        folder,
        keep_fp32=KEEP_FP32,
        what=f"DiT {dit.folder}",
        **kw,
    )


def _text_encoder_config(ckpt: WanCheckpoint, weights: WeightSet):
    from s2dit_mlx.models.umt5 import UMT5Config

    path = ckpt.text_encoder
    if path.is_dir():
        cfg = _read_json(path / "config.json")
        if cfg.get("model_type", "umt5") not in ("umt5", "t5"):
            raise S2DiTError(f"{path} holds a {cfg.get('model_type')} model, not umT5")
        return UMT5Config.from_dict(cfg)
    # Wan's .pth has no config: read the sizes off the tensors (umT5-XXL for real files).
    shapes = weights.shapes()
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        inner = shapes["blocks.0.attn.q.weight"][0]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
    except (KeyError, ValueError) as err:
        raise S2DiTError(f"{path.name} does not look like Wan's umT5 encoder (no {err})") from None
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def _text_encoder_weights(path: Path) -> WeightSet:
    if path.is_dir():
        weights = open_sharded(path, "model")
        if weights is None:
            raise S2DiTError(f"{path} has no model*.safetensors")
        return weights
    return WeightSet([open_weight_file(path)])


def _copy_tokenizer(src: Path | None, dst: Path, name: str) -> None:
    if src is None:
        raise S2DiTError("the checkpoint has no tokenizer (google/umt5-xxl/ or tokenizer/)")
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst / name)
        return
    try:  # only a sentencepiece model: let transformers build the tokenizer.json
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src)).backend_tokenizer.save(str(dst / name))
    except Exception as err:
        raise S2DiTError(
            f"{src} has no tokenizer.json and transformers could not build one "
            f"({' '.join(str(err).split())})"
        ) from None


def _convert_text_encoder(ckpt: WanCheckpoint, folder: Path, **kw) -> tuple[dict, ComponentReport]:
    from s2dit_mlx.models.umt5 import UMT5TextEncoder

    weights = _text_encoder_weights(ckpt.text_encoder)
    config = _text_encoder_config(ckpt, weights)
    module = UMT5TextEncoder(config)
    report = _write_component(
        "text_encoder",
        weights,
        module.sanitize,
        _expected(module),
        folder,
        what=f"text encoder {ckpt.text_encoder}",
        **kw,
    )
    _copy_tokenizer(ckpt.tokenizer, folder, config.tokenizer)
    return config.to_dict(), report


def _vae_config(ckpt: WanCheckpoint, weights: WeightSet):
    from s2dit_mlx.models import wan_vae

    path = ckpt.vae
    if path.is_dir():
        cfg = _read_json(path / "config.json")
        if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
            raise S2DiTError(f"{path} holds a {cfg['_class_name']}, not a Wan VAE")
        return wan_vae.WanVAEConfig.from_diffusers_config(cfg)
    # Wan's .pth has no config: widths come from the tensors, the rest is the published
    # layout (dim_mult 1,2,4,4; 2 residual blocks; time downsampled in the last two levels).
    shapes = weights.shapes()
    try:
        base_dim, in_channels = shapes["encoder.conv1.weight"][:2]
        z_dim = shapes["conv2.weight"][0]
        decoder_dim = shapes["decoder.conv1.weight"][0]
    except (KeyError, ValueError) as err:
        raise S2DiTError(f"{path.name} does not look like a Wan VAE (no {err})") from None
    version = "2.2" if any(".downsamples.0.downsamples." in k for k in shapes) else "2.1"
    expected = VAE_FILES.get(path.name)
    if expected is not None and expected != "wan" + version:
        raise S2DiTError(f"{path.name} holds a Wan {version} VAE, not what its name says")
    published = wan_vae.WanVAEConfig.wan22() if version == "2.2" else wan_vae.WanVAEConfig.wan21()
    config = wan_vae.WanVAEConfig(
        version=version,
        base_dim=base_dim,
        decoder_base_dim=decoder_dim // published.dim_mult[-1],
        z_dim=z_dim,
        patch_size=max(1, int(round((in_channels / 3) ** 0.5))),
    )
    if config.decoder_base_dim == config.base_dim:
        config.decoder_base_dim = None
    if (config.base_dim, config.dec_dim, config.z_dim) == (
        published.base_dim,
        published.dec_dim,
        published.z_dim,
    ):
        # the published latent statistics, only for the published sizes
        config.latents_mean = list(published.latents_mean)
        config.latents_std = list(published.latents_std)
    return config


def _convert_vae(ckpt: WanCheckpoint, folder: Path, **kw) -> tuple[dict, ComponentReport]:
    from s2dit_mlx.models.wan_vae import WanVAE

    path = ckpt.vae
    if path.is_dir():
        weights = open_sharded(path, DIT_STEM)
        if weights is None:
            raise S2DiTError(f"{path} has no {DIT_STEM}*.safetensors")
    else:
        weights = WeightSet([open_weight_file(path)])
    config = _vae_config(ckpt, weights)
    module = WanVAE(config)
    # The VAE's sanitize() tells its layouts apart from the whole dict, and the VAE is small
    # (<= 3 GB in fp32): it converts in one piece.
    report = _write_component(
        "vae",
        weights,
        module.sanitize,
        _expected(module),
        folder,
        whole=True,
        what=f"VAE {path}",
        **kw,
    )
    return config.to_dict(), report


# ----------------------------------------------------------------------------------------------
# Driver


def _defaults(preset: wan.WanPreset | None) -> dict:
    if preset is not None:
        return dict(preset.defaults)
    return dict(wan.PRESETS["wan2.1-t2v-1.3b"].defaults)


def _check_quantizable(args: ModelArgs, group_size: int) -> None:
    """Refuse a quantization that would leave every DiT linear layer as it is."""
    prefixes = QUANTIZED_PREFIXES["dit"]
    if not any(
        should_quantize_linear(name, shape, group_size, prefixes)
        for name, shape in _expected(S2DiT(args)).items()  # lazy: nothing is evaluated
    ):
        raise S2DiTError(
            f"no linear layer of this DiT (width {args.dim}) has an input width divisible by "
            f"the group size {group_size}, so nothing would be quantized; use a smaller "
            "--group-size or leave out -q"
        )


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "bf16",
    bits: int | None = None,
    group_size: int = 64,
    shard_size: str | int = "5GB",
    components: tuple[str, ...] = COMPONENTS,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> ConversionReport:
    """Convert the Wan checkpoint `src` (folder or hub id) into the model folder `out`."""
    if dtype not in DTYPES:
        raise S2DiTError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if bits not in (None, 4, 8):
        raise S2DiTError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise S2DiTError(
            f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
            f"got {group_size!r}"
        )
    shard_bytes = parse_size(shard_size)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or "dit" not in components:
        raise S2DiTError(f"components must include dit and be among {', '.join(COMPONENTS)}")
    # --out: new, empty, or (overwrite) a model folder we wrote; never the checkpoint itself.
    source = [("checkpoint folder", src)]
    target = check_output_dir(out, "model", inputs=source, overwrite=overwrite, flag=None)

    root = resolve_source(src, components)
    check_inputs(target, [("checkpoint folder", root)], "output folder")  # a hub snapshot
    ckpt = inspect_checkpoint(root)
    for kind, path in (("vae", ckpt.vae), ("text_encoder", ckpt.text_encoder)):
        if kind in components and path is None:
            files = {"vae": "Wan2.x_VAE.pth or vae/", "text_encoder": f"{T5_FILE} or text_encoder/"}
            raise S2DiTError(
                f"{root} has no {kind.replace('_', ' ')} ({files[kind]}); "
                "leave it out with --only (e.g. --only dit)"
            )
    args = dit_args(ckpt.dits[0])
    if len(ckpt.dits) == 2 and dit_args(ckpt.dits[1]) != args:
        raise S2DiTError(f"{root}: the two experts have different shapes")
    preset = wan.find_preset(args, two_experts=len(ckpt.dits) == 2)
    quantization = {"group_size": group_size, "bits": bits} if bits else None
    if quantization:
        _check_quantizable(args, group_size)
    report = ConversionReport(
        str(src), ckpt.layout, str(target), preset.name if preset else None, dtype, quantization
    )
    base_meta = {"format": "mlx", "converted_by": "s2dit-mlx convert.wan", "source": str(src)}
    base_meta["source_layout"] = ckpt.layout
    if quantization:
        base_meta["quantization"] = json.dumps(quantization)

    def common(kind: str, quantize: bool, out_dtype: str = dtype) -> dict:
        meta = {**base_meta, "component": kind, "dtype": out_dtype}
        if not quantize:
            meta.pop("quantization", None)
        return dict(
            dtype=DTYPES[out_dtype],
            quantization=quantization if quantize else None,
            shard_bytes=shard_bytes,
            metadata=meta,
        )

    with atomic_dir(target, "model") as tmp:
        config: dict = {"model_type": "s2dit", "dit": args.to_dict()}
        report.components.append(_convert_dit(ckpt.dits[0], args, tmp, **common("dit", True)))
        if len(ckpt.dits) == 2:
            (tmp / LOW_NOISE_DIR).mkdir()
            low = _convert_dit(ckpt.dits[1], args, tmp / LOW_NOISE_DIR, **common("dit", True))
            low.kind = "dit (low-noise expert)"
            report.components.append(low)
            guidance_low = preset.guidance_low_noise if preset else 3.0
            guidance_high = preset.defaults["guidance"] if preset else 4.0
            config[wan.EXPERTS_KEY] = {
                "boundary": ckpt.boundary,
                "guidance": [guidance_low, guidance_high],
                "low_noise": LOW_NOISE_DIR,
            }
        if "vae" in components:
            (tmp / "vae").mkdir()
            vae_cfg, vae_report = _convert_vae(ckpt, tmp / "vae", **common("vae", False, "fp32"))
            config["vae"] = vae_cfg
            _write_json(tmp / "vae" / "config.json", vae_cfg)
            report.components.append(vae_report)
        if "text_encoder" in components:
            (tmp / "text_encoder").mkdir()
            te_cfg, te_report = _convert_text_encoder(
                ckpt, tmp / "text_encoder", **common("text_encoder", True)
            )
            config["text_encoder"] = te_cfg
            _write_json(tmp / "text_encoder" / "config.json", te_cfg)
            report.components.append(te_report)
        # The DiT computes in the dtype it is stored in, unless a user asks otherwise.
        config["defaults"] = {**_defaults(preset), "dtype": COMPUTE_DTYPES[dtype]}
        if quantization:
            config["quantization"] = quantization
        config["wan"] = {
            "preset": preset.name if preset else None,
            "task": preset.task if preset else ("i2v" if args.in_dim != args.out_dim else "t2v"),
            "source": str(src),
            "source_layout": ckpt.layout,
        }
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "conversion_report.json", asdict(report))
    if log is not None:
        for line in report.lines():
            log(line)
    return report


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _shard_size(value: str) -> int:
    try:
        return parse_size(value)
    except S2DiTError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _components(value: str) -> tuple[str, ...]:
    parts = tuple(c.strip() for c in value.split(",") if c.strip())
    unknown = [c for c in parts if c not in COMPONENTS]
    if unknown or "dit" not in parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(COMPONENTS)} that includes dit, "
            f"got {value!r}"
        )
    return parts


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m convert.wan`."""
    parser = Parser(
        prog="python -m convert.wan",
        description="Convert a Wan 2.x checkpoint (original or diffusers layout, local folder "
        "or Hugging Face hub id) into an s2dit-mlx model folder.",
    )
    parser.add_argument("src", help="checkpoint folder or hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weight dtype")
    parser.add_argument(
        "-q", "--quantize", type=int, choices=[4, 8], default=None,
        help="quantize the DiT and text-encoder linear layers to this many bits",
    )  # fmt: skip
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=64,
        help="quantization group size (weights per scale and bias)",
    )
    parser.add_argument(
        "--shard-size",
        type=_shard_size,
        default="5GB",
        help="largest output file: a byte count or a size like 500MB, 5GB",
    )
    parser.add_argument(
        "--only", type=_components, default=",".join(COMPONENTS),
        help="comma-separated components to convert (dit is required)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a model folder s2dit-mlx wrote (nothing else is replaced)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: python -m convert.wan SRC --out DIR ...; returns the exit code."""

    def body() -> None:
        a = build_parser().parse_args(argv)
        convert(
            a.src,
            a.out,
            dtype=a.dtype,
            bits=a.quantize,
            group_size=a.group_size,
            shard_size=a.shard_size,
            components=a.only,
            overwrite=a.overwrite,
        )

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
