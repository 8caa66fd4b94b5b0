"""Seq2seq task and its data: date rendering, the held-out split, TSV errors, training, checkpoints.

Oracles: Python's own date parser (datetime.strptime and date.fromisoformat) for every
rendered format, set disjointness for the split, the file's own line numbers for TSV
errors, the loss at initialization for training, and a reloaded copy for checkpoints.
"""

from __future__ import annotations

import datetime as dt
import locale
import re

import lightning as L
import pytest
import torch

from tasks.data.dates import CASES, DATE_ALPHABET, FORMATS, DatesDataModule, render_date
from tasks.data.parallel import Seq2SeqCollate, TSVDataModule, read_tsv
from tasks.data.tokenizers import CharTokenizer
from tasks.seq2seq import Seq2Seq

pytestmark = pytest.mark.usefixtures("reference_attention")


def _strptime_pattern(pattern: str) -> str:
    # strptime reads unpadded numbers with %d / %m, and has no ordinal directive: the
    # suffix is stripped from the text and %o read as %d.
    return pattern.replace("%-d", "%d").replace("%-m", "%m").replace("%o", "%d")


def _english_names_locale() -> bool:
    return dt.date(2021, 3, 3).strftime("%A %B") == "Wednesday March"


def test_every_format_and_case_parses_back_to_the_date():
    assert _english_names_locale(), f"strptime's month names follow the locale {locale.setlocale(locale.LC_TIME)}"
    days = [dt.date(1969, 1, 1), dt.date(1999, 12, 31), dt.date(2000, 2, 29), dt.date(2021, 3, 3),
            dt.date(2011, 11, 11), dt.date(2022, 1, 22), dt.date(2068, 12, 31), dt.date(1987, 7, 13)]
    for date in days:
        for pattern in FORMATS:
            for case in CASES:
                text = render_date(date, pattern, case)
                assert set(text) <= set(DATE_ALPHABET), text
                plain = re.sub(r"(\d+)(st|nd|rd|th)", r"\1", text, flags=re.IGNORECASE)
                parsed = dt.datetime.strptime(plain, _strptime_pattern(pattern)).date()
                assert parsed == date, (pattern, case, text, parsed)
                if "%A" in pattern or "%a" in pattern:  # strptime ignores the weekday: check it alone
                    assert date.strftime("%a").lower() in text.lower(), text
                if "%o" in pattern:
                    assert re.search(r"\d+(st|nd|rd|th)", text, flags=re.IGNORECASE), text


def test_ordinals_follow_english_rules():
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th", 21: "21st", 22: "22nd",
                23: "23rd", 30: "30th", 31: "31st"}
    for day, text in expected.items():
        assert render_date(dt.date(2021, 1, day), "%o") == text


def test_examples_target_the_iso_date_of_their_source():
    dm = DatesDataModule(train_size=300, val_size=100, test_size=100)
    dm.setup()
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(dataset)):
            date, pattern, case = dataset.example(i)
            source, target = dataset[i]
            assert dt.date.fromisoformat(target) == date
            assert source == render_date(date, pattern, case)
    assert dm.train_set[7] == dm.train_set[7], "examples are deterministic per index"


def test_held_out_dates_never_appear_in_training():
    dm = DatesDataModule(train_size=5000, val_size=2000, test_size=2000)
    dm.setup()
    splits = dm.split_dates()
    train, val, test = (set(splits[s]) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) == (dm.end - dm.start).days + 1
    assert 0.75 < len(train) / (dm.end - dm.start).days < 0.85  # the 80 % share of the default split
    seen = {dm.train_set[i][1] for i in range(len(dm.train_set))}
    for held_out in (dm.val_set, dm.test_set):
        assert not seen & {held_out[i][1] for i in range(len(held_out))}


def test_dates_module_rejects_an_ambiguous_range():
    with pytest.raises(ValueError, match="100 years"):
        DatesDataModule(start="1950-01-01", end="2060-01-01")


