"""The output rule (s2dit_mlx/fsutil.py) across every command that writes.

- A table of bad outputs for generate, export, convert.wan, train.average/fuse/dit/vae/
  default_model: each is one `error:` line, exit 2, no traceback, and the whole tmp tree
  (inputs, the user's files, the would-be output) byte-identical before and after.
- Re-running a command into its own earlier output replaces it (with --overwrite), and
  save_model replaces marked and earlier-version model folders, nothing else.
- Crash safety: a writer killed (SIGKILL) at every step of the folder swap leaves the old
  folder or the complete new one, and the next writer tidies what it left; and the real
  commands killed at random (seeded) moments leave the old output or the complete new one,
  inputs untouched, and a rerun succeeds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

# isort: off
import s2dit_mlx  # noqa: F401

# isort: on
import mlx.core as mx
import pytest
from cli_harness import assert_user_error, run_main, tree_state
from conftest import TINY_DEFAULTS, make_tiny_components
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx import fsutil
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_model, save_model

REPO = Path(__file__).resolve().parents[1]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


HAS_COREML = _has("coremltools")
HAS_WAN = _has("torch") and _has("wan") and _has("safetensors")


# ----------------------------------------------------------------------------------------------
# Inputs, built once per session and copied into each test's tmp tree


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Two tiny model folders sharing one VAE and text encoder, and two LoRA adapters."""
    from train.lora import LoRAConfig, apply_lora, save_adapters

    root = tmp_path_factory.mktemp("rule-sources")
    dit_a, vae, te = make_tiny_components(seed=0)
    dit_b, _, _ = make_tiny_components(seed=1)
    save_model(root / "a", dit_a, vae, te, defaults=TINY_DEFAULTS)
    save_model(root / "b", dit_b, vae, te, defaults=TINY_DEFAULTS)
    for i in (1, 2):
        dit = load_model(root / "a").dit
        config = LoRAConfig(rank=2, alpha=4.0, layers="self_attn.q,ffn.*")
        apply_lora(dit, config)
        mx.random.seed(10 + i)
        lora_b = [
            (k, 0.1 * mx.random.normal(v.shape))
            for k, v in tree_flatten(dit.trainable_parameters())
            if k.endswith("lora_b")
        ]
        dit.update(tree_unflatten(lora_b))
        save_adapters(root / f"adapter{i}", dit, config)
    return root


def _write_wan_checkpoint(folder: Path, seed: int) -> Path:
    """A tiny original-layout Wan DiT checkpoint (config.json + one safetensors file)."""
    import torch
    from safetensors.torch import save_file
    from wan_tiny import DIT, FREQ_DIM, TEXT_DIM, TEXT_LEN, official_wan_module

    torch.manual_seed(seed)
    model = official_wan_module().WanModel(
        model_type="t2v",
        text_len=TEXT_LEN,
        in_dim=DIT["in_dim"],
        dim=DIT["dim"],
        ffn_dim=DIT["ffn_dim"],
        freq_dim=FREQ_DIM,
        text_dim=TEXT_DIM,
        out_dim=DIT["out_dim"],
        num_heads=DIT["num_heads"],
        num_layers=DIT["num_layers"],
    )
    folder.mkdir(parents=True)
    with torch.no_grad():
        state = {
            k: (0.1 * torch.randn(v.shape)).contiguous() for k, v in model.state_dict().items()
        }
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "WanModel", **dict(model.config)}
    (folder / "config.json").write_text(json.dumps(config, default=list))
    return folder


@pytest.fixture(scope="session")
def wan_source(tmp_path_factory):
    if not HAS_WAN:
        pytest.skip("torch, safetensors and the official Wan code are needed for a Wan checkpoint")
    return _write_wan_checkpoint(tmp_path_factory.mktemp("rule-wan") / "wan", seed=0)


@dataclass
class World:
    """One test's tmp tree: inputs under in/, the user's things beside them."""

    tmp: Path
    paths: dict[str, str] = field(default_factory=dict)

    def fmt(self, argv: list[str]) -> list[str]:
        return [a.format(tmp=self.tmp, **self.paths) for a in argv]


