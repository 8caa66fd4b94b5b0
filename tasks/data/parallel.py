"""Parallel text (source -> target pairs) for sequence-to-sequence tasks: batching and local TSV files.

A batch is a dict: src_ids (B, Ss) and src_mask (B, Ss) bool, tgt_ids (B, St) (bos, then
the target shifted right), labels (B, St) (target ids then eos, -100 on padding), and the
raw strings source_text / target_text (lists of B) for metrics that compare text.
Tokenization happens in the collate function, with the data module's tokenizer of the
moment, so a tokenizer restored from a checkpoint (load_state_dict) is the one used.
"""

from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from zoo.seq2seq import shift_tokens_right

from .loaders import SplitDataModule
from .tokenizers import make_tokenizer, tokenizer_from_state, warn_unknown


class Seq2SeqCollate:
    """Turns a list of (source, target) strings into a padded batch (see the module docstring).

    Sources are cut to max_length tokens and targets to max_length - 1 before the eos, at a
    character boundary (bytes and byte-level subwords: a token or two fewer). A plain object
    (not a bound method of the data module) so that worker processes pickle the tokenizer only.
    """

    def __init__(self, tokenizer, max_length: int = 256):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a token and eos), got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> dict:
        tok = self.tokenizer
        sources = [tok.cut(tok.encode(s), self.max_length, s) for s, _ in pairs]
        targets = [tok.cut(tok.encode(t), self.max_length - 1, t) + [tok.eos_id] for _, t in pairs]
        B = len(pairs)
        src = torch.full((B, max(map(len, sources))), tok.pad_id, dtype=torch.long)
        labels = torch.full((B, max(map(len, targets))), -100, dtype=torch.long)
        src_mask = torch.zeros(src.shape, dtype=torch.bool)
        for i, (s, t) in enumerate(zip(sources, targets)):
            src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            src_mask[i, :len(s)] = True
            labels[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        return {"src_ids": src, "src_mask": src_mask, "tgt_ids": shift_tokens_right(labels, tok.bos_id, tok.pad_id),
                "labels": labels, "source_text": [s for s, _ in pairs], "target_text": [t for _, t in pairs]}


class PairsDataModule(SplitDataModule):
    """Base of the parallel-text data modules: loaders with Seq2SeqCollate, the tokenizer's state.

    Subclasses set self.tokenizer and self.train_set / val_set / test_set (datasets of
    (source, target) string pairs) in setup(). state_dict() holds {"tokenizer": state}, so
    a resumed run decodes with the vocabulary it was trained with.
    """

    def __init__(self, batch_size: int, num_workers: int, max_length: int):
        super().__init__(batch_size, num_workers)
        self.check_int("max_length", max_length, 2, " (a token and eos)")
        self.max_length = max_length
        self.tokenizer = None

    def warn_cut(self, splits: dict[str, Sequence[tuple[str, str]]]) -> None:
        """Warns, with counts per split, when pairs are longer than max_length tokens (the collate
        function cuts them: the model trains on, and is scored against, text it never sees whole)."""
        limit = self.max_length
        counts = []
        for name, pairs in splits.items():
            sources = self.tokenizer.encode_many([s for s, _ in pairs])
            targets = self.tokenizer.encode_many([t for _, t in pairs])
            cut = sum(len(s) > limit or len(t) > limit - 1 for s, t in zip(sources, targets))
            if cut:
                counts.append(f"{cut} of {len(pairs)} {name} pairs")
        if counts:
            rank_zero_warn(f"{', '.join(counts)} are longer than max_length={limit} tokens (a source) or "
                           f"{limit - 1} (a target, before its eos) and are cut to it; raise max_length to keep them")

    def collate_fn(self, train: bool):
        return Seq2SeqCollate(self.tokenizer, self.max_length)

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.state()} if self.tokenizer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "tokenizer" in state_dict:
            self.tokenizer = tokenizer_from_state(state_dict["tokenizer"])


def read_tsv(path: str) -> list[tuple[str, str]]:
    """(source, target) pairs from a UTF-8 file of `source<TAB>target` lines; empty lines are
    skipped, a byte-order mark at the start is dropped.

    Raises FileNotFoundError naming a missing file, and ValueError naming the file and the
    line number of a line that is not UTF-8, has not exactly one tab or has an empty side
    (a line of only whitespace and a tab included).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parallel text: no file at {os.path.abspath(path)!r} "
                                f"(expected source<TAB>target lines)")
    pairs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {e.start}: {e.reason})") from e
            if not line.strip(" "):  # an empty line; a line holding a tab is checked below
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(f"{path}:{number}: expected 'source<TAB>target' with both sides non-empty, "
                                 f"got {len(fields) - 1} tab(s) in {line[:80]!r}")
            pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"{path}: no source<TAB>target lines")
    return pairs


class TSVDataModule(PairsDataModule):
    """Parallel text from local TSV files (source<TAB>target per line); one tokenizer for both sides.

    Args:
        train_path: training pairs.
        val_path: validation pairs; None holds out `val_fraction` of the training file's
            distinct sources (a seeded shuffle), each with all its lines, instead.
        test_path: test pairs (None: the validation pairs).
        tokenizer: "subword" (byte-level BPE), "chars" or "bytes"; subword and chars are
            built from the training split (both sides).
        vocab_size: subword vocabulary size (BPE may stop short of it on a small corpus;
            the model's vocabulary must be at least tokenizer.vocab_size).
        max_length: sources and targets are cut to this many tokens (setup warns with the
            number of pairs cut in each split).
        val_fraction, seed: the held-out share when there is no val_path.

    Raises (in setup) FileNotFoundError naming a missing file and ValueError naming the
    file and line of a malformed line.
    """

    def __init__(self, train_path: str, val_path: Optional[str] = None, test_path: Optional[str] = None,
                 tokenizer: str = "subword", vocab_size: int = 8000, max_length: int = 256, batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.01, seed: int = 0):
        super().__init__(batch_size, num_workers, max_length)
        if tokenizer not in ("subword", "chars", "bytes"):
            raise ValueError(f"tokenizer must be subword, chars or bytes, got {tokenizer!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.tokenizer_kind, self.vocab_size = tokenizer, vocab_size
        self.val_fraction, self.seed = val_fraction, seed

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        train = read_tsv(self.train_path)
        if self.val_path is not None:
            val = read_tsv(self.val_path)
        else:
            # Held out by source sentence: every line of a held-out source (a repeated pair, another
            # translation) goes to validation, so that validation never scores a source seen in training.
            sources = list(dict.fromkeys(source for source, _ in train))
            random.Random(self.seed).shuffle(sources)
            n_val = max(1, int(len(sources) * self.val_fraction))
            if n_val >= len(sources):
                raise ValueError(f"{self.train_path}: {len(sources)} distinct source(s) are too few to hold out "
                                 f"a validation share; pass val_path")
            held = set(sources[:n_val])
            val = [p for p in train if p[0] in held]
            train = [p for p in train if p[0] not in held]
        test = read_tsv(self.test_path) if self.test_path is not None else val
        if self.tokenizer is None:  # else restored by load_state_dict
            texts = (side for pair in train for side in pair)
            self.tokenizer = make_tokenizer(self.tokenizer_kind, texts, self.vocab_size)
        splits = {"training": train, "validation": val}
        if self.test_path is not None:
            splits["test"] = test
        self.warn_cut(splits)
        for name, pairs in splits.items():
            if name != "training":
                warn_unknown(self.tokenizer, (side for pair in pairs for side in pair), f"{name} pairs")
        self.train_set, self.val_set, self.test_set = train, val, test
