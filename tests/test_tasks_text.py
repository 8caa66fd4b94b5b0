"""Text tasks and data: corpora, split, tokenizers, masking, LM blocks, unigram baseline, training, checkpoints."""

import copy
import math
import os
import pickle
import random
import sysconfig
from collections import Counter

import lightning as L
import pytest
import torch

from tasks.data.text import (LanguageModelDataModule, MaskedLMDataModule, MaskingCollator, local_documents,
                             mask_tokens, pydoc_topics_documents, split_documents, stdlib_documents,
                             unigram_cross_entropy)
from tasks.data.tokenizers import ByteTokenizer, CharTokenizer, make_tokenizer, tokenizer_from_state
from tasks.text import CausalLM, MaskedLM

pytestmark = pytest.mark.usefixtures("reference_attention")

TINY_GPT = {"dim": 64, "depth": 2, "heads": 2, "max_seq_len": 64}
TINY_BERT = {"dim": 64, "depth": 1, "heads": 2, "mlp_hidden": 128, "max_seq_len": 64, "dropout": 0.0,
             "attn_dropout": 0.0}


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


# ---------------------------------------------------------------- corpora and split


def test_embedded_corpora_are_real_and_deterministic():
    topics = pydoc_topics_documents()
    from pydoc_data.topics import topics as source

    assert len(topics) == len(source) >= 50
    assert dict(topics) == {f"pydoc_topics/{k}": v for k, v in source.items()}
    assert sum(len(text) for _, text in topics) > 100_000

    stdlib = stdlib_documents()
    root = sysconfig.get_paths()["stdlib"]
    names = [name for name, _ in stdlib]
    assert names == sorted(names) and len(names) >= 100
    assert all(name.startswith("stdlib/") and name.count("/") == 1 and name.endswith(".py") for name in names)
    assert "stdlib/os.py" in names and not any("site-packages" in n or n.startswith("stdlib/test") for n in names)
    with open(os.path.join(root, "os.py"), encoding="utf-8") as f:
        assert dict(stdlib)["stdlib/os.py"] == f.read()
    assert stdlib_documents() == stdlib


def test_split_is_by_document_deterministic_and_order_free():
    documents = pydoc_topics_documents() + stdlib_documents()
    splits = split_documents(documents, 0.05, 0.05)
    n = len(documents)
    assert [len(splits[s]) for s in ("val", "test")] == [round(0.05 * n)] * 2
    names = {s: {name for name, _ in docs} for s, docs in splits.items()}
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"]) and not (
        names["val"] & names["test"])
    assert names["train"] | names["val"] | names["test"] == {name for name, _ in documents}
    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    again = split_documents(shuffled, 0.05, 0.05)
    assert {s: {name for name, _ in docs} for s, docs in again.items()} == names
    with pytest.raises(ValueError, match="documents"):
        split_documents(documents[:2])
    with pytest.raises(ValueError, match="more than one is named 'a.txt'"):
        split_documents([("a.txt", "x"), ("b.txt", "y"), ("a.txt", "z"), ("c.txt", "w")])


