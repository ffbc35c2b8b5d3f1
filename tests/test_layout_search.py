"""`python -m train.layout_search` end to end on a tiny teacher and its cache."""

from __future__ import annotations

import json

import s2dit_mlx  # noqa: F401

# isort: split
import pytest

from s2dit_mlx.models.s2dit import ModelArgs
from tests.cli_harness import assert_user_error, run_main, tree_state
from train import layout_search, teacher_cache


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("layout") / "cache"
    argv = ["--teacher", str(tiny_model_dir), "--out", str(out), "--prompts", "shapes:8",
            "--solver", "euler", "--steps", "2", "--samples-per-part", "4", "--no-progress"]  # fmt: skip
    code, _, err = run_main(teacher_cache.main, argv)
    assert code == 0, err
    return out


def test_search_writes_a_student_config_within_budget(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "layout"
    argv = ["--teacher", str(tiny_model_dir), "--cache", str(cache), "--out", str(out),
            "--kinds", "lcha,ssa,full", "--latency", "0.8x", "--fit-steps", "3", "--quiet"]  # fmt: skip
    code, _, err = run_main(layout_search.main, argv)
    assert code == 0, err
    report = json.loads((out / "layout_search.json").read_text())
    config = json.loads((out / "config.json").read_text())
    args = ModelArgs.from_dict(config["dit"])
    assert args.layers == report["layers"] and len(args.layers) == 3
    assert set(args.layers) <= {"lcha", "ssa", "full"}
    assert report["latency_s_per_chunk"] <= report["latency_budget"] + 1e-12
    costs = report["costs_s_per_chunk"]
    assert report["latency_budget"] == pytest.approx(0.8 * 3 * max(costs.values()))
    assert len(report["penalty"]) == 3 and all(len(row) == 3 for row in report["penalty"])
    assert not (out / "fits").exists()


def test_impossible_budget_is_refused_before_any_work(tiny_model_dir, cache, tmp_path):
    before = tree_state(tmp_path)
    argv = ["--teacher", str(tiny_model_dir), "--cache", str(cache), "--out", str(tmp_path / "x"),
            "--kinds", "lcha,ssa", "--latency", "0.01x", "--quiet"]  # fmt: skip
    code, _, err = run_main(layout_search.main, argv)
    assert_user_error(code, err, match="below the cheapest layout")
    assert tree_state(tmp_path) == before
