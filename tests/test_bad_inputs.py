"""Bad input to every command: one `error:` line, exit code 2, no traceback, nothing written.

ONE table (BAD_INPUTS) of rows (id, entry point, argv, expected fragment of the error line),
across `s2dit generate`, `s2dit export coreml`, `python -m convert.wan`, every `python -m
train.*` command and broken model folders. Each row runs in-process and checks, besides the
line and the code, that the whole input tree and the row's own folder (where its outputs would
go, with a user file in it) are byte-identical afterwards: nothing written, nothing deleted.

Also here: Ctrl-C during a generation (exit 130, one line, no partial output), argv bytes that
are not UTF-8 from a real shell, the Python API's prompt check, the sidecar writer with such
text, the non-finite weight screen, the typed config fields and the shared parser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_harness import assert_user_error, run_main, tree_state
from conftest import TINY_DEFAULTS, make_tiny_components
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_model, save_model

NOT_UTF8 = b"\xff\xfe a fox".decode("utf-8", "surrogateescape")  # what Linux argv gives

# A module for --data rows (imported from the input tree; no bytecode is written there).
DATA_MODULE = """
import numpy as np

NOT_A_FUNCTION = 3


def returns_text(**options):
    return "not a source"


def raises(**options):
    raise RuntimeError("no such dataset")


