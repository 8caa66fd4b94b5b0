"""Text data for language modelling: corpora shipped with CPython, or local text files.

Embedded corpora (no download; deterministic for a given CPython version):
- "pydoc_topics": the language-reference topics of `pydoc_data.topics` (79 documents,
  0.46 MB on CPython 3.11), one document per topic, named "pydoc_topics/<topic>".
- "stdlib": the standard library's top-level modules, `*.py` directly in
  sysconfig.get_paths()["stdlib"] sorted by file name (so no test/ package and no
  site-packages; 168 files, 4.7 MB on 3.11), named "stdlib/<file>".
Local corpora: `paths`, each a folder (its files ending in one of `suffixes`, recursively,
named by their path inside the folder), a file, or a glob (named by their normalized path
as given: `d1/a.txt` and `./d1/a.txt` are one name, `/abs/d1/a.txt` another); one document
per file.

Split (`split_documents`): documents are ordered by the SHA-256 of their name; the first
max(1, round(val_fraction * N)) are validation, the next max(1, round(test_fraction * N))
test, the rest training. It depends on nothing but the set of names, so the same documents
split the same way on every machine; it is a cut by rank, so adding documents can move
others across it (a split fixed under additions would need a threshold on each name's
hash, which can leave a small corpus without validation text). Tokenizers are fitted on
the training split only.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .loaders import SplitDataModule
from .tokenizers import make_tokenizer, tokenizer_from_state, warn_unknown

Document = tuple[str, str]  # (name, text)
CORPORA = ("pydoc_topics", "stdlib")
IGNORE_INDEX = -100


def pydoc_topics_documents() -> list[Document]:
    """The topics of `pydoc_data.topics`, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"pydoc_topics/{name}", topics[name]) for name in sorted(topics)]


def read_document(path: str, name: Optional[str] = None) -> Document:
    """(name or path, text) of a UTF-8 file (a byte-order mark at the start dropped);
    ValueError naming the file when it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return (name or path), data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from e


def stdlib_documents() -> list[Document]:
    """The standard library's top-level `*.py` modules, sorted by file name."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py") and os.path.isfile(os.path.join(root, f)))
    return [read_document(os.path.join(root, f), f"stdlib/{f}") for f in files]


def _as_list(names: Union[str, Sequence[str]]) -> list[str]:
    """One name (a str) or several as a list: "stdlib" is one corpus, ".md" one suffix, not characters."""
    return [names] if isinstance(names, str) else list(names)


