"""`zoo compare` on the CPU: FLOP formula, references at the same configuration, the run's outputs, --runs.

Oracles: torch.utils.flop_counter and timm's published GMACs for the FLOPs; the timm and
Hugging Face models' own parameter counts, and zoo.weights' independent readers of those
models (from_timm / from_hf) for "the same configuration"; hand-computed interpolation
for the runs' wall time. No timing is asserted: only that each measurement exists.
"""

import csv
import json
import math
import os

import pytest
import torch
import transformers

import zoo
from tasks import compare, compare_report, compare_runs
from tasks.compare_measure import (analytic_forward_flops, counted_forward_flops, make_workload,
                                   trainable_parameters)
from tasks.compare_reference import NoReference, reference_for
from zoo.vision import to_pair

pytestmark = pytest.mark.usefixtures("reference_attention")
transformers.logging.set_verbosity_error()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _build(preset, overrides, device="meta"):
    # torchaudio's filter bank cannot be made on meta: speech models are built on the CPU.
    with torch.device("cpu" if preset.startswith(("speech", "whisper")) else device):
        return zoo.create_model(preset, **overrides)


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, overrides, seq_len", [
    ("vit_digits", {}, None),
    ("vit_tiny_patch16_224", {}, None),
    ("gpt_nano", {}, 64),
    ("gpt_nano", {"kv_heads": 2, "mlp": "swiglu", "positions": "rotary"}, 48),  # GQA, gated MLP
    ("bert_tiny", {}, 40),
    ("bert_tiny", {"num_classes": 3, "mlm_head": False}, 40),  # pooler + classifier head
    ("seq2seq_tiny", {}, 24),  # cross-attention over the encoder's output
    ("speech_tiny", {}, 50),  # waveforms: the mel filter bank matmul is counted too
    ("whisper_tiny_encoder", {"depth": 2}, 64),  # log-mels
    ("whisper_tiny_encoder", {"depth": 1, "vocab_size": 30}, 30),  # CTC head
])
def test_analytic_flops_equal_flop_counter(preset, overrides, seq_len):
    model = _build(preset, overrides)
    w = make_workload(model, 2, seq_len, "cpu" if preset.startswith(("speech", "whisper")) else "meta")
    counted = counted_forward_flops(lambda **kw: zoo.create_model(preset, **{**overrides, **kw}), w)
    # Exact: the formula counts the same matmuls and convolutions the counter sees (it ignores
    # biases, norms, softmax and the STFT, and so does the formula).
    assert counted > 0 and analytic_forward_flops(model, w) == counted


def test_vit_base_flops_match_timms_published_gmacs():
    # timm's model card for vit_base_patch16_224: 17.6 GMACs at 224x224 (2 FLOPs per MAC).
    model = _build("vit_base_patch16_224", {})
    flops = analytic_forward_flops(model, make_workload(model, 1, None, "meta"))
    assert abs(flops / 2e9 - 17.6) < 0.05


def test_config_yaml_flops_match_counter():
    target = compare.target_from_config("configs/text/bert_mlm.yaml")  # bert_tiny with rotary positions
    model = _build(target.preset, target.overrides)
    w = make_workload(model, 1, 32, "meta")
    factory = lambda **kw: zoo.create_model(target.preset, **{**target.overrides, **kw})  # noqa: E731
    assert analytic_forward_flops(model, w) == counted_forward_flops(factory, w)


# --------------------------------------------------------------------------------------
# References at the same configuration
# --------------------------------------------------------------------------------------


def _backbone_fields(cfg):
    """A TransformerConfig's fields as what they compute: the MLP width rather than ratio or hidden size."""
    values = {k: v for k, v in vars(cfg).items() if k not in ("attn_backend", "mlp_ratio", "mlp_hidden")}
    return {**values, "mlp_width": cfg.mlp_width}


def _same_backbone(theirs, ours):
    a, b = _backbone_fields(theirs), _backbone_fields(ours)
    assert a.keys() == b.keys()
    for key in a:
        # timm stores drop-path rates as float32 values.
        same = math.isclose(a[key], b[key], rel_tol=1e-6) if isinstance(b[key], float) else a[key] == b[key]
        assert same, f"{key}: {a[key]!r} read back, ours {b[key]!r}"


