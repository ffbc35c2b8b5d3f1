"""umT5 text encoder and tokenizer parity.

- encoder vs transformers UMT5EncoderModel / T5EncoderModel and vs the official Wan
  T5Encoder (wan/modules/t5.py), tiny configs, every parameter randomised: <= 1e-5 max abs;
- tokenizer ids and masks equal to Wan's HuggingfaceTokenizer (transformers AutoTokenizer ->
  T5Tokenizer over the same tokenizer.json) on unicode, HTML entities, whitespace and long text;
- cleaning equal to Wan's functions; the component's trim-then-zero-pad rule.
"""

import s2dit_mlx  # noqa: F401

# isort: split
import importlib.util
import json
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.loading import load_weights_strict
from s2dit_mlx.models.umt5 import (
    UMT5Config,
    UMT5Encoder,
    UMT5TextEncoder,
    relative_position_buckets,
)
from s2dit_mlx.tokenizer import Tokenizer, clean_text, train_tokenizer, word_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("ftfy")


def wan_dir() -> Path:
    # find_spec locates the package without running wan/__init__ (which needs CUDA).
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official Wan code (wan22) not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "modules"


TOL = 1e-5  # max abs error, fp32, outputs are O(1) (RMS-normalised with weights ~1)

TINY = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,  # reached by the 24-token inputs: buckets saturate
    layer_norm_epsilon=1e-6,
)
# Wan's T5RelativeEmbedding hard-codes max_dist=128; 32 buckets make its log buckets start at 8.
TINY_WAN = {**TINY, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}

TRAIN_TEXTS = [
    "a cat runs on the green grass in the warm sun",
    "the quick brown fox jumps over the lazy dog",
    "a person is riding a red bike down a steep hill",
    "waves crash on the rocky beach at sunset, slow motion",
    "Über café naïve résumé — the crème brûlée",
    "一只猫在草地上奔跑 夕阳 海浪",
    "city lights at night & rain, cinematic <wide shot>",
]
PROMPTS = [
    "a cat runs on the grass",
    "",
    "   ",
    "Über café naïve résumé crème brûlée",  # accents
    "一只猫在草地上奔跑，夕阳下的海浪。",  # CJK with full-width punctuation (ftfy maps it)
    "a dog 🐶 and a cat 🐱 👍🏽",  # emoji, modifier
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;lt;double&amp;gt; &quot;q&quot; &#39;s&#x27;",
    # With a literal "<" ftfy leaves entities alone, so Wan's two html.unescape calls do it.
    "<b>fish</b> &amp;amp; chips &amp;lt;i&amp;gt; &lt;br&gt; &eacute;",
    "lots   of\t\tspaces\n\nand\u3000ideographic\u00a0nbsp\u2003em  ",
    "\x1c separators \x1f and \u200b zero width \u2028 line sep",
    "mojibake: cafÃ© â€œquotedâ€\x9d “curly” ‘single’ ﬁ ligature ＦＵＬＬ",
    "the quick brown fox " * 40,  # far longer than text_len: trimmed, EOS kept
    "Es un gato que corre. C'est un chat! Это кошка. 猫です。",
    "<pad> </s> <unk> literal special tokens",
]


def load_wan_module(name: str):
    """Import wan/modules/<name>.py as wan_ref.<name>, without importing `wan` (needs CUDA)."""
    if "wan_ref" not in sys.modules:
        # A stand-in package over wan/modules, so t5.py's `from .tokenizers import` resolves.
        package = types.ModuleType("wan_ref")
        package.__path__ = [str(wan_dir())]
        sys.modules["wan_ref"] = package
    # t5.py calls torch.cuda.current_device() in a default argument at import time.
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        return importlib.import_module(f"wan_ref.{name}")
    finally:
        torch.cuda.current_device = original


