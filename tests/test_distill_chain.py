"""The whole 2-in-1 chain on a tiny Wan-architecture teacher (random weights, no torch).

teacher cache -> layout search -> S2DiT-KD (student initialised by name, flow loss on the
cached x0) -> causal ODE regression (few-step initialisation) -> DMD with Self-Forcing rollout
-> a few-step streaming student that generates without guidance.
"""

from __future__ import annotations

import json

import s2dit_mlx  # noqa: F401

# isort: split
import numpy as np
import pytest

from s2dit_mlx.loading import load_model, save_model
from s2dit_mlx.models.byte_text_encoder import ByteTextEncoder, ByteTextEncoderConfig
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig
from s2dit_mlx.models.s2dit import S2DiT
from s2dit_mlx.models.wan import wan_model_args
from s2dit_mlx.pipeline import Pipeline
from tests.cli_harness import assert_user_error, run_main, tree_state
from train import dit as train_dit
from train import dmd, layout_search, teacher_cache

TEACHER_DEFAULTS = dict(height=32, width=64, frames=9, fps=8, steps=4, shift=3.0, guidance=2.0,
                        mode="bidirectional", solver="euler")  # fmt: skip


@pytest.fixture(scope="module")
def wan_teacher(tmp_path_factory):
    """A tiny Wan-architecture teacher: every layer full attention, Wan's block layout."""
    import mlx.core as mx

    args = wan_model_args(32, 64, 2, 3, in_dim=4, out_dim=4, text_dim=16, freq_dim=32, text_len=16)
    args.frames_per_chunk = 1
    mx.random.seed(11)
    dit = S2DiT(args)
    vae = PatchVAE(PatchVAEConfig(z_dim=4, hidden_dim=16))
    te = ByteTextEncoder(ByteTextEncoderConfig(dim=16, num_layers=1, num_heads=2, max_len=16))
    mx.eval(dit.parameters(), vae.parameters(), te.parameters())
    path = tmp_path_factory.mktemp("chain") / "teacher"
    save_model(path, dit, vae, te, defaults=TEACHER_DEFAULTS)
    return path


def ok(main, argv):
    code, _, err = run_main(main, [str(a) for a in argv])
    assert code == 0, err


def test_the_whole_chain_makes_a_few_step_streaming_student(wan_teacher, tmp_path):
    cache, layout = tmp_path / "cache", tmp_path / "layout"
    ok(teacher_cache.main, ["--teacher", wan_teacher, "--out", cache, "--prompts", "shapes:12",
                            "--keep", "all", "--samples-per-part", "4", "--no-progress"])  # fmt: skip
    ok(layout_search.main, ["--teacher", wan_teacher, "--cache", cache, "--out", layout,
                            "--kinds", "lcha,ssa", "--latency", "0.9x", "--fit-steps", "2",
                            "--held-out", "2", "--quiet"])  # fmt: skip
    searched = json.loads((layout / "config.json").read_text())["dit"]["layers"]
    assert len(searched) == 3 and set(searched) <= {"lcha", "ssa"}
    common = ["--data", f"cache:{cache}", "--batch-size", "2", "--lr", "1e-3", "--no-progress",
              "--no-compile", "--mode", "streaming"]  # fmt: skip
    ok(train_dit.main, ["--config", layout / "config.json", "--init-from", wan_teacher,
                        "--out", tmp_path / "kd", "--steps", "4", *common])  # fmt: skip
    report = json.loads((tmp_path / "kd" / "init_report.json").read_text())
    assert report["counts"]["copied"] > 0 and report["student_layers"] == searched
    ok(train_dit.main, ["--model", tmp_path / "kd" / "model", "--objective", "ode",
                        "--ode-steps", "2", "--out", tmp_path / "ode", "--steps", "4", *common])  # fmt: skip
    student = load_model(tmp_path / "ode" / "model")
    assert (student.defaults["solver"], student.defaults["steps"]) == ("few-step", 2)
    ok(dmd.main, ["--generator", tmp_path / "ode" / "model", "--teacher", wan_teacher,
                  "--cache", cache, "--out", tmp_path / "dmd", "--iterations", "3",
                  "--critic-ratio", "2", "--lr-generator", "1e-4", "--lr-critic", "1e-4",
                  "--no-progress"])  # fmt: skip
    final = load_model(tmp_path / "dmd" / "model")
    assert final.dit.args.layers == searched
    assert final.defaults["guidance"] == 1.0 and final.defaults["mode"] == "streaming"
    video = Pipeline.from_bundle(final).generate("a red circle moving left", seed=0)
    assert video.shape == (9, 32, 64, 3) and np.isfinite(video).all()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--objective", "ode", "--data", "shapes"], "--data cache:DIR"),
        (["--init-from", "{teacher}"], "give it with --config"),
        (["--data", "cache:{tmp}/nowhere"], "is not a teacher cache"),
        (
            ["--objective", "ode", "--ode-steps", "3", "--data", "cache:{cache}"],
            "not on the teacher cache's kept steps",
        ),
    ],
)
def test_bad_distillation_inputs_write_nothing(wan_teacher, tmp_path, argv, match):
    cache = tmp_path / "cache"
    ok(teacher_cache.main, ["--teacher", wan_teacher, "--out", cache, "--prompts", "shapes:2",
                            "--keep", "every:2", "--no-progress"])  # fmt: skip
    names = {"teacher": str(wan_teacher), "tmp": str(tmp_path), "cache": str(cache)}
    argv = [a.format(**names) for a in argv]
    before = tree_state(tmp_path)
    code, _, err = run_main(
        train_dit.main, ["--model", str(wan_teacher), "--out", str(tmp_path / "run"), *argv]
    )
    assert_user_error(code, err, match=match)
    assert tree_state(tmp_path) == before
