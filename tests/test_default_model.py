"""The built-in default model: present, small, a real streaming sandwich, used by the CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx import cli
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import (
    DEFAULT_MODEL_DIR,
    STUDENT_MODEL_DIR,
    TEACHER_MODEL_DIR,
    load_model,
    resolve_model_path,
)
from s2dit_mlx.video_io import read_video
from train.palette import palette_targets

MAX_MB = 30


@pytest.mark.parametrize(
    "folder", [TEACHER_MODEL_DIR, STUDENT_MODEL_DIR], ids=["teacher", "student"]
)
def test_builtin_models_are_shipped_and_small(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "config.json") in files
    assert sum(p.stat().st_size for p in files) / 1e6 <= MAX_MB


@pytest.mark.parametrize(
    "folder", [TEACHER_MODEL_DIR, STUDENT_MODEL_DIR], ids=["teacher", "student"]
)
def test_builtin_models_are_streaming_sandwiches(folder):
    bundle = load_model(folder)
    layers = bundle.dit.args.layers
    assert "lcha" in layers and "ssa" in layers
    assert bundle.defaults["mode"] == "streaming"
    assert bundle.dit.args.window is not None  # bounded state for long streams
    # A causal video VAE with Wan's 4x8x8 compression (the patch VAE for now, see train/).
    assert (bundle.vae.temporal_factor, bundle.vae.spatial_factor) == (4, 8)
    assert bundle.vae.z_dim == bundle.dit.args.in_dim
    assert type(bundle.text_encoder).__name__ == "UMT5TextEncoder"
    config = json.loads((folder / "config.json").read_text())
    assert config["defaults"]["height"] >= 64 and config["defaults"]["width"] >= 64


def test_the_default_is_the_distilled_student_and_the_teacher_is_reachable():
    """The default samples a few steps without guidance, with the teacher's layout and text
    side; `builtin:teacher` / `builtin:student` name the two; another builtin name is refused."""
    assert DEFAULT_MODEL_DIR == STUDENT_MODEL_DIR
    student, teacher = load_model("builtin:student"), load_model("builtin:teacher")
    assert resolve_model_path("builtin:teacher") == TEACHER_MODEL_DIR
    d = student.defaults
    assert (d["solver"], d["guidance"], d["steps"]) == ("few-step", 1.0, 3)
    assert teacher.defaults["guidance"] > 1 and teacher.defaults["steps"] > d["steps"]
    assert student.dit.args.layers == teacher.dit.args.layers
    same = dict(tree_flatten(student.text_encoder.parameters()))
    for name, w in tree_flatten(teacher.text_encoder.parameters()):
        np.testing.assert_array_equal(np.array(same[name]), np.array(w))
    with pytest.raises(S2DiTError, match="no built-in model builtin:nope"):
        resolve_model_path("builtin:nope")


def test_generate_without_model_uses_the_default(tmp_path, capsys):
    out = tmp_path / "circle.mp4"
    prompt = "a red circle moving left on a black background"  # the README's quick start
    code = cli.main(["generate", prompt, "-o", str(out), "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    video = read_video(out)
    meta = json.loads((tmp_path / "circle.json").read_text())
    assert video.shape[0] == meta["settings"]["frames"]
    assert video.shape[1:] == (meta["settings"]["height"], meta["settings"]["width"], 3)
    assert meta["model_path"] == str(DEFAULT_MODEL_DIR)
    assert np.std(video) > 5  # not a blank clip


def test_default_model_recipe_end_to_end(tmp_path, capsys, monkeypatch):
    """`python -m train.default_model` at a few steps: every stage runs and the folder works."""
    from train import default_model

    for name in (default_model.LATENTS_ENV, default_model.LONG_MIX_ENV):
        monkeypatch.setenv(name, "")  # the recipe sets them; undone afterwards
    monkeypatch.setenv(default_model.BACKGROUND_DROPOUT_ENV, "0")
    run = tmp_path / "run"
    argv = ["--out", str(run), "--vae-steps", "2", "--vae-mlp-blocks", "1", "--clips", "8"]
    argv += ["--steps", "2", "--batch-size", "2", "--palette-steps", "0", "--tokenizer", "words"]
    argv += ["--stream-sink", "0"]
    assert default_model.main(argv) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err  # --tokenizer words cuts no caption
    bundle = load_model(run / "model")
    assert default_model.trimmed_captions(bundle.text_encoder.tokenizer) == 0
    assert bundle.vae.config.mlp_blocks == 1 and bundle.vae.config.latents_std
    assert bundle.defaults == default_model.DEFAULTS
    assert (run / "dit" / "loss.json").exists() and (run / "vae_run" / "loss.json").exists()
    out = tmp_path / "clip.gif"
    code = cli.main(
        ["generate", "a red circle moving left", "--model", str(run / "model")]
        + ["-o", str(out), "--frames", "9", "--steps", "2", "--seed", "1"]
    )
    assert code == 0, capsys.readouterr().err
    assert read_video(out).shape == (9, 64, 64, 3)

    # --init continues the finished folder: no VAE stage, same VAE, the DiT starts from it.
    config = json.loads((run / "model" / "config.json").read_text())
    config["defaults"]["guidance"] = 7.5  # a folder with other sampling defaults
    (run / "model" / "config.json").write_text(json.dumps(config))
    more = tmp_path / "more"
    argv = ["--out", str(more), "--init", str(run / "model"), "--clips", "8", "--seed", "1"]
    argv += ["--steps", "2", "--batch-size", "2", "--palette-steps", "2", "--clip-frames", "13"]
    argv += ["--recycle-prob", "0.5", "--sink", "2", "--t-shift", "3", "--motion-weight", "2"]
    argv += ["--object-weight", "1.5"]
    argv += ["--long-clips", "4", "--long-clip-frames", "17", "--long-every", "2"]
    assert default_model.main(argv) == 0
    # every second batch came from the long clips (17 frames: 5 latent frames)
    assert np.load(more / "long_latents.npz")["latents"].shape[:2] == (4, 5)
    for stage in ("dit", "palette"):  # both stages recycle, at shifted levels, position-weighted
        stage_run = json.loads((more / stage / "run.json").read_text())
        assert stage_run["recycle_prob"] == 0.5 and stage_run["shift"] == 3.0
        assert stage_run["motion_weight"] == 2.0 and stage_run["object_weight"] == 1.5
    first_run = json.loads((run / "dit" / "run.json").read_text())
    assert first_run["shift"] == 1.0 and first_run["motion_weight"] == 0.0
    assert first_run["object_weight"] == 0.0
    # Longer clips (13 frames: 4 latent frames, two chunks); a cache of other clips is refused.
    assert np.load(more / "latents.npz")["latents"].shape[1] == 4
    with pytest.raises(S2DiTError, match="not the 9 of 33-frame clips"):
        default_model.encode_latents(load_model(more / "init").vae, 8, 1, more / "latents.npz")
    assert not (more / "vae_run").exists() and not (run / "palette").exists()
    assert (more / "palette" / "loss.json").exists()
    start, before, after = (load_model(d) for d in (more / "init", run / "model", more / "model"))
    assert start.defaults["guidance"] == 7.5 and after.defaults == default_model.DEFAULTS
    # --stream-sink 0 changed only the saved model (trained with 1); --sink 2 sets the init
    # folder, which training reads, and the saved model.
    assert load_model(run / "dit" / "model").dit.args.sink == 1 and before.dit.args.sink == 0
    assert start.dit.args.sink == after.dit.args.sink == 2
    after_vae = dict(tree_flatten(after.vae.parameters()))
    for name, value in tree_flatten(before.vae.parameters()):
        assert np.array_equal(np.array(after_vae[name]), np.array(value))
    start_dit, after_dit = (dict(tree_flatten(b.dit.parameters())) for b in (start, after))
    moved = []
    for name, value in tree_flatten(before.dit.parameters()):
        assert start_dit[name].dtype == mx.float32  # trains in float32 from the float16 folder
        assert np.array_equal(np.array(start_dit[name]), np.array(value.astype(mx.float32)))
        if not np.array_equal(np.array(after_dit[name]), np.array(value)):
            moved.append(name)
    assert moved  # the two steps trained it
    # The palette stage ran last: the large weights hold at most 64 values each
    # (counted in float32: np.unique miscounts float16 arrays).
    names = palette_targets(after.dit)
    assert names and all(
        np.unique(np.array(after_dit[n].astype(mx.float32))).size <= 64 for n in names
    )
    assert (more / "tokenizer.json").read_text() == (
        run / "model" / "text_encoder" / "tokenizer.json"
    ).read_text()

    # --steps 0 skips the DiT stage: the palette stage alone fine-tunes the --init folder.
    snap = tmp_path / "snap"
    argv = ["--out", str(snap), "--init", str(more / "model"), "--clips", "8", "--seed", "2"]
    argv += ["--steps", "0", "--batch-size", "2", "--palette-steps", "2", "--clip-frames", "13"]
    assert default_model.main(argv) == 0
    assert not (snap / "dit").exists() and (snap / "palette" / "loss.json").exists()
    assert load_model(snap / "model").defaults == default_model.DEFAULTS


def test_default_model_recipe_rejects_bad_init(tmp_path, capsys):
    from train import default_model

    argv = ["--out", str(tmp_path / "run"), "--init", str(tmp_path / "nowhere")]
    assert default_model.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init: no model folder") and "\n" not in err
    argv = ["--out", str(tmp_path / "run"), "--init", str(TEACHER_MODEL_DIR), "--vae", "x"]
    assert default_model.main(argv) == 2
    assert "not both" in capsys.readouterr().err
    argv = ["--out", str(tmp_path / "run"), "--palette-bits", "0"]
    assert default_model.main(argv) == 2
    assert "--palette-bits takes 1..8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # bad arguments write nothing


def test_word_tokenizer_reads_every_caption_whole():
    """--tokenizer words: one id per word plus EOS, all within 16, one row per caption; the
    trimming count flags a tokenizer that cuts captions."""
    from s2dit_mlx.tokenizer import train_tokenizer, word_tokenizer
    from train.default_model import all_captions, trimmed_captions

    captions = all_captions()
    tokenizer = word_tokenizer(captions).replace(text_len=16)
    rows = tokenizer.tokenize(captions)
    assert [len(r) for r in rows] == [len(c.split()) + 1 for c in captions]
    assert len({tuple(r) for r in rows}) == len(captions)
    assert trimmed_captions(tokenizer) == 0
    longest = max(len(c.split()) + 1 for c in captions)
    short = tokenizer.replace(text_len=longest - 1)
    assert trimmed_captions(short) == sum(len(c.split()) + 1 == longest for c in captions) > 0
    # Why the flag exists: the trainer's sub-word pieces (--tokenizer unigram) cut captions.
    unigram = train_tokenizer(captions, vocab_size=64).replace(text_len=16)
    assert trimmed_captions(unigram) > len(captions) // 2


def test_background_dropout_cuts_the_clause_by_index(tmp_path, monkeypatch):
    """Captions lose " on a X background" at the set rate, the same ones on every call."""
    from s2dit_mlx.tokenizer import Tokenizer, word_tokenizer
    from train import default_model

    captions = [c for c in default_model.all_captions() if " on a " in c][:50]
    word_tokenizer(default_model.all_captions(), path=tmp_path / "tokenizer.json")
    np.savez(
        tmp_path / "latents.npz",
        latents=np.zeros((len(captions), 1, 1, 1, 1), np.float16),
        captions=np.array(captions),
    )
    monkeypatch.setenv(default_model.LATENTS_ENV, str(tmp_path / "latents.npz"))
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json", text_len=16)
    full = tokenizer.tokenize(captions)
    cut = tokenizer.tokenize([default_model.without_background(c) for c in captions])
    assert all(len(c) == len(f) - 4 for c, f in zip(cut, full, strict=True))  # on a X background

    def rows(rate: float, indices: range) -> list[list[int]]:
        monkeypatch.setenv(default_model.BACKGROUND_DROPOUT_ENV, str(rate))
        batch = default_model.latents_source(seed=4, caption_dropout=0.0)(list(indices))
        ids, mask = np.array(batch["ids"]), np.array(batch["mask"])
        return [r[: int(m.sum())].tolist() for r, m in zip(ids, mask, strict=True)]

    indices = range(400)
    kept = rows(0.0, indices)
    assert kept == [full[i % 50] for i in indices]
    mixed = rows(0.25, indices)
    dropped = [m == cut[i % 50] for i, m in zip(indices, mixed, strict=True)]
    assert all(m in (full[i % 50], cut[i % 50]) for i, m in zip(indices, mixed, strict=True))
    assert 0.18 < np.mean(dropped) < 0.32
    assert rows(0.25, indices) == mixed  # by index: the same draws every time
    assert all(r == cut[i % 50] for i, r in zip(indices, rows(1.0, indices), strict=True))


def test_long_clips_fill_every_nth_batch_in_order(tmp_path, monkeypatch):
    """--long-clips: batch b is long when b % every == every - 1, long clips walked in order,
    and a process's slice of a batch reads the same samples as the whole batch."""
    from s2dit_mlx.tokenizer import Tokenizer, word_tokenizer
    from train import default_model

    monkeypatch.setenv(default_model.BACKGROUND_DROPOUT_ENV, "0")
    captions = default_model.all_captions()
    word_tokenizer(captions, path=tmp_path / "tokenizer.json")
    # each clip's latents hold its own number, so a batch shows which clips it read
    short = np.arange(10, dtype=np.float16).reshape(10, 1, 1, 1, 1) * np.ones((1, 3, 1, 1, 1))
    long = -np.arange(1, 8, dtype=np.float16).reshape(7, 1, 1, 1, 1) * np.ones((1, 6, 1, 1, 1))
    np.savez(tmp_path / "latents.npz", latents=short, captions=np.array(captions[:10]))
    np.savez(tmp_path / "long.npz", latents=long, captions=np.array(captions[10:17]))
    monkeypatch.setenv(default_model.LATENTS_ENV, str(tmp_path / "latents.npz"))
    mix = {"path": str(tmp_path / "long.npz"), "every": 3, "batch": 4}
    monkeypatch.setenv(default_model.LONG_MIX_ENV, json.dumps(mix))
    source = default_model.latents_source(seed=0, caption_dropout=0.0)
    read = []
    for b in range(6):
        latents = np.array(source(list(range(4 * b, 4 * b + 4)))["latents"])
        assert latents.shape[1] == (6 if b % 3 == 2 else 3)
        read.append(latents[:, 0, 0, 0, 0].tolist())
    assert read[0] == [0, 1, 2, 3] and read[1] == [4, 5, 6, 7] and read[3] == [2, 3, 4, 5]
    assert read[2] == [-1, -2, -3, -4] and read[5] == [-5, -6, -7, -1]  # in order, wrapping
    # the second half of batch 5 alone (a second process's slice) reads the same clips
    assert np.array(source([22, 23])["latents"])[:, 0, 0, 0, 0].tolist() == [-7, -1]
    # and their captions with them
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json", text_len=16)
    expected, _ = tokenizer(captions[10:14])
    np.testing.assert_array_equal(np.array(source([8, 9, 10, 11])["ids"]), expected)
    monkeypatch.setenv(default_model.LONG_MIX_ENV, "")
    plain = default_model.latents_source(seed=0, caption_dropout=0.0)
    assert np.array(plain(list(range(8, 12)))["latents"]).shape[1] == 3  # no mix: all short