@pytest.mark.parametrize("preset", ["vit_digits", "vit_tiny_patch16_224", "bert_tiny", "gpt_nano"])
def test_reference_has_our_parameter_count(preset):
    model = _build(preset, {})
    with torch.device("meta"):
        ref = reference_for(model).build()
    assert trainable_parameters(ref) == sum(p.numel() for p in ref.parameters()) == trainable_parameters(model)


@pytest.mark.parametrize("preset, overrides", [("vit_digits", {}), ("vit_digits", {"global_pool": "token",
                                                                                    "class_token": True}),
                                                ("bert_tiny", {"depth": 1}), ("gpt_nano", {"depth": 1})])
def test_reference_reads_back_as_our_config(preset, overrides):
    # zoo.weights reads timm / HF models into zoo configs; the reference built from ours must read back as ours.
    model = _build(preset, overrides, device="cpu")
    ref = reference_for(model).build()
    back = zoo.from_timm(ref) if preset.startswith("vit") else zoo.from_hf(ref)
    _same_backbone(back.cfg.backbone, model.cfg.backbone)
    assert _fields(back.cfg) == _fields(model.cfg)


def _fields(cfg):
    """A model config's own fields, sizes as pairs (timm reports them so), without what no module records."""
    values = {k: v for k, v in vars(cfg).items() if k not in ("backbone", "pos_init_std")}
    for key in ("img_size", "patch_size"):
        if key in values:
            values[key] = to_pair(values[key], key)
    if "fc_norm" in values:
        values["fc_norm"] = cfg.use_fc_norm  # None means "as global_pool implies"
    return values


def test_whisper_reference_differs_by_the_key_bias_only():
    model = _build("whisper_tiny_encoder", {"depth": 2, "dim": 64, "heads": 4, "max_seq_len": 50})
    w = make_workload(model, 1, None, "cpu")
    reference = reference_for(model, w)
    ref = reference.build()
    hf_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    # HF's own count: every parameter but the frozen position table (50 x 64), which ours keeps as a buffer.
    assert hf_trainable == sum(p.numel() for p in ref.parameters()) - 50 * 64
    # Whisper's k_proj has no bias; ours is part of the fused qkv Linear: 2 layers x 64.
    assert trainable_parameters(model) - hf_trainable == 2 * 64 == reference.param_difference
    _same_backbone(zoo.from_hf(ref).cfg.backbone, model.cfg.backbone)


@pytest.mark.parametrize("preset, overrides, frames, why", [
    ("seq2seq_tiny", {}, None, "Seq2SeqTransformer"),
    ("speech_tiny", {}, None, "head"),
    ("bert_tiny", {"positions": "rotary"}, None, "positions"),
    ("gpt_nano", {"norm": "rmsnorm"}, None, "norm"),
    ("gpt_nano", {"kv_heads": 1}, None, "kv_heads"),
    ("vit_digits", {"mlp": "swiglu"}, None, "swiglu"),
    ("whisper_tiny_encoder", {"depth": 1}, 100, "3000 frames"),
])
def test_no_reference_says_why(preset, overrides, frames, why):
    model = _build(preset, overrides)
    w = make_workload(model, 1, frames, "meta") if frames else None
    with pytest.raises(NoReference, match=why):
        reference_for(model, w)


# --------------------------------------------------------------------------------------
# Names, configs and bad input
# --------------------------------------------------------------------------------------


SEQ2SEQ_YAML = """\
model:
  class_path: tasks.seq2seq.Seq2Seq
  init_args:
    model: seq2seq_tiny
    vocab_size: 72
    lr: 0.003
    model_args:
      attn_backend: sdpa
"""
CTC_YAML = """\
model:
  class_path: tasks.speech.SpeechRecognition
  init_args:
    model: whisper_base_encoder
    model_args: {max_seq_len: 1800, dropout: 0.1}
"""
VISION_YAML = """\
model:
  class_path: tasks.ImageClassification
  init_args: {model: vit_digits, num_classes: 7, model_args: {depth: 2}}
"""


