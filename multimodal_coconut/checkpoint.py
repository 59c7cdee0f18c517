"""Checkpoints: sharded (torch.distributed.checkpoint), written completely or not at all, resumable on any number of
processes under FSDP2, DDP or none, bounded on disk.

    path = save_checkpoint(run_dir, epoch + 1, model, optimizer, global_step=step, best_metric=best,
                           config_hash=config_hash(cfg.to_dict()), metrics=history, rank=rank, world_size=world_size)
    pending = start_checkpoint(..., asynchronous=True, groups=(g1, g2))  # async_checkpoint: written in the
    path = pending.wait()                                                # background until wait()
    retain(run_dir, keep=2, weights_only=False)                         # rank 0, after the save: bounded disk
    latest = find_latest_checkpoint(run_dir)                            # None on a fresh run
    progress = load_checkpoint(latest, model, optimizer, rank=rank)     # every rank, any world size

`save_dir/checkpoint_{epoch}` (epoch = epochs completed, as in the original Coconut) holds

    model/              the backbone's weights as a DCP checkpoint (`.metadata` + one `__{rank}_0.distcp` per writing rank:
                        each rank writes its own FSDP2 shards, nothing is gathered), keyed as the backbone's own state
                        dict (the Coconut wrapper's `base_model.` prefix removed). A LoRA run stores only what trains
                        (adapters and the new token rows), since the rest is the base model it started from.
    optimizer/          AdamW state as a DCP checkpoint, keyed by parameter name (flattened), so it reshards on load;
                        absent in a weights-only checkpoint; an optimizer that never stepped is `optimizer_groups.pt`
    config.json, tokenizer files, preprocessor_config.json, coconut.json (and, for remote-code backbones, their
                        .py files): everything needed to use the model without the run (see `save_model_files`);
                        `inference.load_trained` builds the backbone from config.json and loads model/ into it
    scheduler.pt        LR scheduler state, when one is passed
    rng_rank{r}.pt      per rank: python, numpy, torch CPU and current CUDA device RNG states
    progress.json       epoch, global_step, best_metric, config_hash, metrics so far, world_size, extra
    COMPLETE            written last: the file names (relative paths) and sizes of the checkpoint

The keys are names, not ranks, so a checkpoint written by N FSDP2 processes loads into M processes under FSDP2, DDP
or a single process: DCP reads the pieces each rank's shards need. RNG files of ranks that no longer exist are not
read (training's randomness that matters for correctness, the data order and the curriculum's draws, is seeded by
seed and epoch, not by these streams).

All of it is written into `checkpoint_{epoch}.tmp-step{global_step}`, fsynced, then renamed (atomic on POSIX; on several
nodes save_path must be one shared filesystem). Every rank writes its shards and its rng file; rank 0 the shared files,
with barriers between the phases. A directory without COMPLETE, or still named `*.tmp-*`, is an interrupted write:
`find_latest_checkpoint` ignores it and names it, and nothing here deletes it, except a leftover tmp dir of the very
checkpoint being written again. A finished checkpoint is never deleted by saving: one whose name is taken again is
moved aside to `checkpoint_{epoch}.replaced-{time}`; `retain` (keep_checkpoints) deletes old ones only after the new
one is complete, never the best one, and with weights_only_checkpoints thins them to model/ + the model files instead.

    python -m multimodal_coconut.checkpoint export RUN_DIR/checkpoint_N OUT.safetensors   # one file, for sharing
    python -m multimodal_coconut.checkpoint export RUN_DIR/checkpoint_N OUT_DIR            # a plain HF folder
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

_CKPT = re.compile(r"checkpoint_(\d+)")
_TMP = re.compile(r"checkpoint_(\d+)\.tmp-.*")
COMPLETE = "COMPLETE"
MODEL_DIR, OPTIMIZER_DIR, SCHEDULER_FILE, PROGRESS_FILE = "model", "optimizer", "scheduler.pt", "progress.json"
OPTIMIZER_GROUPS_FILE = "optimizer_groups.pt"  # an optimizer saved before its first step: hyperparameters only
MODEL_FILE = "model.safetensors"  # the weights of an HF export (export_hf) and of `export`'s single file
INFO_FILE = "coconut.json"  # the training config and stage of a checkpoint or export (inference.load_trained)


# --- state dicts: plain, DDP and FSDP2 models ------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`); the model itself otherwise (FSDP2 shards in place, no wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp2(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (sharded with `torch.distributed.fsdp.fully_shard`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _dcp_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict with the plain module's key names.

    Under FSDP2 this is a collective (every rank must call it) and only rank 0 gets the tensors, on CPU; the other
    ranks get {}. Plain and DDP models give their own tensors (no copy; shared tensors stay shared).
    """
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_dcp_options(full_state_dict=True, cpu_offload=True))
    return {k: v.detach() for k, v in _unwrap(model).state_dict().items()}


