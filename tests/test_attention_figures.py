"""Attention figures: what each panel shows, the TensorBoard callback, `zoo attention-map`.

The panels are checked by the data they display (the arrays handed to imshow), against the
maps computed independently here.
"""

import glob
import os

import matplotlib.pyplot as plt
import pytest
import torch

import zoo
from tasks import attention_figures as figs

pytestmark = pytest.mark.usefixtures("reference_attention")


def shown(ax, index=-1):
    return torch.as_tensor(ax.images[index].get_array().data)


def random_maps(layers, heads, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, tokens, tokens, generator=g).softmax(-1) for _ in range(layers)]


def test_vision_panels_show_rollout_and_class_token_attention():
    maps = random_maps(layers=3, heads=2, tokens=1 + 4 * 3)
    fig = figs.vision_attention(torch.rand(3, 16, 12), maps, grid=(4, 3), num_prefix_tokens=1)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 2 + 2
    eye = torch.eye(13, dtype=torch.float64)
    rollout = eye
    for m in maps:
        a = 0.5 * m.double().mean(0) + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    torch.testing.assert_close(shown(axes[1]).double(), rollout[0, 1:].view(4, 3), rtol=0, atol=1e-6)
    for h in range(2):
        torch.testing.assert_close(shown(axes[2 + h]), maps[-1][h, 0, 1:].view(4, 3))
    plt.close(fig)


def test_vision_without_class_token_shows_attention_received():
    maps = random_maps(layers=1, heads=1, tokens=4)
    fig = figs.vision_attention(torch.rand(1, 4, 4), maps, grid=(2, 2), num_prefix_tokens=0, class_token=False)
    axes = [ax for ax in fig.axes if ax.images]
    torch.testing.assert_close(shown(axes[2]), maps[0][0].mean(0).view(2, 2))
    with pytest.raises(ValueError, match="expected 1 \\+ 2x2"):
        figs.vision_attention(torch.rand(1, 4, 4), maps, grid=(2, 2), num_prefix_tokens=1)
    plt.close("all")


def test_token_heatmaps_alignment_and_speech_panels():
    probs = random_maps(1, 3, 5)[0]
    fig = figs.token_heatmaps(probs, list("abcde"))
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 1 + 3
    torch.testing.assert_close(shown(axes[0]), probs.mean(0))
    torch.testing.assert_close(shown(axes[2]), probs[1])
    assert [t.get_text() for t in axes[0].get_xticklabels()] == list("abcde")
    cross = torch.rand(2, 4, 6).softmax(-1)
    fig = figs.alignment(cross, list("source"), list("tgt!"))
    torch.testing.assert_close(shown(fig.axes[0]), cross.mean(0))
    fig = figs.speech_attention(torch.randn(80, 20), random_maps(1, 2, 10)[0])
    assert len([ax for ax in fig.axes if ax.images]) == 2
    # 21 frames make 11 tokens (the convolution's stride 2 pads): the time axes end at frame 21.
    top, bottom = figs.speech_attention(torch.randn(80, 21), random_maps(1, 2, 11)[0]).axes
    assert top.get_xlim() == bottom.get_xlim() == (0.0, 21.0) and bottom.get_ylim() == (21.0, 0.0)
    with pytest.raises(ValueError, match="21 frames at 2 frames per token make 11"):
        figs.speech_attention(torch.randn(80, 21), random_maps(1, 2, 10)[0])
    with pytest.raises(ValueError, match="heads, Sq, Sk"):
        figs.token_heatmaps(torch.rand(5, 5))
    plt.close("all")