def test_local_document_names_do_not_depend_on_how_a_path_is_spelled(tmp_path, monkeypatch):
    """Globs and files are named by their normalized path (so `./d/a.txt` is `d/a.txt`), and a
    byte-order mark is not part of the text."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.txt").write_bytes("\ufeffcaf\u00e9".encode("utf-8"))
    (folder / "b.txt").write_text("tea", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    expected = [("d/a.txt", "caf\u00e9"), ("d/b.txt", "tea")]
    assert local_documents("d/*.txt") == local_documents("./d/*.txt") == expected
    assert local_documents(["./d/a.txt", "d//b.txt"]) == expected
    assert local_documents("d") == [("a.txt", "caf\u00e9"), ("b.txt", "tea")]
    (folder / "c.md").write_text("# notes", encoding="utf-8")
    (folder / "old.bad").write_text("ignored", encoding="utf-8")  # ends in "d", as ".md" does
    assert local_documents("d", suffixes=".md") == local_documents("d", suffixes=[".md"]) == [("c.md", "# notes")]


def test_a_folder_is_read_through_links_once_each_without_hidden_files(tmp_path):
    """Every file a glob reaches is read from the folder too: through a link to a folder (a link
    back to an ancestor does not loop), suffixes in any case; hidden names are skipped, as a
    glob skips them. The oracle: the files written, by hand."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r.txt").write_text("linked", encoding="utf-8")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "s.txt").write_text("nested", encoding="utf-8")
    (root / "UP.TXT").write_text("shouting", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "copy.txt").write_text("a copy", encoding="utf-8")
    os.symlink(elsewhere, root / "linked")
    assert sorted(text for _, text in local_documents(str(root / "**" / "*.txt"))) == ["linked", "nested"]
    expected = [("UP.TXT", "shouting"), ("linked/r.txt", "linked"), ("sub/s.txt", "nested")]
    assert local_documents(str(root)) == expected
    os.symlink(root, root / "sub" / "loop")  # an ancestor (a glob's "**" would go round it): read once
    assert local_documents(str(root)) == expected
    with pytest.raises(ValueError, match="an empty path"):
        local_documents([str(root), ""])


# ---------------------------------------------------------------- tokenizers and baseline


def test_the_loss_mean_weighs_batches_by_tokens_and_keeps_a_nan():
    """val/loss is a token mean: batches weigh by their token count (torchmetrics' MeanMetric with
    nan_strategy="disable" ignores the weights), and a NaN batch makes it NaN (the default
    MeanMetric drops it: a diverging model would look fine). Oracle: the weighted mean by hand."""
    from tasks.base import WeightedMean

    metric = WeightedMean()
    for value, weight in ((2.0, 3), (1.0, 1), (4.0, 0)):
        metric.update(torch.tensor(value), torch.tensor(weight))
    assert metric.compute().item() == (2.0 * 3 + 1.0) / 4
    metric.update(torch.tensor(float("nan")), torch.tensor(5))
    assert metric.compute().isnan()


def test_tokenizers_round_trip_the_corpus():
    splits = split_documents(pydoc_topics_documents())
    train = [text for _, text in splits["train"]]
    chars = make_tokenizer("chars", train)
    assert all(chars.decode(chars.encode(text)) == text for text in train)
    everything = [text for docs in splits.values() for _, text in docs]
    for tokenizer in (ByteTokenizer(), make_tokenizer("subword", train, vocab_size=600)):
        assert all(tokenizer.decode(tokenizer.encode(text)) == text for text in everything)
        rebuilt = tokenizer_from_state(tokenizer.state())
        assert rebuilt.encode(everything[0]) == tokenizer.encode(everything[0])


def test_tokenizers_refuse_ids_outside_their_vocabulary_and_keep_text_that_spells_a_special():
    text = "html: <eos> vs <mask>, wikitext: the <unk> river <pad>"
    subword = make_tokenizer("subword", [text * 3, "the river flows"], vocab_size=300)
    # A loader worker that is spawned (macOS, Windows; forkserver) gets a pickled copy.
    copies = [tokenizer_from_state(subword.state()), pickle.loads(pickle.dumps(subword)), copy.deepcopy(subword)]
    for tokenizer in (ByteTokenizer(), CharTokenizer(text), subword, *copies):
        ids = tokenizer.encode(text)
        assert min(ids) >= tokenizer.num_specials  # the text's "<eos>" is text, not the special id
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text
        with pytest.raises(ValueError, match=f"id {tokenizer.vocab_size} is outside"):
            tokenizer.decode([*ids, tokenizer.vocab_size])


def _favour(scores: torch.Tensor, ids: list[int]) -> torch.Tensor:
    bias = torch.zeros(scores.shape[-1], dtype=scores.dtype)
    bias[ids] = 100.0
    return scores + bias


@pytest.mark.parametrize("kwargs", [dict(top_k=5), dict(top_p=0.9)])
def test_filters_without_a_temperature_are_refused(kwargs):
    """top_k / top_p at temperature 0 (greedy) would be ignored without a word: refused, as
    the seq2seq task refuses them."""
    gpt = CausalLM("gpt_nano", vocab_size=300, model_args=TINY_GPT).eval()
    with pytest.raises(ValueError, match="top_k and top_p filter sampling: give a temperature > 0"):
        gpt.generate_text(["The "], ByteTokenizer(), max_new_tokens=3, temperature=0, **kwargs)


