"""Lazy readers for foreign checkpoints and a sharded safetensors writer.

- `SafetensorsFile`: parses the header itself and reads one tensor at a time (no torch,
  bf16 included), so a 14B model never has to fit in memory; truncation is caught from the
  header before any tensor is read.
- `read_pth`: PyTorch .pth only through `torch.load(weights_only=True)`, memory-mapped; a
  pickle carrying code or arbitrary objects is refused.
- `WeightSet`: name -> tensor over several files (shards, with or without an index json).
- `ShardWriter`: writes converted tensors shard by shard, with an index json and metadata.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import mlx.core as mx
import numpy as np

from s2dit_mlx.errors import S2DiTError

# safetensors dtype -> (numpy dtype used to read the bytes, MLX dtype to view them as)
_DTYPES = {
    "F64": (np.float64, None),
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),
    "I64": (np.int64, None),
    "I32": (np.int32, None),
    "I16": (np.int16, None),
    "I8": (np.int8, None),
    "U8": (np.uint8, None),
    "U32": (np.uint32, None),
    "BOOL": (np.bool_, None),
}
_MAX_HEADER = 100 << 20  # safetensors caps the JSON header at 100 MB


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class SafetensorsFile:
    """One .safetensors file, read lazily tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise S2DiTError(f"{self.path.name} is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise S2DiTError(
                        f"{self.path.name} is truncated or not a safetensors file "
                        f"(header of {n} bytes in a {size}-byte file)"
                    )
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise S2DiTError(
                f"{self.path.name} is not a readable safetensors file ({_one_line(err)})"
            ) from None
        if not isinstance(header, dict):
            raise S2DiTError(f"{self.path.name} is not a safetensors file (bad header)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        available = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(info["shape"])
                begin, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise S2DiTError(f"{self.path.name}: malformed header entry for {name}") from None
            if end > available:
                raise S2DiTError(
                    f"{self.path.name} is truncated: tensor {name} ends at byte {end} of the "
                    f"data section, which has {available} bytes"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> mx.array:
        """The tensor `name` as an MLX array in its stored dtype."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in _DTYPES:
            raise S2DiTError(f"{self.path.name}: tensor {name} has unsupported dtype {dtype}")
        np_dtype, view = _DTYPES[dtype]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise S2DiTError(f"{self.path.name} is truncated (tensor {name})")
        arr = mx.array(np.frombuffer(data, dtype=np_dtype).reshape(shape))
        return arr.view(view) if view is not None else arr


def _unwrap_state_dict(obj, where: str) -> dict:
    # Some trainers nest the weights one level down.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict) and len(obj) <= 3:
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise S2DiTError(f"{where} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def read_pth(path: str | os.PathLike) -> dict:
    """A .pth state dict through torch.load(weights_only=True); anything else is refused."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise S2DiTError(
            f"reading {path.name} needs PyTorch: pip install 's2dit-mlx[convert]'"
        ) from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError:
        raise S2DiTError(
            f"refusing to load {path.name}: its pickle holds code or objects other than "
            "tensors (only plain weight files are read, with torch.load(weights_only=True))"
        ) from None
    except Exception as err:  # zip and stream errors of truncated or foreign files
        raise S2DiTError(
            f"{path.name} is truncated or not a PyTorch checkpoint ({_one_line(err)})"
        ) from None
    state = _unwrap_state_dict(obj, path.name)
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise S2DiTError(f"{path.name}: entry {name} is a {type(value).__name__}, not a tensor")
    return state


class PthFile:
    """A .pth state dict behind the same interface as SafetensorsFile."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = read_pth(self.path)
        self.metadata: dict = {}

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> mx.array:
        import torch

        t = self.state[name].detach().contiguous()
        if t.dtype == torch.bfloat16:
            return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        return mx.array(t.numpy())


def open_weight_file(path: str | os.PathLike):
    """SafetensorsFile or PthFile by extension."""
    path = Path(path)
    if not path.is_file():
        raise S2DiTError(f"weights file {path} is missing")
    if path.suffix in (".pth", ".pt", ".bin"):
        return PthFile(path)
    return SafetensorsFile(path)


class WeightSet:
    """Tensors spread over one or more files, addressed by name."""

    def __init__(self, files: Iterable):
        self.files = list(files)
        self.where: dict[str, object] = {}
        for f in self.files:
            for name in f.keys():
                if name in self.where:
                    raise S2DiTError(
                        f"tensor {name} appears in both {self.where[name].path.name} and "
                        f"{f.path.name}"
                    )
                self.where[name] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: f.shape(name) for name, f in self.where.items()}

    def get(self, name: str) -> mx.array:
        return self.where[name].get(name)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]


def open_sharded(folder: Path, stem: str) -> WeightSet | None:
    """`stem.safetensors`, or the shards of `stem.safetensors.index.json` / `stem-*.safetensors`.

    Every shard an index lists must exist; returns None when the folder has none of them.
    """
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise S2DiTError(f"{index.name} is not a valid index ({_one_line(err)})") from None
        for name in shard_names:
            if not (folder / name).is_file():
                raise S2DiTError(f"shard {name} listed in {index.name} is missing from {folder}")
        weights = WeightSet(SafetensorsFile(folder / name) for name in shard_names)
        missing = sorted(set(weight_map) - set(weights.keys()))
        if missing:
            raise S2DiTError(
                f"tensor {missing[0]} listed in {index.name} is not in its shard "
                f"{weight_map[missing[0]]}"
            )
        return weights
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return WeightSet([SafetensorsFile(single)])
    shards = sorted(folder.glob(f"{stem}-*.safetensors"))
    if shards:
        return WeightSet(SafetensorsFile(p) for p in shards)
    return None


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64KB' or a byte count -> bytes (S2DiTError on anything else)."""
    size = None
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif isinstance(text, str):
        s = text.strip().upper()
        factor = 1
        for unit, f in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
            if s.endswith(unit):
                s, factor = s[: -len(unit)].strip(), f
                break
        try:
            number = float(s)
        except ValueError:
            number = float("nan")
        if math.isfinite(number):
            size = int(number * factor)
    if size is None or size < 1:
        raise S2DiTError(f"expected a size like 5GB, 500MB or a byte count >= 1, got {text!r}")
    return size


class ShardWriter:
    """Collects tensors and writes `stem.safetensors`, or numbered shards plus an index json."""

    def __init__(self, folder: Path, stem: str = "model", max_bytes: int = 5 << 30, metadata=None):
        self.folder = Path(folder)
        self.stem = stem
        self.max_bytes = max_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.current: dict[str, mx.array] = {}
        self.current_bytes = 0
        self.total_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, array: mx.array) -> None:
        if self.current and self.current_bytes + array.nbytes > self.max_bytes:
            self.flush()
        mx.eval(array)
        self.current[name] = array
        self.current_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def flush(self) -> None:
        if not self.current:
            return
        path = self.folder / f".{self.stem}-{len(self.shards):05d}.partial.safetensors"
        mx.save_safetensors(str(path), self.current, metadata=self.metadata)
        self.shards.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left and give the shards their final names; returns the files."""
        self.flush()
        if not self.shards:
            raise S2DiTError("nothing to write: the converted component has no tensors")
        n = len(self.shards)
        if n == 1:
            final = self.folder / f"{self.stem}.safetensors"
            os.replace(self.shards[0][0], final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self.shards):
            final = self.folder / f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata}}
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*files, index_path]


DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}
# The Pipeline's name for each (a converted folder's defaults.dtype).
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def should_quantize_linear(name: str, shape: tuple[int, ...], group_size: int, prefixes) -> bool:
    """A 2D `.weight` under one of `prefixes` whose input width fits whole groups."""
    return (
        name.endswith(".weight")
        and len(shape) == 2
        and name.startswith(tuple(prefixes))
        and shape[1] % group_size == 0
        and shape[0] % 8 == 0
    )


def quantize_weight(name: str, w: mx.array, group_size: int, bits: int) -> dict[str, mx.array]:
    """`.weight` -> the `.weight`, `.scales`, `.biases` of an MLX QuantizedLinear."""
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    base = name[: -len(".weight")]
    return {name: wq, f"{base}.scales": scales, f"{base}.biases": biases}


def convert_tensors(
    weights: WeightSet,
    mapping: dict[str, str],
    writer: ShardWriter,
    transform: Callable[[str, mx.array], dict[str, mx.array]],
) -> int:
    """Read each source tensor, map its name, transform it and hand it to the writer."""
    count = 0
    for src, dst in mapping.items():
        for name, array in transform(dst, weights.get(src)).items():
            writer.add(name, array)
            count += 1
    return count
