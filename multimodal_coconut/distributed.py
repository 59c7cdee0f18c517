"""Process group setup and model wrapping (DDP or FSDP2); one process without torchrun works the same way.

    python run.py args/demo.yaml                                   # one process, no process group
    torchrun --nnodes 1 --nproc_per_node N run.py args/X.yaml      # N processes: NCCL (+ Gloo) on GPU, Gloo on CPU
    torchrun --nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT --nproc_per_node N run.py ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


GPU_BACKEND = "cpu:gloo,cuda:nccl"


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run as a single process."""
    if "RANK" not in os.environ:
        return DistEnv(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL takes only CUDA tensors. Our own collectives put their tensors on `device` (they then go through NCCL);
        # Gloo beside it serves CPU tensors all the same (object collectives, distributed checkpointing), so a CPU
        # tensor in a collective is never a crash on GPUs.
        dist.init_process_group(GPU_BACKEND, device_id=device, timeout=timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    return DistEnv(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the identity without a process group)."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_max(value: int | float, device: torch.device) -> int | float:
    """The largest `value` over ranks (the value itself without a process group); the collective runs on `device`."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a collective). For decisions that lead into other collectives (save or not,
    stop or not): they must be taken identically everywhere, or the ranks that take the other branch hang."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def layer_classes(base_model: nn.Module) -> set[type]:
    """The repeated blocks of both towers, from HF's `_no_split_modules` (e.g. InternVLVisionLayer, Qwen2DecoderLayer)."""
    names = set()
    for module in base_model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return {type(m) for m in base_model.modules() if type(m).__name__ in names}


def wrap_model(model: nn.Module, env: DistEnv, strategy: str, bf16: bool) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every decoder layer of the vision and language towers, then the root)."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # Frozen parameters (requires_grad=False) are not tracked by DDP: no unused-parameter search is needed.
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    classes = tuple(layer_classes(model))
    if not classes:
        raise ValueError("FSDP: found no decoder layer classes to shard (the model declares no _no_split_modules)")
    # Bottom-up: `_no_split_modules` may name a module and also blocks inside it (the original-format InternVL names
    # InternVisionModel and its encoder layers); children are sharded first, then the parent takes what is left.
    # modules() lists every parent before its descendants, so its reverse lists every child before its parents.
    for module in reversed(list(model.modules())):
        if isinstance(module, classes):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "generate")  # generate runs outside forward: unshard the root for it too
    return model