def test_config_targets_take_the_tasks_model_arguments(tmp_path):
    (tmp_path / "dates.yaml").write_text(SEQ2SEQ_YAML)
    seq = compare.resolve(str(tmp_path / "dates.yaml"))
    assert (seq.preset, seq.source, seq.label) == ("seq2seq_tiny", str(tmp_path / "dates.yaml"), "dates (seq2seq_tiny)")
    # Seq2Seq's vocab_size sizes both vocabularies (tasks/seq2seq.py); model_args come on top.
    assert seq.overrides == {"src_vocab_size": 72, "tgt_vocab_size": 72, "attn_backend": "sdpa"}
    (tmp_path / "ctc.yaml").write_text(CTC_YAML)
    # SpeechRecognition: no classifier, a CTC head of its default 33 symbols, blank 0.
    assert compare.resolve(str(tmp_path / "ctc.yaml")).overrides == {
        "num_classes": 0, "vocab_size": 33, "blank_id": 0, "max_seq_len": 1800, "dropout": 0.1}
    (tmp_path / "vit.yaml").write_text(VISION_YAML)
    target = compare.resolve(str(tmp_path / "vit.yaml"))
    assert target.overrides == {"num_classes": 7, "depth": 2}
    assert _build(target.preset, target.overrides).cfg.num_classes == 7
    # Every config in the repository names a preset compare can build.
    for path in sorted(__import__("glob").glob("configs/**/*.yaml", recursive=True)):
        assert compare.resolve(path).preset in zoo.list_models(), path


def test_bad_names_and_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="'vit_digits'"):
        compare.resolve("vit_digit")
    with pytest.raises(ValueError, match="configs/text/gpt_char.yaml"):
        compare.resolve("gpt_chars")
    with pytest.raises(ValueError, match="--backends"):
        compare.parse_backends("triton,flash")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: tasks.ImageClassification\n")
    with pytest.raises(ValueError, match="model.init_args.model"):
        compare.resolve(str(bad))
    model = _build("gpt_nano", {})
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 256\]"):
        make_workload(model, 1, 257, "meta")
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        compare.run(["gpt_nano"], device="cpu", runs=[str(tmp_path / "nothing")], out_dir=None)


def test_bad_options_fail_before_anything_is_timed(tmp_path, monkeypatch):
    def timed(*args, **kwargs):
        raise AssertionError("a model was measured despite bad options")

    monkeypatch.setattr(compare, "compare_model", timed)
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--peak-tflops must be a positive number"):
            compare.run(["gpt_nano"], device="cpu", peak_tflops=bad, out_dir=None)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--out .* is a file; expected a folder"):
        compare.run(["gpt_nano"], device="cpu", out_dir=str(a_file))
    # A logged run stopped before its first validation has no quality metric: refused up front.
    _write_run(tmp_path / "early" / "version_0", [{"epoch": 0, "step": 5, "train/loss_step": 2.0}])
    with pytest.raises(ValueError, match="holds no values"):
        compare.run(["gpt_nano"], device="cpu", runs=[str(tmp_path / "early")], out_dir=None)
    # A length or an override that only a later model refuses (before: the earlier models were timed first).
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 256\], got 5000"):
        compare.run(["vit_digits", "gpt_nano"], device="cpu", seq_len=5000, out_dir=None)
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  class_path: tasks.ImageClassification\n  init_args:\n    model: vit_digits\n"
                      "    model_args:\n      dept: 2\n")
    with pytest.raises(TypeError, match="has no option 'dept'; did you mean 'depth'"):
        compare.run(["gpt_nano", str(config)], device="cpu", out_dir=None)


def test_median_step_restarts_the_cuda_peak_after_warmup(monkeypatch):
    """The first calls autotune (triton's do_bench allocates 256 MiB of scratch): not the step's memory."""
    from tasks import compare_measure

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    compare_measure.median_step_ms(lambda: events.append("step"), "cuda", steps=2, warmup=3)
    assert events == ["step"] * 3 + ["reset"] + ["step"] * 2


def test_timm_reference_drops_where_ours_does():
    """With dropout > 0, the timm ViT applies dropout at the same places as ours (not also inside the MLP)."""
    model = _build("vit_digits", {"dropout": 0.1, "depth": 2}, device="cpu")
    reference = reference_for(model).build()

    def dropout_calls(module):
        calls = []
        hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in module.modules()
                 if isinstance(m, torch.nn.Dropout) and m.p > 0]
        module.train()(torch.randn(2, 1, 8, 8))
        for h in hooks:
            h.remove()
        return len(calls)

    assert dropout_calls(model) == dropout_calls(reference) == 1 + 2 * 2  # embeddings, then 2 per block


def test_cli_reports_bad_input_with_status_2(capsys):
    assert compare.main(["gpt_nan", "--device", "cpu"]) == 2
    assert "did you mean 'gpt_nano'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Logged runs
