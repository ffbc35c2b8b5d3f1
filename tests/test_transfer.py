"""Initialising a student S2DiT from a teacher by parameter name."""

from __future__ import annotations

import json

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT
from s2dit_mlx.transfer import init_from, layer_map

WIDTHS = dict(
    in_dim=4, out_dim=4, dim=24, ffn_dim=40, freq_dim=16, text_dim=8, num_heads=2, text_len=6
)


def model(layers, seed, **kw) -> S2DiT:
    mx.random.seed(seed)
    m = S2DiT(ModelArgs(**{**WIDTHS, **kw}, layers=layers))
    m.load_weights([(n, mx.random.normal(p.shape)) for n, p in tree_flatten(m.parameters())])
    mx.eval(m.parameters())
    return m


def test_layer_maps():
    assert layer_map(30, 6, "uniform") == [0, 6, 12, 17, 23, 29]
    assert layer_map(4, 4, "uniform") == [0, 1, 2, 3]
    assert layer_map(8, 3, "first") == [0, 1, 2]
    assert layer_map(8, 2, [7, 3]) == [7, 3]
    for how, match in (
        ("first", "no deeper"),
        ("middle", "unknown layer map"),
        ([0], "entries"),
        ([0, 9, 1], "not a teacher block"),
    ):
        with pytest.raises(S2DiTError, match=match):
            layer_map(8, 3 if how != "first" else 9, how)


def test_same_layout_student_equals_teacher():
    teacher = model(["full"] * 3, seed=0)
    student = model(["full"] * 3, seed=1)
    report = init_from(student, teacher, "first")
    assert not report.new and not report.skipped
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32))
    t, ctx = mx.array([500.0]), mx.array(rng.standard_normal((1, 5, 8)).astype(np.float32))
    err = float(mx.abs(student(x, t, ctx) - teacher(x, t, ctx)).max())
    assert err <= 1e-6, err


def test_sandwich_student_report_lists_exactly_the_new_weights(tmp_path):
    teacher = model(["full"] * 4, seed=0)
    student = model(["lcha", "ssa", "lcha"], seed=1, ffn_dim=32)
    report = init_from(student, teacher, "uniform")
    assert report.layer_map == [0, 2, 3]
    lcha_new = {
        "feature_map.weight",
        "feature_map.bias",
        "conv_weight",
        "conv_bias",
        "conv_proj.weight",
        "conv_proj.bias",
        "gate",
    }
    ssa_new = {"down_q", "down_k", "down_v", "up"}
    expected = {f"blocks.{i}.self_attn.{n}" for i in (0, 2) for n in lcha_new}
    expected |= {f"blocks.1.self_attn.{n}" for n in ssa_new}
    assert set(report.new) == expected
    # ffn_dim differs: the FFN weights are skipped (shape), everything else is copied.
    assert {s.split(" ")[0] for s in report.skipped} == {
        f"blocks.{i}.ffn.{j}.{p}"
        for i in range(3)
        for j in (0, 2)
        for p in ("weight", "bias")
        if not (j == 2 and p == "bias")
    }
    t_params = dict(tree_flatten(teacher.parameters()))
    s_params = dict(tree_flatten(student.parameters()))
    assert mx.array_equal(
        s_params["blocks.1.self_attn.q.weight"], t_params["blocks.2.self_attn.q.weight"]
    )
    assert mx.array_equal(
        s_params["blocks.2.cross_attn.o.bias"], t_params["blocks.3.cross_attn.o.bias"]
    )
    assert mx.array_equal(s_params["head.head.weight"], t_params["head.head.weight"])
    saved = json.loads(report.save(tmp_path / "init_report.json").read_text())
    assert saved["counts"]["new"] == len(expected)


def test_mismatched_teacher_is_one_clear_error():
    teacher = model(["full"] * 2, seed=0)
    with pytest.raises(S2DiTError, match="differ in dim"):
        init_from(model(["lcha"], seed=1, dim=32, num_heads=2), teacher)
