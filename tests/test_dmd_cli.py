"""`python -m train.dmd` end to end: a few-step student, a teacher and its cache."""

from __future__ import annotations

import json

import s2dit_mlx  # noqa: F401

# isort: split
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.loading import load_model, save_model
from s2dit_mlx.pipeline import Pipeline
from tests.cli_harness import assert_user_error, run_main, tree_state
from train import dmd, teacher_cache


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd")
    argv = ["--teacher", str(tiny_model_dir), "--out", str(root / "cache"), "--prompts", "shapes:4",
            "--solver", "euler", "--steps", "4", "--samples-per-part", "4", "--no-progress"]  # fmt: skip
    code, _, err = run_main(teacher_cache.main, argv)
    assert code == 0, err
    b = load_model(tiny_model_dir)
    defaults = {**b.defaults, "solver": "few-step", "steps": 2, "shift": 3.0, "guidance": 1.0}
    save_model(root / "student", b.dit, b.vae, b.text_encoder, defaults)
    return root


def args(setup, out, *extra):
    return ["--generator", str(setup / "student"), "--teacher", str(setup / "student"),
            "--cache", str(setup / "cache"), "--out", str(out), "--iterations", "4",
            "--lr-generator", "1e-3", "--lr-critic", "1e-3", "--critic-ratio", "2",
            "--checkpoint-every", "2", "--no-progress", *extra]  # fmt: skip


def test_dmd_cli_trains_resumes_and_writes_a_few_step_student(setup, tmp_path):
    whole = tmp_path / "whole"
    code, _, err = run_main(dmd.main, args(setup, whole, "--guidance", "2"))
    assert code == 0, err
    split = tmp_path / "split"
    code, _, err = run_main(dmd.main, args(setup, split, "--guidance", "2", "--until", "2"))
    assert code == 0, err
    assert not (split / "model").exists()
    code, _, err = run_main(dmd.main, ["--out", str(split), "--resume", "--no-progress"])
    assert code == 0, err
    a, b = (load_model(p / "model") for p in (whole, split))
    fa, fb = dict(tree_flatten(a.dit.parameters())), dict(tree_flatten(b.dit.parameters()))
    assert all(np.array_equal(np.array(fa[k]), np.array(fb[k])) for k in fa)
    assert a.defaults["solver"] == "few-step" and a.defaults["guidance"] == 1.0
    loss = json.loads((whole / "loss.json").read_text())
    assert len(loss["loss"]) == 4
    video = Pipeline.from_bundle(a).generate("a red circle moving left", seed=0)
    assert video.shape[0] == a.defaults["frames"]


def test_dmd_refuses_a_teacher_solver_generator(setup, tiny_model_dir, tmp_path):
    before = tree_state(tmp_path)
    argv = args(setup, tmp_path / "x")
    argv[1] = str(tiny_model_dir)  # a model that samples with an ODE solver
    code, _, err = run_main(dmd.main, argv)
    assert_user_error(code, err, match="DMD trains a few-step student")
    assert tree_state(tmp_path) == before
