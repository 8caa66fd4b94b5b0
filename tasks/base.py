"""What every training task shares: the zoo model from a config, AdamW, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

import zoo
from zoo import TransformerConfig

# Parameters that never get weight decay: embeddings and position tables, by name.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "pos_table", "mask_token")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices and convolutions only.

    Biases, norm gains (every parameter of fewer than 2 dims), nn.Embedding tables and
    learned position/class tokens get none, as is usual for transformers.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embedding_params or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup from ~0 to the base LR over warmup_steps, then cosine to min_lr_ratio x base."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps),
        eta_min=min_lr_ratio * optimizer.param_groups[0]["lr"])
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


class ZooTask(L.LightningModule):
    """Base of the tasks: builds `zoo.create_model(model, **model_args)` and the optimizer.

    Args:
        model: a preset name (zoo.list_models()).
        model_args: overrides of the preset: any field of its config or of its backbone
            (e.g. {"depth": 4, "attn_backend": "sdpa", "num_classes": 10}).
        backbone: a whole TransformerConfig replacing the preset's backbone.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not on biases, norms, embeddings).
        betas: AdamW betas.
        warmup: warmup length: a fraction of the training steps when < 1, else steps.
        min_lr_ratio: final learning rate as a fraction of lr (cosine schedule).
        compile: torch.compile the model (fullgraph) before training.
    """

    def __init__(self, model: str, model_args: Optional[dict[str, Any]] = None,
                 backbone: Optional[TransformerConfig] = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: float = 0.05, min_lr_ratio: float = 0.01,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        overrides = dict(model_args or {})
        if backbone is not None:
            overrides["backbone"] = backbone
        self.model = zoo.create_model(model, **overrides)
        if compile:
            self.model.compile(fullgraph=True)  # in place: state-dict keys stay as they are

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `zoo generate` and other tools need to rebuild the run from the file alone:
        # the task's class, and the data module's tokenizer when it has one.
        checkpoint["zoo_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        # A task that keeps its own tokenizer (restored from a checkpoint) saves that one.
        tokenizer = getattr(datamodule, "tokenizer", None) or getattr(self, "tokenizer", None)
        if tokenizer is not None:
            checkpoint["zoo_tokenizer"] = tokenizer.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Tasks that decode text (seq2seq, CTC) keep the tokenizer as self.tokenizer.
        if hasattr(self, "tokenizer") and "zoo_tokenizer" in checkpoint:
            from .data.tokenizers import tokenizer_from_state

            self.tokenizer = tokenizer_from_state(checkpoint["zoo_tokenizer"])

    def attention_figures(self, batch: Any, tokenizer: Any = None, sample: int = 0, layer: int = -1) -> dict:
        """Figures of the model's attention maps for sample `sample` of a batch from this task's
        data ({name: matplotlib Figure}) at block `layer` (negative: from the end); tokenizer
        labels text tokens. `zoo attention-map` and tasks.callbacks.AttentionMapLogger draw
        with it. Each domain task implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not draw attention maps")

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(decay_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                      fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        if not math.isfinite(total) or total <= 0:
            raise ValueError("the warmup + cosine schedule needs a finite training length (set max_epochs or max_steps)")
        warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
        scheduler = warmup_cosine(optimizer, total, warmup, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
