"""Distributed strategies that know the backbone: FSDP with the transformer Block as its unit.

    trainer:
      strategy:
        class_path: tasks.strategies.BlockFSDP
        init_args: {activation_checkpointing: true}

DDP needs nothing special: `trainer.strategy: ddp` (the attention kernels are ordinary
torch ops with their own autograd, so gradients all-reduce as usual).
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from zoo import Block


class BlockFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy wrapping (sharding) each zoo Block; activation checkpointing per Block too."""

    def __init__(self, activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD", **kwargs):
        # `is None`, not setdefault: LightningCLI passes every FSDPStrategy argument, the policies as None.
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = {Block}
        if activation_checkpointing and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = {Block}
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)
