"""`s2dit generate --model <converted Wan folder>`: the teacher with its published defaults.

Tiny random Wan 2.1 checkpoints (DiT, VAE, umT5, tokenizer; tests/wan_tiny.py) in the
original and the diffusers layout go through `python -m convert.wan`; `s2dit generate` then
runs each folder end to end at tiny sizes (--frames/--height/--width) and otherwise the
defaults convert.wan wrote into config.json: Wan's steps, shift, guidance, negative prompt,
fps, bidirectional mode and UniPC. The preset defaults themselves are checked against the
official wan22 configs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import s2dit_mlx  # noqa: F401

# isort: split
import numpy as np
import pytest
from wan_tiny import official_models, write_diffusers, write_original, write_tokenizer

from convert import wan as convert_wan
from s2dit_mlx import cli
from s2dit_mlx.loading import DEFAULTS
from s2dit_mlx.models import wan
from s2dit_mlx.sampling import WAN_NEGATIVE_PROMPT
from s2dit_mlx.video_io import read_video

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("ftfy")

pytestmark = pytest.mark.filterwarnings(
    "ignore:CUDA is not available:UserWarning", "ignore::FutureWarning"
)

# Wan2.1-T2V-1.3B's defaults: a tiny checkpoint matches no preset and gets these.
FALLBACK = wan.PRESETS["wan2.1-t2v-1.3b"].defaults
TINY_SIZE = ["--frames", "5", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{layout: converted model folder}, both from the same random weights."""
    root = tmp_path_factory.mktemp("wan_cli")
    models = official_models(seed=0)
    tokenizer = write_tokenizer(root / "tokenizer")
    sources = {
        "original": write_original(root / "src_original", models, tokenizer),
        "diffusers": write_diffusers(root / "src_diffusers", models, tokenizer),
    }
    out = {}
    for layout, src in sources.items():
        out[layout] = root / layout
        convert_wan.convert(src, out[layout], log=None)  # default dtype (bf16), as a user would
    return out


