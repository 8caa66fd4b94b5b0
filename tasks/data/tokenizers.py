"""Tokenizers for the text tasks: bytes, characters, and subwords trained locally.

Every tokenizer has encode(str) -> list[int], decode(list[int]) -> str, vocab_size, the
special ids pad_id / bos_id / eos_id / unk_id / mask_id, and state() -> dict, a plain
(JSON-able) description from which `tokenizer_from_state` rebuilds it. The state travels
inside checkpoints, so `zoo generate` can turn a prompt into ids and ids into text.
encode yields no special id but CharTokenizer's <unk> (text that spells "<eos>" is text); decode drops the
special ids and raises ValueError for an id outside the vocabulary (a model's vocabulary
may be larger than its tokenizer's: what it emits there is not text).
"""

from __future__ import annotations

import json
from typing import Iterable, Optional, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")


class _Specials:
    pad_id, bos_id, eos_id, unk_id, mask_id = range(5)
    num_specials = len(SPECIALS)
    vocab_size: int

    def unknown(self, text: str) -> list[str]:
        """The characters of `text` this tokenizer encodes as <unk> (sorted; none but for CharTokenizer)."""
        return []

    def cut(self, ids: list[int], n: int, text: str) -> list[int]:
        """The first n of `ids` (the encoding of `text`), or fewer: never part of a character."""
        return ids[:n]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def _text_ids(self, ids: Iterable[int]) -> list[int]:
        """The ids of `ids` that stand for text (the specials dropped); ValueError for one outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"id {bad[0]} is outside this tokenizer's vocabulary (ids 0..{self.vocab_size - 1}); "
                             f"a model with a larger vocabulary must not emit it")
        return [i for i in ids if i >= self.num_specials]


class ByteTokenizer(_Specials):
    """UTF-8 bytes: ids 5..260 are the byte values, 0..4 the specials. Any text round-trips."""

    vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return [b + self.num_specials for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i - self.num_specials for i in self._text_ids(ids))
        return data.decode("utf-8", errors="replace")

    def cut(self, ids: list[int], n: int, text: str) -> list[int]:
        # Back off over UTF-8 continuation bytes (0b10xxxxxx): the cut falls between characters.
        while 0 < n < len(ids) and (ids[n] - self.num_specials) & 0xC0 == 0x80:
            n -= 1
        return ids[:n]

    def state(self) -> dict:
        return {"kind": "bytes"}


class CharTokenizer(_Specials):
    """The characters of a corpus (sorted), after the specials; unknown characters map to <unk>."""

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet))
        self.itos = list(SPECIALS) + chars
        self.stoi = {c: i + self.num_specials for i, c in enumerate(chars)}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> "CharTokenizer":
        alphabet = set()
        for text in texts:
            alphabet.update(text)
        return cls("".join(alphabet))

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, self.unk_id) for c in text]

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in self._text_ids(ids))

    def state(self) -> dict:
        return {"kind": "chars", "alphabet": "".join(self.itos[self.num_specials:])}


class SubwordTokenizer(_Specials):
    """Byte-level BPE trained locally with Hugging Face's `tokenizers` (no download)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Text is text: "<eos>" written in a document encodes as its bytes, not as the special id
        # (only the task puts specials in a sequence). The flag is not part of the saved JSON.
        tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        for name, token in zip(("pad_id", "bos_id", "eos_id", "unk_id", "mask_id"), SPECIALS):
            if tokenizer.token_to_id(token) != getattr(_Specials, name):
                raise ValueError(f"subword tokenizer must map {token} to {getattr(_Specials, name)}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "SubwordTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]  # on all cores

    def cut(self, ids: list[int], n: int, text: str) -> list[int]:
        # A byte-level token may hold part of a character: back off to a cut whose text is a prefix.
        for m in range(n, max(n - 4, 0) - 1, -1):  # a character's bytes are in at most 4 tokens
            if m >= len(ids) or text.startswith(self.decode(ids[:m])):
                return ids[:m]
        return ids[:n]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(self._text_ids(ids))

    def state(self) -> dict:
        return {"kind": "subword", "json": self.tokenizer.to_str()}

    # A `tokenizers.Tokenizer` pickles through its JSON, which drops encode_special_tokens: a copy
    # in a spawned loader worker would read "<eos>" in a text as the special id. Pickle the state.
    def __getstate__(self) -> dict:
        return self.state()

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]))


def tokenizer_from_state(state: dict):
    """Rebuilds a tokenizer from its state(); raises ValueError for an unknown kind."""
    kind = state.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "chars":
        return CharTokenizer(state["alphabet"])
    if kind == "subword":
        from tokenizers import Tokenizer

        return SubwordTokenizer(Tokenizer.from_str(state["json"]))
    raise ValueError(f"unknown tokenizer kind {kind!r} in {json.dumps(state)[:80]}")


def make_tokenizer(kind: str, texts: Optional[Iterable[str]] = None, vocab_size: int = 4096):
    """"bytes", "chars" (alphabet of `texts`) or "subword" (BPE trained on `texts`)."""
    if kind == "bytes":
        return ByteTokenizer()
    if texts is None:
        raise ValueError(f"a {kind!r} tokenizer is built from a corpus: pass texts")
    if kind == "chars":
        return CharTokenizer.from_corpus(texts)
    if kind == "subword":
        return SubwordTokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer must be one of bytes, chars, subword; got {kind!r}")


def suppressed_ids(tokenizer, model_vocab_size: int) -> list[int]:
    """The ids a model must not generate as text for `tokenizer`: the specials but <eos>, and
    every id of the model's vocabulary past the tokenizer's (a vocabulary padded to a round size)."""
    specials = [i for i in range(tokenizer.num_specials) if i != tokenizer.eos_id]
    return specials + list(range(tokenizer.vocab_size, model_vocab_size))


def warn_unknown(tokenizer, texts: Iterable[str], what: str) -> None:
    """Warns (naming them) when `texts` hold characters the tokenizer encodes as <unk>: the model
    then sees <unk> where the text has something else."""
    unknown = sorted({c for text in texts for c in tokenizer.unknown(text)}) if hasattr(tokenizer, "unknown") else []
    if unknown:
        import warnings

        warnings.warn(f"{what}: {len(unknown)} character(s) outside the tokenizer's alphabet are fed to the model "
                      f"as <unk>: {''.join(unknown)[:40]!r}", stacklevel=3)