def _folder_files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files under `root` that local_documents reads (see there), sorted."""
    lowered = tuple(suffix.lower() for suffix in suffixes)
    seen, files = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a second link to a folder, or a link to one of its ancestors
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [os.path.join(folder, name) for name in names
                  if not name.startswith(".") and name.lower().endswith(lowered)]
    return sorted(files)


def local_documents(paths: Union[str, Sequence[str]], suffixes: Sequence[str] = (".txt",)) -> list[Document]:
    """One document per file of `paths`: folders (files ending in `suffixes`, recursively), files or globs.

    Files are read in sorted order. In a folder, suffixes match in any case, links to folders
    are followed (each folder read once), and names starting with "." are skipped, as a glob
    skips them (hidden files, editors' and notebooks' copies). Raises FileNotFoundError naming
    a path that does not exist, a glob that matches nothing or a folder without such files,
    and ValueError for an empty path and naming a file that is not UTF-8.
    """
    paths, suffixes = _as_list(paths), tuple(_as_list(suffixes))
    documents: list[Document] = []
    for path in paths:
        if not path:
            raise ValueError(f"text data: an empty path in {paths!r} (expected a file, folder or glob)")
        if os.path.isdir(path):
            files = _folder_files(path, suffixes)
            if not files:
                raise FileNotFoundError(f"no text files ({', '.join(suffixes)}) under {os.path.abspath(path)!r}")
            documents += [read_document(f, os.path.relpath(f, path)) for f in files]
        elif os.path.isfile(path):
            documents.append(read_document(path, os.path.normpath(path)))
        elif glob.has_magic(path):
            files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"no file matches {path!r}")
            documents += [read_document(f, os.path.normpath(f)) for f in files]
        else:
            raise FileNotFoundError(f"text data: no file or directory at {os.path.abspath(path)!r}")
    return documents


def load_documents(corpora: Sequence[str] = CORPORA, paths: Union[str, Sequence[str], None] = None,
                   suffixes: Sequence[str] = (".txt",)) -> list[Document]:
    """The documents of the named embedded `corpora` followed by those of local `paths`.

    Raises ValueError for an unknown corpus name or when nothing is selected, and what
    local_documents raises.
    """
    loaders = {"pydoc_topics": pydoc_topics_documents, "stdlib": stdlib_documents}
    corpora = _as_list(corpora)
    unknown = [c for c in corpora if c not in loaders]
    if unknown:
        raise ValueError(f"unknown corpora {unknown}; choose from {list(CORPORA)}")
    documents = [doc for c in corpora for doc in loaders[c]()]
    if paths:
        documents += local_documents(paths, suffixes)
    if not documents:
        raise ValueError("no text selected: name embedded corpora or give paths")
    return documents


def split_documents(documents: Sequence[Document], val_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """{"train", "val", "test"}: documents split by the SHA-256 order of their names (module docstring).

    Each split keeps the documents' given order. Raises ValueError for fractions outside
    (0, 1), fewer than 3 documents, or duplicate names.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    names = [name for name, _ in documents]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"document names must be unique (the split is keyed by name); more than one is named "
                         f"{', '.join(map(repr, twice[:5]))} (files with one relative path in two folders of "
                         f"paths: give the files or a glob instead)")
    n = len(documents)
    n_val, n_test = max(1, round(val_fraction * n)), max(1, round(test_fraction * n))
    if n_val + n_test >= n:
        raise ValueError(f"{n} documents cannot make non-empty train/val/test splits: give more documents "
                         f"(e.g. split a large file into several)")
    order = sorted(range(n), key=lambda i: hashlib.sha256(names[i].encode("utf-8")).hexdigest())
    which = {i: "val" for i in order[:n_val]} | {i: "test" for i in order[n_val:n_val + n_test]}
    splits: dict[str, list[Document]] = {"train": [], "val": [], "test": []}
    for i, doc in enumerate(documents):
        splits[which.get(i, "train")].append(doc)
    return splits


