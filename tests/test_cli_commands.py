"""The argparse side of the `zoo` CLI (tasks/cli.py): generate, attention-map, demo, bench usage.

Checkpoints here are tiny untrained models saved through a Lightning Trainer, as `zoo fit`
saves them: what is checked is the command line around them, not what they generate.
"""

from __future__ import annotations

import argparse
import json
import os

import lightning as L
import pytest
import torch

import kernels
from tasks import bench_attention, cli, demo
from tasks.bench_attention import Shape
from tasks.data.tokenizers import CharTokenizer
from tasks.seq2seq import Seq2Seq
from tasks.text import CausalLM

SOURCE_POSITIONS = 16  # the tiny seq2seq encoder's max_seq_len


def _save(task, tokenizer, path) -> str:
    """Writes `task` as `zoo fit` would: through a Trainer, with the task's class and tokenizer."""
    task.tokenizer = tokenizer  # saved as zoo_tokenizer (tasks.base.ZooTask.on_save_checkpoint)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(task)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_corpus(["3 March 2021 -> 2021-03-03, hello world"])


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory, tokenizer):
    task = CausalLM("gpt_nano", vocab_size=tokenizer.vocab_size,
                    model_args={"dim": 32, "depth": 1, "heads": 2, "max_seq_len": 32})
    return _save(task, tokenizer, tmp_path_factory.mktemp("gpt") / "model.ckpt")


@pytest.fixture(scope="module")
def seq2seq_checkpoint(tmp_path_factory, tokenizer):
    task = Seq2Seq("seq2seq_tiny", vocab_size=tokenizer.vocab_size, max_new_tokens=4,
                   model_args={"dim": 32, "depth": 1, "heads": 2, "max_seq_len": SOURCE_POSITIONS})
    return _save(task, tokenizer, tmp_path_factory.mktemp("seq2seq") / "model.ckpt")


def _generate(*args):
    with kernels.reference_only():
        return cli.main(["generate", *args, "--device", "cpu"])


def _exit_status(argv) -> int:
    """cli.main's status, whether returned or raised as SystemExit (argparse's usage errors)."""
    try:
        with kernels.reference_only():
            return cli.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


# ---------------------------------------------------------------- zoo generate