def generate(capsys, model, out, *extra) -> tuple[int, str]:
    argv = ["generate", "a cat runs on the grass", "--model", str(model), "-o", str(out)]
    code = cli.main(argv + [str(a) for a in extra])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_converted_folder_records_wan_defaults(folders, layout):
    config = json.loads((folders[layout] / "config.json").read_text(encoding="utf-8"))
    assert config["wan"]["source_layout"] == layout and config["wan"]["preset"] is None
    defaults = config["defaults"]
    # The published defaults, plus the DiT's compute dtype: the dtype it was stored in.
    assert defaults == {**FALLBACK, "dtype": "bfloat16"}
    assert set(defaults) == set(DEFAULTS)  # every setting a model folder can carry
    assert defaults["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert (defaults["mode"], defaults["solver"]) == ("bidirectional", "unipc")


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_generate_runs_the_teacher_with_its_defaults(capsys, folders, layout, tmp_path):
    out = tmp_path / "frames"
    code, err = generate(capsys, folders[layout], f"{out}/", *TINY_SIZE, "--seed", 3, "-q")
    assert code == 0, err
    video = read_video(out)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    assert video.std() > 1.0  # a random VAE still gives a non-flat picture
    meta = json.loads((tmp_path / "frames.json").read_text(encoding="utf-8"))
    s = meta["settings"]
    # sizes from the flags, everything else from the folder's Wan defaults
    assert (s["frames"], s["height"], s["width"]) == (5, 32, 32)
    for key in ("steps", "shift", "guidance", "fps", "mode", "solver"):
        assert s[key] == FALLBACK[key], key
    assert meta["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert s["steps"] == 50 and s["mode"] == "bidirectional"
    assert meta["frames_written"] == 5


def test_both_layouts_generate_the_same_video(capsys, folders, tmp_path):
    videos = {}
    flags = [*TINY_SIZE, "--steps", 4, "-q"]
    for layout in folders:
        out = tmp_path / layout
        code, err = generate(capsys, folders[layout], f"{out}/", *flags, "--seed", 9)
        assert code == 0, err
        videos[layout] = read_video(out)
    assert np.array_equal(videos["original"], videos["diffusers"])
    # a different seed gives a different video (the comparison can fail)
    code, err = generate(
        capsys, folders["original"], f"{tmp_path / 'other'}/", *flags, "--seed", 10
    )
    assert code == 0, err
    assert not np.array_equal(read_video(tmp_path / "other"), videos["original"])


def test_console_script_end_to_end(folders, tmp_path):
    """The installed entry point, in a fresh process, with flags overriding the defaults."""
    out = tmp_path / "cat.gif"
    cmd = [
        sys.executable, "-m", "s2dit_mlx.cli", "generate", "a cat", "--model",
        str(folders["diffusers"]), "-o", str(out), *TINY_SIZE, "--steps", "3",
        "--guidance", "1", "--solver", "euler", "--seed", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}: 5 frames 32x32 at 16 fps" in proc.stdout
    meta = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["settings"]["solver"] == "euler" and meta["settings"]["guidance"] == 1.0
    assert read_video(out).shape == (5, 32, 32, 3)


def test_bad_size_for_a_wan_folder_is_one_line(capsys, folders, tmp_path):
    code, err = generate(capsys, folders["original"], tmp_path / "x.mp4", "--height", "40")
    assert code == 2
    assert err.startswith("error: height 40 is not divisible by 16") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The presets' defaults are the official ones


def official_configs():
    """wan22's wan/configs (Wan2.2 models), loaded without running wan/__init__.py (CUDA)."""
    pytest.importorskip("easydict")
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("wan22 (official Wan code) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    if "wan" not in sys.modules:
        stub = importlib.util.spec_from_file_location(
            "wan", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        sys.modules["wan"] = importlib.util.module_from_spec(stub)
    if "wan.configs" not in sys.modules:
        cfg_spec = importlib.util.spec_from_file_location(
            "wan.configs",
            root / "configs" / "__init__.py",
            submodule_search_locations=[str(root / "configs")],
        )
        module = importlib.util.module_from_spec(cfg_spec)
        sys.modules["wan.configs"] = module
        cfg_spec.loader.exec_module(module)
    return sys.modules["wan.configs"]


@pytest.mark.parametrize(
    "preset, task", [("wan2.2-t2v-a14b", "t2v-A14B"), ("wan2.2-i2v-a14b", "i2v-A14B"),
                     ("wan2.2-ti2v-5b", "ti2v-5B")],
)  # fmt: skip
def test_preset_defaults_are_wans(preset, task):
    configs = official_configs()
    official = configs.WAN_CONFIGS[task]
    p = wan.PRESETS[preset]
    d = convert_wan._defaults(p)  # what convert.wan writes for a checkpoint of this shape
    assert d == p.defaults
    assert d["steps"] == official.sample_steps and d["shift"] == official.sample_shift
    assert d["fps"] == official.sample_fps and d["frames"] == official.frame_num
    assert d["negative_prompt"] == official.sample_neg_prompt
    # Wan's sizes are "width*height"; the first supported one is the model's default
    width, height = configs.SIZE_CONFIGS[configs.SUPPORTED_SIZES[task][0]]
    if task == "ti2v-5B":
        assert (d["height"], d["width"]) == (704, 1280)
    else:
        assert {d["height"], d["width"]} == {width, height} and d["width"] > d["height"]
    low, high = (
        official.sample_guide_scale
        if isinstance(official.sample_guide_scale, tuple)
        else (official.sample_guide_scale,) * 2
    )
    assert d["guidance"] == high
    if p.boundary is not None:
        assert p.boundary == official.boundary and p.guidance_low_noise == low
    assert (d["mode"], d["solver"]) == ("bidirectional", "unipc")
