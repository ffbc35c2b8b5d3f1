"""The teacher cache: shards, resume, meta checks, and trajectories a teacher reproduces."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_model
from tests.cli_harness import assert_user_error, run_main, tree_state
from train import teacher_cache
from train.teacher_cache import TeacherCache

ARGS = [
    "--prompts",
    "shapes:5",
    "--solver",
    "euler",
    "--steps",
    "4",
    "--samples-per-part",
    "2",
    "--no-progress",
]


def make_cache(teacher, out, *extra) -> None:
    code, _, err = run_main(
        teacher_cache.main, ["--teacher", str(teacher), "--out", str(out), *ARGS, *extra]
    )
    assert code == 0, err


def part_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.safetensors"))}


def test_shards_together_equal_one_run(tiny_model_dir, tmp_path):
    make_cache(tiny_model_dir, tmp_path / "one")
    make_cache(tiny_model_dir, tmp_path / "split", "--shard", "1/2")
    assert sorted(part_bytes(tmp_path / "split")) == ["part-00001.safetensors"]
    with pytest.raises(S2DiTError, match="incomplete: part 0 of 3"):
        TeacherCache(tmp_path / "split")
    make_cache(tiny_model_dir, tmp_path / "split", "--shard", "0/2")
    one, split = part_bytes(tmp_path / "one"), part_bytes(tmp_path / "split")
    assert list(one) == [
        "part-00000.safetensors",
        "part-00001.safetensors",
        "part-00002.safetensors",
    ]
    assert one == split
    assert (tmp_path / "one" / "meta.json").read_bytes() == (
        tmp_path / "split" / "meta.json"
    ).read_bytes()


def test_killed_run_resumes_to_the_same_bytes(tiny_model_dir, tmp_path):
    many = ["--prompts", "shapes:24", "--samples-per-part", "1"]
    ref = tmp_path / "ref"
    make_cache(tiny_model_dir, ref, *many)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "train.teacher_cache",
        "--teacher",
        str(tiny_model_dir),
        "--out",
        str(out),
        *ARGS,
        *many,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (
        len(list(out.glob("part-*.safetensors"))) < 3
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.safetensors")))
    assert 0 < done < 24, done  # killed part-way
    make_cache(tiny_model_dir, out, *many)
    assert part_bytes(out) == part_bytes(ref)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(name.endswith(".tmp.safetensors") for name in leftovers)  # the killed part


def test_meta_mismatch_and_off_grid_student_are_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "cache"
    make_cache(tiny_model_dir, out)
    before = tree_state(tmp_path)
    argv = ["--teacher", str(tiny_model_dir), "--out", str(out), *ARGS, "--steps", "6"]
    code, _, err = run_main(teacher_cache.main, argv)
    assert_user_error(code, err, match="made by another run (steps")
    assert tree_state(tmp_path) == before
    cache = TeacherCache(out)
    sigmas = [cache.spec.sigmas[i] for i in cache.spec.keep]
    assert cache.check_points([1000.0 * s for s in sigmas[::2]]) == [0, 2]
    with pytest.raises(S2DiTError, match="not on the teacher cache's kept steps"):
        cache.check_points([1000.0 * sigmas[1] - 5.0])


def test_teacher_reproduces_cached_x0_from_the_last_kept_state(tiny_model_dir, tmp_path):
    """Euler at CFG 1: one teacher step from the last kept state lands on the cached x0.

    The teacher streams: chunk c is computed with the cached clean chunks before it written
    into a fresh cache, exactly the context the teacher had when it made the cache.
    """
    out = tmp_path / "cache"
    make_cache(tiny_model_dir, out, "--guidance", "1")
    cache = TeacherCache(out)
    spec = cache.spec
    teacher = load_model(tiny_model_dir).dit
    sample = cache.samples([3])
    x_last, x0 = sample["states"][:, -1], sample["x0"]
    t, sigma = spec.timesteps[-1], spec.sigmas[-1]
    ctx = sample["context"]
    stream = teacher.make_cache()
    f = spec.frames_per_chunk
    worst = 0.0
    for start in range(0, spec.frames, f):
        x = x_last[:, start : start + f]
        v = teacher(x, mx.array([t]), ctx, cache=stream)
        got = x - sigma * v
        worst = max(worst, float(mx.abs(got - x0[:, start : start + f]).max()))
        teacher(x0[:, start : start + f], mx.zeros((1,)), ctx, cache=stream, update_cache=True)
    assert worst <= 1e-5, worst
    # And the cached noise is the teacher's starting point: step 0's state.
    np.testing.assert_array_equal(np.array(sample["noise"]), np.array(sample["states"][:, 0]))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["keep"] == [0, 1, 2, 3] and meta["num_samples"] == 5


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompts", "shapes:0"], "shapes:N needs N >= 1"),
        (["--prompts", "nowhere.txt"], "does not exist"),
        (["--keep", "0,9"], "--keep step indices must lie in 0..3"),
        (["--shard", "2/2"], "--shard i/n needs 0 <= i < n"),
        (["--frames", "10"], "--frames must be 4k + 1"),
        (["--height", "48"], "is not a positive multiple of 32"),
        (["--solver", "few-step"], "invalid choice"),
    ],
)
def test_bad_settings_write_nothing(tiny_model_dir, tmp_path, extra, match):
    before = tree_state(tmp_path)
    argv = ["--teacher", str(tiny_model_dir), "--out", str(tmp_path / "c"), *ARGS, *extra]
    code, _, err = run_main(teacher_cache.main, argv)
    assert_user_error(code, err, match=match)
    assert tree_state(tmp_path) == before