def wrong_size(frames, height, width, **options):
    def source(indices):
        video = np.zeros((len(indices), frames, height // 2, width, 3), np.float32)
        return {"video": video, "captions": [""] * len(indices)}

    return source


def no_video(**options):
    return lambda indices: {"pixels": 0}
"""


# ----------------------------------------------------------------------------------------------
# The input tree, built once


def _edit_config(folder: Path, edit, file: str = "config.json") -> None:
    path = folder / file
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))  # json writes NaN for float("nan"), as a broken tool may


def _poison(folder: Path, file: str, value: float) -> None:
    """Set the first floating weight (by name) of folder/file to `value` everywhere."""
    path = folder / file
    weights = mx.load(str(path))
    name = sorted(weights)[0]
    weights[name] = mx.full(weights[name].shape, value, dtype=weights[name].dtype)
    mx.save_safetensors(str(path), weights)


def _tiny_wan(folder: Path, dim: int, ffn_dim: int) -> Path:
    """An original-layout Wan DiT checkpoint (diffusion_pytorch_model.safetensors) of random
    weights, written without torch: the S2DiT names are Wan's, the patch embedding in
    PyTorch's (O, I, D, H, W) layout."""
    from s2dit_mlx.models import wan
    from s2dit_mlx.models.s2dit import S2DiT

    args = wan.wan_model_args(dim, ffn_dim, 2, 2, in_dim=4, out_dim=4, text_dim=32, freq_dim=32)
    dit = S2DiT(args)
    weights = dict(tree_flatten(dit.parameters()))
    weights["patch_embedding.weight"] = weights["patch_embedding.weight"].transpose(0, 4, 1, 2, 3)
    folder.mkdir()
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights)
    return folder


def _adapter_for_another_model(folder: Path) -> Path:
    from train.lora import LoRAConfig, apply_lora, save_adapters, weights_hash

    dit, _, _ = make_tiny_components(seed=1)  # not the world's model: another base
    config = LoRAConfig(rank=2, alpha=4.0, layers="self_attn.q")
    sha = weights_hash(dit)
    apply_lora(dit, config)
    return save_adapters(folder, dit, config, "other", sha)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Every input a row may name ({name} in its argv), in one tree."""
    root = tmp_path_factory.mktemp("inputs")
    dit, vae, text_encoder = make_tiny_components()
    model = save_model(root / "model", dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    paths = {"root": root, "model": model}

    def broken(name: str, damage) -> None:
        folder = root / name
        save_model(folder, dit, vae, text_encoder, defaults=TINY_DEFAULTS)
        damage(folder)
        paths[name] = folder

    broken("nan", lambda m: _poison(m, "model.safetensors", float("nan")))
    broken("inf", lambda m: _poison(m, "vae/model.safetensors", float("inf")))
    broken("dim_str", lambda m: _edit_config(m, lambda c: c["dit"].__setitem__("dim", "32")))
    broken("layers_str", lambda m: _edit_config(m, lambda c: c["dit"].__setitem__("layers", "ssa")))
    broken("window_float", lambda m: _edit_config(m, lambda c: c["dit"].__setitem__("window", 2.5)))
    broken(
        "eps_nan", lambda m: _edit_config(m, lambda c: c["dit"].__setitem__("eps", float("nan")))
    )
    broken(
        "vae_str",
        lambda m: _edit_config(m, lambda c: c.__setitem__("hidden_dim", "16"), "vae/config.json"),
    )
    broken(
        "te_bool",
        lambda m: _edit_config(
            m, lambda c: c.__setitem__("num_layers", True), "text_encoder/config.json"
        ),
    )
    broken(
        "vae_type",
        lambda m: _edit_config(m, lambda c: c.__setitem__("type", "gan"), "vae/config.json"),
    )
    broken("no_weights", lambda m: (m / "model.safetensors").unlink())
    broken("no_te_weights", lambda m: (m / "text_encoder" / "model.safetensors").unlink())
    broken("bad_json", lambda m: (m / "config.json").write_text('{"dit": {'))
    paths["file"] = root / "notes.txt"
    paths["file"].write_text("a user's file\n")

    # train.dit --config: the built-in config alone (its umT5 tokenizer is not beside it), and a
    # config with a wrong type
    (root / "lone").mkdir()
    paths["lone_config"] = root / "lone" / "config.json"
    paths["lone_config"].write_bytes((TEACHER_MODEL_DIR / "config.json").read_bytes())
    paths["dim_str_config"] = paths["dim_str"] / "config.json"
    # train.dit --resume
    (root / "empty_run").mkdir()
    paths["empty_run"] = root / "empty_run"
    (root / "bad_run").mkdir()
    (root / "bad_run" / "run.json").write_text("{not json")
    paths["bad_run"] = root / "bad_run"
    paths["missing"] = root / "no_such_folder"
    # convert.wan: a tiny Wan DiT (widths 64/128), and one no group size divides (48/80)
    paths["wan"] = _tiny_wan(root / "wan", 64, 128)
    paths["wan48"] = _tiny_wan(root / "wan48", 48, 80)
    # train.fuse: an adapter trained on another base model
    paths["adapter"] = _adapter_for_another_model(root / "adapter")
    # train.default_model --vae: component folders (unknown type; NaN weights)
    for name, damage in (
        ("vae_dir_type", lambda v: _edit_config(v, lambda c: c.__setitem__("type", "gan"))),
        ("vae_dir_nan", lambda v: _poison(v, "model.safetensors", float("nan"))),
    ):
        folder = root / name
        folder.mkdir()
        for f in ("config.json", "model.safetensors"):
            (folder / f).write_bytes((model / "vae" / f).read_bytes())
        damage(folder)
        paths[name] = folder
    # train.dit --data
    (root / "data").mkdir()
    (root / "data" / "bad_sources.py").write_text(DATA_MODULE)
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------------------
# The table: (id, entry point, argv, fragment of the one error line). {name} is a path from
# `world`; {out} is a fresh folder path and {existing} a folder with a user's file, both in the
# row's own tmp folder.

S2DIT, CONVERT = "s2dit", "convert.wan"
DIT, VAE, FUSE, AVERAGE, RECIPE = (
    "train.dit",
    "train.vae",
    "train.fuse",
    "train.average",
    "train.default_model",
)
GEN = ["generate", "a red circle", "--model", "{model}", "-o", "{tmp}/v.mp4"]
EXPORT = ["export", "coreml", "--model", "{model}", "--out", "{out}"]
DIT_RUN = ["--model", "{model}", "--out", "{out}", "--steps", "1", "--batch-size", "1"]
TINY_VAE = ["--out", "{out}", "--steps", "1", "--base-dim", "4", "--z-dim", "4"]


def _gen_model(name: str) -> list[str]:
    return ["generate", "a red circle", "--model", f"{{{name}}}", "-o", "{tmp}/v.mp4"]


BAD_INPUTS = [
    # --- s2dit generate: text and model folders (sizes and outputs: tests/test_cli.py) ---
    ("gen-prompt-not-utf8", S2DIT, ["generate", NOT_UTF8, *GEN[2:]], "undecodable byte 0xff"),
    ("gen-negative-not-utf8", S2DIT, [*GEN, "--negative-prompt", NOT_UTF8], "--negative-prompt"),
    ("gen-nan-weights", S2DIT, _gen_model("nan"), "model.safetensors holds NaN values"),
    ("gen-inf-weights", S2DIT, _gen_model("inf"), "vae/model.safetensors holds infinite"),
    ("gen-dim-string", S2DIT, _gen_model("dim_str"), "dit config: dim must be an integer"),
    ("gen-layers-string", S2DIT, _gen_model("layers_str"), "layers must be a list of strings"),
    ("gen-window-float", S2DIT, _gen_model("window_float"), "window must be an integer or null"),
    ("gen-eps-nan", S2DIT, _gen_model("eps_nan"), "eps must be a finite number, got nan"),
    ("gen-vae-field-string", S2DIT, _gen_model("vae_str"), "hidden_dim must be an integer"),
    ("gen-te-field-bool", S2DIT, _gen_model("te_bool"), "num_layers must be an integer"),
    ("gen-unknown-vae-type", S2DIT, _gen_model("vae_type"), "unknown vae type 'gan'"),
    ("gen-no-dit-weights", S2DIT, _gen_model("no_weights"), "model.safetensors is missing"),
    ("gen-no-te-weights", S2DIT, _gen_model("no_te_weights"), "text_encoder/model.safetensors"),
    ("gen-config-not-json", S2DIT, _gen_model("bad_json"), "config.json is not valid JSON"),
    ("gen-model-is-a-file", S2DIT, _gen_model("file"), "is a file, expected a model folder"),
    # --- s2dit export coreml ---
    ("export-prompt-not-utf8", S2DIT, [*EXPORT, "--prompt", NOT_UTF8], "argument --prompt"),
    (
        "export-negative-not-utf8",
        S2DIT,
        [*EXPORT, "--negative-prompt", NOT_UTF8],
        "not valid UTF-8",
    ),
    ("export-nan-weights", S2DIT, [*EXPORT[:3], "{nan}", "--out", "{out}"], "holds NaN"),
    ("export-dim-string", S2DIT, [*EXPORT[:3], "{dim_str}", "--out", "{out}"], "dim must be"),
    ("export-height", S2DIT, [*EXPORT, "--height", "40"], "height 40 is not divisible by 32"),
    ("export-window-1", S2DIT, [*EXPORT, "--window", "1"], "window must be an integer >= 2"),
    ("export-steps-0", S2DIT, [*EXPORT, "--steps", "0"], "steps must be a positive integer"),
    ("export-compress", S2DIT, [*EXPORT, "--compress", "zip"], "argument --compress"),
    # --- python -m convert.wan ---
    ("convert-shard-lots", CONVERT, ["{wan}", "--out", "{out}", "--shard-size", "lots"], "lots"),
    ("convert-shard-0", CONVERT, ["{wan}", "--out", "{out}", "--shard-size", "0"], "--shard-size"),
    ("convert-group-0", CONVERT, ["{wan}", "--out", "{out}", "--group-size", "0"], "choice: 0"),
    (
        "convert-group-7",
        CONVERT,
        ["{wan}", "--out", "{out}", "--only", "dit", "-q", "4", "--group-size", "7"],
        "argument --group-size: invalid choice: 7",
    ),
    (
        "convert-nothing-quantized",
        CONVERT,
        ["{wan48}", "--out", "{out}", "--only", "dit", "-q", "4", "--group-size", "32"],
        "nothing would be quantized",
    ),
    ("convert-only-vae", CONVERT, ["{wan}", "--out", "{out}", "--only", "vae"], "includes dit"),
    ("convert-dtype", CONVERT, ["{wan}", "--out", "{out}", "--dtype", "fp8"], "argument --dtype"),
    ("convert-no-src", CONVERT, ["{missing}", "--out", "{out}"], "does not exist"),
    ("convert-src-file", CONVERT, ["{file}", "--out", "{out}"], "is a file"),
    ("convert-not-wan", CONVERT, ["{model}", "--out", "{out}"], "is not a Wan checkpoint"),
    ("convert-no-vae", CONVERT, ["{wan}", "--out", "{out}"], "leave it out with --only"),
    (
        "convert-existing-out",
        CONVERT,
        ["{wan}", "--out", "{existing}", "--only", "dit"],
        "is not empty and is not an s2dit-mlx model folder",
    ),
    # --- python -m train.dit ---
    ("dit-frames-10", DIT, [*DIT_RUN, "--frames", "10"], "frames 10 (--frames) must be 4k + 1"),
    ("dit-height-40", DIT, [*DIT_RUN, "--height", "40"], "height 40 (--height) is not divisible"),
    ("dit-data-no-module", DIT, [*DIT_RUN, "--data", "no_such_mod:fn"], "cannot load data"),
    ("dit-data-no-name", DIT, [*DIT_RUN, "--data", "bad_sources:nope"], "has no 'nope'"),
    (
        "dit-data-not-function",
        DIT,
        [*DIT_RUN, "--data", "bad_sources:NOT_A_FUNCTION"],
        "is not a function",
    ),
    (
        "dit-data-returns-text",
        DIT,
        [*DIT_RUN, "--data", "bad_sources:returns_text"],
        "must return a function source(indices)",
    ),
    ("dit-data-raises", DIT, [*DIT_RUN, "--data", "bad_sources:raises"], "no such dataset"),
    (
        "dit-data-wrong-size",
        DIT,
        [*DIT_RUN, "--data", "bad_sources:wrong_size"],
        "gave clips of shape (1, 9, 16, 64, 3)",
    ),
    ("dit-data-no-video", DIT, [*DIT_RUN, "--data", "bad_sources:no_video"], "keys ['pixels']"),
    ("dit-resume-empty", DIT, ["--out", "{empty_run}", "--resume"], "nothing to resume in"),
    ("dit-resume-missing", DIT, ["--out", "{missing}", "--resume"], "it does not exist"),
    ("dit-resume-bad-json", DIT, ["--out", "{bad_run}", "--resume"], "run.json is unreadable"),
    (
        "dit-config-no-tokenizer",
        DIT,
        ["--config", "{lone_config}", "--out", "{out}"],
        "tokenizer file text_encoder/tokenizer.json is missing",
    ),
    (
        "dit-config-wrong-type",
        DIT,
        ["--config", "{dim_str_config}", "--out", "{out}"],
        "dit config: dim must be an integer, got '32'",
    ),
    (
        "dit-config-then-bad-frames",  # the random start (init/) is not saved either
        DIT,
        ["--config", "{model}/config.json", "--out", "{out}", "--frames", "7"],
        "frames 7 (--frames) must be 4k + 1",
    ),
    (
        "dit-height-33",
        DIT,
        ["--model", "{model}", "--out", "{out}", "--height", "33"],
        "height 33 (--height)",
    ),
    ("dit-model-and-config", DIT, [*DIT_RUN, "--config", "{lone_config}"], "exactly one of"),
    ("dit-nan-model", DIT, ["--model", "{nan}", "--out", "{out}"], "holds NaN values"),
    ("dit-steps-0", DIT, [*DIT_RUN, "--steps", "0"], "argument --steps: expected a positive"),
    ("dit-lr-nan", DIT, [*DIT_RUN, "--lr", "nan"], "argument --lr: expected a positive number"),
    ("dit-dropout-2", DIT, [*DIT_RUN, "--caption-dropout", "2"], "expected a probability"),
    ("dit-ema-1", DIT, [*DIT_RUN, "--ema", "1"], "argument --ema: expected a number in [0, 1)"),
    ("dit-sample-prompt", DIT, [*DIT_RUN, "--sample-prompt", NOT_UTF8], "--sample-prompt"),
    ("dit-palette-lora", DIT, [*DIT_RUN, "--lora", "--palette-bits", "4"], "--palette-bits"),
    ("dit-recycle-sigma-0", DIT, [*DIT_RUN, "--recycle-max-sigma", "0"], "recycle_max_sigma"),
    ("dit-lora-rank-0", DIT, [*DIT_RUN, "--lora", "--rank", "0"], "argument --rank"),
    # --- python -m train.vae ---
    ("vae-frames-10", VAE, [*TINY_VAE, "--frames", "10"], "--frames 10 must be 4k + 1"),
    ("vae-size-63", VAE, [*TINY_VAE, "--size", "63"], "--size 63 is not a multiple"),
    ("vae-crop-20", VAE, [*TINY_VAE, "--crop", "20"], "--crop 20 is not a multiple of"),
    ("vae-steps-neg", VAE, [*TINY_VAE, "--steps", "-3"], "argument --steps"),
    ("vae-kl-neg", VAE, [*TINY_VAE, "--kl-weight", "-1"], "argument --kl-weight"),
    ("vae-arch", VAE, [*TINY_VAE, "--arch", "gan"], "argument --arch: invalid choice"),
    # --- python -m train.fuse ---
    (
        "fuse-other-base",
        FUSE,
        ["--model", "{model}", "--adapter", "{adapter}", "--out", "{out}"],
        "pass --no-check-base to load it anyway",
    ),
    (
        "fuse-no-adapter",
        FUSE,
        ["--model", "{model}", "--adapter", "{missing}", "--out", "{out}"],
        "adapter_config.json is missing",
    ),
    (
        "fuse-nan-model",
        FUSE,
        ["--model", "{nan}", "--adapter", "{adapter}", "--out", "{out}", "--no-check-base"],
        "holds NaN",
    ),
    # --- python -m train.average ---
    ("average-one", AVERAGE, ["{model}", "--out", "{out}"], "give two or more model folders"),
    (
        "average-weight-neg",
        AVERAGE,
        ["{model}", "{inf}", "--weights", "1", "-1", "--out", "{out}"],
        "argument --weights",
    ),
    (
        "average-weight-count",
        AVERAGE,
        ["{model}", "{model}", "--weights", "1", "--out", "{out}"],
        "one number per model",
    ),
    ("average-nan", AVERAGE, ["{model}", "{nan}", "--out", "{out}"], "holds NaN"),
    ("average-dim-string", AVERAGE, ["{model}", "{dim_str}", "--out", "{out}"], "dim must be"),
    # --- python -m train.default_model ---
    (
        "recipe-existing-out",
        RECIPE,
        ["--out", "{existing}", "--long-clip-frames", "80"],
        "--long-clip-frames takes 1 + 4k",
    ),
    ("recipe-clips-0", RECIPE, ["--out", "{out}", "--clips", "0"], "argument --clips"),
    ("recipe-clip-frames", RECIPE, ["--out", "{out}", "--clip-frames", "32"], "1 + 4k frames"),
    ("recipe-batch-0", RECIPE, ["--out", "{out}", "--batch-size", "0"], "argument --batch-size"),
    ("recipe-palette-9", RECIPE, ["--out", "{out}", "--palette-bits", "9"], "takes 1..8"),
    ("recipe-vae-missing", RECIPE, ["--out", "{out}", "--vae", "{missing}"], "no such folder"),
    ("recipe-vae-type", RECIPE, ["--out", "{out}", "--vae", "{vae_dir_type}"], "VAE type 'gan'"),
    ("recipe-vae-nan", RECIPE, ["--out", "{out}", "--vae", "{vae_dir_nan}"], "holds NaN"),
    ("recipe-init-nan", RECIPE, ["--out", "{out}", "--init", "{nan}"], "holds NaN"),
    (
        "recipe-init-no-tokenizer",
        RECIPE,
        ["--out", "{out}", "--init", "{model}"],
        "has no text-encoder tokenizer",
    ),
]


def _main(entry: str):
    if entry == S2DIT:
        from s2dit_mlx.cli import main
    elif entry == CONVERT:
        from convert.wan import main
    else:
        import importlib

        main = importlib.import_module(entry).main
    return main


def test_table_is_big_and_covers_every_command():
    ids = [row[0] for row in BAD_INPUTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 45
    assert {row[1] for row in BAD_INPUTS} == {S2DIT, CONVERT, DIT, VAE, FUSE, AVERAGE, RECIPE}
    assert any(row[2][0] == "export" for row in BAD_INPUTS)


@pytest.mark.parametrize(
    ("case", "entry", "argv", "fragment"), [pytest.param(*row, id=row[0]) for row in BAD_INPUTS]
)
def test_bad_input(world, tmp_path, monkeypatch, case, entry, argv, fragment):
    monkeypatch.syspath_prepend(os.path.join(world["root"], "data"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in the input tree
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me\n")
    names = {**world, "tmp": str(tmp_path), "out": str(tmp_path / "out"), "existing": str(existing)}
    full = [arg.format(**names) if "{" in arg else arg for arg in argv]
    before = (tree_state(world["root"]), tree_state(tmp_path))

    start = time.perf_counter()
    code, stdout, stderr = run_main(_main(entry), full)
    elapsed = time.perf_counter() - start

    assert_user_error(code, stderr, 2, fragment)
    assert "Traceback" not in stdout
    assert (tree_state(world["root"]), tree_state(tmp_path)) == before, case
    assert elapsed < 20, f"{case} took {elapsed:.1f} s: it is not refused before the work"


# ----------------------------------------------------------------------------------------------
# In a real process: Ctrl-C, and argv bytes that are not UTF-8


def _s2dit() -> list[str]:
    script = Path(sys.executable).with_name("s2dit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "s2dit_mlx.cli"]


@pytest.mark.parametrize(("name", "extra"), [("v.mp4", ["--stream"]), ("v.gif", [])])
def test_ctrl_c_during_generate_exits_130_and_leaves_nothing(world, tmp_path, name, extra):
    """SIGINT to the process group (as a terminal's Ctrl-C, ffmpeg included) mid-generation."""
    (tmp_path / "notes.txt").write_text("keep me\n")
    before = tree_state(tmp_path)
    # ~30 s of work for the tiny model; interrupted as soon as the first progress appears
    argv = [*_s2dit(), "generate", "a red circle", "--model", world["model"]]
    argv += ["-o", str(tmp_path / name), "--frames", "401", "--steps", "50", *extra]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # As from a terminal: a suite started in the background (`cmd &`) inherits SIGINT
        # ignored, and an ignored SIGINT is rightly left ignored by Python and ffmpeg.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        seen = b""
        while b"chunks" not in seen:  # the progress bar: generation has started
            byte = proc.stderr.read(1)
            assert byte, f"exited before generating: {seen!r}"
            seen += byte
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err_rest = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
    stderr = (seen + err_rest).decode()
    lines = [line for line in stderr.split("\n") if line.strip()]

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in lines if "error" in line] == ["error: interrupted"], stderr
    assert all("chunks" in line for line in lines[:-1]), stderr  # else only the progress bar
    assert tree_state(tmp_path) == before  # no video, no sidecar, no temporary left


def test_undecodable_argv_bytes_are_refused_before_loading(world, tmp_path):
    """`s2dit generate $'\\xff\\xfe'` from a shell: one line, exit 2, nothing written."""
    argv = [*_s2dit(), "generate", b"\xff\xfe a fox", "--model", world["model"]]
    argv += ["-o", str(tmp_path / "v.mp4")]
    done = subprocess.run(argv, capture_output=True, timeout=120)
    stderr = done.stderr.decode()
    assert_user_error(done.returncode, stderr, 2, "argument prompt: not valid UTF-8 text")
    assert "undecodable byte 0xff at character 0" in stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The Python API and the pieces under the CLIs


def test_pipeline_refuses_text_that_is_not_utf8(world):
    from s2dit_mlx.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(world["model"])
    with pytest.raises(S2DiTError, match="prompt is not valid UTF-8 text .undecodable byte 0xff"):
        pipe.settings(NOT_UTF8)
    with pytest.raises(
        S2DiTError, match=r"negative prompt is not valid UTF-8 text .lone surrogate U\+D800"
    ):
        pipe.generate("a fox", negative_prompt="x\ud800")
    assert pipe.settings("ünïcödé ✓ 狐").prompt == "ünïcödé ✓ 狐"  # real Unicode is fine


def test_sidecar_is_written_whatever_the_text(tmp_path):
    """A string that cannot be UTF-8 (a file name with such bytes) no longer breaks the sidecar:
    the record becomes ASCII JSON with escapes and reads back to the same strings."""
    from s2dit_mlx.video_io import write_metadata

    meta = {"prompt": NOT_UTF8, "output": str(tmp_path / "v\udcff.mp4"), "other": object()}
    path = write_metadata(tmp_path / "v.mp4", meta)
    back = json.loads(path.read_bytes().decode("utf-8"))  # valid UTF-8 JSON
    assert back["prompt"] == NOT_UTF8 and back["output"] == meta["output"]
    assert back["other"].startswith("<object object")
    plain = write_metadata(tmp_path / "w.mp4", {"prompt": "狐"})
    assert "狐" in plain.read_text(encoding="utf-8")  # readable text stays unescaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "w.json"]


def test_weight_screen_refuses_nan_and_inf_only(tmp_path):
    """The per-weight sum screen: NaN/inf anywhere is refused naming the weight; a float16
    weight whose sum overflows (but whose values are all finite) still loads."""
    dit, vae, text_encoder = make_tiny_components()
    dit.set_dtype(mx.float16)
    flat = dict(tree_flatten(dit.parameters()))
    name = next(k for k, v in sorted(flat.items()) if v.ndim == 2 and v.size >= 1024)
    big = mx.full(flat[name].shape, 60000.0, dtype=mx.float16)  # sum: inf in float16
    dit.update(tree_unflatten([(name, big)]))
    save_model(tmp_path / "big", dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    loaded = load_model(tmp_path / "big")
    assert mx.array_equal(dict(tree_flatten(loaded.dit.parameters()))[name], big).item()

    values = np.array(big).copy()
    values.flat[123] = np.inf
    dit.update(tree_unflatten([(name, mx.array(values))]))
    save_model(tmp_path / "inf", dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    with pytest.raises(S2DiTError, match=f"weight {name} in model.safetensors holds infinite"):
        load_model(tmp_path / "inf")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _train().TrainConfig.from_dict({"steps": "10"}), "train config: steps must be an"),
        (lambda: _train().TrainConfig(lr=True).validate(), "lr must be a finite number, got True"),
        (lambda: _flow().FlowConfig(shift="1").validate(), "flow config: shift must be a finite"),
        (lambda: _lora().LoRAConfig(rank=2.0).validate(), "LoRA config: rank must be an integer"),
        (lambda: _umt5().UMT5Config.from_dict({"d_ff": [1]}), "umT5 config: d_ff must be an int"),
        (
            lambda: _wan_vae().WanVAEConfig.from_dict({"dim_mult": [1, "2"]}),
            "Wan VAE config: dim_mult must be a list of integers, got [1, '2']",
        ),
        (
            lambda: _dit().ModelArgs.from_dict({"patch_size": "122"}),
            "dit config: patch_size must be a list of 3 integers, got '122'",
        ),
        (
            lambda: _dit().ModelArgs.from_dict({"lcha_feature_dim": 1.5}),
            "lcha_feature_dim must be an integer or null, got 1.5",
        ),
    ],
)
def test_config_fields_are_type_checked_by_annotation(build, message):
    with pytest.raises(S2DiTError) as err:
        build()
    assert message in str(err.value)