def randomise(model, seed: int) -> None:
    """Overwrite every parameter with random values (norm weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2 and "embed" not in name and "shared" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            else:  # token embeddings and relative-position tables
                p.copy_(torch.randn(p.shape, generator=gen))


def to_mx(state: dict) -> dict:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


def load_ours(cfg: UMT5Config, state: dict, cls=UMT5Encoder):
    model = cls(cfg)
    weights = model.sanitize(to_mx(state))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def random_batch(vocab: int, lengths: list[int], length: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(lengths), length))
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, 0)
    return ids, mask


def hf_umt5(cfg: dict, seed: int):
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    hf = UMT5EncoderModel(HFConfig(**cfg, dropout_rate=0.0, feed_forward_proj="gated-gelu"))
    randomise(hf, seed)
    return hf.eval()


def hf_to_wan(state: dict) -> dict:
    """transformers UMT5 encoder names -> Wan T5Encoder names (written out independently)."""
    out = {}
    for name, w in state.items():
        if name == "shared.weight":
            out["token_embedding.weight"] = w
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = w
        elif name.startswith("encoder.block."):
            parts = name.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            sub = {
                "layer.0.SelfAttention.q.weight": "attn.q.weight",
                "layer.0.SelfAttention.k.weight": "attn.k.weight",
                "layer.0.SelfAttention.v.weight": "attn.v.weight",
                "layer.0.SelfAttention.o.weight": "attn.o.weight",
                "layer.0.SelfAttention.relative_attention_bias.weight": (
                    "pos_embedding.embedding.weight"
                ),
                "layer.0.layer_norm.weight": "norm1.weight",
                "layer.1.layer_norm.weight": "norm2.weight",
                "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
                "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
            }[rest]
            out[f"blocks.{i}.{sub}"] = w
    return out


# ----------------------------------------------------------------------------------------------
# Encoder


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 12), (16, 20), (64, 256)])
def test_relative_buckets_match_transformers(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 700
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance
    )
    ours = np.array(relative_position_buckets(length, buckets, max_distance))
    assert np.array_equal(ours, ref.numpy())


def test_encoder_matches_transformers_umt5():
    hf = hf_umt5(TINY, seed=0)
    state = hf.state_dict()
    # umT5: every layer has its own table, and they differ after randomising.
    tables = [k for k in state if "relative_attention_bias" in k]
    assert len(tables) == TINY["num_layers"]
    assert not torch.equal(state[tables[0]], state[tables[1]])

    ours = load_ours(UMT5Config.from_dict(TINY), state)
    ids, mask = random_batch(TINY["vocab_size"], [24, 9, 1], 24, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref = ref.last_hidden_state.numpy()
    out = np.array(ours(mx.array(ids), mx.array(mask)))
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max()
    assert err <= TOL, err
    assert np.abs(ref[valid]).max() > 0.5  # a real signal, not near-zero outputs
    # Without a mask every position is a token: compare all of them.
    with torch.no_grad():
        ref_full = hf(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert np.abs(np.array(ours(mx.array(ids))) - ref_full).max() <= TOL


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers_t5_shared_bias(proj):
    from transformers import T5Config, T5EncoderModel

    hf_cfg = T5Config(**TINY, dropout_rate=0.0, feed_forward_proj=proj)
    hf = T5EncoderModel(hf_cfg)
    randomise(hf, seed=2)
    hf.eval()
    cfg = UMT5Config.from_dict(hf_cfg.to_dict())  # a transformers config.json reads directly
    assert cfg.shared_relative_bias and cfg.feed_forward_proj == proj
    ours = load_ours(cfg, hf.state_dict())
    ids, mask = random_batch(TINY["vocab_size"], [20, 5], 20, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = np.array(ours(mx.array(ids), mx.array(mask)))
    valid = mask.astype(bool)
    assert np.abs(out - ref.last_hidden_state.numpy())[valid].max() <= TOL


def test_encoder_matches_official_wan_and_both_layouts_agree():
    wan_t5 = load_wan_module("t5")
    c = TINY_WAN
    wan = wan_t5.T5Encoder(
        vocab=c["vocab_size"],
        dim=c["d_model"],
        dim_attn=c["d_kv"] * c["num_heads"],
        dim_ffn=c["d_ff"],
        num_heads=c["num_heads"],
        num_layers=c["num_layers"],
        num_buckets=c["relative_attention_num_buckets"],
        shared_pos=False,
        dropout=0.0,
    ).eval()
    hf = hf_umt5(c, seed=4)
    # Same random weights in both references: a strict load proves the name mapping.
    wan.load_state_dict(hf_to_wan(hf.state_dict()), strict=True)

    cfg = UMT5Config.from_dict(c)
    from_wan = load_ours(cfg, wan.state_dict())
    from_hf = load_ours(cfg, hf.state_dict())
    flat_wan, flat_hf = (
        dict(tree_flatten(from_wan.parameters())),
        dict(tree_flatten(from_hf.parameters())),
    )
    assert flat_wan.keys() == flat_hf.keys()
    assert all(mx.array_equal(flat_wan[k], flat_hf[k]).item() for k in flat_wan)

    ids, mask = random_batch(c["vocab_size"], [40, 13], 40, seed=5)
    with torch.no_grad():
        ref = wan(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    out = np.array(from_wan(mx.array(ids), mx.array(mask)))
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= TOL


def test_strict_loading_errors(tmp_path):
    hf = hf_umt5(TINY, seed=6)
    weights = to_mx(hf.state_dict())
    path = tmp_path / "model.safetensors"

    # umT5's per-layer tables do not fit a shared-table (T5) config: strict load reports it.
    mx.save_safetensors(str(path), weights)
    shared = UMT5Encoder(UMT5Config.from_dict({**TINY, "shared_relative_bias": True}))
    with pytest.raises(S2DiTError, match="unexpected weight blocks.1.pos_embedding"):
        load_weights_strict(shared, path, "text encoder")

    del weights["encoder.block.2.layer.1.DenseReluDense.wo.weight"]
    mx.save_safetensors(str(path), weights)
    with pytest.raises(S2DiTError, match="weight blocks.2.ffn.fc2.weight is missing"):
        load_weights_strict(UMT5Encoder(UMT5Config.from_dict(TINY)), path, "text encoder")

    # A full encoder-decoder checkpoint: the decoder half is dropped, the encoder loads.
    full = to_mx(hf.state_dict())
    full["decoder.block.0.layer.0.SelfAttention.q.weight"] = mx.zeros((4, 4))
    full["lm_head.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(path), full)
    load_weights_strict(UMT5Encoder(UMT5Config.from_dict(TINY)), path, "text encoder")


def test_config_validation():
    with pytest.raises(S2DiTError, match="feed_forward_proj"):
        UMT5Encoder(UMT5Config.from_dict({**TINY, "feed_forward_proj": "swiglu"}))
    with pytest.raises(S2DiTError, match="d_model"):
        UMT5Encoder(UMT5Config.from_dict({**TINY, "d_model": 0}))
    cfg = UMT5Config.from_dict({**TINY, "unknown_key": 1})
    assert UMT5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module", params=["trained", "words"])
def tokenizer_dir(request, tmp_path_factory) -> Path:
    """A Unigram tokenizer.json from tokenizers' trainer, or with one piece per word."""
    folder = tmp_path_factory.mktemp("tok")
    if request.param == "trained":
        train_tokenizer(TRAIN_TEXTS * 3, vocab_size=120, path=folder / "tokenizer.json")
    else:
        word_tokenizer(TRAIN_TEXTS, path=folder / "tokenizer.json")
    # What Wan's folder google/umt5-xxl says, so AutoTokenizer picks T5Tokenizer as in Wan.
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    return folder