def test_a_model_vocabulary_padded_past_the_tokenizer_never_reaches_the_text(monkeypatch):
    """ids past the tokenizer's (and specials other than <eos>) are never generated, filled in or
    predicted: making them the model's favourites must not change a thing."""
    tok = ByteTokenizer()
    banned = [tok.pad_id, tok.bos_id, tok.unk_id, tok.mask_id, *range(tok.vocab_size, 300)]
    torch.manual_seed(0)
    gpt = CausalLM("gpt_nano", vocab_size=300, model_args=TINY_GPT).eval()
    expected = gpt.generate_text(["The "], tok, max_new_tokens=20, temperature=0)
    sampled = gpt.generate_text(["The "], tok, max_new_tokens=20, temperature=1.0, seed=3)
    logits = gpt.model.logits
    monkeypatch.setattr(gpt.model, "logits", lambda h: _favour(logits(h), banned))
    assert gpt.generate_text(["The "], tok, max_new_tokens=20, temperature=0) == expected
    assert gpt.generate_text(["The "], tok, max_new_tokens=20, temperature=1.0, seed=3) == sampled

    bert = MaskedLM("bert_tiny", vocab_size=300, model_args=TINY_BERT).eval()
    texts = ["def f(x): ret[MASK]rn x", "[MASK][MASK] é ☃ [MASK]"]
    expected = bert.fill_mask(texts, tok)
    bert.model.register_forward_hook(lambda module, args, out: _favour(out, banned))
    assert bert.fill_mask(texts, tok) == expected
    assert expected[0].startswith("def f(x): ret") and expected[1][2:-1] == " é ☃ " and len(expected[1]) == 8


def test_fill_mask_keeps_the_text_the_tokenizer_cannot_spell():
    bert = MaskedLM("bert_tiny", vocab_size=40, model_args=TINY_BERT)
    text = "Naïve café: [MASK] ok!"
    with pytest.warns(UserWarning, match="fill_mask: 5 character\\(s\\) outside the tokenizer's alphabet .* '!:Néï'"):
        filled = bert.fill_mask([text], CharTokenizer("abcdefghijklmnopqrstuvwxyz "))[0]
    assert filled.startswith("Naïve café: ") and filled.endswith(" ok!") and len(filled) == len(text) - 5


def test_prompts_with_characters_outside_the_alphabet_warn_naming_them(recwarn):
    tok = CharTokenizer("abc ")
    gpt = CausalLM("gpt_nano", vocab_size=tok.vocab_size, model_args=TINY_GPT)
    with pytest.warns(UserWarning, match="generate_text: 2 character\\(s\\) .* as <unk>: 'XZ'"):
        gpt.generate_text(["abZ", "X c"], tok, max_new_tokens=2)
    with pytest.warns(UserWarning, match="text_batch: 1 character"):
        gpt.text_batch(["a-b"], tok)
    recwarn.clear()
    gpt.generate_text(["abc"], tok, max_new_tokens=2)
    assert ByteTokenizer().unknown("any text ☃") == []
    assert not [w for w in recwarn if "alphabet" in str(w.message)]  # nothing to say: no warning


def test_unigram_baseline_by_hand():
    # train counts over a vocabulary of 8: id 5 twice, id 6 once; eval [5, 7]
    expected = -(math.log(3 / 11) + math.log(1 / 11)) / 2
    got = unigram_cross_entropy(torch.tensor([5, 5, 6]), torch.tensor([5, 7]), vocab_size=8)
    assert got == pytest.approx(expected, rel=1e-12)