def _train():
    from train import trainer

    return trainer


def _flow():
    from train import flow

    return flow


def _lora():
    from train import lora

    return lora


def _umt5():
    from s2dit_mlx.models import umt5

    return umt5


def _wan_vae():
    from s2dit_mlx.models import wan_vae

    return wan_vae


def _dit():
    from s2dit_mlx.models import s2dit

    return s2dit


def test_config_in_a_model_folder_reads_its_tokenizer_from_beside_it():
    """train.dit --config s2dit_mlx/assets/teacher/config.json: a random start whose umT5 text
    encoder has the folder's tokenizer (the shipped weights are not loaded)."""
    from train.dit import _build_from_config

    dit, _, text_encoder, defaults = _build_from_config(
        str(TEACHER_MODEL_DIR / "config.json"), seed=0
    )
    shipped = load_model(TEACHER_MODEL_DIR)
    assert text_encoder.tokenizer is not None
    ids, _ = text_encoder.tokenizer(["a red circle moving left"])
    want, _ = shipped.text_encoder.tokenizer(["a red circle moving left"])
    np.testing.assert_array_equal(ids, want)
    name, weight = sorted(tree_flatten(dit.parameters()))[0]
    assert not mx.array_equal(weight, dict(tree_flatten(shipped.dit.parameters()))[name]).item()
    assert defaults == shipped.defaults