def make_world(tmp: Path, sources: Path, wan: Path | None = None) -> World:
    """Copies of the inputs under tmp/in, so their bytes are part of the checked tree."""
    inputs = tmp / "in"
    inputs.mkdir()
    for name in ("a", "b", "adapter1"):
        shutil.copytree(sources / name, inputs / name)
    paths = {"A": str(inputs / "a"), "B": str(inputs / "b"), "AD": str(inputs / "adapter1")}
    if wan is not None:
        shutil.copytree(wan, inputs / "wan")
        paths["SRC"] = str(inputs / "wan")
    return World(tmp, paths)


# ----------------------------------------------------------------------------------------------
# The bad-input table


def user_folder(w: World, name: str = "mine") -> None:
    """A folder of the user's own: notes and a nested data file."""
    (w.tmp / name / "sub").mkdir(parents=True)
    (w.tmp / name / "notes.txt").write_text("my notes\n")
    (w.tmp / name / "sub" / "data.bin").write_bytes(bytes(range(16)))


def user_file(w: World) -> None:
    (w.tmp / "notes.txt").write_text("my notes\n")


def our_model(w: World, name: str = "soup") -> None:
    """An earlier output: a model folder s2dit-mlx wrote (marker included)."""
    shutil.copytree(w.paths["A"], w.tmp / name)


def our_model_with_notes(w: World) -> None:
    our_model(w)
    (w.tmp / "soup" / "notes.txt").write_text("my notes\n")


def earlier_export(w: World, notes: bool = False) -> None:
    """A Core ML export of an earlier version: manifest.json, no marker."""
    (w.tmp / "exp" / "S2DiT.mlpackage").mkdir(parents=True)
    (w.tmp / "exp" / "S2DiT.mlpackage" / "Manifest.json").write_text("{}")
    (w.tmp / "exp" / "manifest.json").write_text(json.dumps({"format": "s2dit-coreml"}))
    if notes:
        (w.tmp / "exp" / "notes.txt").write_text("my notes\n")


def link_to_ours(w: World) -> None:
    our_model(w)
    (w.tmp / "link").symlink_to(w.tmp / "soup", target_is_directory=True)


def foreign_sidecar(w: World) -> None:
    (w.tmp / "clip.json").write_text(json.dumps({"my": "settings"}))


def sidecar_folder(w: World) -> None:
    (w.tmp / "clip.json").mkdir()
    (w.tmp / "clip.json" / "x.txt").write_text("x")


def config_in_folder(w: World) -> None:
    (w.tmp / "cfgrun").mkdir()
    shutil.copyfile(Path(w.paths["A"]) / "config.json", w.tmp / "cfgrun" / "config.json")


def run_folder_with_notes(w: World) -> None:
    user_folder(w, "mine")


def alias_of_input(w: World) -> None:
    (w.tmp / "alias").symlink_to(w.paths["A"], target_is_directory=True)


def seeded_recipe_folder_with_notes(w: World) -> None:
    (w.tmp / "seeded").mkdir()
    (w.tmp / "seeded" / "latents.npz").write_bytes(b"latents")
    (w.tmp / "seeded" / "notes.txt").write_text("my notes\n")


GEN = ["generate", "a red circle", "--model", "{A}", "-q"]
AVG = ["{A}", "{B}", "--out"]
FUSE = ["--model", "{A}", "--adapter", "{AD}", "--out"]
EXPORT = ["export", "coreml", "--model", "{A}", "--out"]
DIT = ["--model", "{A}", "--data", "shapes", "--steps", "1", "--no-progress", "--out"]
VAE = ["--steps", "1", "--no-progress", "--out"]
DEFAULT = ["--init", "{A}", "--steps", "0", "--out"]

