"""Model folders (save/load, strict errors, hub ids), the patch VAE, the byte text encoder
and the Pipeline API on a tiny random-weight model."""

# isort: off
import s2dit_mlx  # noqa: F401

# isort: on
import json
import shutil
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_DEFAULTS, make_tiny_components
from mlx.utils import tree_flatten

from s2dit_mlx import loading
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_model, register_component, save_model
from s2dit_mlx.models.byte_text_encoder import ByteTextEncoder, ByteTextEncoderConfig
from s2dit_mlx.models.patch_vae import PatchVAE, PatchVAEConfig
from s2dit_mlx.pipeline import Pipeline

SMALL = dict(frames=9, height=32, width=64, steps=2, seed=3)


def flat(module) -> dict:
    return dict(tree_flatten(module.parameters()))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_weights(path: Path, fn) -> None:
    weights = dict(mx.load(str(path)))
    fn(weights)
    mx.save_safetensors(str(path), weights)


def load_error(path) -> str:
    with pytest.raises(S2DiTError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_weights_and_outputs(tmp_path):
    dit, vae, text_encoder = make_tiny_components(seed=5)
    folder = save_model(tmp_path / "m", dit, vae, text_encoder, defaults=TINY_DEFAULTS)
    bundle = load_model(folder)
    for original, loaded in [
        (dit, bundle.dit),
        (vae, bundle.vae),
        (text_encoder, bundle.text_encoder),
    ]:
        a, b = flat(original), flat(loaded)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            assert mx.array_equal(a[name], b[name]).item(), name
    assert bundle.dit.args.to_dict() == dit.args.to_dict()
    assert bundle.vae.config == vae.config
    assert bundle.text_encoder.config == text_encoder.config
    assert {k: bundle.defaults[k] for k in TINY_DEFAULTS} == TINY_DEFAULTS

    before = Pipeline(dit, vae, text_encoder, defaults=TINY_DEFAULTS).generate("a cat", **SMALL)
    after = Pipeline.from_bundle(bundle).generate("a cat", **SMALL)
    np.testing.assert_array_equal(before, after)


def test_save_layout_and_atomic_replace(tmp_path):
    dit, vae, text_encoder = make_tiny_components(seed=1)
    target = tmp_path / "m"
    save_model(target, dit, vae, text_encoder)
    names = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert names == [
        ".s2dit",
        "config.json",
        "model.safetensors",
        "text_encoder",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae",
        "vae/config.json",
        "vae/model.safetensors",
    ]
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "s2dit"
    assert config["vae"]["type"] == "patch" and config["text_encoder"]["type"] == "byte"
    assert config["dit"]["layers"] == ["lcha", "ssa", "full"]
    assert set(loading.DEFAULTS) <= set(config["defaults"])

    # Saving again replaces the folder; no temporary folders stay behind.
    dit2, vae2, te2 = make_tiny_components(seed=2)
    save_model(target, dit2, vae2, te2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded = load_model(target)
    w = "blocks.0.ffn.0.weight" if "blocks.0.ffn.0.weight" in flat(dit2) else next(iter(flat(dit2)))
    assert mx.array_equal(flat(loaded.dit)[w], flat(dit2)[w]).item()


def test_failed_save_leaves_old_folder(tmp_path, monkeypatch):
    dit, vae, text_encoder = make_tiny_components(seed=1)
    target = save_model(tmp_path / "m", dit, vae, text_encoder)
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loading.mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        save_model(target, dit, vae, text_encoder)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_half_precision_weights_round_trip(tmp_path):
    dit, vae, text_encoder = make_tiny_components(seed=1)
    dit.set_dtype(mx.bfloat16)
    target = save_model(tmp_path / "m", dit, vae, text_encoder)
    loaded = load_model(target)
    for name, w in flat(loaded.dit).items():
        assert w.dtype == mx.bfloat16, name
        assert mx.array_equal(w, flat(dit)[name]).item(), name
    # the pipeline runs the DiT in the precision asked for, whatever was saved
    pipe = Pipeline.from_bundle(loaded, dtype="float32")
    assert {w.dtype for w in flat(pipe.dit).values()} == {mx.float32}


# ----------------------------------------------------------------------------------------------
# Strict loading: one clear line per problem


def test_missing_folder(tmp_path):
    assert load_error(tmp_path / "nope") == f"model folder {tmp_path / 'nope'} does not exist"


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    assert "is a file" in load_error(f)


def test_missing_config(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    (m / "config.json").unlink()
    assert load_error(m) == f"model folder {m}: config.json is missing"


def test_invalid_json(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    (m / "config.json").write_text('{"dit": {"dim": 32,,}')
    assert "config.json is not valid JSON (line 1" in load_error(m)


def test_config_not_an_object(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    (m / "config.json").write_text("[1, 2]")
    assert "must hold a JSON object" in load_error(m)


def test_missing_dit_entry(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "config.json", lambda c: c.pop("dit"))
    assert 'no "dit" entry' in load_error(m)


def test_unknown_block_type(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "config.json", lambda c: c["dit"]["layers"].__setitem__(1, "mamba"))
    message = load_error(m)
    assert message.startswith(f"model folder {m}: ")
    assert "unknown block type 'mamba'" in message


def test_bad_dit_field_type(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "config.json", lambda c: c["dit"].__setitem__("layers", 5))
    assert load_error(m).startswith(f"model folder {m}: ")


@pytest.mark.parametrize("kind", ["vae", "text_encoder"])
def test_unknown_component_type(tiny_model_dir, tmp_path, kind):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "config.json", lambda c: c[kind].__setitem__("type", "wan99"))
    edit_json(m / kind / "config.json", lambda c: c.__setitem__("type", "wan99"))
    assert f"unknown {kind} type 'wan99'" in load_error(m)


def test_component_mismatch(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "text_encoder" / "config.json", lambda c: c.__setitem__("dim", 24))
    assert "text encoder dim 24 does not match the DiT's text_dim 16" in load_error(m)
    m2 = copy_model(tiny_model_dir, tmp_path / "m2")
    edit_json(m2 / "vae" / "config.json", lambda c: c.__setitem__("z_dim", 8))
    assert "VAE z_dim 8 does not match" in load_error(m2)


def test_bad_defaults(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "config.json", lambda c: c["defaults"].__setitem__("mode", "sideways"))
    assert "default mode must be one of" in load_error(m)


def test_missing_key(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    name = sorted(mx.load(str(m / "model.safetensors")))[0]
    edit_weights(m / "model.safetensors", lambda w: w.pop(name))
    assert load_error(m) == f"model folder {m}: weight {name} is missing from model.safetensors"


def test_several_missing_keys_counted(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_weights(m / "vae" / "model.safetensors", lambda w: [w.pop(k) for k in sorted(w)[:3]])
    message = load_error(m)
    assert "is missing from vae/model.safetensors (3 missing in all)" in message


def test_unexpected_key(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_weights(m / "model.safetensors", lambda w: w.__setitem__("extra.weight", mx.zeros(3)))
    assert load_error(m) == (
        f"model folder {m}: unexpected weight extra.weight in model.safetensors"
    )


def test_shape_mismatch(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    weights = mx.load(str(m / "model.safetensors"))
    name = next(k for k in sorted(weights) if weights[k].ndim == 2)
    shape = tuple(weights[name].shape)
    wrong = (shape[0] + 1, shape[1])
    edit_weights(m / "model.safetensors", lambda w: w.__setitem__(name, mx.zeros(wrong)))
    assert load_error(m) == (
        f"model folder {m}: weight {name} in model.safetensors has shape "
        f"({wrong[0]}, {wrong[1]}), expected ({shape[0]}, {shape[1]})"
    )


def test_text_encoder_shape_mismatch(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_weights(
        m / "text_encoder" / "model.safetensors",
        lambda w: w.__setitem__("norm.weight", mx.ones((7,))),
    )
    assert (
        "weight norm.weight in text_encoder/model.safetensors has shape (7,), expected (16,)"
        in (load_error(m))
    )


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tiny_model_dir, tmp_path, how):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {
            "garbage": b"not a safetensors file" * 4,
            "truncated": data[: len(data) // 2],
            "empty": b"",
        }[how]
    )
    message = load_error(m)
    assert message.startswith(f"model folder {m}: model.safetensors is not a readable safetensors")


def test_missing_weights_file(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    (m / "vae" / "model.safetensors").unlink()
    assert "weights file vae/model.safetensors is missing" in load_error(m)


def test_integer_weights_rejected(tiny_model_dir, tmp_path):
    m = copy_model(tiny_model_dir, tmp_path / "m")
    weights = mx.load(str(m / "model.safetensors"))
    name = sorted(weights)[0]
    bad = mx.zeros(weights[name].shape, dtype=mx.int32)
    edit_weights(m / "model.safetensors", lambda w: w.__setitem__(name, bad))
    assert "non-float dtype" in load_error(m)


# ----------------------------------------------------------------------------------------------
# Hub ids


def test_hub_id_goes_through_snapshot_download(tiny_model_dir, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    bundle = load_model("someone/tiny-s2dit")
    assert calls == [("someone/tiny-s2dit", loading.HUB_PATTERNS)]
    assert bundle.path == Path(tiny_model_dir)
    assert bundle.name == "someone/tiny-s2dit"
    assert set(loading.HUB_PATTERNS) == {"*.json", "*.safetensors", "*/*.json", "*/*.safetensors"}


def test_hub_failure_is_one_line(monkeypatch, tmp_path):
    # Offline with an empty cache: huggingface_hub raises, we report one line.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    message = load_error("someone/not-cached-model")
    assert message.startswith("model someone/not-cached-model is neither a local folder nor")


def test_paths_never_go_to_the_hub(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("hub contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    for name in [str(tmp_path / "x"), "./x/y", "../x", "~/x", "a/b/c"]:
        assert "does not exist" in load_error(name)
    with pytest.raises(S2DiTError, match="model path is empty"):
        load_model("")


# ----------------------------------------------------------------------------------------------
# Component registry


def test_register_component(tiny_model_dir, tmp_path, monkeypatch):
    class OtherEncoder(ByteTextEncoder):
        pass

    class OtherConfig(ByteTextEncoderConfig):
        def validate(self):  # accept our own type name
            pass

    monkeypatch.setitem(
        loading._COMPONENTS, "text_encoder", dict(loading._COMPONENTS["text_encoder"])
    )
    register_component("text_encoder", "other", OtherConfig, OtherEncoder)
    assert "other" in loading.component_types("text_encoder")
    m = copy_model(tiny_model_dir, tmp_path / "m")
    edit_json(m / "text_encoder" / "config.json", lambda c: c.__setitem__("type", "other"))
    assert isinstance(load_model(m).text_encoder, OtherEncoder)
    with pytest.raises(ValueError):
        register_component("scheduler", "x", OtherConfig, OtherEncoder)


# ----------------------------------------------------------------------------------------------
# Patch VAE


def tiny_vae(seed=0, **kw) -> PatchVAE:
    mx.random.seed(seed)
    vae = PatchVAE(PatchVAEConfig(**{"z_dim": 4, "hidden_dim": 16, **kw}))
    mx.eval(vae.parameters())
    return vae


@pytest.mark.parametrize("splits", [[1, 1, 1, 1, 1], [2, 3], [3, 2], [1, 4], [5]])
def test_vae_streaming_decode_equals_full(splits):
    vae = tiny_vae(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 2.0, 0.5, 1.5])
    z = mx.random.normal((2, sum(splits), 3, 5, 4), key=mx.random.key(1))
    full = vae.decode(z)
    assert full.shape == (2, 1 + 4 * (sum(splits) - 1), 24, 40, 3)
    decoder = vae.decoder()
    parts, start = [], 0
    for n in splits:
        part = decoder.decode(z[:, start : start + n])
        # the first latent frame gives 1 pixel frame, every later one 4
        assert part.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        parts.append(part)
        start += n
    streamed = mx.concatenate(parts, axis=1)
    assert mx.array_equal(streamed, full).item()
    assert mx.abs(full).max().item() <= 1.0


def test_vae_decoder_is_causal():
    vae = tiny_vae()
    z = mx.random.normal((1, 4, 2, 2, 4), key=mx.random.key(2))
    z2 = mx.concatenate([z[:, :2], z[:, 2:] + 1.0], axis=1)
    a, b = vae.decode(z), vae.decode(z2)
    n = 1 + 4  # pixel frames of the first two latent frames
    assert mx.array_equal(a[:, :n], b[:, :n]).item()
    assert not mx.array_equal(a[:, n:], b[:, n:]).item()


def test_vae_mlp_blocks_start_as_identity_then_train():
    plain, deep = tiny_vae(seed=3), tiny_vae(seed=3, mlp_blocks=2)
    weights = dict(tree_flatten(plain.parameters()))
    deep.load_weights(list(weights.items()), strict=False)
    video = mx.random.uniform(-1, 1, (1, 9, 16, 24, 3), key=mx.random.key(4))
    # fc2 starts at zero: a deep VAE is the plain one until its blocks train
    assert mx.array_equal(deep(video), plain(video)).item()
    for block in (*deep.encoder.blocks, *deep.decoder_module.blocks):
        block.fc2.weight = mx.random.normal(block.fc2.weight.shape, key=mx.random.key(5))
    changed = deep(video)
    assert mx.abs(changed - plain(video)).max().item() > 1e-2
    z = deep.encode(video)
    decoder = deep.decoder()
    streamed = mx.concatenate([decoder.decode(z[:, :1]), decoder.decode(z[:, 1:])], axis=1)
    assert mx.array_equal(streamed, changed).item()
    with pytest.raises(S2DiTError, match="mlp_blocks must be a non-negative integer"):
        PatchVAEConfig(mlp_blocks=-1).validate()


def test_vae_encode_shapes_and_reset():
    vae = tiny_vae(temporal_kernel=3)
    video = mx.random.uniform(-1, 1, (1, 9, 16, 24, 3))
    z = vae.encode(video)
    assert z.shape == (1, 3, 2, 3, 4)
    assert vae.num_latent_frames(9) == 3 and vae.num_pixel_frames(3) == 9
    decoder = vae.decoder()
    first = decoder.decode(z)
    decoder.reset()
    assert mx.array_equal(decoder.decode(z), first).item()
    assert first.shape == video.shape


def test_vae_input_errors():
    vae = tiny_vae()
    with pytest.raises(S2DiTError, match="frame count must be 1 \\+ 4k"):
        vae.encode(mx.zeros((1, 6, 16, 16, 3)))
    with pytest.raises(S2DiTError, match="divisible by 8"):
        vae.encode(mx.zeros((1, 5, 12, 16, 3)))
    with pytest.raises(S2DiTError, match="latents must be"):
        vae.decode(mx.zeros((1, 2, 2, 2, 5)))
    with pytest.raises(S2DiTError, match="latents_std has 2 entries"):
        PatchVAE(PatchVAEConfig(z_dim=4, latents_std=[1.0, 1.0]))


def test_vae_normalisation_round_trip():
    vae = tiny_vae(latents_mean=[1.0, 2.0, 3.0, 4.0], latents_std=[2.0, 2.0, 4.0, 4.0])
    z = mx.random.normal((1, 2, 2, 2, 4))
    assert mx.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6).item()


# ----------------------------------------------------------------------------------------------
# Byte text encoder


def test_byte_text_encoder():
    mx.random.seed(0)
    enc = ByteTextEncoder(ByteTextEncoderConfig(dim=16, num_layers=2, num_heads=2, max_len=12))
    out = enc.encode(["hi", "", "a much longer prompt than twelve bytes", "héllo"])
    assert out.shape == (4, 12, 16) and out.dtype == mx.float32
    assert not mx.isnan(out).any().item()
    ids, lengths = enc.tokenize(["hi", "", "a much longer prompt than twelve bytes", "héllo"])
    assert lengths.tolist() == [3, 1, 12, 7]  # bytes + EOS, cut at max_len
    # positions past the prompt are zeros, as Wan's padded umT5 context
    assert mx.abs(out[0, 3:]).max().item() == 0.0
    assert mx.abs(out[0, :3]).max().item() > 0.0
    # a prompt's embedding does not depend on the others in the batch
    alone = enc.encode(["hi"])
    assert mx.allclose(alone[0], out[0], atol=1e-5).item()
    with pytest.raises(S2DiTError, match="not divisible by num_heads"):
        ByteTextEncoder(ByteTextEncoderConfig(dim=10, num_heads=4))


# ----------------------------------------------------------------------------------------------
# Pipeline API


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline.from_pretrained(str(tiny_model_dir))


def test_pipeline_generate_and_stream(pipe):
    video = pipe.generate("a cat", seed=1)
    assert video.shape == (9, 32, 64, 3) and video.dtype == np.uint8  # defaults of the folder
    batches = list(pipe.stream("a cat", seed=1))
    assert [b.shape[0] for b in batches] == [5, 4]  # 3 latent frames in chunks of 2 + 1
    np.testing.assert_array_equal(np.concatenate(batches), video)
    run = pipe.start("a cat", seed=1)
    chunks = list(run)
    assert [c.index for c in chunks] == [0, 1]
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), video)
    stats = run.summary()
    assert stats["frames"] == 9 and stats["chunks"] == 2
    for key in ("text_encode_s", "first_frames_s", "generate_s", "frames_per_s", "peak_memory_gb"):
        assert stats[key] is not None and stats[key] >= 0, key
    assert stats["denoise_s"] == pytest.approx(sum(c.denoise_s for c in chunks))
    assert not np.array_equal(pipe.generate("a cat", seed=2), video)


def test_pipeline_streaming_solvers(pipe):
    """Streaming runs the ODE solvers per chunk or the few-step sampler; each gives its own video."""
    videos = {
        solver: pipe.generate("a cat", solver=solver, steps=3, guidance=2.0, seed=3)
        for solver in ("euler", "unipc", "few-step")
    }
    assert {v.shape for v in videos.values()} == {(9, 32, 64, 3)}
    assert not np.array_equal(videos["euler"], videos["few-step"])
    assert not np.array_equal(videos["unipc"], videos["few-step"])
    again = pipe.generate("a cat", solver="few-step", steps=3, guidance=2.0, seed=3)
    np.testing.assert_array_equal(again, videos["few-step"])


def test_pipeline_bidirectional_with_guidance(pipe):
    for solver in ("euler", "unipc"):
        video = pipe.generate(
            "a cat",
            mode="bidirectional",
            solver=solver,
            guidance=3.0,
            negative_prompt="blur",
            frames=13,
            seed=4,
        )
        assert video.shape == (13, 32, 64, 3)
    run = pipe.start("a cat", mode="bidirectional", guidance=3.0, frames=13, seed=4)
    chunks = list(run)
    assert chunks[0].denoise_s > 0 and all(c.denoise_s == 0 for c in chunks[1:])
    assert run.summary()["denoise_s"] == chunks[0].denoise_s


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pipeline_half_precision(tiny_model_dir, dtype):
    pipe = Pipeline.from_pretrained(str(tiny_model_dir), dtype=dtype)
    assert {w.dtype for w in flat(pipe.dit).values()} == {getattr(mx, dtype)}
    assert {w.dtype for w in flat(pipe.vae).values()} == {mx.float32}
    video = pipe.generate("a cat", seed=1)
    assert video.shape == (9, 32, 64, 3)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(frames=10), "frames must be 4k \\+ 1"),
        (dict(frames=0), "frames must be 4k \\+ 1"),
        (dict(height=48), "height 48 is not divisible by 32 \\(VAE factor 8 x patch 2 x SSA"),
        (dict(width=16), "width 16 is not divisible by 32"),
        (dict(height=0), "height must be a positive integer"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(guidance=-1.0), "guidance must be a finite number >= 0"),
        (dict(guidance=float("nan")), "guidance must be a finite number >= 0"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(shift=0.0), "shift must be a positive number"),
        (dict(mode="sideways"), "mode must be one of"),
        (dict(solver="rk4"), "solver must be one of euler, unipc, few-step"),
        (dict(solver="few-step", mode="bidirectional"), "few-step solver runs in streaming mode"),
    ],
)
def test_pipeline_validation(pipe, settings, match):
    with pytest.raises(S2DiTError, match=match):
        pipe.stream("a cat", **settings)  # validation happens before the first frame


def test_pipeline_unknown_dtype(tiny_model_dir):
    with pytest.raises(S2DiTError, match="unknown dtype"):
        Pipeline.from_pretrained(str(tiny_model_dir), dtype="float8")


def test_components_meet_the_vae_and_text_encoder_interfaces(tiny_model_dir):
    """Every built-in VAE and text encoder satisfies the Protocols the pipeline relies on."""
    from s2dit_mlx.models.interfaces import StreamingDecoder, TextEncoder, VideoVAE
    from s2dit_mlx.models.wan_vae import WanVAE, WanVAEConfig

    bundle = load_model(tiny_model_dir)
    wan = WanVAE(WanVAEConfig(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1))
    for vae in (bundle.vae, wan):
        assert isinstance(vae, VideoVAE), type(vae)
        assert isinstance(vae.decoder(), StreamingDecoder)
    assert isinstance(bundle.text_encoder, TextEncoder)
    assert not isinstance(bundle.dit, VideoVAE)  # the checks can fail


def test_overlapped_decode_gives_the_same_frames(tiny_model_dir):
    """Decoding chunk k on its own stream while chunk k + 1 denoises changes no frame."""
    pipe = Pipeline.from_pretrained(str(tiny_model_dir))
    overlapped = pipe.generate("a cat", frames=17, seed=2)
    pipe.overlap_decode = False
    np.testing.assert_array_equal(pipe.generate("a cat", frames=17, seed=2), overlapped)