BAD_SETTINGS = [
    (["--background-dropout", "1.5"], "argument --background-dropout: expected a probability"),
    (["--clip-frames", "32"], "--clip-frames takes 1 + 4k frames, k >= 1 (got 32)"),
    (["--recycle-prob", "-0.1"], "argument --recycle-prob: expected a probability in [0, 1]"),
    (["--sink", "-1"], "argument --sink: expected an integer >= 0, got '-1'"),
    (["--stream-sink", "-2"], "argument --stream-sink: expected an integer >= 0, got '-2'"),
    (["--workers", "0"], "argument --workers: expected a positive integer, got '0'"),
    (
        ["--long-clips", "8", "--long-every", "1"],
        "--long-clips takes a count >= 0 and --long-every a period >= 2 (got 8 and 1)",
    ),
    (["--long-clip-frames", "80"], "--long-clip-frames takes 1 + 4k frames, k >= 1 (got 80)"),
    (["--t-shift", "0"], "argument --t-shift: expected a positive number, got '0'"),
    (["--motion-weight", "-1"], "argument --motion-weight: expected a finite number >= 0"),
    (["--object-weight", "inf"], "argument --object-weight: expected a finite number >= 0"),
    (["--clips", "0"], "argument --clips: expected a positive integer, got '0'"),
    (
        ["--steps", "0"],
        "--steps takes a count >= 1, or 0 with --init to skip the DiT stage (got 0)",
    ),
]


@pytest.mark.parametrize(("flags", "message"), BAD_SETTINGS)
def test_recipe_rejects_a_bad_setting(tmp_path, capsys, flags, message):
    """One error line and exit 2, before anything is written."""
    from train import default_model

    assert default_model.main(["--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_clips_drawn_by_several_workers_are_the_same(tmp_path):
    from train import default_model

    vae = load_model(DEFAULT_MODEL_DIR).vae
    paths = [
        default_model.encode_latents(vae, 6, 3, tmp_path / f"w{n}.npz", 9, batch=2, workers=n)
        for n in (1, 2)
    ]
    one, two = (np.load(p) for p in paths)
    assert one["latents"].shape[:2] == (6, 3)  # 9 frames: 3 latent frames
    np.testing.assert_array_equal(one["latents"], two["latents"])
    assert list(one["captions"]) == list(two["captions"]) and len(set(one["captions"])) > 1