def test_lm_datamodule_baseline_matches_counts_of_its_split():
    dm = LanguageModelDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", block_size=64)
    dm.setup("fit")
    tok = dm.tokenizer

    def stream(split):
        return [t for _, text in dm.splits[split] for t in [tok.bos_id, *tok.encode(text), tok.eos_id]]

    train, val = Counter(stream("train")), stream("val")
    scored = val[1:len(dm.val_set) * 64 + 1]
    total = sum(train.values())
    expected = -sum(math.log((train[t] + 1) / (total + tok.vocab_size)) for t in scored) / len(scored)
    assert dm.unigram_baseline == pytest.approx(expected, rel=1e-9)
    # The tokenizer saw the training split only.
    assert set(tok.state()["alphabet"]) == set("".join(text for _, text in dm.splits["train"]))


# ---------------------------------------------------------------- causal LM blocks


def test_lm_blocks_are_contiguous_and_labels_are_shifted_inputs(tmp_path):
    texts = {f"doc{i}.txt": f"document {i}: " + "the quick brown fox jumps. " * (i + 3) for i in range(8)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    dm = LanguageModelDataModule(corpora=[], paths=str(tmp_path), tokenizer_kind="chars", block_size=16,
                                 val_fraction=0.15, test_fraction=0.15)
    dm.setup("fit")
    tok, blocks = dm.tokenizer, dm.train_set
    items = [blocks[i] for i in range(len(blocks))]
    inputs = torch.cat([item["input_ids"] for item in items])
    for item, following in zip(items, items[1:]):
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])
        assert item["labels"][-1] == following["input_ids"][0]
    # The concatenated blocks are the training documents in order, each between <bos> and <eos>.
    expected = "".join(f"<{text}>" for _, text in dm.splits["train"])
    shown = "".join({tok.bos_id: "<", tok.eos_id: ">"}.get(i, None) or tok.decode([i]) for i in inputs.tolist())
    assert len(shown) == len(inputs) == len(blocks) * 16 and expected.startswith(shown)
    assert len(expected) - len(shown) <= 16
    assert {name for name, _ in dm.splits["train"]} <= set(texts)


# ---------------------------------------------------------------- masking


def test_masking_statistics_within_binomial_bounds():
    gen = torch.Generator().manual_seed(0)
    first_regular, vocab, mask_id = 5, 40, 4
    ids = torch.randint(first_regular, vocab, (400, 500), generator=gen)
    maskable = torch.rand(ids.shape, generator=gen) < 0.9
    out, labels = mask_tokens(ids, maskable, mask_id, first_regular, vocab, 0.15, gen)
    selected = labels != -100

    def within(count, n, p):  # 5 sigma of a binomial(n, p)
        return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))

    n = int(maskable.sum())
    assert not bool((selected & ~maskable).any())
    assert within(int(selected.sum()), n, 0.15)
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(out[~selected], ids[~selected])
    k = int(selected.sum())
    as_mask = int((out[selected] == mask_id).sum())
    unchanged = int((out[selected] == ids[selected]).sum())
    replaced = k - as_mask - unchanged
    regular = vocab - first_regular  # a random replacement equals the original with probability 1 / regular
    assert within(as_mask, k, 0.8)
    assert within(unchanged, k, 0.1 + 0.1 / regular)
    assert within(replaced, k, 0.1 * (1 - 1 / regular))
    assert bool(((out >= first_regular) | (out == mask_id)).all())


def test_masking_collator_pads_skips_specials_and_fixes_eval_masks():
    tok = CharTokenizer("abcdefghij")
    items = [(i, torch.tensor([tok.bos_id, *tok.encode("abcdefghij"[: 3 + i]), tok.eos_id])) for i in range(6)]
    fixed = MaskingCollator(tok, mask_prob=0.5, seed=7)
    batch = fixed(items)
    assert batch["input_ids"].shape == (6, 10)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(ids) for _, ids in items]
    padded = batch["attention_mask"] == 0
    assert bool((batch["input_ids"][padded] == tok.pad_id).all()) and bool((batch["labels"][padded] == -100).all())
    assert bool((batch["labels"][:, 0] == -100).all())  # <bos> is never selected
    # Seeded masks depend on the item, not on how items are batched.
    halves = [fixed(items[:3]), fixed(items[3:])]
    for key in ("input_ids", "labels"):
        for row in range(6):
            half = halves[row // 3][key][row % 3]
            assert torch.equal(half[: len(items[row][1])], batch[key][row, : len(items[row][1])])


# ---------------------------------------------------------------- training and checkpoints


def _validate(trainer, task, dm) -> float:
    return trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]