def test_cleaning_matches_wan():
    wan_tok = load_wan_module("tokenizers")
    for prompt in PROMPTS:
        assert clean_text(prompt, "whitespace") == wan_tok.whitespace_clean(
            wan_tok.basic_clean(prompt)
        )
        assert (
            clean_text(prompt, "lower")
            == wan_tok.whitespace_clean(wan_tok.basic_clean(prompt)).lower()
        )
        assert clean_text(prompt, "canonicalize") == wan_tok.canonicalize(
            wan_tok.basic_clean(prompt)
        )
    # Whitespace rule over every code point (Wan uses the `regex` module's \s).
    text = "".join(f"a{chr(c)}" for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    from s2dit_mlx.tokenizer import whitespace_clean

    assert whitespace_clean(text) == wan_tok.whitespace_clean(text)


def test_tokenizer_matches_wan_and_transformers(tokenizer_dir):
    text_len = 32
    ours = Tokenizer.from_file(tokenizer_dir / "tokenizer.json", text_len=text_len)
    ids, mask = ours(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), text_len)

    # Wan's own wrapper over transformers' AutoTokenizer (-> T5Tokenizer) on the same file.
    wan_tok = load_wan_module("tokenizers")
    wan = wan_tok.HuggingfaceTokenizer(str(tokenizer_dir), seq_len=text_len, clean="whitespace")
    assert type(wan.tokenizer).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    ref_ids, ref_mask = wan(PROMPTS, return_mask=True, add_special_tokens=True)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_array_equal(mask, ref_mask.numpy())

    # The generic fast tokenizer over the file (the file's own post-processor adds the EOS).
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    ref = fast(
        [clean_text(p) for p in PROMPTS],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        return_tensors="np",
    )
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])

    # The test set exercises what it claims to: trimming, unknown pieces, special ids.
    lengths = mask.sum(1)
    assert lengths.max() == text_len and ids[lengths.argmax(), -1] == 1  # trimmed, ends in EOS
    assert lengths[1] == 1 and ids[1, 0] == 1  # empty prompt: EOS only
    assert (ids == 2).any()  # <unk> for characters the tiny vocabulary lacks
    assert all(ids[i, n - 1] == 1 and (ids[i, n:] == 0).all() for i, n in enumerate(lengths))


