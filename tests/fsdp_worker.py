"""A process of a two-process FSDP run on the CPU (gloo), for tests/test_cli_training.py.

Spawned by torch.multiprocessing: builds the task, shards it as tasks.strategies.BlockFSDP
does (each Block a unit, FULL_SHARD), and reports what configure_optimizers made of it.
"""

import os

import torch
import torch.distributed as dist


def optimizer_groups(rank: int, world_size: int, rendezvous: str, results: dict) -> None:
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tasks import ImageClassification
    from tasks.base import unwrapped_name
    from zoo import Block

    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        task = ImageClassification(model="vit_digits", model_args={"depth": 2}, weight_decay=0.05)
        task.record_parameter_dims()  # what setup / configure_model do before the strategy wraps
        shapes = {name: tuple(p.shape) for name, p in task.model.named_parameters()}
        FullyShardedDataParallel(task, device_id=torch.device("cpu"), use_orig_params=True,
                                 auto_wrap_policy=ModuleWrapPolicy({Block}),
                                 sharding_strategy=ShardingStrategy.FULL_SHARD)
        task._trainer = SimpleNamespace(estimated_stepping_batches=10)
        optimizer = task.configure_optimizers()["optimizer"]
        names = {id(p): unwrapped_name(n) for n, p in task.model.named_parameters()}
        results[rank] = {
            "groups": [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups],
            "sharded_dims": sorted({p.dim() for p in task.model.parameters()}),
            "shapes": shapes,
        }
    finally:
        dist.destroy_process_group()