def test_collate_pads_masks_and_shifts():
    tok = CharTokenizer("abc")
    batch = Seq2SeqCollate(tok, max_length=8)([("ab", "c"), ("abca", "cab")])
    assert batch["src_ids"].tolist() == [tok.encode("ab") + [0, 0], tok.encode("abca")]
    assert batch["src_mask"].tolist() == [[True, True, False, False], [True] * 4]
    eos = tok.eos_id
    assert batch["labels"].tolist() == [tok.encode("c") + [eos, -100, -100], tok.encode("cab") + [eos]]
    assert batch["tgt_ids"].tolist() == [[tok.bos_id] + tok.encode("c") + [eos, 0],
                                         [tok.bos_id] + tok.encode("cab")]


@pytest.mark.parametrize("kind", ["bytes", "subword"])
def test_pairs_are_cut_between_characters_and_the_cuts_are_counted(kind, tmp_path):
    """A byte or byte-level-subword cut may fall inside a character: the model would learn half
    of "ñ". The cut backs off to a character boundary (oracle: the text's own prefixes), and
    setup says how many pairs of each split are longer than max_length."""
    path = tmp_path / "train.tsv"
    lines = [f"año {i}	niño {i}" for i in range(30)] + ["a much longer source sentence ñ	aññññññññ"] * 2
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = TSVDataModule(train_path=str(path), tokenizer=kind, vocab_size=300, max_length=9, val_fraction=0.1)
    with pytest.warns(UserWarning, match=r"2 of \d+ training pairs are longer than max_length=9"):
        dm.setup("fit")
    tok = dm.tokenizer
    for n in range(1, 10):
        batch = Seq2SeqCollate(tok, max_length=n + 1)([("ñ" * 6, "ñ" * 6)])
        source = tok.decode(batch["src_ids"][0].tolist())
        target = tok.decode([i for i in batch["labels"][0].tolist() if i >= 0])
        for text, limit in ((source, n + 1), (target, n)):
            assert "\ufffd" not in text and ("ñ" * 6).startswith(text)
            assert len(tok.encode(text)) <= limit and len(tok.encode(text + "ñ")) > limit or text == "ñ" * 6


