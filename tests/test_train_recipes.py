"""The VAE recipe and the atomic folder writer it (and every other saver) relies on."""

import json

import pytest

from s2dit_mlx.fsutil import atomic_dir
from s2dit_mlx.loading import build_component
from train import vae as train_vae


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("patch", ["--hidden-dim", "32", "--crop", "0"]),
        ("wan", ["--base-dim", "4", "--crop", "16"]),
    ],
)
def test_vae_recipe_writes_a_loadable_component(tmp_path, arch, extra):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--arch", arch, "--steps", "2", "--batch-size", "1"]
    argv += ["--size", "32", "--frames", "5", "--z-dim", "4", "--no-progress", *extra]
    assert train_vae.main(argv) == 0
    cfg = json.loads((out / "vae" / "config.json").read_text())
    assert cfg["type"] == arch
    assert len(cfg["latents_mean"]) == 4 and all(s > 0 for s in cfg["latents_std"])
    vae = build_component("vae", cfg, "test")
    vae.load_weights(str(out / "vae" / "model.safetensors"))  # strict: every weight present
    assert (out / "loss.png").is_file()


def test_vae_recipe_refuses_bad_settings_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_vae.main(["--out", str(out), "--steps", "-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --steps: expected a positive integer, got '-3'"), err
    assert not out.exists()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "folder"
    with atomic_dir(target, "model") as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(target, "model") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no temp left behind
    with atomic_dir(target, "model") as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == [".s2dit", "b.txt"]