def unigram_cross_entropy(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of eval_ids under a unigram model of train_ids with add-one smoothing.

    p(t) = (count_train(t) + 1) / (len(train_ids) + vocab_size) for every id t < vocab_size.
    Raises ValueError for an empty eval_ids or ids outside [0, vocab_size).
    """
    train_ids, eval_ids = train_ids.flatten().long(), eval_ids.flatten().long()
    if eval_ids.numel() == 0:
        raise ValueError("eval_ids is empty")
    for name, ids in (("train_ids", train_ids), ("eval_ids", eval_ids)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"{name} must be in [0, {vocab_size})")
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_p = counts.log() - math.log(train_ids.numel() + vocab_size)
    return float(-log_p[eval_ids].mean())


class _TextDataModule(SplitDataModule):
    """Shared by the text data modules: documents, split, tokenizer (fitted on train) and its state."""

    def __init__(self, corpora: Sequence[str], paths: Union[str, Sequence[str], None], suffixes: Sequence[str],
                 tokenizer_kind: str, subword_vocab_size: int, val_fraction: float, test_fraction: float,
                 batch_size: int, num_workers: int):
        super().__init__(batch_size, num_workers)
        self.check_int("subword_vocab_size", subword_vocab_size, 1)
        if tokenizer_kind not in ("bytes", "chars", "subword"):
            raise ValueError(f"tokenizer_kind must be one of bytes, chars, subword; got {tokenizer_kind!r}")
        self.corpora, self.paths, self.suffixes = _as_list(corpora), paths, _as_list(suffixes)
        self.tokenizer_kind, self.subword_vocab_size = tokenizer_kind, subword_vocab_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer = None
        self.splits: Optional[dict[str, list[Document]]] = None
        self.unigram_baseline: Optional[float] = None  # nats/token on the validation split

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        self.splits = split_documents(load_documents(self.corpora, self.paths, self.suffixes),
                                      self.val_fraction, self.test_fraction)
        if self.tokenizer is None:  # else restored by load_state_dict before setup
            texts = [text for _, text in self.splits["train"]]
            self.tokenizer = make_tokenizer(self.tokenizer_kind, texts, self.subword_vocab_size)
        for split in ("val", "test"):
            warn_unknown(self.tokenizer, (text for _, text in self.splits[split]), f"the {split} split")
        self._build()

    def encode_split(self, split: str) -> list[list[int]]:
        """The token ids of each document of a split (after setup)."""
        return self.tokenizer.encode_many([text for _, text in self.splits[split]])

    def _build(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.state()} if self.tokenizer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the saved tokenizer (a resumed run keeps its vocabulary).

        Lightning restores a data module after its setup, so when the tokenizer refitted
        there differs from the saved one, the datasets are rebuilt with the saved one (the
        model, built at setup from the refitted tokenizer, must then have room for its ids).
        """
        if "tokenizer" not in state_dict:
            return
        if self.tokenizer is not None and self.tokenizer.state() == state_dict["tokenizer"]:
            return
        self.tokenizer = tokenizer_from_state(state_dict["tokenizer"])
        if self.train_set is not None:  # resumed after setup: tokenize again with the restored vocabulary
            self._build()


class LMBlocks(Dataset):
    """Contiguous blocks of a token stream: item i is {"input_ids": s[iT : iT+T], "labels": s[iT+1 : iT+T+1]}."""

    def __init__(self, stream: Tensor, block_size: int):
        self.stream, self.block_size = stream, block_size

    def __len__(self):
        return max(0, (len(self.stream) - 1) // self.block_size)

    def __getitem__(self, i):
        start = i * self.block_size
        chunk = self.stream[start:start + self.block_size + 1].long()
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class LanguageModelDataModule(_TextDataModule):
    """Causal-LM data: each split's documents as one stream <bos> doc <eos> <bos> doc <eos> ..., cut
    into non-overlapping blocks of block_size tokens with next-token labels (see LMBlocks).

    After setup: .tokenizer, .unigram_baseline (nats/token of the validation stream under an
    add-one unigram model of the training stream). Args:
        corpora: embedded corpora, any of "pydoc_topics", "stdlib" ([] for local files only).
        paths: local text: folders, files or globs (module docstring).
        suffixes: which files of a folder are read.
        tokenizer_kind: "bytes", "chars" or "subword" (byte-level BPE), fitted on the training split.
        subword_vocab_size: vocabulary of the subword tokenizer.
        block_size: tokens per training sequence.
        val_fraction, test_fraction: documents held out (module docstring).
    Raises FileNotFoundError naming missing local data, ValueError for a split shorter than a block.
    """

    def __init__(self, corpora: Union[Sequence[str], str] = CORPORA, paths: Union[str, list[str], None] = None,
                 suffixes: Union[Sequence[str], str] = (".txt",), tokenizer_kind: str = "chars",
                 subword_vocab_size: int = 4096, block_size: int = 256, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, batch_size: int = 32, num_workers: int = 0):
        super().__init__(corpora, paths, suffixes, tokenizer_kind, subword_vocab_size, val_fraction, test_fraction,
                         batch_size, num_workers)
        self.check_int("block_size", block_size, 2)
        self.block_size = block_size
        self.streams: dict[str, Tensor] = {}

    def _build(self) -> None:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        for split in ("train", "val", "test"):
            ids = [t for doc in self.encode_split(split) for t in (bos, *doc, eos)]
            self.streams[split] = torch.tensor(ids, dtype=torch.int32)  # int32: half the memory of a large corpus
            if len(ids) <= self.block_size:
                raise ValueError(f"the {split} split has {len(ids)} tokens, fewer than block_size + 1 = "
                                 f"{self.block_size + 1}: give more text or a smaller block_size")
        self.train_set, self.val_set, self.test_set = (LMBlocks(self.streams[s], self.block_size)
                                                       for s in ("train", "val", "test"))
        # Exactly the tokens the validation loss is averaged over: the labels of the val blocks.
        scored = self.streams["val"][1:len(self.val_set) * self.block_size + 1]
        self.unigram_baseline = unigram_cross_entropy(self.streams["train"], scored, self.tokenizer.vocab_size)


def mask_tokens(ids: Tensor, maskable: Tensor, mask_id: int, first_regular: int, vocab_size: int,
                mask_prob: float = 0.15, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """BERT's masking: (input_ids, labels) of the same shape as ids.

    Each position where `maskable` is True is selected with probability mask_prob; a
    selected token becomes mask_id with probability 0.8, a uniformly random regular id
    in [first_regular, vocab_size) with 0.1, and stays itself with 0.1. labels hold the
    original id at selected positions and -100 elsewhere.
    """
    selected = (torch.rand(ids.shape, generator=generator) < mask_prob) & maskable
    labels = ids.masked_fill(~selected, IGNORE_INDEX)
    choice = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(first_regular, vocab_size, ids.shape, generator=generator)
    out = torch.where(selected & (choice < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(selected & (choice >= 0.8) & (choice < 0.9), random_ids, out)
    return out, labels


class _Sequences(Dataset):
    """Token sequences; items are (index, ids), the index seeding the masks of evaluation data."""

    def __init__(self, sequences: list[Tensor]):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return i, self.sequences[i]


class MaskingCollator:
    """Pads (index, ids) items into {"input_ids", "attention_mask", "labels"} and masks them (mask_tokens).

    With seed=None the masks come from torch's global generator (new masks every epoch);
    with a seed, item i's masks come from a generator seeded with (seed, i), so an
    evaluation set is masked the same way every time, whatever the batching or workers.
    Specials (<pad>, <bos>, <eos>, ...) are never selected.
    """

    def __init__(self, tokenizer, mask_prob: float = 0.15, seed: Optional[int] = None):
        self.pad_id, self.mask_id, self.first_regular = tokenizer.pad_id, tokenizer.mask_id, tokenizer.num_specials
        self.vocab_size, self.mask_prob, self.seed = tokenizer.vocab_size, mask_prob, seed

    def __call__(self, items):
        length = max(len(ids) for _, ids in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for row, (index, ids) in enumerate(items):
            generator = None
            if self.seed is not None:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            ids = ids.long()
            masked, row_labels = mask_tokens(ids, ids >= self.first_regular, self.mask_id, self.first_regular,
                                             self.vocab_size, self.mask_prob, generator)
            input_ids[row, :len(ids)], labels[row, :len(ids)] = masked, row_labels
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MaskedLMDataModule(_TextDataModule):
    """Masked-LM data: each document cut into pieces of up to max_length - 2 tokens, each as
    <bos> piece <eos> (BERT's [CLS] ... [SEP]); batches padded with an attention_mask and
    masked by MaskingCollator (15%: 80% <mask> / 10% random / 10% unchanged). Training masks
    change every epoch; validation and test masks are fixed by `mask_seed`.

    After setup: .tokenizer, .unigram_baseline (nats/token of the validation split's regular
    tokens under an add-one unigram model of the training split's, the baseline of predicting
    a masked token without context). Args as LanguageModelDataModule, plus:
        max_length: longest sequence, specials included.
        mask_prob: fraction of regular tokens selected for prediction.
        mask_seed: seed of the validation and test masks.
    """

    def __init__(self, corpora: Union[Sequence[str], str] = CORPORA, paths: Union[str, list[str], None] = None,
                 suffixes: Union[Sequence[str], str] = (".txt",), tokenizer_kind: str = "subword",
                 subword_vocab_size: int = 4096, max_length: int = 128, mask_prob: float = 0.15, mask_seed: int = 0,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, batch_size: int = 32, num_workers: int = 0):
        super().__init__(corpora, paths, suffixes, tokenizer_kind, subword_vocab_size, val_fraction, test_fraction,
                         batch_size, num_workers)
        self.check_int("max_length", max_length, 3, " (<bos>, a token, <eos>)")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.max_length, self.mask_prob, self.mask_seed = max_length, mask_prob, mask_seed

    def _build(self) -> None:
        bos, eos, piece = self.tokenizer.bos_id, self.tokenizer.eos_id, self.max_length - 2
        content = {}
        for split in ("train", "val", "test"):
            docs = self.encode_split(split)
            content[split] = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
            sequences = [torch.tensor([bos, *doc[i:i + piece], eos], dtype=torch.int32)
                         for doc in docs for i in range(0, len(doc), piece)]
            if not sequences:
                raise ValueError(f"the {split} split holds no tokens")
            setattr(self, f"{split}_set", _Sequences(sequences))
        self.unigram_baseline = unigram_cross_entropy(content["train"], content["val"], self.tokenizer.vocab_size)

    def collate_fn(self, train: bool):
        # Training draws new masks every epoch; evaluation masks are fixed by mask_seed.
        return MaskingCollator(self.tokenizer, self.mask_prob, None if train else self.mask_seed)
