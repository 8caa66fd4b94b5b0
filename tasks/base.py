"""What every training task shares: the zoo model from a config, AdamW, warmup + cosine."""

from __future__ import annotations

import atexit
import math
import random
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

import zoo
from zoo import TransformerConfig
from zoo.config import is_finite_number, is_int

# Parameters that never get weight decay: embeddings and position tables, by name.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "pos_table", "mask_token")


def rng_states() -> dict:
    """This process's random states: Python's, NumPy's, torch's CPU generator and (once CUDA is in
    use) the current CUDA device's, as plain types and tensors (a checkpoint loads them with
    torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Puts back what rng_states() returned (the CUDA state where CUDA is available)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def unwrapped_name(name: str) -> str:
    """A parameter's name without the segments FSDP and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def parameter_dims(model: nn.Module) -> dict[str, int]:
    """{unwrapped name: number of dims} of each parameter, to be taken before a strategy wraps the model."""
    return {unwrapped_name(name): p.dim() for name, p in model.named_parameters()}


def decay_groups(model: nn.Module, weight_decay: float, dims: Optional[dict[str, int]] = None) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices and convolutions only.

    Biases, norm gains (every parameter of fewer than 2 dims), nn.Embedding tables and
    learned position/class tokens get none, as is usual for transformers. dims: the
    parameters' dims before FSDP wrapped the model (parameter_dims), by unwrapped name: a
    sharded parameter is a 1-D view, which would otherwise read as a bias.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        dim = dims.get(unwrapped_name(name), p.dim()) if dims else p.dim()
        if dim < 2 or id(p) in embedding_params or any(key in name for key in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup from 1e-3 x the base LR to it over warmup_steps, then cosine to min_lr_ratio x
    base at total_steps (and there it stays). A warmup as long as the run is cut to total_steps - 1.

    A LambdaLR of a plain function: its state is the step count alone, so a run resumed with a
    larger max_steps/max_epochs follows the new length's curve from where it stopped (the
    state of torch's CosineAnnealingLR would bring back the old length, and past its end the
    learning rate would climb back up).
    """
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    cosine_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 1e-3 + (1.0 - 1e-3) * step / warmup_steps
        done = min(step - warmup_steps, cosine_steps) / cosine_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def close_process_group_at_exit() -> None:
    """Ends torch.distributed's default process group when this process exits, while Python still
    runs (atexit), if one is open and no call has registered this yet. Called by every task's
    ``setup``, on every rank.

    Lightning does this for NCCL only. A gloo (CPU) group left to interpreter shutdown can
    abort a rank that finished its work: the group's worker thread frees the last collective
    (there an all_gather) and takes the GIL for it while the main thread is finalizing,
    which ends that thread in the middle of C++ code ("terminate called without an active
    exception", SIGABRT; 2 of 56 runs of the ddp_spawn test, read from a core dump, 2026-11-25).
    Destroying the group joins its threads first.
    """
    global _CLOSE_REGISTERED
    if _CLOSE_REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    _CLOSE_REGISTERED = True
    atexit.register(_close_process_group)


_CLOSE_REGISTERED = False


def _close_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class WeightedMean(Metric):
    """The mean of values, each weighted (a batch's mean loss by its token count), summed across
    processes. A NaN value makes the mean NaN: torchmetrics' MeanMetric drops NaNs by default and,
    with nan_strategy="disable", ignores the weights (torchmetrics 1.9)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        value = torch.as_tensor(value, dtype=torch.float64, device=self.total.device)
        weight = torch.as_tensor(weight, dtype=torch.float64, device=self.total.device)
        self.total += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


def check_label_smoothing(label_smoothing: float) -> None:
    """ValueError unless label_smoothing is a number in [0, 1) (1 would make every target uniform;
    torch's cross-entropy refuses more only at the first training step)."""
    if not is_finite_number(label_smoothing) or not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")


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

    Raises ValueError (naming the argument) for lr not > 0, a negative weight_decay, betas
    outside [0, 1), a warmup or min_lr_ratio out of range, or a non-finite value of any.
    """

    # Read by Lightning's ThroughputMonitor (which `zoo fit` adds), which warns on every run of a
    # module without it. None: not computed, so the throughput logs have no FLOPs or MFU. A
    # batch's training FLOPs depend on its shapes (sequence lengths, padding) and on the task's
    # head and loss; no formula here counts them exactly for every task (zoo compare's analytic
    # count is the forward of fixed-shape inputs). A subclass or user may set it per batch.
    flops_per_batch: Optional[int] = None

    def __init__(self, model: str, model_args: Optional[dict[str, Any]] = None,
                 backbone: Optional[TransformerConfig] = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: float = 0.05, min_lr_ratio: float = 0.01,
                 compile: bool = False):
        super().__init__()
        # Checked here, not when fit() reaches configure_optimizers after the data is set up: lr=0
        # would train nothing without a word, and torch's "Invalid learning rate" names no task.
        if not is_finite_number(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0 (AdamW's peak learning rate), got {lr!r}")
        if not is_finite_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2 \
                or not all(is_finite_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas!r}")
        if not is_finite_number(warmup) or not warmup >= 0 or (warmup >= 1 and warmup != int(warmup)):
            raise ValueError(f"warmup must be a fraction of the training steps in [0, 1) or a whole number "
                             f"of steps, got {warmup!r}")
        if not is_finite_number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (the final learning rate over lr), got {min_lr_ratio!r}")
        self.save_hyperparameters()
        overrides = dict(model_args or {})
        if backbone is not None:
            overrides["backbone"] = backbone
        self.model = zoo.create_model(model, **overrides)
        if compile:
            self.model.compile(fullgraph=True)  # in place: state-dict keys stay as they are

    def setup(self, stage: str) -> None:
        """Runs on every rank once Lightning has set up the processes; subclasses call it first."""
        close_process_group_at_exit()
        self.record_parameter_dims()

    def record_parameter_dims(self) -> None:
        """Notes the model's parameter dims for configure_optimizers while the model is unwrapped
        (setup and configure_model run before a strategy wraps it; FSDP flattens what it shards).
        A task that builds its model in configure_model calls this once it has."""
        if getattr(self, "model", None) is not None:
            self._parameter_dims = parameter_dims(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `zoo generate` and other tools need to rebuild the run from the file alone:
        # the task's class, and the data module's tokenizer when it has one.
        checkpoint["zoo_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        # A task that keeps its own tokenizer (restored from a checkpoint) saves that one.
        tokenizer = getattr(datamodule, "tokenizer", None) or getattr(self, "tokenizer", None)
        if tokenizer is not None:
            checkpoint["zoo_tokenizer"] = tokenizer.state()
        # Every rank's random states (Lightning saves a checkpoint from all ranks at once): a
        # run resumed from it draws the dropout, masks and augmentation it would have drawn.
        states = rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint["zoo_rng_states"] = gathered
        else:
            checkpoint["zoo_rng_states"] = [states]
        self._note_pending_accumulation(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Put back when training starts: after the restore, before the first step draws.
        self._rng_states_to_restore = checkpoint.get("zoo_rng_states")
        pending = checkpoint.get("zoo_pending_accumulation")
        if pending and self._trainer is not None and self.trainer.state.fn == "fit":
            rank_zero_warn(f"the checkpoint was written after {pending[0]} of {pending[1]} accumulated batches, whose "
                           f"gradients it does not hold: the resumed run's first step sums the rest of that window "
                           f"only (val_check_interval a multiple of accumulate_grad_batches makes resumes exact)")
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

    def _use_fused_adamw(self) -> bool:
        """torch's fused AdamW on CUDA, unless the run scales its loss (16-mixed): then Lightning
        unscales the gradients before clipping, which it cannot do for a fused optimizer."""
        return self.device.type == "cuda" and getattr(self.trainer.precision_plugin, "scaler", None) is None

    def configure_optimizers(self):
        hp = self.hparams
        groups = decay_groups(self.model, hp.weight_decay, getattr(self, "_parameter_dims", None))
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas),
                                      fused=self._use_fused_adamw())
        estimated = float(self.trainer.estimated_stepping_batches)
        if not math.isfinite(estimated) or estimated <= 0:
            raise ValueError(f"the warmup + cosine schedule needs a finite training length (set max_epochs or "
                             f"max_steps); the trainer's estimate of the optimizer steps is {estimated}")
        total = int(estimated)
        warmup = round(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
        if warmup >= total > 1:
            rank_zero_warn(f"warmup of {warmup} steps is not shorter than the run's {total} optimizer steps: it is cut "
                           f"to {total - 1}, so the learning rate peaks at the last step (no cosine phase)")
        scheduler = warmup_cosine(optimizer, total, warmup, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self._restore_training_loader()
        states = self.__dict__.pop("_rng_states_to_restore", None)
        if states is not None:
            if len(states) == self.trainer.world_size:
                set_rng_states(states[self.global_rank])
            else:
                rank_zero_warn(f"the checkpoint holds the random states of {len(states)} processes, this run has "
                               f"{self.trainer.world_size}: they are not restored (the resumed run draws other "
                               f"dropout, masks and augmentation than an uninterrupted one would)")
        # A resumed run gets back the optimizer's learning rates of its last step, and a LambdaLR
        # recomputes them only at its next step: the first step would use the old schedule's rate
        # (with a new max_steps, not this run's curve). Set them from the schedule now.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _restore_training_loader(self) -> None:
        """Puts the training loader where the checkpoint had it, and warns where a resume cannot
        be exact.

        Lightning loads the loader's state when its fit loop first builds the loader, after the
        checkpoint is read; but configure_optimizers' estimated_stepping_batches builds it before
        that in a run bounded by max_epochs, and the state was then never loaded: a mid-epoch
        resume restarted its epoch (batches trained twice, others never). Loaded here instead,
        before the first batch. (Lightning 2.6's fit loop: _load_combined_loader_states.)
        """
        from .data.loaders import ResumableLoader

        fit_loop = self.trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None) and fit_loop.restarting:
            fit_loop._load_combined_loader_states()
        combined = getattr(fit_loop, "_combined_loader", None)
        loaders = [dl for dl in getattr(combined, "flattened", []) if isinstance(dl, ResumableLoader)]
        # A final checkpoint written when max_steps stopped the run mid-epoch: Lightning counts
        # that epoch as done and resumes with the next, so the rest of it is never trained.
        planned = self.trainer.num_training_batches
        for loader in loaders:
            if loader._resume and loader._given < planned and loader._epoch < fit_loop.epoch_progress.current.completed:
                rank_zero_warn(f"the checkpoint was written after {loader._given} of epoch {loader._epoch}'s "
                               f"{planned} batches (max_steps ended that run there); Lightning resumes with the next "
                               f"epoch, so the rest of epoch {loader._epoch} is not trained. Resume from a checkpoint "
                               f"written at a validation (last.ckpt when max_steps is a multiple of "
                               f"val_check_interval) for an exact continuation")

    def _note_pending_accumulation(self, checkpoint: dict) -> None:
        """Notes, in a checkpoint written inside a gradient-accumulation window, how many batches'
        gradients it lacks (they are in .grad, which checkpoints do not hold)."""
        trainer = self._trainer
        if trainer is None:  # a checkpoint written by hand, outside a run
            return
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and trainer.state.fn == "fit":
            ready = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            pending = ready % accumulate
            if pending and ready < self.trainer.num_training_batches:
                checkpoint["zoo_pending_accumulation"] = [pending, accumulate]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, plus two cases its precision plugins refuse (the CLI clips by
        default): norm clipping under FSDP, which needs the sharded module's clip_grad_norm_ (the
        norm over all shards), and a fused optimizer under bf16-mixed, where no loss scaling means
        the gradients are final when clipped."""
        if not gradient_clip_val:
            return
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType
        from torch.distributed.fsdp import FullyShardedDataParallel

        algorithm = gradient_clip_algorithm or "norm"
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel) and algorithm == "norm":
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, GradClipAlgorithmType(algorithm))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)


