"""convert.wan: both Wan checkpoint layouts -> one MLX model folder.

Tiny reference checkpoints, every parameter randomised:
- diffusers layout: WanTransformer3DModel.save_pretrained (+ model_index.json);
- original layout: the official wan22 WanModel's state dict (renamed to diffusers names by
  diffusers' own converter, so both hold the same weights), in 2 safetensors shards + index.
Checks: identical MLX DiT weights from both; the converted model's output vs diffusers' at
<= 1e-4 relative to the output scale (fp32); quantized / bf16 / sharded outputs load and run;
one clear S2DiTError line for a missing shard, a wrong architecture, a truncated file; a
.pth carrying a pickle payload is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import s2dit_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from wan_tiny import official_wan_module

from convert import wan as convert_wan
from convert.weights import SafetensorsFile, read_pth
from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_dit
from s2dit_mlx.models.wan import WanExperts

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")

RTOL = 1e-4
# dims are multiples of the quantization group (64) so every block linear gets quantized
TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=4, out_dim=4)
TEXT_DIM, FREQ_DIM, TEXT_LEN = 64, 256, 512


def randomise(module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "modulation" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


def make_pair(seed: int = 0):
    """(official WanModel, diffusers WanTransformer3DModel) holding the same random weights."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = TINY
    official = (
        official_wan_module()
        .WanModel(
            model_type="t2v",
            text_len=TEXT_LEN,
            in_dim=c["in_dim"],
            dim=c["dim"],
            ffn_dim=c["ffn_dim"],
            freq_dim=FREQ_DIM,
            text_dim=TEXT_DIM,
            out_dim=c["out_dim"],
            num_heads=c["num_heads"],
            num_layers=c["num_layers"],
        )
        .eval()
    )
    randomise(official, seed)
    ours = diffusers.WanTransformer3DModel(
        num_attention_heads=c["num_heads"],
        attention_head_dim=c["dim"] // c["num_heads"],
        in_channels=c["in_dim"],
        out_channels=c["out_dim"],
        text_dim=TEXT_DIM,
        freq_dim=FREQ_DIM,
        ffn_dim=c["ffn_dim"],
        num_layers=c["num_layers"],
    ).eval()
    state = convert_wan_transformer_to_diffusers(dict(official.state_dict()))
    ours.load_state_dict(state, strict=True)
    return official, ours


