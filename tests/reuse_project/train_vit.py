"""A small Lightning project that is not part of tritonzoo: a timm ViT on random images.

    python train_vit.py [--triton]   # prints one JSON line: the losses and, with --triton, the routing report

With --triton it adds tritonzoo's Lightning callback and nothing else changes.
"""

import argparse
import json

import lightning as L
import timm
import torch
import torch.nn.functional as F


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
        self.losses = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--triton", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    callbacks = []
    if args.triton:
        from kernels.lightning import TritonAttention

        callbacks.append(TritonAttention())
    model = Classifier()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    print(json.dumps({"losses": model.losses, "report": callbacks[0].report() if callbacks else None}))


if __name__ == "__main__":
    main()
