"""Distillation from a teacher cache: the data source and the causal ODE regression loss."""

from __future__ import annotations

from dataclasses import replace

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import pytest

from s2dit_mlx.loading import load_model
from s2dit_mlx.models.s2dit import S2DiT
from s2dit_mlx.transfer import init_from
from tests.cli_harness import run_main
from train import teacher_cache
from train.flow import FlowModel
from train.kd import cache_source, make_ode_loss
from train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "cache"
    argv = ["--teacher", str(tiny_model_dir), "--out", str(out), "--prompts", "shapes:8",
            "--solver", "euler", "--steps", "4", "--guidance", "1", "--samples-per-part", "4",
            "--no-progress"]  # fmt: skip
    code, _, err = run_main(teacher_cache.main, argv)
    assert code == 0, err
    return out


def test_teacher_copy_has_zero_ode_loss_at_the_last_step(tiny_model_dir, cache):
    source = cache_source(str(cache))
    spec = source.cache.spec
    batch = source([0, 1, 2])
    teacher = load_model(tiny_model_dir).dit
    student = S2DiT(teacher.args)
    init_from(student, teacher, "first")
    keys = mx.random.split(mx.random.key(0), 3)
    last = make_ode_loss([len(spec.keep) - 1], spec)(FlowModel(student), batch, keys)
    first = make_ode_loss([0], spec)(FlowModel(student), batch, keys)
    assert float(last) <= 1e-10, float(last)
    assert float(first) > 1e-3  # from pure noise one step cannot land on x0


def test_ode_regression_trains_a_sandwich_student(tiny_model_dir, cache, tmp_path):
    source = cache_source(str(cache), seed=1)
    spec = source.cache.spec
    teacher = load_model(tiny_model_dir).dit
    mx.random.seed(0)
    student = S2DiT(replace(teacher.args, layers=["lcha", "lcha"]))
    init_from(student, teacher, "uniform")
    positions = source.cache.check_points([1000.0 * spec.sigmas[0], 1000.0 * spec.sigmas[2]])
    cfg = TrainConfig(steps=30, batch_size=2, lr=3e-4, seed=0, progress=False, compile=False)
    trainer = Trainer(FlowModel(student), make_ode_loss(positions, spec), source, cfg, tmp_path)
    losses = trainer.train()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