class ClassificationTask(ZooTask):
    """A ZooTask that classifies: cross-entropy with label smoothing, and top-1 (acc) and top-5
    (acc_top5, or top-k for fewer classes) accuracy logged per stage.

    Subclasses say how a batch becomes (logits (B, num_classes), labels (B,)) in
    logits_and_labels. Args as ZooTask, plus num_classes (passed to the model) and
    label_smoothing.
    """

    monitor = ("val/acc", "max")  # what the best checkpoint is chosen by

    def __init__(self, model: str, num_classes: int, label_smoothing: float = 0.0,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        check_label_smoothing(label_smoothing)
        if not is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (the classes of the data set), got {num_classes!r}")
        super().__init__(model, {"num_classes": num_classes, **(model_args or {})}, **kwargs)
        top = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("train", "val", "test") for name, k in (("acc", 1), (f"acc_top{top}", top))})

    def logits_and_labels(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, num_classes), labels (B,)) of a batch."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Checks the head against the data module's classes (its num_classes, once set up).

        More classes in the data than in the head would fail mid-epoch on a label past the
        logits; fewer train a head with unused outputs, which is allowed but warned about.
        """
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        found = getattr(datamodule, "num_classes", None)
        ours = self.hparams.num_classes
        if not isinstance(found, int) or found == ours:
            return
        if found > ours:
            raise ValueError(f"the data has {found} classes but the model's head has {ours}: set the task's "
                             f"num_classes (model.init_args.num_classes) to {found}")
        rank_zero_warn(f"the data has {found} classes and the model's head {ours}: outputs {found} to {ours - 1} "
                       f"are never a target")

    def predict_logits(self, batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits (B, num_classes), labels (B,) or None) of a predict batch, which may have no labels."""
        raise NotImplementedError

    def predict_step(self, batch, batch_idx) -> list[dict]:
        """One record per sample (`zoo predict` writes them, tasks.callbacks.PredictionWriter):
        prediction (class index), probability, top (the top-5, or top-k for fewer classes, as
        [index, probability] pairs), class (its name, when the data module has `classes`) and,
        with labels, label and correct."""
        logits, labels = self.predict_logits(batch)
        probs = logits.float().softmax(dim=-1)
        top_p, top_i = probs.topk(min(5, probs.shape[-1]), dim=-1)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "classes", None)
        records = []
        for row, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist())):
            record = {"prediction": ids[0], "probability": ps[0], "top": [[i, p] for i, p in zip(ids, ps)]}
            if names is not None and ids[0] < len(names):
                record["class"] = names[ids[0]]
            if labels is not None:
                record["label"] = int(labels[row])
                record["correct"] = ids[0] == record["label"]
            records.append(record)
        return records

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits, labels = self.logits_and_labels(batch)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=len(labels), sync_dist=True)  # a tensor: averaged over processes here
        for name, metric in self.metrics.items():
            if name.startswith(stage + "_"):
                metric(logits, labels)
                self.log(f"{stage}/{name[len(stage) + 1:]}", metric, prog_bar=name.endswith("_acc"),
                         on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