def test_unknown_characters_of_the_held_out_pairs_are_named(tmp_path):
    path, val = tmp_path / "train.tsv", tmp_path / "val.tsv"
    path.write_text("ab\tba\nba\tab\n", encoding="utf-8")
    val.write_text("abz\tzba\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"validation pairs: 1 character\(s\) .* as <unk>: 'z'"):
        TSVDataModule(train_path=str(path), val_path=str(val), tokenizer="chars").setup("fit")


def test_tsv_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("hello\tbonjour\n\nyes\toui\nno tab here\nok\td'accord\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4")):
        read_tsv(str(path))
    path.write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_tsv(str(path))
    path.write_text("a\tb\n\tempty source\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        read_tsv(str(path))
    path.write_text("a\tb\n\t\n", encoding="utf-8")  # both sides empty: not a blank line to skip
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected")):
        read_tsv(str(path))
    path.write_bytes(b"a\tb\nd\xe9j\xe0\tdone\n")  # Latin-1
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8")):
        read_tsv(str(path))
    path.write_bytes("\ufeffhello\tbonjour\r\nyes\toui\r\n".encode("utf-8"))  # BOM and CRLF, as Notepad saves
    assert read_tsv(str(path)) == [("hello", "bonjour"), ("yes", "oui")]
    missing = tmp_path / "no_such_corpus.tsv"
    with pytest.raises(FileNotFoundError, match="no_such_corpus.tsv"):
        TSVDataModule(train_path=str(missing)).setup("fit")


def test_tsv_module_holds_out_lines_and_restores_its_tokenizer(tmp_path):
    path = tmp_path / "train.tsv"
    lines = [f"{w} {i}\t{w.upper()} {i}" for i, w in enumerate(["red", "green", "blue", "cyan"] * 25)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = TSVDataModule(train_path=str(path), tokenizer="subword", vocab_size=300, val_fraction=0.1, batch_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10
    assert not set(dm.train_set) & set(dm.val_set)
    # Repeated pairs and a second translation of one source: held out with all their lines.
    lines += ["red 0\tRED 0", "red 0\tROUGE 0", "green 1\tGREEN 1"] * 3
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    again = TSVDataModule(train_path=str(path), tokenizer="chars", val_fraction=0.3, seed=3)
    again.setup("fit")
    train_sources, val_sources = {s for s, _ in again.train_set}, {s for s, _ in again.val_set}
    assert not train_sources & val_sources and len(val_sources) == 30
    assert sorted(again.train_set + again.val_set) == sorted(tuple(line.split("\t")) for line in lines)
    restored = TSVDataModule(train_path=str(path))
    restored.load_state_dict(dm.state_dict())
    for source, target in dm.val_set:
        assert restored.tokenizer.encode(source) == dm.tokenizer.encode(source)
        assert dm.tokenizer.decode(dm.tokenizer.encode(target)) == target


def _task(**kwargs) -> Seq2Seq:
    return Seq2Seq(model="seq2seq_tiny", vocab_size=len(DATE_ALPHABET) + 5, lr=3e-3, warmup=5,
                   model_args={"dim": 64, "attn_backend": "sdpa"}, **kwargs)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_training_lowers_the_loss_and_checkpoints_round_trip(tmp_path):
    dm = DatesDataModule(train_size=40 * 32, val_size=64, test_size=64, batch_size=32)
    task = _task()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        before = float(task._loss(batch))
    trainer = _trainer(tmp_path, max_steps=40, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(task, dm)
    with torch.no_grad():
        after = float(task._loss(batch))
    # Baseline: the entropy of the target symbols' frequencies in this batch, the loss of the
    # best model that ignores both the source and the position. Learning where "-", eos and
    # the leading digits of years, months and days go already beats it.
    labels = batch["labels"][batch["labels"] != -100]
    p = torch.bincount(labels).float() / labels.numel()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert after < unigram < before, (before, unigram, after)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/exact_match"]) <= 1.0 and float(metrics["val/cer"]) >= 0.0

    path = tmp_path / "dates.ckpt"
    trainer.save_checkpoint(path)
    loaded = Seq2Seq.load_from_checkpoint(path, map_location="cpu")  # no data module: hparams + tokenizer
    sources = ["3 March 2021", "Mar 3, 2021", "tuesday, march 3rd 2021"]
    task.eval()
    assert loaded.generate_text(sources) == task.generate_text(sources, dm.tokenizer)
    for a, b in zip(loaded.state_dict().values(), task.state_dict().values()):
        assert torch.equal(a, b)
    beams = loaded.generate_text(sources, num_beams=3, max_new_tokens=12)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)


def test_exact_match_counts_whole_strings(tmp_path):
    """val/exact_match and val/cer against answers computed here from the decoded strings."""
    dm = DatesDataModule(train_size=64, val_size=48, test_size=48, batch_size=16)
    task = _task(max_new_tokens=12)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    metrics = trainer.validate(task, dm, verbose=False)[0]
    predictions, references = [], []
    for batch in dm.val_dataloader():
        predictions += task.decode(batch["src_ids"], batch["src_mask"])
        references += batch["target_text"]
    exact = sum(p == r for p, r in zip(predictions, references)) / len(references)
    assert metrics["val/exact_match"] == pytest.approx(exact)

    def edits(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
        return row[-1]

    cer = sum(edits(p, r) for p, r in zip(predictions, references)) / sum(len(r) for r in references)
    assert metrics["val/cer"] == pytest.approx(cer, rel=1e-5)


def test_validation_loss_is_the_mean_over_every_target_token_whatever_the_batching(tmp_path):
    """Targets of different lengths in batches of unequal size: val/loss is the token mean over
    the split (oracle: one float64 cross-entropy over all the split's logits), not a mean of
    batch means, so it does not depend on the batch size."""
    path = tmp_path / "pairs.tsv"
    lines = [f"{i} {'x' * (i % 7)}\t{'y' * (1 + (i * 5) % 23)}" for i in range(40)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    task = Seq2Seq(model="seq2seq_tiny", vocab_size=64, max_new_tokens=4, model_args={"dim": 32, "depth": 1})
    got = []
    for batch_size in (3, 7):
        dm = TSVDataModule(train_path=str(path), val_path=str(path), tokenizer="chars", batch_size=batch_size)
        got.append(_trainer(tmp_path, max_steps=1, enable_checkpointing=False).validate(task, dm, verbose=False)[0])
    logits, labels = [], []
    task.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits.append(task(batch["src_ids"], batch["tgt_ids"], batch["src_mask"]).double().flatten(0, 1))
            labels.append(batch["labels"].flatten())
    want = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels), ignore_index=-100,
                                             label_smoothing=task.hparams.label_smoothing).item()
    assert [m["val/loss"] for m in got] == [pytest.approx(want, rel=1e-5)] * 2


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    task = Seq2Seq(model="seq2seq_tiny", vocab_size=40, model_args={"dim": 32, "attn_backend": "sdpa"})
    with pytest.raises(ValueError, match="at least 72"):
        _trainer(tmp_path, max_steps=1).fit(task, DatesDataModule(train_size=32, val_size=8, test_size=8))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_only_text_and_eos_are_decoded_from_a_larger_model_vocabulary(num_beams):
    """The model's 128 ids hold the 72 of the dates tokenizer: decoding another id (or a special but
    <eos>) would be dropped by the tokenizer and hidden from exact match. Making every such id the
    model's favourite must not change what is decoded."""
    torch.manual_seed(0)
    task = Seq2Seq(model="seq2seq_tiny", vocab_size=128, num_beams=num_beams, max_new_tokens=12,
                   model_args={"dim": 32, "attn_backend": "sdpa"}).eval()
    tok = CharTokenizer(DATE_ALPHABET)
    batch = task.text_batch(["3 March 2021", "Sunday, 22 January 2023"], tok)
    with torch.no_grad():
        expected = task.decode(batch["src_ids"], batch["src_mask"], tok)
        bias = torch.zeros(128)
        bias[[tok.pad_id, tok.bos_id, tok.unk_id, tok.mask_id, *range(tok.vocab_size, 128)]] = 100.0
        task.model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
        assert task.decode(batch["src_ids"], batch["src_mask"], tok) == expected
    assert all(len(text) == 12 for text in expected)  # untrained: no <eos> within 12 tokens, nothing dropped


def test_sources_with_characters_outside_the_alphabet_warn():
    with pytest.warns(UserWarning, match="sources: 1 character\\(s\\) outside the tokenizer's alphabet .* '€'"):
        _task().text_batch(["3 March 2021 €"], CharTokenizer(DATE_ALPHABET))


def test_generate_text_without_a_tokenizer_says_what_is_missing():
    with pytest.raises(RuntimeError, match="tokenizer"):
        _task().generate_text(["3 March 2021"])


def test_generate_text_samples_with_a_temperature():
    """temperature 0 (the default) is the greedy decode that validation measures; above 0 it
    samples, reproducibly with a seed, only inside the tokenizer's text (suppressed ids stay
    out); top_k=1 is greedy again. Contradictory or bad options are refused."""
    torch.manual_seed(0)
    task = _task(max_new_tokens=12)
    tokenizer = CharTokenizer(DATE_ALPHABET)
    sources = ["3 March 2021", "Mar 3, 2021", "tuesday, march 3rd 2021"]
    greedy = task.generate_text(sources, tokenizer)
    assert task.generate_text(sources, tokenizer, temperature=0) == greedy
    sampled = task.generate_text(sources, tokenizer, temperature=1.5, seed=4)
    assert sampled == task.generate_text(sources, tokenizer, temperature=1.5, seed=4)
    assert sampled != greedy  # an untrained model's distributions are broad: 36 characters drawn
    assert all(set(text) <= set(DATE_ALPHABET) for text in sampled)
    assert task.generate_text(sources, tokenizer, temperature=0.9, top_k=1, seed=1) == greedy
    for kwargs, says in ((dict(temperature=-1.0), "temperature must be >= 0"),
                         (dict(top_k=3), "give a temperature > 0"),
                         (dict(temperature=0.5, num_beams=2), "needs num_beams=1"),
                         (dict(temperature=0.5, top_p=0.0), r"top_p must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=says):
            task.generate_text(sources, tokenizer, **kwargs)
