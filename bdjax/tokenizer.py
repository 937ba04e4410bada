"""OpenAI CLIP's tokenizer: the token ids of `clip.tokenize`, offline.

The reference (OpenAI's `clip.tokenize`) cleans a prompt with `ftfy.fix_text` and two rounds of
HTML unescaping, collapses whitespace, lower-cases it and byte-pair-encodes it with OpenAI's
vocabulary. Here the clean-up is the same calls, and the encoding is transformers'
`CLIPTokenizer` built from that vocabulary, which ships in `bdjax/data/` (MIT licence, see
`bdjax/data/LICENSE-clip-bpe.txt`), so nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from collections.abc import Sequence

import numpy as np

CONTEXT_LENGTH = 77
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
_WHITESPACE = re.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def _word_pattern():
    """The reference's word split. Splitting before encoding keeps its rule for the special
    tokens: one is special only where the split yields it as a whole word ("!<|endoftext|>" is the
    punctuation run "!<|" and then letters, as in the reference), which the tokenizer's own
    search for special tokens anywhere in the text would not keep."""
    import regex  # a dependency of transformers, for \p{L}

    return regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                         regex.IGNORECASE)


def clean(text: str) -> str:
    """The reference's clean-up: ftfy.fix_text, HTML-unescape twice, collapse whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def byte_characters() -> list[str]:
    """The 256 printable characters that stand for the 256 byte values in OpenAI's vocabulary,
    in its order: the printable Latin-1 bytes as themselves, then the others mapped past U+00FF."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


@functools.lru_cache(maxsize=None)
def _tokenizer():
    """transformers' CLIPTokenizer over OpenAI's vocabulary, ids in the reference's order."""
    from transformers import CLIPTokenizer

    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The file starts with a version line; the reference keeps the first 48,894 merges, giving
    # 256 bytes + 256 word-final bytes + 48,894 merges + 2 special tokens = 49,408 ids.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


def encode(text: str) -> list[int]:
    """Token ids of `text` without the start and end tokens."""
    words = _word_pattern().findall(clean(text))
    if not words:
        return []
    return _tokenizer()(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> np.ndarray:
    """int32 [len(texts), context_length] token ids, zero-padded, as `clip.tokenize` returns.

    A prompt longer than `context_length` tokens (start and end included) is an error, as in the
    reference, unless `truncate` (Python only; no command-line flag): then it is cut and its last
    token becomes end-of-text.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _tokenizer()
    start, end = tokenizer.convert_tokens_to_ids(START_OF_TEXT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    result = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
        tokens = [start, *encode(text), end]
        if len(tokens) > context_length:
            if not truncate:
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"prompt {shown!r} is {len(tokens)} tokens long (start and end tokens included), more "
                    f"than CLIP's limit of {context_length}: shorten the prompt by at least "
                    f"{len(tokens) - context_length} token(s)")
            tokens = tokens[:context_length]
            tokens[-1] = end
        result[i, :len(tokens)] = tokens
    return result
