"""Training on several processes: data parallel (DDP) or sharded (FSDP2); a no-op on one.

Under `torchrun --nproc_per_node N`, every process runs the same program. Each takes its
contiguous share of every global batch; DistributedDataParallel averages the gradients, so the
N processes follow the single process's trajectory. FSDP2 (`fully_shard`) shards the
parameters per block instead, for models that do not fit one device.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from .gemma import DecoderBlock
from .siglip import EncoderBlock


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed() -> None:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def barrier() -> None:
    """Wait for every process (nothing to wait for on one)."""
    if dist.is_initialized():
        dist.barrier()


def local_share(items: list) -> list:
    """This process's contiguous share of a global batch."""
    rank, world = rank_and_world()
    if len(items) % world:
        raise ValueError(f"global batch of {len(items)} does not split over {world} processes")
    share = len(items) // world
    return items[rank * share:(rank + 1) * share]


def wrap_for_training(model: nn.Module, fsdp: bool) -> nn.Module:
    """DistributedDataParallel (or FSDP2 sharding per transformer block) when distributed; else the model."""
    if not dist.is_initialized():
        return model
    if fsdp:
        for module in model.modules():
            if isinstance(module, (EncoderBlock, DecoderBlock)):
                fully_shard(module)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model)
