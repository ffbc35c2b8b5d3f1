"""Structural checks of a saved package, on its protobuf program (what Core ML will load).

coremltools 9.0 lowers `coreml_update_state` to `write_state` followed by a `read_state` of the
same state (that read is the update's output). The rules checked, per function:
- iOS 18 spec (specification version >= 9), every state fp16 with the expected shape;
- each state written at most once per call, and exactly once where the caller expects it;
- each write_state comes right after the op producing its value (a 9.0 trap otherwise);
- no read of a state after its write, except the read right after it (the update's output);
- no model output is a state's source (the written value or the update's output);
- only op types from an allow-list (what the interpreter implements).
"""

from __future__ import annotations

from pathlib import Path

from ._ct import require

ct = require()
from .interpret import OPS  # noqa: E402

IOS18_SPEC_VERSION = 9
STATE_OPS = ("read_state", "write_state", "coreml_update_state")
CONSTEXPR_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")
ALLOWED_OPS = frozenset(OPS) | {"const", *STATE_OPS, *CONSTEXPR_OPS}


def _names(arg) -> list[str]:
    return [a.name for a in arg.arguments if a.name]


def check_package(
    path: str | Path,
    states: dict[str, tuple[int, ...]],
    writes: dict[str, set[str]],
) -> list[str]:
    """Problems found in the package at `path` (an empty list when it passes).

    states: expected state name -> shape; writes: function name -> states it must write (every
    other state must not be written by that function).
    """
    problems: list[str] = []
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.specificationVersion < IOS18_SPEC_VERSION:
        problems.append(f"specification version {spec.specificationVersion} < 9 (iOS 18)")
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    desc = spec.description
    for fdesc in list(desc.functions) or [desc]:
        fname = getattr(fdesc, "name", "") or "main"
        seen = {}
        for st in fdesc.state:
            arr = st.type.stateType.arrayType
            seen[st.name] = tuple(arr.shape)
            if arr.dataType != fp16:
                problems.append(f"{fname}: state {st.name} is not fp16")
        if seen != {k: tuple(v) for k, v in states.items()}:
            problems.append(f"{fname}: states {seen} differ from the expected {states}")
    functions = spec.mlProgram.functions
    if set(functions) != set(writes):
        problems.append(f"functions {sorted(functions)} differ from {sorted(writes)}")
    for fname, func in functions.items():
        ops = list(func.block_specializations[func.opset].operations)
        outputs = set(func.block_specializations[func.opset].outputs)
        bad = sorted({o.type for o in ops} - ALLOWED_OPS)
        if bad:
            problems.append(f"{fname}: op types outside the allow-list: {bad}")
        producers = {out.name: i for i, o in enumerate(ops) for out in o.outputs}
        written: dict[str, int] = {}
        for i, o in enumerate(ops):
            if o.type == "coreml_update_state":
                problems.append(f"{fname}: un-lowered coreml_update_state at op {i}")
            if o.type != "write_state":
                continue
            state = _names(o.inputs["input"])[0]
            data = _names(o.inputs["data"])[0]
            if state in written:
                problems.append(f"{fname}: state {state} written twice")
            written[state] = i
            if producers.get(data) != i - 1:
                problems.append(f"{fname}: write of {state} is not right after its producer")
            if data in outputs:
                problems.append(f"{fname}: output {data} is the source of state {state}")
        for i, o in enumerate(ops):
            if o.type != "read_state":
                continue
            state = _names(o.inputs["input"])[0]
            if state in written and i > written[state]:
                if i != written[state] + 1:
                    problems.append(f"{fname}: state {state} read again after its write")
                elif any(out.name in outputs for out in o.outputs):
                    problems.append(f"{fname}: an output is the update of state {state}")
            if any(out.name in outputs for out in o.outputs):
                problems.append(f"{fname}: output is a raw read of state {state}")
        reads_before = {}
        for i, o in enumerate(ops):
            if o.type == "read_state":
                state = _names(o.inputs["input"])[0]
                if state not in written or i < written[state]:
                    reads_before[state] = reads_before.get(state, 0) + 1
        for state, count in reads_before.items():
            if count > 1:
                problems.append(f"{fname}: state {state} read {count} times")
        expected = writes.get(fname, set())
        if set(written) != set(expected):
            problems.append(f"{fname}: writes {sorted(written)}, expected {sorted(expected)}")
    return problems
