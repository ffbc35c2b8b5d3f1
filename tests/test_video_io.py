"""Video writers (mp4/gif/png), atomic outputs, path checks, metadata, and the BLAS setup."""

import importlib.metadata
import json
import os
import subprocess
import sys

# isort: off
import s2dit_mlx
import mlx.core as mx

# isort: on
import numpy as np
import pytest
from PIL import Image

from s2dit_mlx import info
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.video_io import (
    VideoWriter,
    check_frame_count,
    check_output_path,
    metadata_path,
    read_video,
    to_uint8,
    write_metadata,
    write_video,
)


def _frames(n=9, h=32, w=48, seed=0):
    # 8x8 blocks of few colours: exact through GIF/PNG, close through H.264
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4, (n, h // 8, w // 8, 3)).astype(np.uint8) * 80
    return np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_mp4_round_trip_in_chunks(tmp_path):
    frames = _frames()
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, fps=16) as w:
        w.write(frames[:1])  # streaming: the first chunk decodes to one frame
        w.write(frames[1:5])
        w.write(frames[5:])
    assert w.frames_written == 9
    back = read_video(out)
    assert back.shape == (9, 32, 48, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 12
    assert _listing(tmp_path) == ["clip.mp4"]  # no temporaries left


def test_mp4_rejects_odd_size(tmp_path):
    with pytest.raises(S2DiTError, match="even"):
        with VideoWriter(tmp_path / "x.mp4") as w:
            w.write(np.zeros((1, 31, 48, 3), np.uint8))
    assert _listing(tmp_path) == []


def test_gif_round_trip_loops_forever(tmp_path):
    frames = _frames(5)
    out = write_video(tmp_path / "clip.GIF", frames, fps=10)
    np.testing.assert_array_equal(read_video(out), frames)
    with Image.open(out) as im:
        assert im.info["loop"] == 0 and im.info["duration"] == 100
    assert _listing(tmp_path) == ["clip.GIF"]


@pytest.mark.parametrize("name", ["frames/", "frames"])
def test_png_directory(tmp_path, name):
    frames = _frames(4)
    (tmp_path / "frames").mkdir()  # an existing empty directory is fine
    with VideoWriter(str(tmp_path / name)) as w:
        w.write(frames[:2])
        w.write(frames[2:])
    assert _listing(tmp_path / "frames") == [f"{i:05d}.png" for i in range(4)]
    np.testing.assert_array_equal(read_video(tmp_path / "frames"), frames)
    assert _listing(tmp_path) == ["frames"]


def test_png_pattern_and_single(tmp_path):
    frames = _frames(3)
    write_video(tmp_path / "f_%03d.png", frames)
    assert _listing(tmp_path) == ["f_000.png", "f_001.png", "f_002.png"]
    np.testing.assert_array_equal(read_video(tmp_path / "f_%03d.png"), frames)

    write_video(tmp_path / "still.png", frames[:1])
    np.testing.assert_array_equal(read_video(tmp_path / "still.png"), frames[:1])
    with pytest.raises(S2DiTError, match="one frame"):
        write_video(tmp_path / "two.png", frames[:2])
    assert not (tmp_path / "two.png").exists()


@pytest.mark.parametrize("name", ["a.mp4", "a.gif", "frames/", "p_%05d.png"])
def test_exception_inside_writer_leaves_nothing(tmp_path, name):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / name) as w:
            w.write(_frames(3))
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_failure_keeps_previous_output(tmp_path):
    out = tmp_path / "a.mp4"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out) as w:
            w.write(_frames(2))
            raise KeyboardInterrupt
    assert out.read_bytes() == b"old" and _listing(tmp_path) == ["a.mp4"]