def test_callback_logs_to_tensorboard_and_cli_writes_pngs(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.cli import main

    root = str(tmp_path / "runs")
    every_epoch = tmp_path / "every_epoch.yaml"  # replaces the config's callbacks (every 10 epochs)
    every_epoch.write_text("trainer:\n  callbacks:\n    - class_path: tasks.callbacks.AttentionMapLogger\n"
                           "      init_args: {every_n_epochs: 1}\n")
    main(["fit", "-c", "configs/vision/vit_digits.yaml", "-c", str(every_epoch), "--name", "vit_digits",
          "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"])
    run_dir = os.path.join(root, "vit_digits", "version_0")
    (events,) = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events, size_guidance={"images": 0})
    accumulator.Reload()
    images = accumulator.Images("attention/vision_attention")
    assert [image.step for image in images] == [2, 4]  # after each epoch's validation (2 steps per epoch)
    out = str(tmp_path / "maps")
    assert main(["attention-map", os.path.join(run_dir, "checkpoints", "last.ckpt"), "--sample", "1",
                 "--out", out]) == 0
    assert os.listdir(out) == ["vision_attention.png"]
    image = plt.imread(os.path.join(out, "vision_attention.png"))
    assert image.shape[0] > 100 and image.std() > 0.01  # a drawn figure, not a blank canvas
    # Usage errors: status 2 and one line that says what was wrong, as `zoo generate`.
    for args, message in (([run_dir + "/checkpoints/last.ckpt", "--sample", "300"],
                           "--sample 300 is not in the first validation batch (samples 0 to 63)"),
                          ([run_dir + "/checkpoints/last.ckpt", "--text", "hi"], "--text needs a text model"),
                          ([run_dir + "/checkpoints/last.ckpt", "--layer", "9"], "out of range"),
                          ([run_dir + "/checkpoints/last.ckpt", "--config", "configs/text/seq2seq_dates.yaml"],
                           "configs/text/seq2seq_dates.yaml trains a tasks.seq2seq.Seq2Seq, the checkpoint holds a "
                           "tasks.vision.ImageClassification: pass the config of the run"),
                          ([str(tmp_path / "nowhere.ckpt")], f"checkpoint not found: {tmp_path}/nowhere.ckpt")):
        capsys.readouterr()
        assert main(["attention-map", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zoo attention-map: error: ") and message in err and "Traceback" not in err


def test_callback_draws_in_a_run_bounded_by_steps_only(tmp_path):
    """gpt_char-style: max_epochs -1, validation every 2 steps inside one epoch. every_n_epochs=3
    then counts validations: figures after the 3rd (step 6) and the last (step 8)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.cli import main

    root = str(tmp_path / "runs")
    callback = tmp_path / "callback.yaml"
    callback.write_text("trainer:\n  callbacks:\n    - class_path: tasks.callbacks.AttentionMapLogger\n"
                        "      init_args: {every_n_epochs: 3}\n")
    def fit(max_steps, *extra):
        main(["fit", "-c", "configs/text/gpt_char.yaml", "-c", str(callback), "--name", "gpt_char",
              f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--data.init_args.corpora=[pydoc_topics]", "--data.init_args.block_size=32",
              "--model.init_args.model_args={'depth': 1, 'dim': 48, 'heads': 12}",
              f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra])

    def image_steps(version):
        (events,) = glob.glob(os.path.join(root, "gpt_char", version, "**", "events.out.tfevents.*"),
                              recursive=True)
        accumulator = EventAccumulator(events, size_guidance={"images": 0})
        accumulator.Reload()
        return [image.step for image in accumulator.Images("attention/text_attention")]

    fit(8)
    assert image_steps("version_0") == [6, 8]
    # Stopped at step 4 (2 validations; its last figure there), resumed to 8: the count goes on
    # from the checkpoint, so the resumed run draws where the uninterrupted one did.
    fit(4)
    assert image_steps("version_1") == [4]
    fit(8, f"--ckpt_path={root}/gpt_char/version_1/checkpoints/last.ckpt")
    assert image_steps("version_2") == [6, 8]


def test_callback_leaves_training_as_it_was_draws_at_max_steps_and_checks_its_sample_first(tmp_path):
    """A run with the callback trains as one without it (vit_digits draws drop-path masks: a
    draw from torch's generator would change them), step for step; a run that max_steps ends
    before max_epochs still gets its last figure; a `sample` past the batch fails before the
    first training step."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks.cli import main

    root = str(tmp_path / "runs")

    def fit(name, callbacks, *extra):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"trainer:\n  callbacks: {callbacks}\n")
        main(["fit", "-c", "configs/vision/vit_digits.yaml", "-c", str(config), "--name", name,
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
              f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra])
        return os.path.join(root, name, "version_0")

    def losses(run_dir):
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            return [(row["step"], row["train/loss_step"]) for row in csv.DictReader(f) if row["train/loss_step"]]

    def image_steps(run_dir):
        (events,) = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
        accumulator = EventAccumulator(events, size_guidance={"images": 0})
        accumulator.Reload()
        return [image.step for image in accumulator.Images("attention/vision_attention")]

    logger = "[{class_path: tasks.callbacks.AttentionMapLogger, init_args: {every_n_epochs: %d, sample: %d}}]"
    drawn = fit("drawn", logger % (1, 0), "--trainer.max_epochs=3")
    plain = fit("plain", "[]", "--trainer.max_epochs=3")
    assert image_steps(drawn) == [2, 4, 6] and len(losses(plain)) == 6
    assert losses(drawn) == losses(plain)
    assert image_steps(fit("stopped", logger % (5, 0), "--trainer.max_epochs=10", "--trainer.max_steps=4")) == [4]
    with pytest.raises(ValueError, match="sample 1000 is past the first validation batch"):
        fit("bad_sample", logger % (5, 1000), "--trainer.max_epochs=10")
    assert not os.path.exists(os.path.join(root, "bad_sample", "version_0", "checkpoints"))


def test_figures_show_every_head():
    """12 heads (GPT-2, BERT-base, ViT-B): the mean and all 12, not the first 8."""
    probs = random_maps(1, 12, 5)[0]
    axes = [ax for ax in figs.token_heatmaps(probs, list("abcde")).axes if ax.images]
    assert [ax.get_title() for ax in axes] == ["mean over heads"] + [f"head {h}" for h in range(12)]
    torch.testing.assert_close(shown(axes[12]), probs[11])
    maps = random_maps(layers=1, heads=12, tokens=1 + 4)
    axes = [ax for ax in figs.vision_attention(torch.rand(3, 4, 4), maps, (2, 2), 1).axes if ax.images]
    assert len(axes) == 2 + 12
    torch.testing.assert_close(shown(axes[-1]), maps[0][11, 0, 1:].view(2, 2))
    plt.close("all")


def test_callback_validates_its_arguments():
    from tasks.callbacks import AttentionMapLogger

    with pytest.raises(ValueError, match="every_n_epochs"):
        AttentionMapLogger(every_n_epochs=0)
    with pytest.raises(ValueError, match="sample"):
        AttentionMapLogger(sample=-1)


def test_vision_task_figures_use_the_models_maps():
    from tasks.vision import ImageClassification

    task = ImageClassification("vit_digits").eval()
    images = torch.randn(2, 1, 8, 8)
    figures = task.attention_figures((images, torch.tensor([3, 4])), sample=1, layer=1)
    axes = [ax for ax in figures["vision_attention"].axes if ax.images]
    maps = zoo.attention_maps(task.model, images[1:], layers=[1])["backbone.blocks.1.attn"][0]
    grid = 8 // task.model.patch_size[0]
    # vit_digits pools by averaging (no class token): head 0's panel is the attention each patch receives.
    torch.testing.assert_close(shown(axes[2]), maps[0].mean(0).view(grid, grid))
    plt.close("all")


def test_text_figures_label_tokens_and_show_the_models_maps():
    from tasks.data.tokenizers import CharTokenizer
    from tasks.text import CausalLM, MaskedLM

    tokenizer = CharTokenizer.from_corpus(["hello world, attention!"])
    gpt = CausalLM("gpt_nano", vocab_size=tokenizer.vocab_size).eval()
    batch = gpt.text_batch(["hello", "attention world"], tokenizer)
    assert batch["input_ids"][0, 0] == tokenizer.bos_id and batch["attention_mask"][0].sum() == 6
    fig = gpt.attention_figures(batch, tokenizer, sample=0)["text_attention"]
    axes = [ax for ax in fig.axes if ax.images]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["<bos>", "h", "e", "l", "l", "o"]
    want = zoo.attention_maps(gpt.model, batch["input_ids"][:1, :6], layers=[-1])["backbone.blocks.3.attn"][0]
    torch.testing.assert_close(shown(axes[1]), want[0])  # head 0, padding excluded
    assert (shown(axes[1]).triu(1) == 0).all()  # causal

    bert = MaskedLM("bert_tiny", vocab_size=tokenizer.vocab_size).eval()
    long = bert.text_batch(["hello world " * 10], tokenizer)  # 122 tokens: cut to FIGURE_TOKENS
    axes = [ax for ax in bert.attention_figures(long, tokenizer)["text_attention"].axes if ax.images]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert len(labels) == MaskedLM.FIGURE_TOKENS and labels[0] == "<bos>" and labels[-1] == "<eos>"
    cut = torch.cat([long["input_ids"][0, : MaskedLM.FIGURE_TOKENS - 1], torch.tensor([tokenizer.eos_id])])[None]
    want = zoo.attention_maps(bert.model, {"input_ids": cut}, layers=[-1])["backbone.blocks.1.attn"][0]
    torch.testing.assert_close(shown(axes[0]), want.mean(0))
    # A model with fewer positions than FIGURE_TOKENS: cut to its max_seq_len, not refused.
    for task in (CausalLM("gpt_nano", vocab_size=tokenizer.vocab_size, model_args={"max_seq_len": 32}),
                 MaskedLM("bert_tiny", vocab_size=tokenizer.vocab_size, model_args={"max_seq_len": 32})):
        axes = [ax for ax in task.eval().attention_figures(long, tokenizer)["text_attention"].axes if ax.images]
        assert len(axes[0].get_yticklabels()) == 32
    plt.close("all")


def test_seq2seq_figure_is_the_cross_attention_of_the_models_own_output():
    from tasks.data.tokenizers import CharTokenizer
    from tasks.seq2seq import Seq2Seq

    tokenizer = CharTokenizer.from_corpus(["0123456789-march tuesday,"])
    task = Seq2Seq("seq2seq_tiny", vocab_size=tokenizer.vocab_size, max_new_tokens=6).eval()
    batch = task.text_batch(["march 3", "tuesday 21"], tokenizer)
    fig = task.attention_figures(batch, tokenizer, sample=1, layer=0)["cross_attention"]
    src = batch["src_ids"][1:2]
    text_only = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id, tokenizer.mask_id]  # as the task decodes
    out = task.model.generate(src, None, max_new_tokens=6, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                              suppress_tokens=text_only)
    out = out[0].tolist()
    if tokenizer.eos_id in out[1:]:
        out = out[: out.index(tokenizer.eos_id, 1) + 1]
    want = zoo.attention_maps(task.model, (src, torch.tensor([out[:-1]])),
                              layers=["decoder.blocks.0.cross_attn"])["decoder.blocks.0.cross_attn"][0]
    torch.testing.assert_close(shown(fig.axes[0]), want.mean(0))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("tuesday 21")
    with pytest.raises(ValueError, match="out of range"):
        task.attention_figures(batch, tokenizer, layer=5)
    plt.close("all")


def test_speech_figure_shows_attention_over_the_real_frames():
    from tasks.speech import AudioClassification

    task = AudioClassification("speech_tiny", num_classes=3).eval()
    waveforms = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 8000])
    fig = task.attention_figures((waveforms, lengths, torch.tensor([0, 2])), sample=1)["speech_attention"]
    (spectrogram, attention) = [ax for ax in fig.axes if ax.images]
    want = zoo.attention_maps(task.model, waveforms[1:, :8000], layers=[-1])["backbone.blocks.1.attn"][0]
    torch.testing.assert_close(shown(attention), want.mean(0))
    log_mel, _ = task.model.log_mels(waveforms[1:, :8000])
    torch.testing.assert_close(shown(spectrogram), log_mel[0])
    plt.close("all")