def save_official(model, folder: Path, shards: int = 2) -> Path:
    """config.json + diffusion_pytorch_model-0000i-of-0000n.safetensors + index json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        safetensors_torch.save_file({k: state[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = {"_class_name": "WanModel", **dict(model.config)}
    (folder / "config.json").write_text(json.dumps(config, default=list))
    return folder


def save_diffusers(model, root: Path, model_2=None, boundary=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    if boundary is not None:
        index["boundary_ratio"] = boundary
    (root / "model_index.json").write_text(json.dumps(index))
    model.save_pretrained(root / "transformer")
    if model_2 is not None:
        model_2.save_pretrained(root / "transformer_2")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    official, diff = make_pair()
    return dict(
        official=save_official(official, root / "original"),
        diffusers=save_diffusers(diff, root / "diffusers"),
        diffusers_model=diff,
        root=root,
    )


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    folders = {}
    for layout in ("official", "diffusers"):
        folders[layout] = out / layout
        convert_wan.convert(
            checkpoints[layout], folders[layout], dtype="fp32", components=("dit",), log=None
        )
    return folders


def flat(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def run_diffusers(model, x, t, context):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 4, 1, 2, 3)),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(context),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


def inputs(seed: int = 3):
    """Latents [B, T, H, W, C], t [B], and context zero-padded to text_len (as Wan's encoder)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 6, TINY["in_dim"])).astype(np.float32)
    t = np.array([999, 301])
    context = np.zeros((2, TEXT_LEN, TEXT_DIM), np.float32)
    context[0, :7] = rng.standard_normal((7, TEXT_DIM))
    context[1, :11] = rng.standard_normal((11, TEXT_DIM))
    return x, t, context


def run_ours(model, x, t, context) -> np.ndarray:
    out = model(mx.array(x), mx.array(t.astype(np.float32)), mx.array(context))
    return np.array(out.astype(mx.float32))


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------


def test_both_layouts_give_identical_weights(converted):
    a = flat(load_dit(converted["official"]))
    b = flat(load_dit(converted["diffusers"]))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_converted_model_matches_diffusers(converted, checkpoints):
    model = load_dit(converted["diffusers"])
    x, t, context = inputs()
    ref = run_diffusers(checkpoints["diffusers_model"], x, t, context)
    err = rel_err(run_ours(model, x, t, context), ref)
    assert err <= RTOL, f"relative error {err:.2e}"


def test_folder_contents(converted):
    folder = converted["official"]
    config = json.loads((folder / "config.json").read_text())
    assert config["dit"]["layers"] == ["full"] * TINY["num_layers"]
    assert config["dit"]["text_dim"] == TEXT_DIM and config["dit"]["text_len"] == TEXT_LEN
    assert config["wan"]["source_layout"] == "original" and config["wan"]["preset"] is None
    assert config["defaults"]["mode"] == "bidirectional" and "quantization" not in config
    meta = SafetensorsFile(folder / "model.safetensors").metadata
    assert meta["component"] == "dit" and meta["source_layout"] == "original"
    report = json.loads((folder / "conversion_report.json").read_text())
    assert report["components"][0]["unused"] == []
    assert len(report["components"][0]["source"]) == 2  # both input shards were read


@pytest.mark.parametrize("bits, tol", [(8, 2e-2), (4, 0.2)])
def test_quantized_conversion_loads_and_runs(checkpoints, converted, tmp_path, bits, tol):
    out = tmp_path / f"q{bits}"
    report = convert_wan.convert(
        checkpoints["diffusers"], out, dtype="fp32", bits=bits, components=("dit",), log=None
    )
    # 6 linears per attention x 2 + 2 ffn per block, blocks only
    assert report.components[0].quantized == 10 * TINY["num_layers"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits}
    model = load_dit(out)
    assert type(model.blocks[0].ffn[0]).__name__ == "QuantizedLinear"
    assert flat(model)["blocks.0.ffn.0.weight"].dtype == mx.uint32
    x, t, context = inputs()
    full = run_ours(load_dit(converted["diffusers"]), x, t, context)
    err = rel_err(run_ours(model, x, t, context), full)
    assert 0 < err <= tol, f"{bits}-bit relative error {err:.2e}"


def test_bf16_and_sharded_output(checkpoints, converted, tmp_path):
    out = tmp_path / "bf16"
    report = convert_wan.convert(
        checkpoints["official"], out, dtype="bf16", shard_size="40KB", components=("dit",), log=None
    )
    files = report.components[0].files
    assert "model.safetensors.index.json" in files and len(files) > 3
    model = load_dit(out)
    weights = flat(model)
    assert weights["blocks.0.self_attn.q.weight"].dtype == mx.bfloat16
    # the time MLP and the modulation tables stay float32
    assert weights["time_embedding.0.weight"].dtype == mx.float32
    assert weights["blocks.1.modulation"].dtype == mx.float32
    x, t, context = inputs()
    full = run_ours(load_dit(converted["official"]), x, t, context)
    assert rel_err(run_ours(model, x, t, context), full) <= 3e-2


def test_two_expert_checkpoints(tmp_path):
    _, high = make_pair(seed=1)
    official_low, low = make_pair(seed=2)
    root = tmp_path / "a14b"
    save_diffusers(high, root / "diffusers", model_2=low, boundary=0.875)
    save_official(official_low, root / "original" / "low_noise_model", shards=1)
    official_high, _ = make_pair(seed=1)
    save_official(official_high, root / "original" / "high_noise_model", shards=1)
    models = {}
    for layout in ("diffusers", "original"):
        out = tmp_path / f"out_{layout}"
        convert_wan.convert(root / layout, out, dtype="fp32", components=("dit",), log=None)
        config = json.loads((out / "config.json").read_text())
        assert config["experts"] == {
            "boundary": 0.875,
            "guidance": [3.0, 4.0],
            "low_noise": "low_noise",
        }
        models[layout] = load_dit(out)
        assert isinstance(models[layout], WanExperts)
    for expert in ("high_noise", "low_noise"):
        a = flat(getattr(models["diffusers"], expert))
        b = flat(getattr(models["original"], expert))
        assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    x, t, context = inputs()
    for ref, tt in ((high, np.array([900, 900])), (low, np.array([100, 100]))):
        err = rel_err(
            run_ours(models["diffusers"], x, tt, context), run_diffusers(ref, x, tt, context)
        )
        assert err <= RTOL


# ---- errors ----------------------------------------------------------------------------------


def one_line_error(fn) -> str:
    with pytest.raises(S2DiTError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard(checkpoints, tmp_path):
    src = copy_tree(checkpoints["official"], tmp_path / "src")
    (src / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    msg = one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    assert "shard diffusion_pytorch_model-00002-of-00002.safetensors" in msg and "missing" in msg
    assert not (tmp_path / "o").exists()


def test_truncated_file(checkpoints, tmp_path):
    src = copy_tree(checkpoints["official"], tmp_path / "src")
    shard = src / "diffusion_pytorch_model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    msg = one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    assert "truncated" in msg
    shard.write_bytes(data[:5])
    assert "truncated" in one_line_error(lambda: SafetensorsFile(shard))


def test_wrong_architecture(checkpoints, tmp_path):
    # a diffusers pipeline that is not Wan
    src = copy_tree(checkpoints["diffusers"], tmp_path / "flux")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert "not a Wan pipeline" in one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    # a transformer of another class
    src = copy_tree(checkpoints["diffusers"], tmp_path / "other")
    cfg_path = src / "transformer" / "config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "_class_name": "FluxTransformer2DModel"})
    )
    assert "not a Wan DiT" in one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    # a config that disagrees with the weights
    src = copy_tree(checkpoints["official"], tmp_path / "bad_cfg")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    assert "num_layers=3 but the weights have 2" in one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    # weights of a different width than the diffusers config says
    src = copy_tree(checkpoints["diffusers"], tmp_path / "bad_shape")
    cfg_path = src / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "ffn_dim": 256}))
    assert "different architecture" in one_line_error(
        lambda: convert_wan.convert(src, tmp_path / "o", components=("dit",), log=None)
    )
    # not a checkpoint at all
    (tmp_path / "empty").mkdir()
    assert "not a Wan checkpoint" in one_line_error(
        lambda: convert_wan.convert(tmp_path / "empty", tmp_path / "o", log=None)
    )


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused(checkpoints, tmp_path):
    marker = tmp_path / "pwned"
    src = copy_tree(checkpoints["official"], tmp_path / "src")
    torch.save({"token_embedding.weight": Payload(marker)}, src / convert_wan.T5_FILE)
    msg = one_line_error(lambda: read_pth(src / convert_wan.T5_FILE))
    assert msg.startswith("refusing to load models_t5_umt5-xxl-enc-bf16.pth")
    msg = one_line_error(
        lambda: convert_wan.convert(
            src, tmp_path / "o", components=("dit", "text_encoder"), log=None
        )
    )
    assert "refusing to load" in msg
    assert not marker.exists()


