"""run.py under a process-group shim that behaves like a GPU machine's process group, on CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/nccl_shim.py CONFIG.yaml key=value ...

`distributed.setup` is made to believe CUDA is available, so it asks for the backend it asks for on GPUs; the shim
records that request, starts a real Gloo group instead and keeps the model on the CPU. Every collective that the
package itself calls (not torch's FSDP / DDP / checkpoint internals, which put their tensors on the model's device,
the CPU here) then checks what NCCL would: a tensor of a device type the requested backend does not serve (a CPU
tensor under a plain "nccl" group) raises, as NCCL does. Object collectives are exempt (on NCCL they stage through
the current CUDA device by themselves).

What it cannot simulate: NCCL itself, CUDA streams and memory, a tensor on the wrong GPU.
"""

import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multimodal_coconut import distributed  # noqa: E402
from multimodal_coconut.cli import main  # noqa: E402

PACKAGE = str(Path(distributed.__file__).parent)
requested = {}


def serves(device_type: str) -> bool:
    backend = requested["backend"]
    if ":" not in backend:  # one backend for every device type it supports
        return {"nccl": "cuda", "gloo": "cpu"}.get(backend) == device_type
    return device_type in [part.split(":")[0] for part in backend.split(",")]


def checked(collective):
    def wrapper(tensor, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
        if caller.startswith(PACKAGE):
            for t in tensors:
                if isinstance(t, torch.Tensor) and not serves(t.device.type):
                    raise RuntimeError(f"nccl shim: {collective.__name__} on a {t.device.type} tensor, which the "
                                       f"process group ({requested['backend']!r}) cannot take (called from {caller})")
        return collective(tensor, *args, **kwargs)
    return wrapper


for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce",
             "gather", "scatter"):
    setattr(dist, name, checked(getattr(dist, name)))

real_init, real_setup = dist.init_process_group, distributed.setup


def fake_init(backend=None, **kwargs):
    requested["backend"] = backend
    kwargs.pop("device_id", None)
    real_init("gloo", **kwargs)


def fake_setup(**kwargs):
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.set_device"), \
            mock.patch.object(dist, "init_process_group", fake_init):
        env = real_setup(**kwargs)
    assert env.device.type == "cuda", "setup did not take the GPU path"
    env.device = torch.device("cpu")
    if env.master:
        print(f"nccl shim: the GPU path requested backend {requested['backend']!r}", flush=True)
    return env


distributed.setup = fake_setup

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