@pytest.mark.parametrize("kind", ["chars", "bytes"])
def test_bits_per_character_are_the_bits_of_every_label_over_the_characters(tmp_path, kind):
    """Short documents: <bos>/<eos> are ~7% of the labels. Their cost counts, but they are not characters."""
    rng = random.Random(0)
    for i in range(60):
        (tmp_path / f"{i:02d}.txt").write_text("".join(rng.choice("abcdé ") for _ in range(rng.randint(8, 30))))
    dm = LanguageModelDataModule(corpora=[], paths=str(tmp_path), tokenizer_kind=kind, block_size=16,
                                 val_fraction=0.25, test_fraction=0.05, batch_size=4)
    torch.manual_seed(0)
    task = CausalLM("gpt_nano", model_args=TINY_GPT)
    logged = quiet_trainer().validate(task, datamodule=dm, verbose=False)[0]
    nats, labels = 0.0, []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = task.model(batch["input_ids"]).double()
            nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                            reduction="sum"))
            labels += batch["labels"].flatten().tolist()
    chars = sum(1 for t in labels if t >= dm.tokenizer.num_specials)
    assert len(labels) - chars > 0.05 * len(labels)  # the case the definition matters for
    name = {"chars": "bpc", "bytes": "bpb"}[kind]
    assert logged[f"val/{name}"] == pytest.approx(nats / chars / math.log(2), rel=1e-5)
    assert logged["val/loss"] == pytest.approx(nats / len(labels), rel=1e-5)