def test_bad_frames_and_empty_video(tmp_path):
    with pytest.raises(S2DiTError, match="uint8"):
        with VideoWriter(tmp_path / "a.gif") as w:
            w.write(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(S2DiTError, match="size changed"):
        with VideoWriter(tmp_path / "a.gif") as w:
            w.write(np.zeros((1, 16, 16, 3), np.uint8))
            w.write(np.zeros((1, 32, 16, 3), np.uint8))
    with pytest.raises(S2DiTError, match="no frames"):
        with VideoWriter(tmp_path / "a.mp4"):
            pass
    assert _listing(tmp_path) == []


def test_check_output_path_errors(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_text("x")
    (tmp_path / "adir.mp4").mkdir()
    cases = {
        "": "empty",
        str(tmp_path / "out.avi"): "unsupported output suffix '.avi'",
        str(tmp_path / "missing" / "out.mp4"): "does not exist",
        str(tmp_path / "afile" / "out.mp4"): "not a directory",
        str(tmp_path / "adir.mp4"): "is a directory",
        str(tmp_path / "full"): "not empty",
        str(tmp_path / "afile/"): "not a directory",
        str(tmp_path / "a_%d_%d.png"): "exactly one",
    }
    for path, msg in cases.items():
        with pytest.raises(S2DiTError, match=msg) as err:
            check_output_path(path)
        assert "\n" not in str(err.value)
    with pytest.raises(S2DiTError, match="holds one frame but 5 were asked for"):
        check_frame_count(tmp_path / "x.png", 5)
    check_frame_count(tmp_path / "x.png", 1)
    check_frame_count(tmp_path / "frames_%03d.png", 5)
    check_frame_count(tmp_path / "x.mp4", 5)

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(S2DiTError, match="not writable"):
        check_output_path(tmp_path / "out.mp4")
    monkeypatch.undo()

    assert check_output_path(tmp_path / "ok.MP4") == tmp_path / "ok.MP4"
    assert _listing(tmp_path) == ["adir.mp4", "afile", "full"]  # checks create nothing


def test_to_uint8():
    x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0, np.nan], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 128, 255, 255, 128])
    y = to_uint8(mx.array([[-1.0, 1.0]], dtype=mx.bfloat16))
    assert y.dtype == np.uint8 and y.tolist() == [[0, 255]]


def test_metadata_sidecar(tmp_path):
    assert metadata_path(tmp_path / "out.mp4") == tmp_path / "out.json"
    assert metadata_path(str(tmp_path / "frames") + "/") == tmp_path / "frames.json"
    assert metadata_path(tmp_path / "f_%05d.png") == tmp_path / "f.json"
    meta = {"prompt": "un chat", "seed": np.int64(3), "shift": np.float32(5.0), "size": (8, 8)}
    side = write_metadata(tmp_path / "out.mp4", meta)
    assert side == tmp_path / "out.json"
    assert json.loads(side.read_text()) == {
        "s2dit_sidecar": 1,
        "prompt": "un chat",
        "seed": 3,
        "shift": 5.0,
        "size": [8, 8],
    }
    write_metadata(tmp_path / "out.mp4", {"seed": 4})  # our own sidecar: replaced in place
    assert json.loads(side.read_text()) == {"s2dit_sidecar": 1, "seed": 4}
    assert _listing(tmp_path) == ["out.json"]


def test_read_video_missing(tmp_path):
    with pytest.raises(S2DiTError, match="no video"):
        read_video(tmp_path / "nope.mp4")


def test_info_lines():
    lines = info.info_lines(gemm=False)
    text = "\n".join(lines)
    assert f"s2dit-mlx: {s2dit_mlx.__version__}" in text and f"MLX: {mx.__version__}" in text
    assert "BLAS: " in text and "numpy: " in text and "CPU kernels: " in text
    assert info.gemm_gflops(64, repeats=1) > 0


def _blas_status(extra_env, setup=True):
    env = {k: v for k, v in os.environ.items() if k != "S2DIT_NO_OPENBLAS"}
    env.update(extra_env)
    call = "_blas.setup_blas(); " if setup else ""
    code = f"from s2dit_mlx import _blas; {call}import mlx.core; print(_blas.status)"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return res.stdout.strip()


def _has_cmeel_openblas():
    try:
        importlib.metadata.version("cmeel-openblas")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _has_cmeel_openblas(),
    reason="OpenBLAS loading applies to Linux with cmeel-openblas installed",
)
def test_blas_status_in_fresh_process():
    assert _blas_status({}) == "openblas"
    assert _blas_status({"S2DIT_NO_OPENBLAS": "1"}) == "disabled"
    assert _blas_status({}, setup=False) == "not-run"  # importing the library loads nothing
