"""Image classification."""

from __future__ import annotations

from typing import Any, Optional

import zoo

from .base import ClassificationTask


class ImageClassification(ClassificationTask):
    """Trains a zoo image classifier (ViT) with cross-entropy; logs top-1 and top-5 accuracy
    (top-k, acc_top<k>, with k < 5 classes).

    Batches are (images (B, C, H, W), labels (B,)). Args as ZooTask, plus:
        num_classes: classes of the data set (passed to the model).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(self, model: str = "vit_digits", num_classes: int = 10, label_smoothing: float = 0.0,
                 model_args: Optional[dict[str, Any]] = None, **kwargs):
        super().__init__(model, num_classes, label_smoothing, model_args, **kwargs)

    def forward(self, images):
        return self.model(images)

    def logits_and_labels(self, batch):
        images, labels = batch
        return self.model(images), labels

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

    def predict_logits(self, batch):
        """Batches of images (B, C, H, W), or (images, labels)."""
        if isinstance(batch, (tuple, list)):
            return self.model(batch[0]), (batch[1] if len(batch) > 1 else None)
        return self.model(batch), None