def test_every_saved_config_passes_the_type_check(world):
    """Folders written by this and earlier versions (the built-in model, the fixtures) load."""
    for path in (TEACHER_MODEL_DIR, world["model"]):
        load_model(path)


# ----------------------------------------------------------------------------------------------
# One parser for every entry point, with help and defaults for every option


def _parsers():
    import importlib

    from s2dit_mlx import cli

    modules = [module for group in cli.MODULE_COMMANDS.values() for module, _ in group.values()]
    return {
        "s2dit": cli.build_parser(),  # generate, export coreml, info and the command lists
        **{module: importlib.import_module(module).build_parser() for module in modules},
    }


def _all_parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_entry_point_uses_the_shared_parser():
    from s2dit_mlx.cli_args import Parser

    for name, parser in _parsers().items():
        for p in _all_parsers(parser):
            assert isinstance(p, Parser), f"{name}: {p.prog} is a {type(p).__name__}"


@pytest.mark.parametrize(
    "name", ["train.dit", "train.vae", "train.fuse", "train.average", "train.default_model"]
)
def test_every_train_option_has_help_and_shows_its_default(name):
    parser = _parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), f"{name}: {action.dest} has no help"
        if action.option_strings and not any(action.default is v for v in (None, False)):
            # "(default: X)" is added, or the help states the default in its own words
            assert "default" in formatter._get_help_string(action), f"{name}: {action.dest}"
    assert "(default: 1000)" in " ".join(parser.format_help().split()) or name != "train.dit"