# (id, command, argv, setup, text the one line must contain)
CASES = [
    # train.average
    ("average-user-folder", "average", [*AVG, "{tmp}/mine", "--overwrite"], user_folder, "not an s2dit-mlx model folder"),
    ("average-out-is-input", "average", [*AVG, "{A}", "--overwrite"], None, "is the input model folder"),
    ("average-out-inside-input", "average", [*AVG, "{A}/soup"], None, "inside the input model folder"),
    ("average-out-contains-inputs", "average", [*AVG, "{tmp}/in", "--overwrite"], None, "contains the input"),
    ("average-out-is-file", "average", [*AVG, "{tmp}/notes.txt", "--overwrite"], user_file, "is a file"),
    ("average-parent-is-file", "average", [*AVG, "{tmp}/notes.txt/soup"], user_file, "is not a folder"),
    ("average-ours-needs-overwrite", "average", [*AVG, "{tmp}/soup"], our_model, "pass --overwrite"),
    ("average-ours-holds-user-file", "average", [*AVG, "{tmp}/soup", "--overwrite"], our_model_with_notes, "holds notes.txt"),
    ("average-into-export", "average", [*AVG, "{tmp}/exp", "--overwrite"], earlier_export, "not a model folder"),
    ("average-symlink", "average", [*AVG, "{tmp}/link", "--overwrite"], link_to_ours, "symbolic link"),
    ("average-link-to-input", "average", [*AVG, "{tmp}/alias", "--overwrite"], alias_of_input, "is the input model folder"),
    # train.fuse
    ("fuse-out-is-adapter", "fuse", [*FUSE, "{AD}", "--overwrite"], None, "is the input adapter folder"),
    ("fuse-out-is-model", "fuse", [*FUSE, "{A}", "--overwrite"], None, "is the input model folder"),
    ("fuse-out-inside-adapter", "fuse", [*FUSE, "{AD}/fused"], None, "inside the input adapter folder"),
    ("fuse-user-folder", "fuse", [*FUSE, "{tmp}/mine", "--overwrite"], user_folder, "not an s2dit-mlx model folder"),
    ("fuse-ours-needs-overwrite", "fuse", [*FUSE, "{tmp}/soup"], our_model, "pass --overwrite"),
    # python -m convert.wan
    ("convert-out-is-source", "convert", ["{SRC}", "--out", "{SRC}", "--only", "dit", "--overwrite"], None, "is the input checkpoint folder"),
    ("convert-out-inside-source", "convert", ["{SRC}", "--out", "{SRC}/mlx", "--only", "dit"], None, "inside the input checkpoint folder"),
    ("convert-out-contains-source", "convert", ["{SRC}", "--out", "{tmp}/in", "--only", "dit", "--overwrite"], None, "contains the input"),
    ("convert-user-folder", "convert", ["{SRC}", "--out", "{tmp}/mine", "--only", "dit", "--overwrite"], user_folder, "not an s2dit-mlx model folder"),
    ("convert-out-is-file", "convert", ["{SRC}", "--out", "{tmp}/notes.txt", "--only", "dit", "--overwrite"], user_file, "is a file"),
    ("convert-ours-needs-overwrite", "convert", ["{SRC}", "--out", "{tmp}/soup", "--only", "dit"], our_model, "pass --overwrite"),
    # s2dit export coreml
    ("export-out-is-model", "s2dit", [*EXPORT, "{A}", "--overwrite"], None, "is the input model folder"),
    ("export-user-folder", "s2dit", [*EXPORT, "{tmp}/mine", "--overwrite"], user_folder, "not an s2dit-mlx Core ML export"),
    ("export-earlier-needs-overwrite", "s2dit", [*EXPORT, "{tmp}/exp"], earlier_export, "pass --overwrite"),
    ("export-earlier-holds-user-file", "s2dit", [*EXPORT, "{tmp}/exp", "--overwrite"], lambda w: earlier_export(w, notes=True), "holds notes.txt"),
    ("export-into-model-folder", "s2dit", [*EXPORT, "{tmp}/soup", "--overwrite"], our_model, "not a Core ML export"),
    ("export-out-is-file", "s2dit", [*EXPORT, "{tmp}/notes.txt", "--overwrite"], user_file, "is a file"),
    # s2dit generate
    ("generate-stdout", "s2dit", [*GEN, "-o", "-"], None, "standard output"),
    ("generate-foreign-sidecar", "s2dit", [*GEN, "-o", "{tmp}/clip.mp4"], foreign_sidecar, "sidecar"),
    ("generate-sidecar-is-folder", "s2dit", [*GEN, "-o", "{tmp}/clip.mp4"], sidecar_folder, "not a plain file"),
    ("generate-into-model-folder", "s2dit", [*GEN, "-o", "{A}/clip.mp4"], None, "inside the input model folder"),
    # train.dit / train.vae / train.default_model run folders
    ("dit-user-folder", "dit", [*DIT, "{tmp}/mine"], user_folder, "not an s2dit-mlx run folder"),
    ("dit-resume-user-folder", "dit", [*DIT, "{tmp}/mine", "--resume"], run_folder_with_notes, "not an s2dit-mlx run folder"),
    ("dit-out-is-model", "dit", [*DIT, "{A}"], None, "is the input model folder"),
    ("dit-out-is-file", "dit", [*DIT, "{tmp}/notes.txt"], user_file, "is a file"),
    ("dit-out-holds-config", "dit", ["--config", "{tmp}/cfgrun/config.json", "--data", "shapes", "--out", "{tmp}/cfgrun"], config_in_folder, "contains the input config file"),
    ("vae-user-folder", "vae", [*VAE, "{tmp}/mine"], user_folder, "not an s2dit-mlx run folder"),
    ("vae-out-is-file", "vae", [*VAE, "{tmp}/notes.txt"], user_file, "is a file"),
    ("default-out-is-init", "default_model", [*DEFAULT, "{A}"], None, "is the input --init model folder"),
    ("default-user-folder", "default_model", [*DEFAULT, "{tmp}/mine"], user_folder, "not an s2dit-mlx run folder"),
    ("default-seeded-with-user-file", "default_model", [*DEFAULT, "{tmp}/seeded"], seeded_recipe_folder_with_notes, "not an s2dit-mlx run folder"),
]  # fmt: skip