# --------------------------------------------------------------------------------------


def _write_run(folder, rows, task="tasks.ImageClassification"):
    folder.mkdir(parents=True)
    columns = ["epoch", "step", "train/loss_step", "train/time", "val/acc", "val/loss"]
    # Lightning's CSVLogger: csv module defaults (\r\n line ends), empty cells for absent values.
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if task:
        (folder / "config.yaml").write_text(f"model:\n  class_path: {task}\n  init_args:\n    model: vit_digits\n")


RUN_ROWS = [
    {"epoch": 0, "step": 10, "train/time": 2.0}, {"epoch": 0, "step": 10, "train/loss_step": 2.1},
    {"epoch": 0, "step": 15, "val/acc": 0.5, "val/loss": 1.5},
    {"epoch": 1, "step": 20, "train/time": 4.0}, {"epoch": 1, "step": 20, "val/acc": 0.75, "val/loss": 1.0},
    {"epoch": 2, "step": 25, "val/acc": 0.7, "val/loss": 0.9},
]


def test_read_run_takes_the_monitored_metric_and_training_time(tmp_path):
    _write_run(tmp_path / "digits" / "version_0", RUN_ROWS)
    [path] = compare_runs.find_metrics_files([str(tmp_path / "digits")])
    run = compare_runs.read_run(path)
    assert (run["run"], run["metric"], run["mode"]) == ("digits/version_0", "val/acc", "max")
    # Lightning logs the 0-based index of the last step: the steps done are one more.
    assert run["steps"] == [16, 21, 26] and run["values"] == [0.5, 0.75, 0.7]
    # train/time: 2 s at step 11, 4 s at step 21 -> 3 s at 16; past the end at the last rate (0.2 s/step).
    assert run["seconds"] == pytest.approx([3.0, 4.0, 5.0])
    assert compare_runs.best(run) == (0.75, 21)


def test_read_run_fallbacks(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "train/time"} for r in RUN_ROWS]
    _write_run(tmp_path / "a" / "version_3", rows, task=None)
    run = compare_runs.read_run(tmp_path / "a" / "version_3" / "metrics.csv")
    assert (run["metric"], run["mode"]) == ("val/acc", "max")  # the first of PREFERRED_METRICS present
    assert run["seconds"] == [None, None, None] and run["time_source"] == "none"
    loss = compare_runs.read_run(tmp_path / "a" / "version_3" / "metrics.csv", metric="val/loss")
    assert loss["mode"] == "min" and compare_runs.best(loss) == (0.9, 26)
    # With TensorBoard events, their wall-clock stamps give the time (seconds since the first event).
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "a" / "version_3"))
    writer.add_scalar("train/loss_step", 2.1, 10, walltime=1000.0)
    for step, value, wall in ((15, 0.5, 1003.0), (20, 0.75, 1010.0), (25, 0.7, 1012.5)):
        writer.add_scalar("val/acc", value, step, walltime=wall)
    writer.close()
    timed = compare_runs.read_run(tmp_path / "a" / "version_3" / "metrics.csv")
    assert timed["seconds"] == pytest.approx([3.0, 10.0, 12.5]) and "TensorBoard" in timed["time_source"]


def test_runs_folder_skips_the_logs_of_validate_and_test(tmp_path):
    """`zoo validate|test` write version folders under the same run name, with val/ or test/
    columns only: a run-name folder or glob reads the training runs among them, and an
    evaluation folder named alone is refused with a message that says what it is."""
    _write_run(tmp_path / "digits" / "version_0", RUN_ROWS)
    for version, column in ((1, "val/acc"), (2, "test/acc")):
        folder = tmp_path / "digits" / f"version_{version}"
        folder.mkdir()
        (folder / "metrics.csv").write_text(f"epoch,step,{column}\r\n0,0,0.5\r\n")
    (tmp_path / "digits" / "version_3").mkdir()  # `zoo predict`: hparams only, no metrics.csv
    expected = [tmp_path / "digits" / "version_0" / "metrics.csv"]
    assert compare_runs.find_metrics_files([str(tmp_path / "digits")]) == expected
    assert compare_runs.find_metrics_files([str(tmp_path / "digits" / "version_*")]) == expected
    evaluation = tmp_path / "digits" / "version_1"
    assert compare_runs.find_metrics_files([str(evaluation)]) == [evaluation / "metrics.csv"]
    with pytest.raises(ValueError, match="not a training run's log"):
        compare_runs.read_run(evaluation / "metrics.csv")
    (tmp_path / "digits" / "version_0" / "metrics.csv").unlink()
    with pytest.raises(FileNotFoundError, match="only logs of `zoo validate/test`.*version_1"):
        compare_runs.find_metrics_files([str(tmp_path / "digits")])


