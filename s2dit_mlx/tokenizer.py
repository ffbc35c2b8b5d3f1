"""The umT5 tokenizer: a Hugging Face `tokenizer.json` run by the `tokenizers` library.

It reproduces what Wan feeds its umT5 encoder (`wan/modules/tokenizers.py` with
clean="whitespace" over `AutoTokenizer("google/umt5-xxl")`):

- text cleaning: ftfy.fix_text, HTML entities unescaped twice, whitespace runs collapsed;
- one EOS token appended (T5's "$A </s>" template), sequences longer than `text_len`
  cut to `text_len - 1` tokens before the EOS;
- right padding with the pad id to exactly `text_len`, with a 0/1 attention mask.

`train_tokenizer` writes a small Unigram tokenizer in the same file format, with T5's
special-token layout (<pad>=0, </s>=1, <unk>=2) and T5's pre-tokenizer, so that
transformers' T5Tokenizer reads it back with identical ids.
"""

from __future__ import annotations

import html
import math
import os
import re
import string
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import S2DiTError

CLEAN_MODES = (None, "whitespace", "lower", "canonicalize")

# Unicode White_Space, which is what Wan's `regex` `\s` matches. Python's `re` `\s` would
# also match U+001C..U+001F (str.isspace() is True for them), so the class is spelled out.
_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """Wan's basic_clean: fix mojibake and odd unicode with ftfy, unescape HTML twice, strip."""
    try:
        import ftfy
    except ImportError:
        raise S2DiTError(
            "the umT5 tokenizer's text cleaning needs ftfy: pip install ftfy"
        ) from None
    text = ftfy.fix_text(text)
    # Twice, so doubly escaped text ("&amp;lt;") also becomes plain ("<"), as in Wan.
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Wan's whitespace_clean: every run of unicode whitespace becomes one space; strip."""
    return _WHITESPACE.sub(" ", text).strip()


def canonicalize(text: str) -> str:
    """Wan's canonicalize: underscores to spaces, ASCII punctuation dropped, lower case."""
    text = text.replace("_", " ").translate(_NO_PUNCTUATION).lower()
    return _WHITESPACE.sub(" ", text).strip()


def clean_text(text: str, mode: str | None = "whitespace") -> str:
    """Clean a prompt the way Wan's HuggingfaceTokenizer does for the given clean mode."""
    if mode is None:
        return text
    if mode == "whitespace":
        return whitespace_clean(basic_clean(text))
    if mode == "lower":
        return whitespace_clean(basic_clean(text)).lower()
    if mode == "canonicalize":
        return canonicalize(basic_clean(text))
    raise S2DiTError(f"unknown text clean mode {mode!r} (known: {CLEAN_MODES})")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise S2DiTError(
            "the umT5 tokenizer needs the tokenizers package: pip install tokenizers"
        ) from None
    return tokenizers


