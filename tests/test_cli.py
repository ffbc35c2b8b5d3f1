"""The `s2dit` CLI end to end on a tiny random-weight model folder (tests/conftest.py)."""

# isort: off
import s2dit_mlx  # noqa: F401

# isort: on
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from s2dit_mlx import cli
from s2dit_mlx.video_io import read_video


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate(capsys, model, out, *extra):
    return run(capsys, "generate", "a red fox in the snow", "--model", model, "-o", out, *extra)


# ----------------------------------------------------------------------------------------------
# Success paths


def test_mp4_frames_size_and_sidecar(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "fox.mp4"
    code, stdout, err = generate(
        capsys, tiny_model_dir, out, "--frames", 17, "--seed", 5, "--fps", 12, "-q"
    )
    assert code == 0, err
    assert err == "" and stdout == ""  # --quiet
    video = read_video(out)
    assert video.shape == (17, 32, 64, 3) and video.dtype == np.uint8

    meta = json.loads((tmp_path / "fox.json").read_text())
    assert meta["prompt"] == "a red fox in the snow"
    assert meta["seed"] == 5 and meta["model"] == str(tiny_model_dir)
    assert meta["frames_written"] == 17
    settings = meta["settings"]
    assert settings["frames"] == 17 and settings["height"] == 32 and settings["width"] == 64
    assert settings["fps"] == 12 and settings["steps"] == 2 and settings["mode"] == "streaming"
    assert settings["stream"] is False and settings["dtype"] == "float32"
    assert "negative_prompt" in meta and "guidance" in settings and "shift" in settings
    for key in ("load_s", "text_encode_s", "generate_s", "wall_s", "first_frames_s"):
        assert meta["timings"][key] >= 0, key
    assert meta["frames_per_s"] > 0 and meta["peak_memory_gb"] >= 0
    assert meta["versions"]["mlx"] == mx.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.json", "fox.mp4"]


def test_defaults_come_from_model_folder(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "v.mp4"
    code, stdout, err = generate(capsys, tiny_model_dir, out, "--seed", 1)
    assert code == 0, err
    assert read_video(out).shape == (9, 32, 64, 3)  # defaults: 9 frames, 32x64
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["settings"]["fps"] == 8 and meta["settings"]["steps"] == 2
    assert "wrote" in stdout and "frames/s" in stdout  # summary line
    assert "chunks" in err  # tqdm progress


def test_random_seed_is_recorded(capsys, tiny_model_dir, tmp_path):
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "v.gif", "-q")
    assert code == 0, err
    seed = json.loads((tmp_path / "v.json").read_text())["seed"]
    assert isinstance(seed, int) and seed >= 0


def test_stream_matches_non_stream(capsys, tiny_model_dir, tmp_path):
    # PNG frames are lossless, so the two runs must agree exactly.
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = generate(capsys, tiny_model_dir, f"{a}/", "--frames", 13, "--seed", 9, "-q")
    assert code == 0, err
    code, _, err = generate(
        capsys, tiny_model_dir, f"{b}/", "--frames", 13, "--seed", 9, "--stream"
    )
    assert code == 0, err
    assert "frames/s" in err  # the live figure on the progress bar
    va, vb = read_video(a), read_video(b)
    assert va.shape == (13, 32, 64, 3)
    np.testing.assert_array_equal(va, vb)
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["stream"] is True


def test_stream_writes_frames_as_chunks_arrive(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from s2dit_mlx import video_io

    seen = []  # frames written so far, recorded each time a new batch arrives
    original = video_io.VideoWriter.write

    def spy(self, frames):
        seen.append(self.frames_written)
        return original(self, frames)

    monkeypatch.setattr(video_io.VideoWriter, "write", spy)
    out = tmp_path / "s.mp4"
    code, _, err = generate(capsys, tiny_model_dir, out, "--frames", 17, "--stream", "-q")
    assert code == 0, err
    # 5 latent frames in chunks of 2: 5 + 8 + 4 pixel frames, written one chunk at a time
    assert seen == [0, 5, 13]
    assert read_video(out).shape[0] == 17


def test_gif_output(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "v.gif"
    code, _, err = generate(capsys, tiny_model_dir, out, "--frames", 5, "-q")
    assert code == 0, err
    assert read_video(out).shape == (5, 32, 64, 3)
    assert (tmp_path / "v.json").is_file()


def test_png_pattern_output(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "f_%03d.png"
    code, _, err = generate(capsys, tiny_model_dir, out, "--frames", 5, "--stream", "-q")
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["f.json"] + [f"f_{i:03d}.png" for i in range(5)]
    assert read_video(out).shape == (5, 32, 64, 3)


def test_single_png_and_other_sizes(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "still.png"
    args = ("--frames", 1, "--height", 64, "--width", 96, "-q")
    code, _, err = generate(capsys, tiny_model_dir, out, *args)
    assert code == 0, err
    assert read_video(out).shape == (1, 64, 96, 3)


def test_bidirectional_cfg_half_precision(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "v.mp4"
    args = ["--mode", "bidirectional", "--solver", "euler", "--guidance", 4, "--dtype", "bfloat16"]
    code, _, err = generate(capsys, tiny_model_dir, out, "--negative-prompt", "blurry", *args)
    assert code == 0, err
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["negative_prompt"] == "blurry" and meta["settings"]["guidance"] == 4
    assert meta["settings"]["dtype"] == "bfloat16" and meta["timings"]["denoise_s"] >= 0
    assert read_video(out).shape == (9, 32, 64, 3)


def test_streaming_solver_flag(capsys, tiny_model_dir, tmp_path):
    from s2dit_mlx.sampling import SAMPLERS

    generate_parser = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    solver = next(a for a in generate_parser._actions if a.dest == "solver")
    assert tuple(solver.choices) == SAMPLERS  # the CLI's literal list is the library's
    out = tmp_path / "v.mp4"
    code, _, err = generate(capsys, tiny_model_dir, out, "--solver", "few-step", "--steps", 2, "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "v.json").read_text())["settings"]["solver"] == "few-step"
    code, _, err = generate(
        capsys, tiny_model_dir, out, "--solver", "few-step", "--mode", "bidirectional"
    )
    assert code != 0 and err.strip().splitlines() == [
        "error: the few-step solver runs in streaming mode only"
    ]


def test_overwrites_existing_output(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    code, _, err = generate(capsys, tiny_model_dir, out, "-q")
    assert code == 0, err
    assert read_video(out).shape[0] == 9


def test_info(capsys):
    code, stdout, err = run(capsys, "info", "--no-gemm")
    assert code == 0, err
    assert f"MLX: {mx.__version__}" in stdout and "BLAS:" in stdout


def test_help_and_version(capsys):
    code, stdout, _ = run(capsys, "generate", "--help")
    assert code == 0
    for flag in ("--model", "--frames", "--stream", "--negative-prompt", "--fps", "--dtype"):
        assert flag in stdout
    code, stdout, _ = run(capsys, "--version")
    assert code == 0 and stdout.startswith("s2dit-mlx ")
    code, stdout, _ = run(capsys)
    assert code != 0 and "generate" in stdout


# ----------------------------------------------------------------------------------------------
# Bad input: exit code != 0, one line on stderr, no traceback, nothing left behind


def _model_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, fn) -> None:
    weights = dict(mx.load(str(path)))
    fn(weights)
    mx.save_safetensors(str(path), weights)


def _drop_first(w):
    w.pop(sorted(w)[0])


def _reshape_first_matrix(w):
    name = next(k for k in sorted(w) if w[k].ndim == 2)
    w[name] = mx.zeros((w[name].shape[0] + 1, w[name].shape[1]))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


BROKEN_MODELS = {
    "unknown-block": lambda m: _edit_config(
        m / "config.json", lambda c: c["dit"]["layers"].__setitem__(0, "mamba")
    ),
    "unknown-vae-type": lambda m: (
        _edit_config(m / "config.json", lambda c: c["vae"].__setitem__("type", "wan99")),
        _edit_config(m / "vae" / "config.json", lambda c: c.__setitem__("type", "wan99")),
    ),
    "invalid-json": lambda m: (m / "config.json").write_text("{ this is not json"),
    "missing-config": lambda m: (m / "config.json").unlink(),
    "corrupt-safetensors": lambda m: (m / "model.safetensors").write_bytes(b"\x00garbage" * 9),
    "truncated-safetensors": lambda m: _truncate(m / "vae" / "model.safetensors"),
    "missing-key": lambda m: _edit_weights(m / "model.safetensors", _drop_first),
    "unexpected-key": lambda m: _edit_weights(
        m / "text_encoder" / "model.safetensors", lambda w: w.__setitem__("x.weight", mx.ones(2))
    ),
    "shape-mismatch": lambda m: _edit_weights(m / "model.safetensors", _reshape_first_matrix),
    "text-dim-mismatch": lambda m: _edit_config(
        m / "text_encoder" / "config.json", lambda c: c.__setitem__("dim", 8)
    ),
}


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    for d in (Path("/sys"), Path("/proc")):  # root writes anywhere except pseudo filesystems
        if d.is_dir():
            return d
    pytest.skip("no unwritable directory available as root")


# name -> (argv after "generate PROMPT", expected text in the error line); "{model}" and
# "{out}" are filled in per test; "{broken:KIND}" is a broken copy of the tiny model.
BAD_INPUTS = {
    "height-not-divisible": (["--height", "40"], "height 40 is not divisible by 32"),
    "width-not-divisible": (["--width", "100"], "width 100 is not divisible by 32"),
    "height-zero": (["--height", "0"], "height must be a positive integer"),
    "frames-not-4k+1": (["--frames", "10"], "frames must be 4k + 1"),
    "frames-zero": (["--frames", "0"], "frames must be 4k + 1"),
    "frames-non-numeric": (["--frames", "ten"], "argument --frames: invalid int value: 'ten'"),
    "steps-zero": (["--steps", "0"], "steps must be a positive integer"),
    "steps-negative": (["--steps", "-3"], "steps must be a positive integer"),
    "guidance-negative": (["--guidance", "-1"], "guidance must be a finite number >= 0"),
    "guidance-nan": (["--guidance", "nan"], "guidance must be a finite number >= 0"),
    "seed-negative": (["--seed", "-5"], "seed must be an integer"),
    "shift-zero": (["--shift", "0"], "shift must be a positive number"),
    "fps-zero": (["--fps", "0"], "argument --fps: expected a positive number"),
    "bad-dtype": (["--dtype", "float8"], "argument --dtype: invalid choice"),
    "unknown-option": (["--colour", "red"], "unrecognized arguments: --colour red"),
    "no-model": ([None], "the built-in model is missing"),
    "missing-model": (["--model", "{missing}"], "does not exist"),
    "empty-output": (["-o", ""], "output path is empty"),
    "output-dir-missing": (["-o", "{tmp}/no/such/dir/v.mp4"], "output directory does not exist"),
    "output-parent-is-file": (["-o", "{tmp}/file.txt/v.mp4"], "is not a directory"),
    "output-is-a-directory": (["-o", "{tmp}/adir.mp4"], "output path is a directory"),
    "unknown-suffix": (["-o", "{tmp}/v.avi"], "unsupported output suffix '.avi'"),
    "png-for-many-frames": (["-o", "{tmp}/one.png"], "holds one frame but 9 were asked for"),
    "png-dir-not-empty": (["-o", "{tmp}/full/"], "output directory for PNG frames is not empty"),
    "unwritable-output": (["-o", "{unwritable}/v.mp4"], "output directory is not writable"),
    **{
        f"model-{kind}": (["--model", f"{{broken:{kind}}}"], "model folder ")
        for kind in BROKEN_MODELS
    },
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(capsys, monkeypatch, tiny_model_dir, tmp_path, case):
    extra, expected = BAD_INPUTS[case]
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    model = str(tiny_model_dir)
    out = str(tmp_path / "out.mp4")
    if extra[0] is None:  # no --model at all, and the built-in model missing
        model, extra = None, extra[1:]
        monkeypatch.setattr("s2dit_mlx.loading.DEFAULT_MODEL_DIR", tmp_path / "no-default")
    argv, i = [], 0
    while i < len(extra):
        flag, value = extra[i], extra[i + 1] if i + 1 < len(extra) else None
        if value is not None and value.startswith("{broken:"):
            kind = value[len("{broken:") : -1]
            value = str(_model_copy(tiny_model_dir, tmp_path / "broken", BROKEN_MODELS[kind]))
        elif value == "{missing}":
            value = str(tmp_path / "no-such-model")
        elif value is not None and "{unwritable}" in value:
            value = value.replace("{unwritable}", str(_unwritable_dir(tmp_path)))
        elif value is not None:
            value = value.replace("{tmp}", str(tmp_path))
        if flag == "--model":
            model = value
        elif flag == "-o":
            out = value
        else:
            argv += [flag, value] if value is not None else [flag]
        i += 2
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "broken" not in p.parts}
    full = ["generate", "a fox"] + (["--model", model] if model else []) + ["-o", out] + argv

    code, stdout, err = run(capsys, *full)

    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err + stdout
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "broken" not in p.parts}
    assert after == before  # no output file, no sidecar, no temporary left behind
    if case.startswith("model-"):
        assert f"model folder {tmp_path / 'broken'}" in lines[0]


def test_enough_kinds_of_bad_input():
    assert len(BAD_INPUTS) >= 15


def test_failure_during_generation_leaves_nothing(capsys, tiny_model_dir, tmp_path, monkeypatch):
    # A write failure after some frames were streamed: the partial video must not remain.
    from s2dit_mlx import video_io
    from s2dit_mlx.errors import S2DiTError

    original = video_io.VideoWriter.write

    def fail_second(self, frames):
        if self.frames_written:
            raise S2DiTError("disk full while writing")
        return original(self, frames)

    monkeypatch.setattr(video_io.VideoWriter, "write", fail_second)
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "v.mp4", "--stream", "-q")
    assert code == 2 and err == "error: disk full while writing\n"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The real console script, in a subprocess


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("s2dit")
    if script.is_file():
        return [str(script)]
    found = shutil.which("s2dit")
    return [found] if found else [sys.executable, "-m", "s2dit_mlx.cli"]


def test_console_script_subprocess(tiny_model_dir, tmp_path):
    bad = subprocess.run(
        [
            *_console_script(),
            "generate",
            "a fox",
            "--model",
            str(tiny_model_dir),
            "-o",
            str(tmp_path / "v.mp4"),
            "--frames",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["error: frames must be 4k + 1 (1, 5, 9, 13, 17, ...), got 6"]
    assert "Traceback" not in bad.stdout + bad.stderr
    assert list(tmp_path.iterdir()) == []

    good = subprocess.run(
        [
            *_console_script(),
            "generate",
            "a fox",
            "--model",
            str(tiny_model_dir),
            "-o",
            str(tmp_path / "v.mp4"),
            "--seed",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr
    assert read_video(tmp_path / "v.mp4").shape == (9, 32, 64, 3)