def test_read_run_counts_the_steps_a_real_run_took(tmp_path):
    """The oracle is the trainer: 3 optimizer steps, validated at the end, read back as step 3."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from tasks import ImageClassification
    from tasks.data.vision import DigitsDataModule

    task = ImageClassification("vit_digits", model_args={"depth": 1, "attn_backend": "sdpa"})
    logger = CSVLogger(str(tmp_path), name="digits")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=3, limit_val_batches=1, logger=logger,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, DigitsDataModule(batch_size=16))
    run = compare_runs.read_run(os.path.join(logger.log_dir, "metrics.csv"))
    assert run["steps"] == [trainer.global_step] == [3]


# --------------------------------------------------------------------------------------
# A whole run, at tiny sizes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, threshold, says", [
    ("cpu", 1 << 27, "PyTorch paths"), ("cuda", 1 << 27, "from 134,217,728 elements a call, torch's fused ops below"),
    ("cuda", 0, "at every size (TRITONZOO_KERNEL_MIN_ELEMENTS=0)")])
def test_kernel_ops_note_says_where_the_kernels_ran(device, threshold, says, monkeypatch):
    from zoo import layers
    monkeypatch.setattr(layers, "KERNEL_MIN_ELEMENTS", threshold)
    assert says in compare.kernel_ops_note(device)


def test_cpu_run_writes_every_output(tmp_path):
    _write_run(tmp_path / "runs" / "digits" / "version_0", RUN_ROWS)
    (tmp_path / "seq2seq_dates.yaml").write_text(SEQ2SEQ_YAML)
    out = tmp_path / "out"
    report = compare.run(["vit_digits", "gpt_nano", str(tmp_path / "seq2seq_dates.yaml")], batch_size=2, seq_len=16,
                         device="cpu", steps=1, warmup=0, backends=["triton", "sdpa"],
                         runs=[str(tmp_path / "runs" / "*")], out_dir=str(out), command="zoo compare test")
    names = ["compare.md", "compare.csv", "compare.json", "compare_throughput.png", "compare_quality.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for png in names[3:]:
        assert (out / png).read_bytes().startswith(PNG_MAGIC)

    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(report)) and set(saved) == {"metadata", "models", "runs"}
    for key in ("device", "torch", "triton", "timm", "transformers", "date", "command", "precision", "timing"):
        assert saved["metadata"][key], key
    assert saved["metadata"]["command"] == "zoo compare test" and saved["metadata"]["peak_tflops"] is None
    assert f"- our ops: {saved['metadata']['kernel_ops']}" in (out / "compare.md").read_text()

    with (out / "compare.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == compare_report.CSV_COLUMNS
    impls = [(r["model"], r["implementation"]) for r in rows]
    assert impls == [("vit_digits", "ours (triton)"), ("vit_digits", "ours (sdpa)"),
                     ("vit_digits", "timm VisionTransformer"), ("gpt_nano", "ours (triton)"),
                     ("gpt_nano", "ours (sdpa)"), ("gpt_nano", "HF GPT2LMHeadModel"),
                     ("seq2seq_dates (seq2seq_tiny)", "ours (triton)"), ("seq2seq_dates (seq2seq_tiny)", "ours (sdpa)")]
    tokens = {"vit_digits": 16, "gpt_nano": 16, "seq2seq_dates (seq2seq_tiny)": 32}
    for r in rows:
        assert r["error"] == ""
        assert float(r["counter_over_analytic"]) == 1.0
        samples = float(r["train_samples_per_s"])
        assert samples == pytest.approx(2 / (float(r["train_step_ms"]) / 1e3))
        assert float(r["train_tokens_per_s"]) == pytest.approx(samples * tokens[r["model"]])
        assert float(r["infer_samples_per_s"]) > 0
        assert r["train_peak_mib"] == "" and r["mfu"] == ""  # n/a on the CPU
    by = {(r["model"], r["implementation"]): r for r in rows}
    ref = float(by[("gpt_nano", "HF GPT2LMHeadModel")]["train_samples_per_s"])
    ours = float(by[("gpt_nano", "ours (triton)")]["train_samples_per_s"])
    assert float(by[("gpt_nano", "ours (triton)")]["speedup_vs_reference_train"]) == pytest.approx(ours / ref)
    assert by[("seq2seq_dates (seq2seq_tiny)", "ours (triton)")]["speedup_vs_reference_train"] == ""
    assert int(by[("gpt_nano", "HF GPT2LMHeadModel")]["params"]) == int(by[("gpt_nano", "ours (triton)")]["params"])

    md = (out / "compare.md").read_text()
    for heading in ("### Models", "### Training step", "### Inference", "### Summary", "### Logged runs"):
        assert heading in md
    assert "gpt_nano: ours (triton) trains at" in md and "no reference implementation for a Seq2SeqTransformer" in md
    assert saved["runs"][0]["metric"] == "val/acc" and not math.isnan(saved["runs"][0]["values"][0])


def test_a_run_stopped_midway_keeps_the_models_measured(tmp_path, monkeypatch, capsys):
    """A device call's time limit can stop a long GPU comparison: what was measured before
    is on disk (compare.json, compare.md and compare.csv; before, the CSV and plots of an
    earlier run in the folder were left beside them), and each figure was printed as it came."""
    real = compare.compare_model

    def second_one_stops(target, *args, **kwargs):
        if target.label == "gpt_nano":
            raise KeyboardInterrupt("the call's time is up")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(compare, "compare_model", second_one_stops)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("compare.csv", "compare_throughput.png", "compare_quality.png"):  # an earlier run's
        (out / name).write_text("from an earlier run")
    with pytest.raises(KeyboardInterrupt):
        compare.run(["vit_digits", "gpt_nano"], batch_size=2, device="cpu", steps=1, warmup=0,
                    backends=["triton"], reference=False, out_dir=str(out))
    saved = json.loads((out / "compare.json").read_text())
    assert [m["model"] for m in saved["models"]] == ["vit_digits"]
    assert saved["models"][0]["reference"]["why_none"] == "references skipped (--no-reference)"
    assert "ours (triton)" in (out / "compare.md").read_text()
    assert "vit_digits: ours-triton: train" in capsys.readouterr().err
    # The folder's files agree: the CSV holds the same model, and no plot of the earlier run is left.
    with (out / "compare.csv").open() as f:
        assert {row["model"] for row in csv.DictReader(f)} == {"vit_digits"}
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json", "compare.md"]


def test_table_numbers_round_before_choosing_the_format():
    assert compare_report._num(999.7) == "1,000" and compare_report._num(999.4) == "999"
    assert compare_report._num(12345.6) == "12,346" and compare_report._num(0.01234) == "0.0123"
    assert compare_report._num(None) == "n/a"


def test_mfu_peak_is_read_from_the_device_name():
    from tasks.compare_measure import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0  # H100 SXM, dense bf16
    assert peak_tflops("NVIDIA H100 PCIe")[0] < 989.0  # the PCIe card is not taken for the SXM one
    assert peak_tflops("NVIDIA L40")[0] == 181.0 and peak_tflops("NVIDIA L4")[0] == 121.0  # whole words
    assert peak_tflops("NVIDIA L40S")[0] == 362.0 and peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("NVIDIA RTX A1000")[0] is None  # not an A100
    value, why = peak_tflops("Some Future GPU")
    assert value is None and "--peak-tflops" in why


@pytest.mark.gpu
def test_gpu_run_reports_memory_and_mfu(tmp_path):
    report = compare.run(["gpt_nano", "vit_digits"], batch_size=4, seq_len=64, device="cuda", steps=2, warmup=1,
                         out_dir=str(tmp_path), command="zoo compare gpu test", peak_tflops=100.0)
    for entry in report["models"]:
        assert set(entry["results"]) == {"ours-triton", "ours-sdpa", "ours-eager", "reference"}
        for result in entry["results"].values():
            train, infer = result["train"], result["infer"]
            assert "error" not in train and "error" not in infer
            assert train["peak_mib"] > 0 and infer["peak_mib"] > 0
            # MFU is training FLOP/s over the given peak: 3 x forward FLOPs per sample x samples/s.
            flops = 3 * entry["flops"]["forward_analytic"] * train["samples_per_s"]
            assert train["mfu"] == pytest.approx(flops / 100e12)