def _main(command: str):
    if command == "s2dit":
        from s2dit_mlx.cli import main
    elif command == "convert":
        from convert.wan import main
    elif command == "average":
        from train.average import main
    elif command == "fuse":
        from train.fuse import main
    elif command == "dit":
        from train.dit import main
    elif command == "vae":
        from train.vae import main
    else:
        from train.default_model import main
    return main


def test_table_has_every_command():
    commands = {(c[1], c[2][0]) if c[1] == "s2dit" else c[1] for c in CASES}
    assert {"average", "fuse", "convert", "dit", "vae", "default_model"} <= commands
    assert {("s2dit", "generate"), ("s2dit", "export")} <= commands
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_output_is_refused_and_nothing_changes(case, sources, tmp_path, request):
    name, command, argv, setup, match = case
    if "export" in argv and not HAS_COREML:
        pytest.skip("coremltools is not installed")
    wan = request.getfixturevalue("wan_source") if command == "convert" else None
    world = make_world(tmp_path, sources, wan)
    if setup is not None:
        setup(world)
    before = tree_state(tmp_path)
    code, _, err = run_main(_main(command), world.fmt(argv))
    assert_user_error(code, err, match=match)
    assert tree_state(tmp_path) == before, "the tree changed"


# ----------------------------------------------------------------------------------------------
# Re-running into one's own output; save_model; sidecars; run folders


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_average_and_fuse_replace_their_own_output(sources, tmp_path):
    from train.average import main as average
    from train.fuse import main as fuse

    world = make_world(tmp_path, sources)
    inputs = tree_state(tmp_path / "in")
    out = tmp_path / "outs" / "soup"
    code, _, err = run_main(average, world.fmt([*AVG, str(out)]))
    assert code == 0, err
    first = tree_state(out)
    code, _, err = run_main(
        average, world.fmt([*AVG, str(out), "--weights", "2", "1", "--overwrite"])
    )
    assert code == 0, err
    assert tree_state(out) != first and fsutil.read_marker(out)["kind"] == "model"
    assert load_model(out).dit is not None

    fused = tmp_path / "outs" / "fused"
    assert run_main(fuse, world.fmt([*FUSE, str(fused)]))[0] == 0
    first = tree_state(fused)
    argv = ["--model", "{A}", "--adapter", str(sources / "adapter2"), "--out", str(fused)]
    code, _, err = run_main(fuse, world.fmt([*argv, "--overwrite"]))
    assert code == 0, err
    assert tree_state(fused) != first
    assert _hidden_leftovers(tmp_path / "outs") == []
    assert tree_state(tmp_path / "in") == inputs