class Tokenizer:
    """A tokenizer.json tokenizer with Wan's cleaning, EOS, trimming and padding rules."""

    def __init__(
        self,
        backend,
        text_len: int = 512,
        clean: str | None = "whitespace",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
    ):
        if clean not in CLEAN_MODES:
            raise S2DiTError(f"unknown text clean mode {clean!r} (known: {CLEAN_MODES})")
        if not isinstance(text_len, int) or text_len < 1:
            raise S2DiTError(f"tokenizer text_len must be a positive integer, got {text_len!r}")
        # Keep the file as loaded for save(); encoding needs the file's own padding/truncation
        # settings (if any) off, since the rules here replace them.
        self._json = backend.to_str()
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.text_len = text_len
        self.clean = clean
        self.eos_id = self._token_id(eos_token)
        self.pad_id = self._token_id(pad_token)

    def _token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise S2DiTError(f"tokenizer has no {token!r} token")
        return token_id

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> Tokenizer:
        """Load a Hugging Face tokenizer.json; kwargs as in the constructor."""
        path = Path(path)
        if not path.is_file():
            raise S2DiTError(f"tokenizer file {path} is missing")
        try:
            text = path.read_text(encoding="utf-8")
            backend = _tokenizers().Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises plain Exceptions for bad files
            reason = " ".join(str(err).split()) or type(err).__name__
            raise S2DiTError(
                f"tokenizer file {path} is not a readable tokenizer.json ({reason})"
            ) from None
        tokenizer = cls(backend, **kwargs)
        tokenizer._json = text  # save() copies the file byte for byte
        return tokenizer

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer.json as it was loaded (or trained)."""
        Path(path).write_text(self._json, encoding="utf-8")

    def replace(self, **rules) -> Tokenizer:
        """A tokenizer with the same vocabulary and file but other rules (text_len, clean, ...)."""
        current = dict(
            text_len=self.text_len,
            clean=self.clean,
            eos_token=self.backend.id_to_token(self.eos_id),
            pad_token=self.backend.id_to_token(self.pad_id),
        )
        out = Tokenizer(self.backend, **{**current, **rules})
        out._json = self._json  # save() keeps writing the file as it was loaded
        return out

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def tokenize(self, prompts: Iterable[str]) -> list[list[int]]:
        """Clean and tokenize prompts: ids ending in EOS, at most text_len of them, no padding."""
        texts = [clean_text(p, self.clean) for p in prompts]
        # Special tokens are added here, not by the file's post-processor, so the rule is always
        # T5's "$A </s>" (transformers' T5Tokenizer forces it too) whatever the file holds.
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [enc.ids[: self.text_len - 1] + [self.eos_id] for enc in encodings]

    def __call__(self, prompts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (ids, mask), both int32 [B, text_len]; padding has the pad id and mask 0."""
        rows = self.tokenize(prompts)
        ids = np.full((len(rows), self.text_len), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), self.text_len), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5 ids 0, 1, 2


def _t5_pre_tokenizer():
    """T5's word splitting: whitespace, then Metaspace ("▁word")."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )


def _t5_layout(backend, path: str | os.PathLike | None) -> Tokenizer:
    """Give a Unigram backend T5's pipeline (word split, Metaspace, "$A </s>"); save it."""
    from tokenizers import decoders, processors

    backend.pre_tokenizer = _t5_pre_tokenizer()
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = Tokenizer(backend)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None
) -> Tokenizer:
    """Train a small Unigram tokenizer.json on texts (T5 layout: <pad>=0, </s>=1, <unk>=2).

    The pipeline mirrors transformers' T5Tokenizer (no normalizer, whitespace split then
    Metaspace, "$A </s>"), so transformers loads the saved file with identical ids. Texts are
    cleaned like prompts before training. Saves to `path` when given.
    """
    tk = _tokenizers()
    from tokenizers import models, trainers

    backend = tk.Tokenizer(models.Unigram())
    backend.pre_tokenizer = _t5_pre_tokenizer()  # the trainer sees the words T5 will see
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    return _t5_layout(backend, path)


def word_tokenizer(texts: Iterable[str], path: str | os.PathLike | None = None) -> Tokenizer:
    """A Unigram tokenizer.json with one piece per word of `texts` (T5 layout, as above).

    For a closed vocabulary, such as the captions of a procedural world. tokenizers'
    UnigramTrainer keeps sub-word pieces on a corpus that small (the shapes world's captions
    came out at up to 41 tokens), so a short text encoder never saw the last words. Here every
    word is one piece scored by its log frequency, and every character is a piece scored far
    below any word, so an unseen word still tokenizes (into characters) and a known one never
    splits. Texts are cleaned like prompts. Saves to `path` when given.
    """
    tk = _tokenizers()
    from tokenizers import models

    counts: dict[str, int] = {}
    for text in texts:
        for word in clean_text(text).split():
            counts["▁" + word] = counts.get("▁" + word, 0) + 1
    if not counts:
        raise S2DiTError("word_tokenizer needs at least one non-empty text")
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    pieces = [(w, math.log(counts[w] / total)) for w in words]
    floor = min(score for _, score in pieces) - 10.0
    chars = sorted({c for w in words for c in w} - set(words))
    pieces += [(c, floor) for c in chars]
    backend = tk.Tokenizer(models.Unigram([(t, 0.0) for t in SPECIAL_TOKENS] + pieces, unk_id=2))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return _t5_layout(backend, path)