def test_cli(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli"
    assert convert_wan.main([str(checkpoints["official"]), "--out", str(out), "--only", "dit"]) == 0
    assert "dit: " in capsys.readouterr().out
    # the output exists now: refused without --overwrite, with one line on stderr
    assert convert_wan.main([str(checkpoints["official"]), "--out", str(out), "--only", "dit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    args = [str(checkpoints["official"]), "--out", str(out), "--only", "dit", "--overwrite"]
    assert convert_wan.main(args + ["-q", "8"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    # a full conversion needs the VAE and text encoder the checkpoint lacks
    assert convert_wan.main([str(checkpoints["official"]), "--out", str(tmp_path / "x")]) == 2
    assert "--only dit" in capsys.readouterr().err


# ---- VAE and text encoder: full folders from both layouts -----------------------------------

T5 = dict(
    vocab_size=64, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)  # fmt: skip
T5_LAYER = {
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.0.layer_norm": "norm1",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}


def hf_t5_to_wan(state: dict) -> dict:
    """transformers UMT5 encoder names -> Wan's models_t5 .pth names (written out here)."""
    out = {}
    for name, w in state.items():
        if name == "shared.weight":
            out["token_embedding.weight"] = w
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = w
        elif name.startswith("encoder.block."):
            _, _, i, rest = name.split(".", 3)
            out[f"blocks.{i}.{T5_LAYER[rest.removesuffix('.weight')]}.weight"] = w
    return out


@pytest.fixture(scope="module")
def full_checkpoints(checkpoints, tmp_path_factory):
    """Both layouts with a tiny Wan 2.1 VAE, a tiny umT5 and a trained tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from wan_refs import load_wan_module

    from s2dit_mlx.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("full")
    orig = copy_tree(checkpoints["official"], root / "original")
    diff = copy_tree(checkpoints["diffusers"], root / "diffusers")

    vae_orig = load_wan_module("modules/vae2_1.py").WanVAE_(
        dim=8, z_dim=4, temperal_downsample=[False, True, True]
    )
    randomise(vae_orig, 5)
    torch.save(vae_orig.state_dict(), orig / "Wan2.1_VAE.pth")
    vae_diff = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    )
    vae_diff.load_state_dict(convert_wan_vae_to_diffusers(dict(vae_orig.state_dict())))
    vae_diff.save_pretrained(diff / "vae")

    t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5)).eval()
    randomise(t5, 6)
    t5.save_pretrained(diff / "text_encoder")
    torch.save(hf_t5_to_wan(t5.state_dict()), orig / convert_wan.T5_FILE)

    texts = ["a cat runs on the grass", "waves crash on the beach at sunset", "一只猫"] * 4
    for folder in (orig / "google" / "umt5-xxl", diff / "tokenizer"):
        folder.mkdir(parents=True)
        train_tokenizer(texts, vocab_size=T5["vocab_size"], path=folder / "tokenizer.json")
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return dict(original=orig, diffusers=diff)


def test_full_conversion_both_layouts(full_checkpoints, tmp_path):
    from s2dit_mlx import loading

    outs = {}
    for layout, src in full_checkpoints.items():
        outs[layout] = tmp_path / layout
        report = convert_wan.convert(src, outs[layout], dtype="fp32", log=None)
        assert [c.kind for c in report.components] == ["dit", "vae", "text_encoder"]
        assert all(not c.unused for c in report.components), report.lines()
        assert (outs[layout] / "text_encoder" / "tokenizer.json").is_file()
    for sub in ("vae", "text_encoder"):
        a, b = (
            mx.load(str(outs[k] / sub / "model.safetensors")) for k in ("original", "diffusers")
        )
        assert a.keys() == b.keys()
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), sub
    if "wan" not in loading.component_types("vae"):
        pytest.skip("the Wan VAE is not registered with loading.py yet")
    bundle = loading.load_model(outs["original"])
    assert bundle.defaults["steps"] == 50 and bundle.defaults["mode"] == "bidirectional"
    context = bundle.text_encoder.encode(["a cat runs"])
    assert context.shape == (1, bundle.text_encoder.config.text_len, T5["d_model"])


def _loading_reads_converted_folders() -> bool:
    import inspect

    from s2dit_mlx import loading

    return "quantization" in inspect.signature(loading.load_weights_strict).parameters


@pytest.mark.skipif(
    not _loading_reads_converted_folders(),
    reason="loading.py does not read sharded / quantized / two-expert folders yet",
)
def test_load_model_reads_sharded_quantized_two_expert_folders(full_checkpoints, tmp_path):
    from s2dit_mlx import loading
    from s2dit_mlx.pipeline import Pipeline

    if "wan" not in loading.component_types("vae"):
        pytest.skip("the Wan VAE is not registered with loading.py yet")
    src = copy_tree(full_checkpoints["diffusers"], tmp_path / "src")
    _, low = make_pair(seed=2)
    low.save_pretrained(src / "transformer_2")
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875}
    (src / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    convert_wan.convert(src, out, dtype="bf16", bits=8, shard_size="64KB", log=None)
    for sub in ("", "low_noise/", "text_encoder/"):
        assert (out / f"{sub}model.safetensors.index.json").is_file(), sub
    bundle = loading.load_model(out)
    assert isinstance(bundle.dit, WanExperts)
    for module in (bundle.dit.low_noise.blocks[1].ffn[2], bundle.text_encoder.blocks[0].attn.q):
        assert type(module).__name__ == "QuantizedLinear"
    # the low-noise expert holds the second transformer's weights
    want = mx.array(low.state_dict()["blocks.0.attn2.to_q.bias"].numpy()).astype(mx.bfloat16)
    assert mx.array_equal(bundle.dit.low_noise.blocks[0].cross_attn.q.bias, want).item()
    experts, select = bundle.dit, bundle.dit.select
    seen = []
    experts.select = lambda t: (seen.append(experts.is_high_noise(t)), select(t))[1]
    pipe = Pipeline.from_bundle(bundle)
    video = pipe.generate("a cat", frames=5, height=32, width=32, steps=3, seed=0)
    assert video.shape == (5, 32, 32, 3)
    assert True in seen and False in seen  # both experts denoised
    # The same folder streams chunk by chunk, each expert with its own caches.
    seen.clear()
    streamed = pipe.generate(
        "a cat", frames=9, height=32, width=32, steps=3, seed=0, mode="streaming"
    )
    assert streamed.shape == (9, 32, 32, 3)
    assert True in seen and False in seen


def test_hub_ids_download_only_the_wan_files(checkpoints, monkeypatch, tmp_path):
    """A hub id goes through snapshot_download with allow_patterns (no network: mocked)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(checkpoints["official"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert_wan.convert("Wan-AI/Wan2.1-T2V-1.3B", tmp_path / "o", components=("dit",), log=None)
    ((repo_id, patterns),) = calls
    assert repo_id == "Wan-AI/Wan2.1-T2V-1.3B"
    assert "transformer/*" in patterns and convert_wan.T5_FILE not in patterns  # dit only
    assert convert_wan.T5_FILE in convert_wan.hub_patterns()

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    msg = one_line_error(lambda: convert_wan.convert("a/b", tmp_path / "p", log=None))
    assert "neither a local folder nor a downloadable" in msg
    assert "does not exist" in one_line_error(
        lambda: convert_wan.convert(str(tmp_path / "nope"), tmp_path / "p", log=None)
    )