def test_tokenizer_save_roundtrip_and_errors(tokenizer_dir, tmp_path):
    tok = Tokenizer.from_file(tokenizer_dir / "tokenizer.json", text_len=8)
    tok.save(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()
    again = Tokenizer.from_file(tmp_path / "copy.json", text_len=8)
    for a, b in zip(tok(PROMPTS), again(PROMPTS), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(S2DiTError, match="missing"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(S2DiTError, match="not a readable tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(S2DiTError, match="no '<s>' token"):
        Tokenizer.from_file(tokenizer_dir / "tokenizer.json", eos_token="<s>")


# ----------------------------------------------------------------------------------------------
# The text encoder component


def test_component_trims_and_zero_pads(tokenizer_dir, tmp_path):
    text_len = 24
    hf = hf_umt5({**TINY, "vocab_size": 128}, seed=7)
    cfg = UMT5Config.from_dict({**TINY, "vocab_size": 128, "text_len": text_len})
    enc = load_ours(cfg, hf.state_dict(), cls=UMT5TextEncoder)
    enc.load_assets(tokenizer_dir)
    assert enc.dim == TINY["d_model"]
    prompts = ["a cat runs on the grass", "一只猫 🐱 &amp; crème", "the quick brown fox " * 20, ""]
    out = np.array(enc.encode(prompts))
    assert out.shape == (len(prompts), text_len, TINY["d_model"])

    # Wan: run over all text_len positions with the mask, keep each prompt's true length,
    # zero-pad back to text_len.
    ids, mask = enc.tokenizer(prompts)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    expected = np.zeros_like(ref)
    for i, n in enumerate(mask.sum(1)):
        expected[i, :n] = ref[i, :n]
    assert np.abs(out - expected).max() <= TOL
    assert (out[0, mask[0].sum() :] == 0).all() and np.abs(out[0, 0]).max() > 0
    # A prompt encodes the same alone as beside longer prompts.
    alone = np.array(enc.encode(prompts[:1]))
    assert np.abs(alone[0] - out[0]).max() <= TOL

    # to_dict/from_dict and the tokenizer travel through a component folder.
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    enc.save_assets(folder)
    assert (folder / cfg.tokenizer).is_file()
    twin = UMT5TextEncoder(UMT5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    twin.update(enc.parameters())
    twin.load_assets(folder)
    assert mx.array_equal(twin.encode(prompts), mx.array(out)).item()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(S2DiTError, match="tokenizer file empty/tokenizer.json is missing"):
        twin.load_assets(empty)
    with pytest.raises(S2DiTError, match="no tokenizer"):
        UMT5TextEncoder(cfg).encode(["x"])
    small = UMT5TextEncoder(UMT5Config.from_dict({**TINY, "vocab_size": 8}))
    small.load_assets(tokenizer_dir)
    with pytest.raises(S2DiTError, match="outside the text encoder's vocabulary"):
        small.encode(["a cat"])