def test_causal_lm_learns_below_unigram_and_round_trips(tmp_path):
    L.seed_everything(0)
    dm = LanguageModelDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", block_size=64, batch_size=16)
    task = CausalLM("gpt_nano", model_args=TINY_GPT, lr=3e-3, warmup=10, weight_decay=0.0)
    trainer = quiet_trainer(max_steps=150, limit_val_batches=8, val_check_interval=150)
    before = _validate(trainer, task, dm)
    trainer.fit(task, datamodule=dm)
    after = _validate(trainer, task, dm)
    assert task.hparams.vocab_size == dm.tokenizer.vocab_size
    # A uniform model scores ln(vocab); training must beat both it and the unigram model.
    assert before > dm.unigram_baseline and after < dm.unigram_baseline < math.log(dm.tokenizer.vocab_size)

    path = str(tmp_path / "lm.ckpt")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["LanguageModelDataModule"]["tokenizer"] == dm.tokenizer.state()
    tokenizer = tokenizer_from_state(checkpoint["zoo_tokenizer"])
    loaded = CausalLM.load_from_checkpoint(path)
    for (name, a), b in zip(task.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    prompts = ["The ", "x"]
    texts = loaded.generate_text(prompts, tokenizer, max_new_tokens=20, temperature=0)
    assert texts == task.generate_text(prompts, dm.tokenizer, max_new_tokens=20, temperature=0)
    sampled = loaded.generate_text(prompts, tokenizer, max_new_tokens=20, temperature=0.8, top_k=10, seed=3)
    assert sampled == loaded.generate_text(prompts, tokenizer, max_new_tokens=20, temperature=0.8, top_k=10, seed=3)
    for prompt, text in zip(prompts, texts + sampled):
        assert isinstance(text, str) and text.startswith(prompt) and len(text) <= len(prompt) + 20
    # Without max_new_tokens: 200, cut to what the 64 learned positions allow (<bos> + "The " + 60).
    longest = loaded.generate_text(["The "], tokenizer, temperature=0)[0]
    assert longest.startswith("The ") and len(longest) <= 4 + 60
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        loaded.generate_text(prompts, tokenizer, temperature=-1.0)
    from tasks import cli

    assert cli.main(["generate", path, "--prompt", "The ", "--temperature", "0", "--device", "cpu"]) == 0
    assert cli.main(["generate", path, "--prompt", "The ", "--temperature", "0"]) == 0  # default device
    assert cli.main(["generate", path, "--prompt", "x", "--top_p", "1.5", "--device", "cpu"]) == 2
    assert cli.main(["generate", str(tmp_path / "missing.ckpt"), "--device", "cpu"]) == 2


def test_masked_lm_trains_and_round_trips(tmp_path):
    L.seed_everything(0)
    dm = MaskedLMDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", max_length=64, batch_size=16)
    task = MaskedLM("bert_tiny", model_args=TINY_BERT, lr=3e-3, warmup=5, weight_decay=0.0)
    trainer = quiet_trainer(max_steps=40, limit_val_batches=6, val_check_interval=40)
    before = _validate(trainer, task, dm)
    trainer.fit(task, datamodule=dm)
    after = _validate(trainer, task, dm)
    assert after < before
    path = str(tmp_path / "mlm.ckpt")
    trainer.save_checkpoint(path)
    tokenizer = tokenizer_from_state(torch.load(path, weights_only=False)["zoo_tokenizer"])
    loaded = MaskedLM.load_from_checkpoint(path)
    filled = loaded.fill_mask(["def f(x): ret[MASK]rn x", "[MASK]he"], tokenizer)
    assert [len(t) for t in filled] == [len("def f(x): return x"), 3]
    assert filled[0].startswith("def f(x): ret") and filled[0].endswith("rn x")


def test_vocab_size_comes_from_the_tokenizer_or_must_fit_it():
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLM("gpt_nano", model_args={"vocab_size": 10})
    task = CausalLM("gpt_nano", model_args=TINY_GPT)
    with pytest.raises(ValueError, match="pass vocab_size"):
        task.configure_model()  # deferred, and no data module to ask
    given = CausalLM("gpt_nano", vocab_size=300, model_args=TINY_GPT)
    assert given.model.token_embed.weight.shape[0] == 300 and not given.model.token_embed.weight.is_meta


def test_datamodule_state_restores_the_tokenizer():
    dm = LanguageModelDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", block_size=64)
    saved = CharTokenizer("".join(sorted(set("abc def\n"))))
    dm.load_state_dict({"tokenizer": saved.state()})
    dm.setup("fit")
    assert dm.tokenizer.state() == saved.state() == dm.state_dict()["tokenizer"]
    text = dm.splits["train"][0][1]
    assert dm.train_set[0]["input_ids"][1:].tolist() == saved.encode(text)[:63]
    # Lightning restores a resumed run's data module after its setup: the data must follow.
    late = LanguageModelDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", block_size=64)
    late.setup("fit")
    late.load_state_dict({"tokenizer": saved.state()})
    assert late.tokenizer.state() == saved.state()
    assert late.train_set[0]["input_ids"][1:].tolist() == saved.encode(text)[:63]


# ---------------------------------------------------------------- bad input


def test_missing_and_bad_files_are_named(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        local_documents(str(missing))
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        local_documents(str(tmp_path / "nothing_here*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        local_documents(str(tmp_path / "empty"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        local_documents(str(tmp_path))
    dm = LanguageModelDataModule(corpora=[], paths="data/text_that_is_not_here")
    with pytest.raises(FileNotFoundError, match="data/text_that_is_not_here"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="corpora"):
        MaskedLMDataModule(corpora=["wikipedia"]).setup("fit")
    # Through a Trainer the error must surface as is, not be hidden by the teardown of a deferred model.
    tok = CharTokenizer("a")
    uses = ((CausalLM("gpt_nano", model_args=TINY_GPT), lambda task: task.generate_text(["a"], tok)),
            (MaskedLM("bert_tiny", model_args=TINY_BERT), lambda task: task.fill_mask(["[MASK]"], tok)))
    for task, use in uses:
        missing_dm = LanguageModelDataModule(corpora=[], paths="data/text_that_is_not_here")
        with pytest.raises(FileNotFoundError, match="data/text_that_is_not_here"):
            quiet_trainer(max_steps=1).fit(task, datamodule=missing_dm)
        with pytest.raises(RuntimeError, match="not built yet"):
            use(task)