WRAPPER_PREFIX = "base_model."  # MultimodalCoconut holds the backbone as `base_model`
# MultimodalCoconut's own parameters, beside the backbone's: the learned thought projection (thought_norm: projection).
# They keep their names in checkpoints (the backbone's lose `base_model.`) and are written beside an HF export.
WRAPPER_OWN = ("thought_projection.",)
WRAPPER_OWN_FILE = "coconut_weights.safetensors"  # in an HF export: the wrapper's own weights, when it has any


def is_wrapper_own(key: str) -> bool:
    return key.startswith(WRAPPER_OWN)


def backbone_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a MultimodalCoconut (`base_model.` keys) keyed as its backbone's, the wrapper's own weights
    (WRAPPER_OWN) as they are; other dicts unchanged."""
    if any(k.startswith(WRAPPER_PREFIX) for k in state_dict) and \
            all(k.startswith(WRAPPER_PREFIX) or is_wrapper_own(k) for k in state_dict):
        return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state_dict.items()}
    return dict(state_dict)


def split_wrapper_own(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the backbone's weights, the wrapper's own) of a backbone-keyed state dict."""
    own = {k: v for k, v in state_dict.items() if is_wrapper_own(k)}
    return {k: v for k, v in state_dict.items() if not is_wrapper_own(k)}, own


def _keys_for(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone-keyed weights re-keyed for `model` when it is the Coconut wrapper (its keys start `base_model.`)."""
    first = next(iter(_unwrap(model).state_dict()), "")
    if first.startswith(WRAPPER_PREFIX) and not any(k.startswith(WRAPPER_PREFIX) for k in state_dict):
        return {(k if is_wrapper_own(k) else WRAPPER_PREFIX + k): v for k, v in state_dict.items()}
    return dict(state_dict)


def load_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load full weights into a plain, DDP or FSDP2 model (under FSDP2 every rank passes the full state dict and
    keeps its shard); backbone-keyed weights load into the Coconut wrapper too. Returns the missing/unexpected keys
    of a non-strict load."""
    state_dict = _keys_for(model, state_dict)
    if is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(model, dict(state_dict), options=_dcp_options(full_state_dict=True, strict=strict))
    return _unwrap(model).load_state_dict(state_dict, strict=strict)


def sharded_model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """This rank's view of the weights, keyed as the backbone: DTensor shards under FSDP2 (nothing is gathered), the
    tensors themselves otherwise. `trainable_only` leaves out frozen parameters (a LoRA run's base model)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_dcp_options(ignore_frozen_params=trainable_only))
    # torch keeps one name of a tied parameter; every name is kept, so that the weights read back load anywhere
    # (a tied LM head, or the head name of a model that unties them).
    first: dict[int, str] = {}
    for name, param in _unwrap(model).named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
        if name not in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
    return backbone_keys(state)


def _optimizer_options():
    return _dcp_options(flatten_optimizer_state_dict=True)  # keys "state.<param name>.exp_avg": reshardable


# --- DCP -------------------------------------------------------------------------------------------------------


def _dcp_save(state: dict, path: Path, distributed: bool, asynchronous: bool = False, group=None):
    """dcp.save; asynchronous: dcp.async_save, which copies the state to CPU memory before it returns and writes it
    in a background thread (collectives on `group`); returns its future (None when synchronous)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        writer = dcp.FileSystemWriter(str(path))
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not distributed)
        dcp.save(state, storage_writer=writer, no_dist=not distributed)
        return None


