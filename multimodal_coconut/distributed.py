"""Process group setup and model wrapping (DDP or FSDP2); one process without torchrun works the same way.

    python run.py args/demo.yaml                                   # one process, no process group
    torchrun --nnodes 1 --nproc_per_node N run.py args/X.yaml      # N processes: NCCL (+ Gloo) on GPU, Gloo on CPU
    torchrun --nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT --nproc_per_node N run.py ...
"""

from __future__ import annotations

import os
from contextlib import contextmanager
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


def setup(timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run as a single process.

    Collectives and the setup itself time out after `timeout_minutes` (dist_timeout_minutes) with an error instead of
    waiting for a dead peer forever, so that torchrun's elastic agent can restart the workers.
    """
    if "RANK" not in os.environ:
        return DistEnv(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = timedelta(minutes=timeout_minutes)
    kwargs = dict(rank=rank, world_size=world_size, timeout=timeout, store=_attempt_store(rank, world_size, timeout))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL takes only CUDA tensors. Our own collectives put their tensors on `device` (they then go through NCCL);
        # Gloo beside it serves CPU tensors all the same (object collectives, distributed checkpointing), so a CPU
        # tensor in a collective is never a crash on GPUs.
        backend, kwargs["device_id"] = GPU_BACKEND, device
    else:
        device, backend = torch.device("cpu"), "gloo"
    try:
        dist.init_process_group(backend, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        raise RuntimeError(f"rank {rank} of {world_size}: joining the process group ({backend}, "
                           f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, torchrun attempt "
                           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}) failed within dist_timeout_minutes="
                           f"{timeout_minutes:g}: {e}") from e
    return DistEnv(rank, world_size, local_rank, device)


def _attempt_store(rank: int, world_size: int, timeout: timedelta):
    """The rendezvous store of this torchrun attempt: the store torchrun's env:// describes, its keys prefixed by the
    restart count. torchrun restarts the workers against the same TCPStore (static and c10d rendezvous alike), which
    still holds the keys of the process group of the attempt before, e.g. the address of a rank that was killed:
    without the prefix, the restarted ranks read them and connect to dead peers (Gloo: "Connection refused") or wait
    forever. None outside torchrun (plain env://)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return dist.PrefixStore(f"multimodal_coconut/attempt_{attempt}/", store)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _named(operation: str):
    """A collective that fails (a dead peer, or none within dist_timeout_minutes: a hung one) is an error naming this
    rank and the operation, so the log of a failed attempt says which rank waited for what."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        raise RuntimeError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {operation} did not complete (a peer "
                           "died, or none arrived within dist_timeout_minutes): " + " ".join(str(e).split())) from e


def barrier() -> None:
    if dist.is_initialized():
        with _named("barrier"):
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the identity without a process group)."""
    t = t.detach().clone()
    if dist.is_initialized():
        with _named("all_reduce (sum)"):
            dist.all_reduce(t)
    return t


def all_reduce_max(value: int | float, device: torch.device) -> int | float:
    """The largest `value` over ranks (the value itself without a process group); the collective runs on `device`."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    with _named("all_reduce (max)"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a collective). For decisions that lead into other collectives (save or not,
    stop or not): they must be taken identically everywhere, or the ranks that take the other branch hang."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    with _named("broadcast_object_list"):
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