def test_convert_replaces_its_own_output(wan_source, tmp_path):
    from convert.wan import main as convert

    src = shutil.copytree(wan_source, tmp_path / "wan")
    inputs = tree_state(src)
    out = tmp_path / "mlx"
    assert run_main(convert, [str(src), "--out", str(out), "--only", "dit"])[0] == 0
    marker = fsutil.read_marker(out)
    assert marker["kind"] == "model" and "config.json" in marker["files"]
    first = tree_state(out)
    argv = [str(src), "--out", str(out), "--only", "dit", "--dtype", "fp16", "--overwrite"]
    code, _, err = run_main(convert, argv)
    assert code == 0, err
    assert tree_state(out) != first
    assert _hidden_leftovers(tmp_path) == [] and tree_state(src) == inputs


def test_save_model_replaces_ours_and_nothing_else(tmp_path):
    dit, vae, te = make_tiny_components(seed=3)
    target = tmp_path / "m"
    save_model(target, dit, vae, te)
    marker = fsutil.read_marker(target)
    assert marker == {
        "kind": "model",
        "version": 1,
        "files": [
            "config.json",
            "model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "vae/config.json",
            "vae/model.safetensors",
        ],
    }
    save_model(target, dit, vae, te)  # marked: replaced
    (target / fsutil.MARKER).unlink()  # as an earlier version wrote it
    save_model(target, dit, vae, te)  # recognised by its layout: replaced, now marked
    assert fsutil.read_marker(target)["kind"] == "model"
    assert _hidden_leftovers(tmp_path) == []

    legacy = shutil.copytree(target, tmp_path / "legacy")
    (legacy / fsutil.MARKER).unlink()
    (legacy / "vae" / "notes.txt").write_text("mine")  # earlier version's folder + a user file
    (target / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    user_folder(World(tmp_path))
    adapter = tmp_path / "adapter"
    with fsutil.atomic_dir(adapter, "adapter") as tmp:
        (tmp / "adapters.safetensors").write_bytes(b"x")
    before = tree_state(tmp_path)
    for path, match in [
        (target, "holds notes.txt"),
        (legacy, "holds vae/notes.txt"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "mine", "not an s2dit-mlx model folder"),
        (adapter, "not a model folder"),
    ]:
        with pytest.raises(S2DiTError, match=match):
            save_model(path, dit, vae, te)
    assert tree_state(tmp_path) == before


def test_generate_replaces_only_its_own_sidecar(tiny_model_dir, tmp_path):
    from s2dit_mlx.cli import main

    out = tmp_path / "clip.gif"
    argv = ["generate", "a red circle", "--model", str(tiny_model_dir), "-o", str(out), "-q"]
    assert run_main(main, [*argv, "--seed", "1"])[0] == 0
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["s2dit_sidecar"] == 1 and sidecar["seed"] == 1
    assert run_main(main, [*argv, "--seed", "2"])[0] == 0  # ours: replaced
    assert json.loads((tmp_path / "clip.json").read_text())["seed"] == 2
    # a sidecar of an earlier version (no s2dit_sidecar key) is recognised by its fields
    del sidecar["s2dit_sidecar"]
    (tmp_path / "clip.json").write_text(json.dumps(sidecar))
    assert run_main(main, [*argv, "--seed", "3"])[0] == 0
    assert json.loads((tmp_path / "clip.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.json"]


def test_training_runs_resume_in_marked_and_earlier_run_folders(tiny_model_dir, tmp_path):
    from train.dit import main as train_dit

    common = ["--model", str(tiny_model_dir), "--data", "shapes", "--steps", "2",
              "--batch-size", "1", "--lora", "--rank", "2", "--layers", "self_attn.q",
              "--no-progress", "--checkpoint-every", "1"]  # fmt: skip
    for name, earlier in (("marked", False), ("earlier", True)):
        run = tmp_path / name
        code, _, err = run_main(train_dit, [*common, "--out", str(run), "--until", "1"])
        assert code == 0, err
        assert fsutil.read_marker(run) == {"kind": "run", "version": 1, "command": "train.dit"}
        if earlier:
            (run / fsutil.MARKER).unlink()
        (run / "my-notes.txt").write_text("kept")  # a user's file in a run folder stays
        code, _, err = run_main(train_dit, ["--out", str(run), "--resume"])
        assert code == 0, err
        assert (run / "adapters" / "adapters.safetensors").is_file()
        assert (run / "my-notes.txt").read_text() == "kept"
        assert fsutil.read_marker(run)["kind"] == "run"


def test_run_folders_of_earlier_versions_are_recognised(tmp_path):
    for name, files in [
        ("dit-run", ["run.json", "loss.json"]),
        ("killed-early", ["checkpoints/latest"]),
        ("seeded-recipe", ["latents.npz"]),  # train.default_model's documented `cp latents.npz`
        ("recipe", ["tokenizer.json", "init/config.json", "vae_run/run.json"]),
    ]:
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("x")
        assert fsutil.check_run_dir(tmp_path / name) == tmp_path / name
        assert fsutil.folder_owner(tmp_path / name) == ("run", [])
    (tmp_path / "empty").mkdir()
    fsutil.check_run_dir(tmp_path / "empty")
    fsutil.check_run_dir(tmp_path / "new" / "run")
    fsutil.mark_run_dir(tmp_path / "new" / "run", "train.vae")
    assert fsutil.read_marker(tmp_path / "new" / "run")["command"] == "train.vae"
    # A marker cut short is no marker: an otherwise empty folder still counts as empty.
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / fsutil.MARKER).write_text('{"kind": "ru')
    fsutil.check_run_dir(tmp_path / "cut")


# ----------------------------------------------------------------------------------------------
# Stale temps and the two-rename fallback


def test_stale_temps_of_dead_writers_are_tidied_and_nothing_else(tmp_path):
    target = tmp_path / "m"
    with fsutil.atomic_dir(target, "model") as tmp:
        (tmp / "config.json").write_text("new")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = tmp_path / ".m.0123abcd.tmp"  # a killed writer's half-written folder
    stale.mkdir()
    fsutil.write_marker(stale, "model", pid=pid, host=__import__("socket").gethostname())
    (stale / "model.safetensors").write_bytes(b"half")
    empty = tmp_path / ".m.89abcdef.tmp"
    empty.mkdir()
    alive = tmp_path / ".m.00000001.tmp"  # a writer that is still running (this process)
    alive.mkdir()
    fsutil.write_marker(alive, "model", pid=os.getpid(), host=__import__("socket").gethostname())
    unmarked = tmp_path / ".m.00000002.tmp"  # same name pattern, not ours: left alone
    unmarked.mkdir()
    (unmarked / "x").write_text("x")
    other = tmp_path / ".other.0123abcd.tmp"  # another target's: not looked at
    other.mkdir()
    fsutil.write_marker(other, "model")
    with fsutil.atomic_dir(target, "model") as tmp:
        (tmp / "config.json").write_text("newer")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".m.00000001.tmp", ".m.00000002.tmp", ".other.0123abcd.tmp", "m"]
    assert (target / "config.json").read_text() == "newer"