def _dcp_load(state: dict, path: Any, distributed: bool) -> None:
    import torch.distributed.checkpoint as dcp

    reader = path if not isinstance(path, Path) else dcp.FileSystemReader(str(path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, storage_reader=reader, no_dist=not distributed)


def _dcp_keys(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def read_dcp(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint directory, whole, on CPU, in this process alone (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in reader.read_metadata().state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    _dcp_load(state, reader, distributed=False)
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --- safetensors with shared tensors ---------------------------------------------------------------------------


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save a state dict as safetensors, on CPU, fsynced.

    safetensors refuses tensors that share memory, which every tied model (embeddings = LM head) and every wrapper
    that registers a submodule twice (MultimodalCoconut's `embedding`, `decoder`, `lm_head`) has. Identical views
    are stored once and the other names recorded in the metadata (`aliases`), so loading restores every key;
    partial overlaps (different views of one storage) are stored as copies.
    """
    from torch.distributed.tensor import DTensor

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if isinstance(t, DTensor):
            raise TypeError(f"state dict entry {name!r} is a sharded DTensor: gather it with full_model_state_dict")
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        key = (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ptr and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    storages: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if t.numel():
            storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    for names in storages.values():
        if len(names) > 1:
            for name in names:
                tensors[name] = tensors[name].clone()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _fsync_file(path)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load what `save_safetensors` wrote, aliases restored as the same tensor (on CPU)."""
    tensors = load_file(os.fspath(path))
    with safe_open(os.fspath(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def read_model_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint directory (its DCP model/, read whole on CPU in this process), an HF export, a
    `.safetensors` file, or a torch-saved state dict (the original Coconut's checkpoint files); for `load_model_path`
    and exports. Keys are as stored: the backbone's for our checkpoints (only the trained ones for a LoRA run)."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_DIR).is_dir():
            _check_complete(path)
            return read_dcp(path / MODEL_DIR)
        if (path / WRAPPER_OWN_FILE).is_file():  # an HF export of a model with weights of its own
            return {**read_model_state_dict(path / MODEL_FILE), **load_safetensors(path / WRAPPER_OWN_FILE)}
        path = path / MODEL_FILE  # an HF export
    if not path.exists():
        raise FileNotFoundError(f"no model weights at {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# --- RNG -------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when CUDA is in use) current-device CUDA RNG states, in weights_only-loadable
    types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # only the current device: all devices would create contexts
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore `rng_state()` output: the random streams continue exactly where they were saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- saving ----------------------------------------------------------------------------------------------------


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = (
        "resume", "load_model_path", "num_epochs", "only_eval", "num_workers", "log_every", "tensorboard", "wandb",
        "num_examples_to_print", "eval_batch_size", "export_hf", "project", "distributed", "keep_checkpoints",
        "weights_only_checkpoints")) -> str:
    """Short hash of the settings a resumed run must share with the run that wrote the checkpoint (keys that may
    change between the two, like num_epochs, logging, DDP <-> FSDP2 or the disk policy, are left out). A resume on
    another number of processes changes batch_size_training too: what must match then is the global batch."""
    kept = {k: v for k, v in sorted(config.items()) if k not in set(ignore)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _default_barrier(world_size: int) -> Callable[[], None]:
    if world_size == 1:
        return lambda: None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs a barrier callable or an initialised process group")
    return dist.barrier


def _move_aside(path: Path, reason: str, log: Callable[[str], None] | None) -> Path:
    target = path.with_name(f"{path.name}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.rename(path, target)
    if log:
        log(f"checkpoint: moved existing {path} aside to {target.name}")
    return target


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL) at a named point: how the tests crash a run deterministically (mid-step, mid-
    generation, mid-checkpoint) to prove that a re-run, or torchrun's restart, ends as an uninterrupted run. A no-op
    unless MMC_FAULT names the point.

    MMC_FAULT is a comma-separated list, one fault per torchrun attempt: the i-th fires in attempt i
    (TORCHELASTIC_RESTART_COUNT, 0 outside torchrun), so `train_step:3@1,generate:2@0` kills rank 1 at optimizer step
    3, then, in the restarted workers, rank 0 during epoch 2's generation. Without `@rank` every rank dies there.
    A `~stop` suffix stops the process (SIGSTOP) instead: a hung rank whose peers wait for it.
    """
    faults = [f for f in os.environ.get("MMC_FAULT", "").split(",") if f]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(faults):
        return
    fault, _, how = faults[attempt].partition("~")
    point, _, rank = fault.partition("@")
    if point == name and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


def save_checkpoint(save_dir: str | os.PathLike, epoch: int, model: nn.Module | Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, **kwargs) -> Path:
    """Write `save_dir/checkpoint_{epoch}` atomically; every rank calls it, all return its path.

    `model`: the model (plain, DDP or FSDP2: every rank writes its own shards) or a full state dict (written by rank
    0 alone). `optimizer`: its state is saved keyed by parameter name (needs `model` to be the module). `scheduler`:
    anything with `state_dict()`. Keyword arguments: those of `start_checkpoint`.
    """
    return start_checkpoint(save_dir, epoch, model, optimizer, scheduler, **kwargs).wait()


class PendingCheckpoint:
    """A checkpoint whose shards may still be being written. `wait()` (every rank, at the same point) waits for the
    writes, then marks the checkpoint COMPLETE and gives it its final name; it returns the final path."""

    def __init__(self, path: Path, finish: Callable[[], None]):
        self.path, self._finish = path, finish

    def wait(self) -> Path:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return self.path


def start_checkpoint(save_dir: str | os.PathLike, epoch: int, model: nn.Module | Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, *,
                     global_step: int = 0, best_metric: float | None = None, config_hash: str | None = None,
                     metrics: list | None = None, extra: Mapping[str, Any] | None = None, rank: int = 0,
                     world_size: int = 1, barrier: Callable[[], None] | None = None,
                     model_files: Callable[[Path], None] | None = None, trainable_only: bool = False,
                     asynchronous: bool = False, groups: tuple | None = None,
                     log: Callable[[str], None] | None = print) -> PendingCheckpoint:
    """Begin writing `save_dir/checkpoint_{epoch}` (see `save_checkpoint`); every rank calls it.

    `barrier` defaults to `torch.distributed.barrier` when world_size > 1. `model_files(dir)` writes what makes the
    checkpoint usable on its own (tokenizer, model config: `save_model_files`), on rank 0. `trainable_only`: save
    only parameters that train (LoRA). `asynchronous` (async_checkpoint): the model and optimizer shards are copied
    to CPU memory before this returns, so training may go on and change them, and written to disk in the background,
    one thread for the model and one for the optimizer; with several processes each thread's collectives run on a
    process group of its own, `groups` = (model's, optimizer's), e.g. two Gloo groups, so that they never interleave
    with each other's or training's. Until `wait()` the checkpoint is a `.tmp-` directory without COMPLETE, which
    nothing resumes from.
    """
    save_dir = Path(save_dir)
    barrier = barrier or _default_barrier(world_size)
    module = model if isinstance(model, nn.Module) else None
    final = save_dir / f"checkpoint_{epoch}"
    tmp = save_dir / f"checkpoint_{epoch}.tmp-step{global_step}"

    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # an interrupted write of this same checkpoint: start it again
            if log:
                log(f"checkpoint: removing {tmp}, left by an interrupted write of this checkpoint")
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()

    # Every rank: its shards of the model and optimizer, and its RNG state. Rank 0: everything shared.
    distributed = world_size > 1 and _distributed()
    if asynchronous and distributed and groups is None:
        raise ValueError("asynchronous checkpoints with several processes need `groups`: two process groups of their "
                         "own, so that the background writes' collectives never meet training's")
    writes = []  # futures of the asynchronous DCP writes
    model_group, optimizer_group = groups or (None, None)
    if module is not None:
        writes.append(_dcp_save(sharded_model_state_dict(module, trainable_only), tmp / MODEL_DIR, distributed,
                                asynchronous, model_group))
    elif rank == 0:
        writes.append(_dcp_save(backbone_keys(model), tmp / MODEL_DIR, False, asynchronous))
    if optimizer is not None:
        if optimizer.state:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            if module is None:
                raise ValueError("saving the optimizer needs the model (its parameter names), not a state dict")
            state = get_optimizer_state_dict(module, optimizer, options=_optimizer_options())
            writes.append(_dcp_save(state, tmp / OPTIMIZER_DIR, distributed, asynchronous, optimizer_group))
        elif rank == 0:
            # Not stepped yet: torch's state-dict API would first initialise it with a zero step, which changes
            # later Adam updates. Its hyperparameters are all there is.
            _torch_save([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                        tmp / OPTIMIZER_GROUPS_FILE)
    _torch_save(rng_state(), tmp / f"rng_rank{rank}.pt")
    fault_point(f"checkpoint_write:{epoch}")  # asynchronous: while the background writes are in flight
    if rank == 0:
        if model_files is not None:
            model_files(tmp)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        progress = {"epoch": epoch, "global_step": global_step, "best_metric": best_metric,
                    "config_hash": config_hash, "metrics": list(metrics or []), "world_size": world_size,
                    "trainable_only": trainable_only, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **dict(extra or {})}
        _write_json(progress, tmp / PROGRESS_FILE)
    return PendingCheckpoint(final, lambda: _finish_checkpoint(tmp, final, epoch, writes, rank, world_size,
                                                               barrier, log))


def _finish_checkpoint(tmp: Path, final: Path, epoch: int, writes: list, rank: int, world_size: int,
                       barrier: Callable[[], None], log: Callable[[str], None] | None) -> None:
    """Wait for this rank's writes, then (rank 0, once every rank is done) COMPLETE and the rename."""
    for future in writes:
        if future is not None:
            future.result()  # raises what the background write raised
    barrier()

    if rank == 0:
        save_dir = final.parent
        files = _file_sizes(tmp)
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if f"rng_rank{r}.pt" not in files]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: missing {missing} after the barrier")
        for name in files:
            if "/" in name:  # DCP fsyncs its own files; the directories holding them too
                _fsync_dir(tmp / name.rsplit("/", 1)[0])
        _write_json({"epoch": epoch, "files": files}, tmp / COMPLETE)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of this epoch from an earlier attempt: keep it, under another name
            _move_aside(final, "replaced" if (final / COMPLETE).exists() else "incomplete", log)
        os.rename(tmp, final)
        _fsync_dir(save_dir)
    barrier()


def _file_sizes(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


# --- finding and loading ---------------------------------------------------------------------------------------


def list_checkpoints(save_dir: str | os.PathLike, log: Callable[[str], None] | None = print) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, path), oldest first. Interrupted writes (`checkpoint_N.tmp-*` directories,
    or `checkpoint_N` without COMPLETE) are skipped with a message naming them, and left where they are."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for path in sorted(save_dir.iterdir()):
        if _TMP.fullmatch(path.name):
            if log:
                log(f"checkpoint: ignoring {path}: an interrupted checkpoint write (left in place)")
            continue
        m = _CKPT.fullmatch(path.name)
        if not m:
            continue
        if not path.is_dir() or not (path / COMPLETE).is_file():
            if log:
                log(f"checkpoint: ignoring {path}: not a complete checkpoint directory (no {COMPLETE}; left in place)")
            continue
        found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(save_dir: str | os.PathLike, log: Callable[[str], None] | None = print) -> Path | None:
    """The complete checkpoint with the largest epoch in `save_dir`, or None (see `list_checkpoints`)."""
    found = list_checkpoints(save_dir, log)
    return found[-1][1] if found else None


def _check_complete(path: Path) -> dict:
    marker = path / COMPLETE
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    info = json.loads(marker.read_text())
    for name, size in info["files"].items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise ValueError(f"checkpoint {path}: {name} is {actual} bytes, COMPLETE recorded {size}")
    return info


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, rank: int = 0, *, restore_rng: bool = True,
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG streams from a checkpoint; return progress.json.

    Every rank calls it, with any number of processes and any wrapping (plain, DDP, FSDP2): DCP reads the pieces this
    rank's shards need. A checkpoint that holds only some parameters (a LoRA run's) loads those and leaves the rest,
    which must then be frozen. A rank with no rng file of its own (resuming on more processes than saved) keeps its
    current RNG state, with a message.
    """
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    _check_complete(path)
    distributed = _distributed()
    saved = _dcp_keys(path / MODEL_DIR)
    state = sharded_model_state_dict(model)
    trainable = sharded_model_state_dict(model, trainable_only=True).keys()
    missing, unexpected = sorted(trainable - saved), sorted(saved - state.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model: it lacks trained weights {missing[:5]}, "
                         f"and holds weights the model does not have {unexpected[:5]}")
    state = {k: v for k, v in state.items() if k in saved}
    _dcp_load(state, path / MODEL_DIR, distributed)
    set_model_state_dict(model, _keys_for(model, state), options=_dcp_options(strict=False))
    if optimizer is not None:
        if (path / OPTIMIZER_DIR).is_dir():
            optim_state = get_optimizer_state_dict(model, optimizer, options=_optimizer_options())
            _dcp_load(optim_state, path / OPTIMIZER_DIR, distributed)
            set_optimizer_state_dict(model, optimizer, optim_state, options=_optimizer_options())
        elif (path / OPTIMIZER_GROUPS_FILE).is_file():
            groups = torch.load(path / OPTIMIZER_GROUPS_FILE, weights_only=True)
            if len(groups) != len(optimizer.param_groups):
                raise ValueError(f"saved optimizer has {len(groups)} parameter groups, this one "
                                 f"{len(optimizer.param_groups)}")
            for group, saved_group in zip(optimizer.param_groups, groups):
                group.update(saved_group)
        else:
            raise FileNotFoundError(f"{path} holds no optimizer state (a weights-only checkpoint?) to restore the "
                                    "optimizer from")
    if scheduler is not None:
        if not (path / SCHEDULER_FILE).exists():
            raise FileNotFoundError(f"{path} holds no {SCHEDULER_FILE} to restore the scheduler from")
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    if restore_rng:
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        elif log:
            log(f"checkpoint: {path} has no {rng_file.name} (saved with fewer processes); rank {rank} keeps its RNG")
    return json.loads((path / PROGRESS_FILE).read_text())


def holds_full_model(path: str | os.PathLike) -> bool:
    """Whether a checkpoint holds every weight (not only a LoRA run's trained ones)."""
    return not json.loads((Path(path) / PROGRESS_FILE).read_text()).get("trainable_only")


def is_weights_only(path: str | os.PathLike) -> bool:
    """A checkpoint thinned by `retain` to its model (no optimizer or RNG state): usable, not resumable."""
    return bool(json.loads((Path(path) / COMPLETE).read_text()).get("weights_only"))


def prune_checkpoints(save_dir: str | os.PathLike, keep: Iterable[str | os.PathLike],
                      log: Callable[[str], None] | None = print) -> list[Path]:
    """Delete complete checkpoints not in `keep`, never the newest complete one; return what was deleted.
    Interrupted writes are left alone."""
    found = list_checkpoints(save_dir, log=None)
    keep = {Path(p).resolve() for p in keep}
    removed = []
    for _, path in found[:-1]:
        if path.resolve() not in keep:
            shutil.rmtree(path)
            removed.append(path)
            if log:
                log(f"checkpoint: deleted {path}")
    return removed


def _thin(path: Path, log: Callable[[str], None] | None) -> None:
    """Make a checkpoint weights-only: COMPLETE is rewritten first (atomically) without the optimizer, scheduler and
    RNG files, which are deleted after; a kill in between leaves a valid weights-only checkpoint with extra files."""
    info = json.loads((path / COMPLETE).read_text())
    drop = lambda name: name.split("/")[0] in (OPTIMIZER_DIR, OPTIMIZER_GROUPS_FILE, SCHEDULER_FILE) \
        or name.startswith("rng_rank")  # noqa: E731
    info = {**info, "weights_only": True, "files": {k: v for k, v in info["files"].items() if not drop(k)}}
    _write_json(info, path / f"{COMPLETE}.tmp")
    os.replace(path / f"{COMPLETE}.tmp", path / COMPLETE)
    for item in list(path.iterdir()):
        if drop(item.name):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    if log:
        log(f"checkpoint: kept only the weights of {path} (weights_only_checkpoints)")


def best_epoch(progress: Mapping[str, Any]) -> int | None:
    """The epoch whose evaluation set `best_metric` (the first to reach it), from a progress.json."""
    best = progress.get("best_metric")
    for m in progress.get("metrics", []):
        if best is not None and m.get("mc_accuracy", m.get("da_accuracy")) == best:
            return m["epoch"]
    return None


def retain(save_dir: str | os.PathLike, keep: int, weights_only: bool = False,
           log: Callable[[str], None] | None = print) -> list[Path]:
    """keep_checkpoints / weights_only_checkpoints, on rank 0 after a checkpoint is complete: of the resumable
    checkpoints, the newest `keep` stay (0 = all), and so does the best one (`best_metric` of the newest
    progress.json); each older one is deleted, or with `weights_only` thinned to its weights. Returns the paths
    deleted or thinned. Interrupted writes are left alone."""
    found = [(e, p) for e, p in list_checkpoints(save_dir, log=None) if not is_weights_only(p)]
    if keep <= 0 or len(found) <= keep:
        return []
    best = best_epoch(json.loads((found[-1][1] / PROGRESS_FILE).read_text()))
    changed = []
    for epoch, path in found[:-keep]:
        if epoch == best:
            continue
        if weights_only:
            _thin(path, log)
        else:
            shutil.rmtree(path)
            if log:
                log(f"checkpoint: deleted {path} (keep_checkpoints={keep})")
        changed.append(path)
    return changed


def disk_used(path: str | os.PathLike) -> int:
    """Bytes of all files under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# --- Hugging Face files ----------------------------------------------------------------------------------------


def save_model_files(out_dir: str | os.PathLike, model_base: nn.Module, tokenizer: Any, image_processor: Any,
                     info: Mapping[str, Any]) -> None:
    """Everything but the weights that using the model needs: the model config (and, for a remote-code backbone
    such as the original-format InternVL, its .py files), the tokenizer with Coconut's tokens, the image processor,
    and `info` (the run's config and the stage trained at) as coconut.json. Rank 0 only."""
    from transformers.dynamic_module_utils import custom_object_save

    out_dir = Path(out_dir)
    if getattr(model_base, "is_remote_code", lambda: False)():
        custom_object_save(model_base, out_dir, config=model_base.config)
    model_base.config.architectures = [type(model_base).__name__]
    model_base.config.save_pretrained(out_dir)
    for part in (tokenizer, image_processor):
        if part is not None:
            part.save_pretrained(out_dir)
    _write_json(dict(info), out_dir / INFO_FILE)




def export_hf(model_base: nn.Module, tokenizer: Any, image_processor: Any, out_dir: str | os.PathLike, *,
              state_dict: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False,
              info: Mapping[str, Any] | None = None, own: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write an ordinary HF checkpoint directory (`save_pretrained` of model, tokenizer, image processor) atomically.

    `model_base` is the backbone (MultimodalCoconut.base_model, with the latent tokens added); call on rank 0 only.
    Under FSDP2 pass `state_dict`, the gathered full weights keyed as `model_base.state_dict()`. `info` (the run's
    config and stage) is written as coconut.json, which `inference.load_trained` reads; `own`, the Coconut wrapper's
    own weights (WRAPPER_OWN: the thought projection), as WRAPPER_OWN_FILE beside the model's. An existing
    `out_dir` is an error unless `overwrite`, in which case it is replaced only once the new export is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model_base.save_pretrained(tmp, state_dict=dict(state_dict) if state_dict is not None else None)
    for part in (tokenizer, image_processor):
        if part is not None:
            part.save_pretrained(tmp)
    if info is not None:
        _write_json(dict(info), tmp / INFO_FILE)
    if own:
        save_safetensors(own, tmp / WRAPPER_OWN_FILE)
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync_file(file)
    _fsync_dir(tmp)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)
    return out_dir


# --- command line ----------------------------------------------------------------------------------------------


def export_file(checkpoint: str | os.PathLike, out: str | os.PathLike, own_file: Path | None = None) -> Path:
    """A checkpoint's model weights (read whole from its shards) as one .safetensors file, keyed as the backbone
    (`from_pretrained(checkpoint_dir, state_dict=load_safetensors(out))` or plain `load_state_dict`). `own_file`:
    where the wrapper's own weights go instead (an HF folder's WRAPPER_OWN_FILE), if it has any."""
    checkpoint, out = Path(checkpoint), Path(out)
    progress = checkpoint / PROGRESS_FILE
    if progress.is_file() and not holds_full_model(checkpoint):
        raise ValueError(f"{checkpoint} is a LoRA checkpoint: it holds only the adapters and new token rows; "
                         "export the merged model with export_hf: true (RUN_DIR/hf_model) instead")
    state = read_model_state_dict(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    if own_file is not None:
        state, own = split_wrapper_own(state)
        if own:
            save_safetensors(own, own_file.with_name(f"{own_file.name}.tmp-{os.getpid()}"))
            os.replace(own_file.with_name(f"{own_file.name}.tmp-{os.getpid()}"), own_file)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    save_safetensors(state, tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m multimodal_coconut.checkpoint",
                                     description="Convert a checkpoint's sharded weights into one safetensors file.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="RUN_DIR/checkpoint_N -> OUT: a .safetensors file, or else a folder "
                                           "that from_pretrained loads (model.safetensors + the model files)")
    export.add_argument("checkpoint")
    export.add_argument("out")
    a = parser.parse_args(argv)
    out, t0, own_file = Path(a.out), time.time(), None
    if out.suffix != ".safetensors":  # a folder: the model files beside model.safetensors, a plain HF folder
        state_files = (MODEL_DIR, OPTIMIZER_DIR, OPTIMIZER_GROUPS_FILE, SCHEDULER_FILE, PROGRESS_FILE, COMPLETE)
        out.mkdir(parents=True, exist_ok=True)
        for item in Path(a.checkpoint).iterdir():
            if item.is_file() and item.name not in state_files and not item.name.startswith("rng_rank"):
                shutil.copy2(item, out / item.name)
        out, own_file = out / MODEL_FILE, out / WRAPPER_OWN_FILE
    path = export_file(a.checkpoint, out, own_file)
    print(f"wrote {path} ({human_bytes(path.stat().st_size)}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
