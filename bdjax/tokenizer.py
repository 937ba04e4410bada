"""OpenAI CLIP's tokenizer: the token ids of `clip.tokenize`, offline.

The reference (OpenAI's `simple_tokenizer.py`) cleans a prompt, lower-cases it,
splits it into words with one regular expression and byte-pair-encodes each
word. The byte-pair encoding here is the `tokenizers` library's BPE model
built from OpenAI's merge list, shipped in `bdjax/data/` (MIT licence, see
`bdjax/data/LICENSE-clip-bpe.txt`); the word split uses the reference's
expression with the same `regex` engine (a dependency of transformers).

Text clean-up: the reference runs `ftfy.fix_text`, which bdjax does not
depend on. `fix_text` reproduces its character-level fixes (HTML entities,
curly quotes, Latin ligatures, full-width forms, C1 and other control
characters, terminal escapes, NFC); it does not reproduce ftfy's mojibake
repair, a heuristic that guesses when text was decoded with the wrong codec
("cafÃ©" -> "café"). Prompts typed as text never need it; for such prompts
the ids differ from `clip.tokenize` (tests/test_clip.py shows one).
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

CONTEXT_LENGTH = 77
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

# The reference's word split; it runs on lower-cased text, with IGNORECASE as there.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
WHITESPACE = regex.compile(r"\s+")


# ---- ftfy.fix_text's character-level fixes, in ftfy's order -------------------------------

def _html_entities() -> dict[str, str]:
    """`&name;` for every HTML5 entity, plus ALL-CAPS spellings of lower-case names (`&EACUTE;`)."""
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue  # entities without the semicolon are too ambiguous in plain text
        table["&" + name] = char
        upper = "&" + name.upper()
        if name == name.lower() and html.unescape(upper) == upper:
            table[upper] = char.upper()
    return table


_ENTITIES = _html_entities()
_ENTITY = regex.compile(r"&#?[0-9A-Za-z]{1,24};")
_TERMINAL_ESCAPE = regex.compile("\x1b\\[[0-9;]*[a-zA-Z]")
_C1_CONTROL = regex.compile("[\x80-\x9f]")
_SURROGATE_PAIR = regex.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = regex.compile("[\ud800-\udfff]")
_QUOTES = str.maketrans({**{c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"},
                         **{c: '"' for c in "\u201c\u201d\u201e\u201f"}})
# Single-character Latin ligatures and digraphs -> their letters (ftfy leaves other scripts alone).
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})
# Half- and full-width forms -> normal width; the ideographic space -> a space.
_WIDTH = str.maketrans({0x3000: " ", **{
    i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)}})
_CONTROL = str.maketrans(dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
     *range(0xFFF9, 0xFFFD)]))


def _unescape_entity(match: regex.Match) -> str:
    entity = match.group(0)
    if entity in _ENTITIES:
        return _ENTITIES[entity]
    if entity.startswith("&#"):
        char = html.unescape(entity)
        return entity if ";" in char else char  # only fully decoded references
    return entity


def _c1_as_windows_1252(match: regex.Match) -> str:
    # Bytes that windows-1252 leaves undefined keep their Latin-1 meaning ("sloppy" decoding).
    try:
        return match.group(0).encode("latin-1").decode("windows-1252")
    except UnicodeDecodeError:
        return match.group(0)


def _fix_segment(text: str, unescape_html: bool) -> str:
    while True:
        before = text
        if unescape_html:
            text = _ENTITY.sub(_unescape_entity, text)
        text = _C1_CONTROL.sub(_c1_as_windows_1252, text)
        text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
        for line_break in ("\r\n", "\r", "\u2028", "\u2029", "\x85"):
            text = text.replace(line_break, "\n")
        text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(
            lambda m: m.group(0).encode("utf-16", "surrogatepass").decode("utf-16"), text))
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """`ftfy.fix_text` without mojibake repair (see the module docstring)."""
    out = []
    unescape_html = True
    for segment in regex.findall(r"[^\n]*\n|[^\n]+", text):
        # ftfy reads a line with "<" as HTML source and from then on stops decoding entities.
        unescape_html = unescape_html and "<" not in segment
        out.append(_fix_segment(segment, unescape_html))
    return "".join(out)


def clean(text: str) -> str:
    """The reference's clean-up: fix_text, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return WHITESPACE.sub(" ", text).strip().lower()


# ---- byte-pair encoding ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bpe():
    """A `tokenizers` BPE over OpenAI's vocabulary, ids in the reference's order."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The file starts with a version line; the reference keeps the first 48,894 merges, giving
    # 256 bytes + 256 word-final bytes + 48,894 merges + 2 special tokens = 49,408 ids.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    # OpenAI's byte-to-unicode table lists its 256 characters in code-point order.
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                     end_of_word_suffix="</w>"))
    # Words arrive already split; ByteLevel only maps UTF-8 bytes to the printable alphabet.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A word that is exactly a special token (the word split yields it whole) gets its id, as in
    # the reference; no other word can contain one.
    tokenizer.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
    return tokenizer


def encode(text: str) -> list[int]:
    """Token ids of `text` without the start and end tokens."""
    words = WORD_PATTERN.findall(clean(text))
    if not words:
        return []
    return _bpe().encode(words, is_pretokenized=True, add_special_tokens=False).ids


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> np.ndarray:
    """int32 [len(texts), context_length] token ids, zero-padded, as `clip.tokenize` returns.

    A prompt longer than `context_length` tokens (start and end included) is an error, as in the
    reference, unless `truncate` (Python only; no command-line flag): then it is cut and its last
    token becomes end-of-text.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _bpe()
    start, end = tokenizer.token_to_id(START_OF_TEXT), tokenizer.token_to_id(END_OF_TEXT)
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