def test_cut_short_fallback_swap_is_put_back(tmp_path, monkeypatch):
    target = tmp_path / "m"
    with fsutil.atomic_dir(target, "model") as tmp:
        (tmp / "config.json").write_text("old")
    # As if killed between the two renames of the fallback swap: only `.old` is left.
    os.rename(target, tmp_path / ".m.0badc0de.old")
    fsutil.clean_stale_temps(target)
    assert (target / "config.json").read_text() == "old"
    # Where the system cannot swap atomically, two renames still replace the folder.
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    with fsutil.atomic_dir(target, "model") as tmp:
        (tmp / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# A writer that SIGKILLs itself at its N-th file-system change after the new folder is written.
_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from s2dit_mlx import fsutil

    target, step, fallback = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    count = [0]

    def counted(fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapped

    with fsutil.atomic_dir(target, "model") as tmp:
        (tmp / "config.json").write_text('{"model_type": "s2dit", "dit": {}, "v": "new"}')
        (tmp / "vae").mkdir()
        (tmp / "vae" / "model.safetensors").write_bytes(b"new weights")
        (tmp / "model.safetensors").write_bytes(b"new")
        for name in ("rename", "replace", "unlink", "rmdir", "mkdir"):
            setattr(os, name, counted(getattr(os, name)))
        fsutil._exchange = (lambda a, b: False) if fallback else counted(fsutil._exchange)
    print("done")
    """
)


def _old_folder(target: Path, marked: bool) -> None:
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "s2dit", "dit": {}, "v": "old"}')
    (target / "model.safetensors").write_bytes(b"old")
    (target / "text_encoder").mkdir()
    (target / "text_encoder" / "model.safetensors").write_bytes(b"old text")
    if marked:
        fsutil.write_marker(target, "model", files=fsutil._files(target))


@pytest.mark.parametrize(
    "marked,fallback", [(True, False), (False, False), (True, True)], ids=["swap", "earlier-version", "two-renames"]
)  # fmt: skip
def test_kill_at_every_step_of_the_swap_leaves_old_or_new(tmp_path, marked, fallback):
    target = tmp_path / "m"
    _old_folder(target, marked)
    old = tree_state(target)
    new = None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for step in range(1, 40):
        proc = subprocess.run(
            [sys.executable, "-c", _CRASH_CHILD, str(target), str(step), str(int(fallback))],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        finished = proc.returncode == 0
        assert finished or proc.returncode == -signal.SIGKILL, proc.stderr
        if not os.path.lexists(target):
            # Only between the fallback's two renames; the next writer puts `.old` back.
            assert fallback
            fsutil.clean_stale_temps(target)
        state = tree_state(target)
        content = json.loads((target / "config.json").read_text())["v"]
        if content == "old":
            assert {k: v for k, v in state.items() if k != fsutil.MARKER} == {
                k: v for k, v in old.items() if k != fsutil.MARKER
            }
        else:
            new = new or state
            assert state == new and fsutil.read_marker(target)["kind"] == "model"
        fsutil.clean_stale_temps(target)  # what the next writer does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], step
        if finished:
            break
        if content == "new":  # put the old folder back for the next kill point
            shutil.rmtree(target)
            _old_folder(target, marked)
    assert finished and new is not None


# ----------------------------------------------------------------------------------------------
# kill -9 of the real commands at random moments


def _snapshot(path: Path, kind: str) -> dict:
    """tree_state, except Core ML packages (random ids inside): names and our manifest fields."""
    state = tree_state(path)
    if kind != "coreml" or not state:
        return state
    manifest = json.loads((path / "manifest.json").read_text())
    return {
        "names": sorted(state),
        "precision": manifest["precision"],
        "packages": sorted(k for k, v in manifest["packages"].items() if v),
    }


def _wait_for_exit(proc: subprocess.Popen, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _kill_run(argv: list[str], out: Path, kind: str, inputs: Path, seed: int, kills: int) -> None:
    """SIGKILL `argv` (which replaces the old output at `out`) at random moments; check each.

    A first whole run is the reference for the new output, and gives the run's duration and
    its write phase (while its temp folder exists); half the kill points fall anywhere in the
    run, half in the write phase (+- 50 ms). After each kill `out` must hold the old output or the reference's, byte for
    byte, and the inputs must be untouched; at the end a rerun succeeds and tidies up.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    inputs_state = tree_state(inputs)
    old = _snapshot(out, kind)
    saved = out.with_name("saved-old")
    shutil.copytree(out, saved, symlinks=True)
    log = out.with_name("probe.log")
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
    write_start = write_end = None  # while the temp folder beside `out` exists
    while proc.poll() is None:
        busy = any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
        if busy and write_start is None:
            write_start = time.perf_counter() - t0
        if not busy and write_start is not None and write_end is None:
            write_end = time.perf_counter() - t0
        time.sleep(0.002)
    duration = time.perf_counter() - t0
    assert proc.returncode == 0, log.read_text()
    log.unlink()
    new = _snapshot(out, kind)
    assert new != old
    write_start = duration * 0.8 if write_start is None else write_start
    write_end = duration if write_end is None else write_end
    rng = random.Random(seed)
    moments = [rng.uniform(0, duration) for _ in range(kills // 2)]
    moments += [
        rng.uniform(max(0.0, write_start - 0.05), write_end + 0.05)
        for _ in range(kills - kills // 2)
    ]
    for moment in moments:
        shutil.rmtree(out)
        shutil.copytree(saved, out, symlinks=True)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        _wait_for_exit(proc)
        state = _snapshot(out, kind)
        assert state in (old, new), f"a mix after a kill at {moment:.2f} s of {duration:.2f} s"
        print(f"kill at {moment:.3f} s of {duration:.3f} s (write {write_start:.3f}-{write_end:.3f} s): "
              f"{'old' if state == old else 'new'}")  # fmt: skip
        assert tree_state(inputs) == inputs_state
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(out, kind) == new
    shutil.rmtree(saved)
    assert _hidden_leftovers(out.parent) == []
    assert tree_state(inputs) == inputs_state


def _old_output(tmp_path: Path, main, argv: list[str], name: str = "out") -> Path:
    """Write the command's earlier output (in-process) at tmp/outs/NAME; returns that path."""
    out = tmp_path / "outs" / name
    code, _, err = run_main(main, [*argv, str(out)])
    assert code == 0, err
    return out


def test_kill9_average_leaves_old_or_new(sources, tmp_path):
    from train.average import main as average

    world = make_world(tmp_path, sources)
    a, b = world.paths["A"], world.paths["B"]
    out = _old_output(tmp_path, average, [a, b, "--out"])
    argv = [sys.executable, "-m", "train.average", a, b, "--weights", "3", "1", "--out", str(out),
            "--overwrite"]  # fmt: skip
    _kill_run(argv, out, "model", tmp_path / "in", seed=1, kills=8)


@pytest.mark.slow  # each run imports mlx_lm (and transformers): ~3-6 s
def test_kill9_fuse_leaves_old_or_new(sources, tmp_path):
    from train.fuse import main as fuse

    world = make_world(tmp_path, sources)
    a = world.paths["A"]
    ad2 = shutil.copytree(sources / "adapter2", tmp_path / "in" / "adapter2")
    out = _old_output(tmp_path, fuse, ["--model", a, "--adapter", world.paths["AD"], "--out"])
    argv = [sys.executable, "-m", "train.fuse", "--model", a, "--adapter", str(ad2), "--out",
            str(out), "--overwrite"]  # fmt: skip
    _kill_run(argv, out, "model", tmp_path / "in", seed=2, kills=4)


def test_kill9_convert_leaves_old_or_new(wan_source, tmp_path):
    from convert.wan import main as convert

    src = shutil.copytree(wan_source, tmp_path / "in" / "wan")
    out = _old_output(tmp_path, convert, [str(src), "--only", "dit", "--out"])
    argv = [sys.executable, "-m", "convert.wan", str(src), "--only", "dit", "--dtype", "fp16",
            "--out", str(out), "--overwrite"]  # fmt: skip
    _kill_run(argv, out, "model", tmp_path / "in", seed=3, kills=8)


@pytest.mark.slow  # each run imports coremltools: ~10 s
@pytest.mark.skipif(not HAS_COREML, reason="coremltools is not installed")
def test_kill9_export_coreml_leaves_old_or_new(sources, tmp_path):
    from s2dit_mlx.cli import main

    model = shutil.copytree(sources / "a", tmp_path / "in" / "a")
    base = ["export", "coreml", "--model", str(model), "--skip-vae", "-q"]
    out = _old_output(tmp_path, main, [*base, "--out"])
    argv = [sys.executable, "-m", "s2dit_mlx.cli", *base, "--precision", "float32", "--out",
            str(out), "--overwrite"]  # fmt: skip
    _kill_run(argv, out, "coreml", tmp_path / "in", seed=4, kills=4)
