"""A numpy interpreter for the MIL ops our exports use, run on a *saved* .mlpackage.

Core ML cannot run on Linux. To check an export there, the package is loaded back from disk (its
protobuf program and weight blobs, through coremltools' milproto loader, which works without the
Core ML runtime) and every op is evaluated here with numpy, states carried across calls:

    pkg = Package("out/S2DiT.mlpackage")
    state = pkg.make_state()                      # zero fp16 buffers, like a fresh MLState
    out = pkg.predict({"latents": x, ...}, state, function="denoise")

Each op computes in float32 (float64 for nothing) and rounds its result to the dtype the program
declares (fp16 ops really round to fp16). Ops outside OPS raise: the interpreter never guesses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import S2DiTError
from ._ct import require

ct = require()
from coremltools.converters.mil.frontend.milproto.load import load as _load_milproto  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

OPS: dict = {}


def op(*names):
    """Register an op implementation: fn(args: dict[str, value]) -> value or tuple of values."""

    def deco(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return deco


def _f32(a):
    return np.asarray(a, dtype=np.float32) if np.asarray(a).dtype.kind == "f" else np.asarray(a)


# ------------------------------------------------------------------------------------------------
# Elementwise


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "mod": np.mod,  # floor mod, like MIL's
    "floor_div": np.floor_divide,
    "pow": np.power,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "equal": np.equal,
    "not_equal": np.not_equal,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = lambda a, _fn=_fn: _fn(_f32(a["x"]), _f32(a["y"]))


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


_UNARY = {
    "identity": lambda x: x,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "cos": np.cos,
    "sin": np.sin,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softplus": _softplus,
    "square": np.square,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda a, _fn=_fn: _fn(_f32(a["x"]))


@op("rsqrt")
def _rsqrt(a):
    return 1.0 / np.sqrt(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-12)))


@op("clip")
def _clip(a):
    return np.clip(_f32(a["x"]), a["alpha"], a["beta"])


@op("gelu")
def _gelu(a):
    x, mode = _f32(a["x"]), str(a.get("mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)).astype(np.float32))


@op("select")
def _select(a):
    return np.where(a["cond"], _f32(a["a"]), _f32(a["b"]))


@op("cast")
def _cast(a):
    return np.asarray(a["x"]).astype(types.nptype_from_builtin(types.string_to_builtin(a["dtype"])))


# ------------------------------------------------------------------------------------------------
# Reductions and normalisation


def _axes(a, rank):
    axes = a.get("axes")
    return tuple(range(rank)) if axes is None else tuple(int(i) % rank for i in np.ravel(axes))


def _reduce(fn):
    def run(a):
        x = _f32(a["x"])
        return fn(x, axis=_axes(a, x.ndim), keepdims=bool(a.get("keep_dims", False)))

    return run


for _name, _fn in (("reduce_mean", np.mean), ("reduce_sum", np.sum), ("reduce_max", np.max)):
    op(_name)(_reduce(_fn))


@op("layer_norm")
def _layer_norm(a):
    x = _f32(a["x"])
    axes = _axes(a, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        out = out * _f32(a["gamma"])
    if a.get("beta") is not None:
        out = out + _f32(a["beta"])
    return out


@op("softmax")
def _softmax(a):
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Linear algebra


@op("linear")
def _linear(a):
    out = _f32(a["x"]) @ _f32(a["weight"]).T
    return out + _f32(a["bias"]) if a.get("bias") is not None else out


@op("matmul")
def _matmul(a):
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("scaled_dot_product_attention")
def _sdpa(a):
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scores = (q @ np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f32(mask)
    return _softmax({"x": scores, "axis": -1}) @ v


def _conv_pads(a, spatial, kernel, dilations):
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "custom":
        pad = [int(p) for p in np.ravel(a["pad"])]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type in ("same", "same_lower"):
        pads = []
        for k, d in zip(kernel, dilations, strict=True):
            total = (k - 1) * d
            lo = total // 2 if pad_type == "same" else total - total // 2
            pads.append((lo, total - lo))
        return pads
    raise S2DiTError(f"interpreter: conv pad_type {pad_type!r} is not supported")


@op("conv")
def _conv(a):
    """N-d grouped convolution (cross-correlation) as a sum over kernel taps."""
    x, w = _f32(a["x"]), _f32(a["weight"])
    n_spatial = x.ndim - 2
    groups = int(a.get("groups", 1))
    strides = [int(s) for s in np.ravel(a.get("strides", [1] * n_spatial))]
    dilations = [int(d) for d in np.ravel(a.get("dilations", [1] * n_spatial))]
    kernel = w.shape[2:]
    pads = _conv_pads(a, x.shape[2:], kernel, dilations)
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    batch, c_in = x.shape[:2]
    c_out = w.shape[0]
    out_sizes = [
        (x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
        for i in range(n_spatial)
    ]
    xg = x.reshape(batch, groups, c_in // groups, *x.shape[2:])
    wg = w.reshape(groups, c_out // groups, c_in // groups, *kernel)
    out = np.zeros((batch, groups, c_out // groups, *out_sizes), np.float32)
    for tap in np.ndindex(*kernel):
        sl = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilations, out_sizes, strides, strict=True)
        )
        patch = xg[(slice(None), slice(None), slice(None), *sl)]  # [B, G, Ci, *out]
        out += np.einsum("bgi...,goi->bgo...", patch, wg[(..., *tap)])
    out = out.reshape(batch, c_out, *out_sizes)
    if a.get("bias") is not None:
        out = out + _f32(a["bias"]).reshape(1, c_out, *([1] * n_spatial))
    return out


# ------------------------------------------------------------------------------------------------
# Shapes


@op("reshape")
def _reshape(a):
    x = np.asarray(a["x"])
    shape = [int(s) for s in np.ravel(a["shape"])]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("transpose")
def _transpose(a):
    return np.transpose(a["x"], [int(p) for p in np.ravel(a["perm"])])


@op("concat")
def _concat(a):
    values = [np.asarray(v) for v in a["values"]]
    axis = int(a["axis"])
    if a.get("interleave", False):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@op("expand_dims")
def _expand_dims(a):
    x = np.asarray(a["x"])
    out_rank = x.ndim + len(np.ravel(a["axes"]))
    for ax in sorted(int(i) % out_rank for i in np.ravel(a["axes"])):
        x = np.expand_dims(x, ax)
    return x


@op("squeeze")
def _squeeze(a):
    x = np.asarray(a["x"])
    axes = a.get("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, tuple(int(i) for i in np.ravel(axes)))


@op("tile")
def _tile(a):
    return np.tile(a["x"], [int(r) for r in np.ravel(a["reps"])])


@op("pad")
def _pad(a):
    """Pads the last len(pad) / 2 axes: constant (constant_val), reflect or replicate."""
    x = np.asarray(a["x"])
    pad = [int(p) for p in np.ravel(a["pad"])]
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = str(a.get("mode") or "constant")
    if mode == "constant":
        value = a.get("constant_val")
        return np.pad(x, widths, constant_values=0 if value is None else np.asarray(value).item())
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise S2DiTError(f"interpreter: pad mode {mode!r} is not supported")


@op("upsample_nearest_neighbor")
def _upsample_nearest(a):
    """Nearest-neighbour upsampling of the last two axes: output i reads input floor(i / s)."""
    x = np.asarray(a["x"])
    for axis, key in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        s = a.get(key)
        s = 1.0 if s is None else float(np.asarray(s))
        size = x.shape[axis]
        src = np.floor(np.arange(int(np.floor(size * s))) / s).astype(np.int64)
        x = np.take(x, np.minimum(src, size - 1), axis=axis)
    return x


def _slices(a, shape):
    rank = len(shape)
    begin = [int(b) for b in np.ravel(a["begin"])]
    end = [int(e) for e in np.ravel(a["end"])]
    stride = [int(s) for s in np.ravel(a.get("stride", [1] * rank))]
    begin_mask = list(np.ravel(a.get("begin_mask", [False] * rank)))
    end_mask = list(np.ravel(a.get("end_mask", [False] * rank)))
    out = []
    for i in range(rank):
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        out.append(slice(b, e, stride[i]))
    squeeze = [i for i, s in enumerate(np.ravel(a.get("squeeze_mask", [False] * rank))) if s]
    return tuple(out), squeeze


@op("slice_by_index")
def _slice_by_index(a):
    x = np.asarray(a["x"])
    sl, squeeze = _slices(a, x.shape)
    out = x[sl]
    return np.squeeze(out, tuple(squeeze)) if squeeze else out


@op("slice_update")
def _slice_update(a):
    x = np.array(a["x"], copy=True)
    sl, _ = _slices(a, x.shape)
    target = x[sl]
    x[sl] = np.asarray(a["update"]).reshape(target.shape).astype(x.dtype)
    return x


# ------------------------------------------------------------------------------------------------
# Compressed weights (iOS 18 constexpr ops)


def _blockwise(param, shape):
    """Repeat a per-block parameter to the full shape (block size = shape / param shape)."""
    param = np.asarray(param)
    for axis, (full, blocks) in enumerate(zip(shape, param.shape, strict=True)):
        if blocks != full:
            param = np.repeat(param, full // blocks, axis=axis)
    return param


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a):
    data = np.asarray(a["data"]).astype(np.float32)
    scale = _blockwise(_f32(a["scale"]), data.shape)
    if a.get("offset") is not None:
        data = data - _blockwise(np.asarray(a["offset"]).astype(np.float32), data.shape)
    return (scale * data).astype(np.asarray(a["scale"]).dtype)


@op("constexpr_lut_to_dense")
def _lut_to_dense(a):
    indices = np.asarray(a["indices"]).astype(np.int64)
    lut = np.asarray(a["lut"])
    if lut.shape[-1] != 1:
        raise S2DiTError("interpreter: vector palettization is not supported")
    rank = indices.ndim
    block = [indices.shape[i] // lut.shape[i] for i in range(rank)]
    grid = np.meshgrid(
        *[np.arange(s) // b for s, b in zip(indices.shape, block, strict=True)], indexing="ij"
    )
    return lut[(*grid, indices, 0)]


# ------------------------------------------------------------------------------------------------
# The package


def _np_dtype(var):
    dtype = var.dtype
    return types.nptype_from_builtin(dtype) if dtype is not None else None


class Package:
    """A saved .mlpackage, loaded back from disk and run op by op with numpy."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "Manifest.json").is_file():
            raise S2DiTError(f"{path} is not an .mlpackage (no Manifest.json)")
        model = ct.models.MLModel(str(path), skip_model_load=True)
        self.path = path
        self.spec = model.get_spec()
        self.program = _load_milproto(self.spec, self.spec.specificationVersion, model.weights_dir)
        desc = self.spec.description
        self.default_function = desc.defaultFunctionName or "main"
        self.states: dict[str, tuple[tuple[int, ...], str]] = {}
        descs = list(desc.functions) or [desc]
        for fdesc in descs:
            for st in fdesc.state:
                arr = st.type.stateType.arrayType
                fp16 = arr.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
                self.states[st.name] = (tuple(arr.shape), "fp16" if fp16 else str(arr.dataType))

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)

    def make_state(self) -> dict[str, np.ndarray]:
        """Zeroed fp16 buffers for every state of every function."""
        return {name: np.zeros(shape, np.float16) for name, (shape, _) in self.states.items()}

    def predict(
        self, inputs: dict, state: dict | None = None, function: str | None = None
    ) -> dict[str, np.ndarray]:
        """Run one function; states are read from and written back into `state` in place."""
        name = function or self.default_function
        if name not in self.program.functions:
            name = "main" if "main" in self.program.functions else name
        func = self.program.functions[name]
        env: dict[str, object] = {}
        for in_name, var in func.inputs.items():
            if types.is_state(var.sym_type):
                if state is None or in_name not in state:
                    raise S2DiTError(f"interpreter: state {in_name} was not given")
                env[var.name] = ("state", in_name)
            else:
                if in_name not in inputs:
                    raise S2DiTError(f"interpreter: input {in_name} was not given")
                env[var.name] = np.asarray(inputs[in_name]).astype(_np_dtype(var))
        for operation in func.operations:
            self._run_op(operation, env, state)
        return {var.name: env[var.name] for var in func.outputs}

    def _value(self, var, env):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise S2DiTError(f"interpreter: value of {var.name} is unknown")

    def _run_op(self, operation, env, state) -> None:
        kind = operation.op_type
        if kind == "const":
            env[operation.outputs[0].name] = operation.outputs[0].val
            return
        args = {}
        for key, var in operation.inputs.items():
            if isinstance(var, (list, tuple)):
                args[key] = [self._value(v, env) for v in var]
            else:
                args[key] = self._value(var, env)
        if kind == "read_state":
            result = state[args["input"][1]].copy()
        elif kind in ("coreml_update_state", "write_state"):
            target = args["state" if kind == "coreml_update_state" else "input"][1]
            value = np.asarray(args["value" if kind == "coreml_update_state" else "data"])
            if value.shape != state[target].shape:
                raise S2DiTError(f"interpreter: state {target} written with shape {value.shape}")
            state[target] = value.astype(np.float16)
            result = state[target].copy()
        elif kind in OPS:
            result = OPS[kind](args)
        else:
            raise S2DiTError(f"interpreter: op {kind!r} is not implemented")
        outputs = operation.outputs
        results = result if isinstance(result, tuple) else (result,)
        for var, value in zip(outputs, results, strict=False):
            dtype = _np_dtype(var)
            value = np.asarray(value)
            env[var.name] = value.astype(dtype) if dtype is not None else value
