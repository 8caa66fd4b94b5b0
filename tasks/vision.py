"""Image classification."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

import zoo

from .base import ZooTask


class ImageClassification(ZooTask):
    """Trains a zoo image classifier (ViT) with cross-entropy; logs top-1 and top-5 accuracy.

    Batches are (images (B, C, H, W), labels (B,)). Args as ZooTask, plus:
        num_classes: classes of the data set (passed to the model).
        label_smoothing: cross-entropy label smoothing.
    """

    monitor = ("val/acc", "max")  # what the best checkpoint is chosen by

    def __init__(self, model: str = "vit_digits", num_classes: int = 10, label_smoothing: float = 0.0,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, {"num_classes": num_classes, **(model_args or {})}, **kwargs)
        top5 = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for stage in ("train", "val", "test") for name, k in (("acc", 1), (f"acc_top{top5}", top5))})

    def forward(self, images):
        return self.model(images)

    def _step(self, batch, stage: str):
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(labels))
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

    def attention_figures(self, batch, tokenizer=None, sample: int = 0, layer: int = -1) -> dict:
        """The class token's attention rollout over the image (all layers) and its attention per
        head in block `layer`."""
        from .attention_figures import layer_maps, vision_attention

        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        image = images[sample: sample + 1]
        maps = layer_maps(zoo.attention_maps(self.model, image))
        grid = (image.shape[-2] // self.model.patch_size[0], image.shape[-1] // self.model.patch_size[1])
        label = f" (label {int(batch[1][sample])})" if isinstance(batch, (tuple, list)) and len(batch) > 1 else ""
        depth = len(maps)
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} is out of range for {depth} blocks")
        figure = vision_attention(image[0], [m[0] for m in maps[: layer % depth + 1]], grid,
                                  self.model.num_prefix_tokens, class_token=self.model.cls_token is not None,
                                  title=f"{self.hparams.model}: sample {sample}{label}")
        return {"vision_attention": figure}

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(images).softmax(dim=-1)