def test_generate_usage_errors_exit_2_with_the_generate_prefix(gpt_checkpoint, seq2seq_checkpoint, tmp_path,
                                                               capsys):
    """Every wrong option or value: status 2 and `zoo generate: error: ` naming it and what is expected."""
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    no_task = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, no_task)
    cases = [
        ([gpt_checkpoint, "--bogus"], "unrecognized arguments: --bogus"),
        ([gpt_checkpoint, "--max_new_tokens", "x"], "argument --max_new_tokens: expected a positive int, got 'x'"),
        ([gpt_checkpoint, "--num_beams", "2"], "--num_beams: a CausalLM checkpoint does not take it; it takes "
                                               "--max_new_tokens, --temperature, --top_k, --top_p, --seed"),
        ([seq2seq_checkpoint, "--prompt", "3", "--temperature", "0", "--top_k", "2"],
         "top_k and top_p filter sampling: give a temperature > 0 with them"),
        ([gpt_checkpoint, "--temperature", "0", "--top_p", "0.9"],
         "top_k and top_p filter sampling: give a temperature > 0 with them"),
        ([seq2seq_checkpoint, "--prompt", "3", "--temperature", "0.7", "--num_beams", "2"],
         "do_sample=True needs num_beams=1 (beam search does not sample)"),
        ([str(not_a_checkpoint)], f"{not_a_checkpoint}: not a checkpoint"),
        ([str(no_task)], f"{no_task}: not a tritonzoo task checkpoint (no 'zoo_task' entry)"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert _exit_status(["generate", *args, "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("zoo generate: error: ") and message in last, (args, err)
        if "unrecognized" in message:
            assert err.startswith("usage: zoo generate ")  # the subcommand's usage, not `zoo`'s
    devices = [("foo", "argument --device: invalid choice: 'foo'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "--device cuda: no CUDA device is available"))
    for device, message in devices:
        capsys.readouterr()
        assert _exit_status(["generate", gpt_checkpoint, "--device", device]) == 2, device
        assert message in capsys.readouterr().err


def test_max_new_tokens_zero_is_refused_for_decoders_and_encoder_decoders_alike(gpt_checkpoint, seq2seq_checkpoint,
                                                                                capsys):
    """--max_new_tokens 0 is a usage error for both kinds of checkpoint (it was accepted for GPT,
    returning the prompt, and refused for seq2seq). Refused rather than accepted because zero new
    tokens is no generation at all, and Hugging Face's generate refuses it too: its
    GenerationConfig.validate, the oracle here. 1 is accepted by both."""
    from transformers import GenerationConfig

    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0).validate()
    GenerationConfig(max_new_tokens=1).validate()
    # A decoder prints the prompt and its continuation, an encoder-decoder the output alone.
    for checkpoint, longest in ((gpt_checkpoint, len("3") + 1), (seq2seq_checkpoint, 1)):
        capsys.readouterr()
        assert _exit_status(["generate", checkpoint, "--prompt", "3", "--max_new_tokens", "0", "--device", "cpu"]) == 2
        assert ("zoo generate: error: argument --max_new_tokens: expected a positive int (at least 1 new token), "
                "got 0") in capsys.readouterr().err
        assert _generate(checkpoint, "--prompt", "3", "--max_new_tokens", "1") == 0
        heading, text = capsys.readouterr().out.split("\n", 1)
        assert heading == "--- '3'" and len(text.rstrip("\n")) <= longest


def test_a_source_past_the_encoders_positions_is_named_in_tokens(seq2seq_checkpoint, tokenizer, capsys):
    """A source longer than the encoder's positions: its length in tokens and the model's limit
    (the tokenizer's own count, and the max_seq_len the checkpoint was built with), not the
    position table's index; a source of exactly the limit decodes."""
    fits = "3 March 2021 -> 2"
    fits = fits[:SOURCE_POSITIONS]
    assert len(tokenizer.encode(fits)) == SOURCE_POSITIONS
    assert _generate(seq2seq_checkpoint, "--prompt", fits) == 0
    long = "3 March 2021, hello world"
    tokens = len(tokenizer.encode(long))
    assert tokens > SOURCE_POSITIONS
    capsys.readouterr()
    assert _generate(seq2seq_checkpoint, "--prompt", long) == 2
    assert capsys.readouterr().err == (f"zoo generate: error: the source is {tokens} tokens long; the model accepts "
                                       f"at most {SOURCE_POSITIONS} (its encoder's max_seq_len)\n")
    assert _generate(seq2seq_checkpoint, "--prompt", "3", "--prompt", long) == 2
    assert f"source 1 is {tokens} tokens long" in capsys.readouterr().err


# ---------------------------------------------------------------- abbreviations and usage


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """(subcommand path, parser) of every innermost subcommand of `parser`."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_no_zoo_subcommand_takes_an_abbreviated_option():
    """Every long option of every subcommand, less its last letter, is unrecognized rather than
    taken for the option (argparse's allow_abbrev): `--max_new_tok` is not --max_new_tokens."""
    parser = cli.build_parser()
    checked = 0
    for path, leaf in _leaf_parsers(parser):
        positionals = ["x.ckpt"] if any(a.dest == "checkpoint" for a in leaf._actions) else []
        for action in leaf._actions:
            for option in action.option_strings:
                if not option.startswith("--") or option == "--help":
                    continue
                abbreviation = option[:-1]
                args, unknown = parser.parse_known_args([*path, *positionals, abbreviation])
                assert abbreviation in unknown, (path, option)
                checked += 1
    assert checked >= 20  # generate, attention-map, demo, compare and the four benchmarks have options


def test_bench_usage_errors_show_the_bench_usage(capsys):
    """Unknown options and refused values of `zoo bench <target>` print that target's usage and
    prog; an unknown target, bench's. (`zoo bench nonsense` already did.)"""
    for argv, usage, message in (
            (["bench", "attention", "--bogus"], "usage: zoo bench attention ",
             "zoo bench attention: error: unrecognized arguments: --bogus"),
            (["bench", "decode", "--quick", "--device", "cpu", "extra"], "usage: zoo bench decode ",
             "zoo bench decode: error: unrecognized arguments: extra"),
            (["bench", "attention", "--device", "cpu"], "usage: zoo bench attention ",
             "zoo bench attention: error: the full attention benchmark needs a CUDA GPU"),
            (["bench", "nonsense"], "usage: zoo bench ", "zoo bench: error: argument TARGET: invalid choice"),
            (["demo", "--bogus"], "usage: zoo demo ", "zoo demo: error: unrecognized arguments: --bogus"),
            (["compare", "--bogus"], "usage: zoo compare ", "zoo compare: error: unrecognized arguments: --bogus")):
        assert _exit_status(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(usage) and message in err, (argv, err)


# ---------------------------------------------------------------- zoo attention-map


def test_attention_map_writes_next_to_the_run_or_else_the_checkpoint(gpt_checkpoint, tmp_path, capsys):
    """In runs/<name>/version_<n>/checkpoints/: figures in the run folder's attention_maps/.
    Elsewhere: in attention_maps/ beside the checkpoint, whose folder is also where the run
    config is looked for; nothing is written above it. --out wins over both."""
    import shutil

    elsewhere = tmp_path / "exported" / "model.ckpt"
    in_a_run = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    for path in (elsewhere, in_a_run):
        path.parent.mkdir(parents=True)
        shutil.copy(gpt_checkpoint, path)
    with kernels.reference_only():
        assert cli.main(["attention-map", str(elsewhere), "--text", "hello"]) == 0
        assert os.listdir(tmp_path / "exported" / "attention_maps") == ["text_attention.png"]
        assert sorted(os.listdir(tmp_path)) == ["exported", "runs"]
        assert cli.main(["attention-map", str(in_a_run), "--text", "hello"]) == 0
        assert os.listdir(tmp_path / "runs" / "gpt" / "version_0" / "attention_maps") == ["text_attention.png"]
        assert sorted(os.listdir(tmp_path / "runs" / "gpt")) == ["version_0"]
        assert cli.main(["attention-map", str(elsewhere), "--text", "hello", "--out", str(tmp_path / "o")]) == 0
        assert os.listdir(tmp_path / "o") == ["text_attention.png"]
        capsys.readouterr()
        assert cli.main(["attention-map", str(elsewhere)]) == 2  # no --text: the run config, beside it
    assert f"no run config at {tmp_path / 'exported' / 'config.yaml'}" in capsys.readouterr().err


def test_attention_map_names_a_file_that_is_not_a_task_checkpoint(tmp_path, capsys):
    """As `zoo generate` does: status 2 and the file named (before: an UnpicklingError traceback)."""
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_bytes(bytes(range(256)))
    no_task = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, no_task)
    for path, message in ((not_a_checkpoint, "not a checkpoint"),
                          (no_task, "not a tritonzoo task checkpoint (no 'zoo_task' entry)")):
        capsys.readouterr()
        assert cli.main(["attention-map", str(path), "--text", "hello"]) == 2
        assert capsys.readouterr().err.startswith(f"zoo attention-map: error: {path}: {message}")


# ---------------------------------------------------------------- zoo demo


def test_demo_writes_its_benchmark_to_out(tmp_path, monkeypatch):
    """--out DIR takes the benchmark's files; without it they go to ./bench_out/demo as before;
    a file as --out is a usage error before anything runs. (The interpreted correctness check
    is test_bench_cli.py's slow test_demo_end_to_end; here it is stubbed out.)"""
    monkeypatch.setattr(demo, "run_checks", lambda device: True)
    monkeypatch.setattr(bench_attention, "cpu_shapes", lambda: [Shape(1, 32, 2, 16, False, "float32")])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["attention.json", "attention.png"]
    with open(out / "attention.json") as f:
        assert json.load(f)["metadata"]["command"] == f"zoo demo --out {out}"
    assert not (tmp_path / "bench_out").exists()
    assert cli.main(["demo"]) == 0
    assert sorted(os.listdir(tmp_path / "bench_out" / "demo")) == ["attention.json", "attention.png"]

    def never(device):
        raise AssertionError("ran despite a bad --out")

    monkeypatch.setattr(demo, "run_checks", never)
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "taken")])
    assert exit_info.value.code == 2
