"""Initialise a student S2DiT from a teacher by parameter name (S2DiT-KD's starting point).

Parameter names follow Wan's layout wherever Wan has the parameter, so a student whose layers
are any mix of attention kinds takes every weight the teacher has under the same name and
shape: the embeddings, the head, and per block the q/k/v/o projections and norms, the cross-
attention, the FFN and the modulation. What the teacher lacks (an LCHA layer's feature map,
conv path and gate; an SSA layer's pooling weights) keeps the student's own initialisation.

Student block i reads teacher block `layer_map[i]`:
- "first": block i (a shorter student takes the teacher's first blocks);
- "uniform": blocks spread evenly over the teacher's depth, first and last included;
- an explicit list of teacher block indices.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import S2DiTError

LAYER_MAPS = ("uniform", "first")
# Widths a student must share with its teacher for names to line up at all.
SHARED_FIELDS = ("dim", "num_heads", "text_dim", "freq_dim", "in_dim", "out_dim", "patch_size")


def layer_map(teacher_layers: int, student_layers: int, how: str | list[int]) -> list[int]:
    """Teacher block index for every student block."""
    if isinstance(how, str):
        if how == "first":
            if student_layers > teacher_layers:
                raise S2DiTError(
                    f'layer map "first" needs a student no deeper than the teacher '
                    f"({student_layers} > {teacher_layers} layers)"
                )
            return list(range(student_layers))
        if how == "uniform":
            if student_layers == 1:
                return [0]
            step = (teacher_layers - 1) / (student_layers - 1)
            return [round(i * step) for i in range(student_layers)]
        raise S2DiTError(f"unknown layer map {how!r} (choose {', '.join(LAYER_MAPS)} or a list)")
    mapping = list(how)
    if len(mapping) != student_layers:
        raise S2DiTError(
            f"explicit layer map has {len(mapping)} entries, the student {student_layers} layers"
        )
    bad = [i for i in mapping if not (isinstance(i, int) and 0 <= i < teacher_layers)]
    if bad:
        raise S2DiTError(
            f"layer map entry {bad[0]!r} is not a teacher block (0..{teacher_layers - 1})"
        )
    return mapping


@dataclass
class InitReport:
    """What init_from did, weight by weight (saved as init_report.json)."""

    layer_map: list[int]
    student_layers: list[str]
    teacher_layers: list[str]
    copied: list[str] = field(default_factory=list)  # student name (teacher name if different)
    new: list[str] = field(default_factory=list)  # the teacher has no such weight
    skipped: list[str] = field(default_factory=list)  # the teacher's has another shape

    def to_dict(self) -> dict:
        """JSON-ready dict with counts."""
        return {
            **asdict(self),
            "counts": {
                "copied": len(self.copied),
                "new": len(self.new),
                "skipped": len(self.skipped),
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def _teacher_name(name: str, mapping: list[int]) -> str:
    m = re.match(r"blocks\.(\d+)\.(.+)", name)
    return f"blocks.{mapping[int(m.group(1))]}.{m.group(2)}" if m else name


def check_compatible(student_args, teacher_args) -> None:
    """Raise S2DiTError unless the student's widths match the teacher's (names can line up)."""
    for name in SHARED_FIELDS:
        a, b = getattr(student_args, name), getattr(teacher_args, name)
        if isinstance(a, (list, tuple)):
            a, b = tuple(a), tuple(b)
        if a != b:
            raise S2DiTError(
                f"student and teacher differ in {name} ({a} vs {b}): initialising by name "
                "needs the same widths"
            )


def init_from(student, teacher, how: str | list[int] = "uniform") -> InitReport:
    """Copy every teacher weight the student has under the same name and shape; report the rest."""
    from .models.wan import WanExperts

    if isinstance(teacher, WanExperts):  # the low-noise expert knows the clean end best
        teacher = teacher.low_noise
    check_compatible(student.args, teacher.args)
    mapping = layer_map(len(teacher.args.layers), len(student.args.layers), how)
    report = InitReport(mapping, list(student.args.layers), list(teacher.args.layers))
    source = dict(tree_flatten(teacher.parameters()))
    updates = []
    attention_copied: dict[int, int] = {}
    for name, value in tree_flatten(student.parameters()):
        src = _teacher_name(name, mapping)
        label = name if src == name else f"{name} <- {src}"
        if src not in source:
            report.new.append(name)
        elif tuple(source[src].shape) != tuple(value.shape):
            report.skipped.append(
                f"{label} (teacher {tuple(source[src].shape)}, student {tuple(value.shape)})"
            )
        else:
            updates.append((name, source[src].astype(value.dtype)))
            report.copied.append(label)
            m = re.match(r"blocks\.(\d+)\.self_attn\.", name)
            if m:
                attention_copied[int(m.group(1))] = attention_copied.get(int(m.group(1)), 0) + 1
    for i, kind in enumerate(student.args.layers):
        if not attention_copied.get(i):
            raise S2DiTError(
                f"the teacher cannot initialise layer {i} ({kind!r}): none of its attention "
                "weights exist in the teacher under the same name and shape"
            )
    student.update(tree_unflatten(updates))
    mx.eval(student.parameters())
    return report
