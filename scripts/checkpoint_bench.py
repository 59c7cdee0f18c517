"""Checkpoint size and write time (full vs LoRA vs weights-only) and the peak memory of a LoRA step, for the
`internvl3-1b-shape` preset (938M parameters, fp32) on CPU. Prints a markdown table (docs/benchmarks.md).

    nice python scripts/checkpoint_bench.py --out /tmp/ckpt_bench [--lora-r 16]

One process, no process group (the format is the same with N: each rank writes its shards). The full run's AdamW
state (exp_avg, exp_avg_sq and step per parameter, what a stepped AdamW holds) is written as its own DCP directory
after the model is freed, to keep the peak under ~8 GB on a shared machine; a full training step (weights + grads +
AdamW = 4 x 3.75 GB, plus activations) is not run here.
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import time
from pathlib import Path

import torch


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_and_text_batch():
    """The 938M-parameter InternVL3-1B-shaped Coconut model and a 256-token text batch (no image placeholder, no
    latent tokens): the input of the LoRA step and of the full step."""
    from multimodal_coconut import MultimodalCoconut, load_backbone

    bb = load_backbone("internvl3-1b-shape", image_size=448)
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id)
    ids = torch.randint(0, 1000, (1, 256))
    ids[ids == model.image_token_id] = bb.eos_token_id
    ids[(ids == bb.latent_id) | (ids == bb.start_latent_id) | (ids == bb.end_latent_id)] = bb.eos_token_id
    return model, ids


def main() -> None:
    from multimodal_coconut.checkpoint import _dcp_save, disk_used, save_checkpoint, start_checkpoint
    from multimodal_coconut.config import Config
    from multimodal_coconut.lora import apply_lora
    from multimodal_coconut.train import freeze

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/ckpt_bench")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--full-step", action="store_true",
                        help="only measure the peak memory of one full AdamW step (every weight trains; ~17 GB)")
    a = parser.parse_args()
    if a.full_step:
        return full_step_peak()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(2)
    rows = []

    def timed_save(name, model, **kw):
        t0 = time.time()
        path = save_checkpoint(out / name, 1, model, log=None, **kw)
        return path, time.time() - t0

    model, ids = model_and_text_batch()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built: {n_params / 1e6:.1f}M parameters, RSS {rss_gb():.1f} GB", flush=True)

    path, seconds = timed_save("weights", model)
    weights_bytes = disk_used(path / "model")
    rows.append(("weights only (model/)", weights_bytes, seconds))
    print(rows[-1], flush=True)

    # LoRA on the language model, vision and projector frozen (the usual VLM recipe), one real step on text.
    cfg = Config(dataset="builtin", lora_r=a.lora_r, lora_alpha=2 * a.lora_r, freeze_vision=True,
                 freeze_projector=True)
    freeze(model, cfg)
    apply_lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    before = rss_gb()
    t0 = time.time()
    loss = model(ids, torch.ones_like(ids), ids, torch.arange(256)[None]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"LoRA step: {time.time() - t0:.1f} s, RSS {before:.1f} -> peak {peak_gb():.1f} GB", flush=True)
    lora_peak = peak_gb()
    # async_checkpoint: how long training is blocked (the copy to CPU memory) against the whole write; after the
    # LoRA step, so that its CPU copy does not count in that step's peak (the weights are the same bytes).
    t0 = time.time()
    pending = start_checkpoint(out / "async", 1, model, log=None, asynchronous=True)
    blocked = time.time() - t0
    pending.wait()
    async_total = time.time() - t0
    print(f"async weights: training blocked {blocked:.1f} s, written after {async_total:.1f} s", flush=True)
    shutil.rmtree(out / "async")

    path, seconds = timed_save("lora", model, optimizer=optimizer, trainable_only=True)
    n_trainable = sum(p.numel() for p in trainable)
    rows.append((f"LoRA r={a.lora_r} (adapters + 3 token rows x2, + AdamW)", disk_used(path), seconds))
    print(rows[-1], flush=True)

    # The full run's optimizer state: exp_avg, exp_avg_sq (fp32, one of each per weight) and step.
    names = [(n, p.shape) for n, p in model.named_parameters()
             if "lora_" not in n and "tokens_delta" not in n]
    del model, optimizer, trainable
    gc.collect()
    state = {}
    for n, shape in names:
        n = n.replace(".base_layer", "").replace(".token_adapter", "")
        state[f"state.{n}.exp_avg"] = torch.full(shape, 1e-3)
        state[f"state.{n}.exp_avg_sq"] = torch.full(shape, 1e-6)
        state[f"state.{n}.step"] = torch.tensor(1.0)
    t0 = time.time()
    _dcp_save(state, out / "optimizer", distributed=False)
    optim_seconds = time.time() - t0
    optim_bytes = disk_used(out / "optimizer")
    rows.insert(0, ("full (model/ + optimizer/)", weights_bytes + optim_bytes,
                    rows[0][2] + optim_seconds))
    print(f"\n{n_params / 1e6:.1f}M parameters; LoRA trains {n_trainable / 1e6:.2f}M; LoRA step peak RSS "
          f"{lora_peak:.1f} GB\n")
    print("| checkpoint | size | write time (s) | fraction of full |\n|---|---|---|---|")
    for name, size, seconds in rows:
        print(f"| {name} | {size / 2**30:.2f} GiB | {seconds:.1f} | {size / rows[0][1]:.2%} |")
    print(f"| weights only, async_checkpoint | {weights_bytes / 2**30:.2f} GiB | training blocked {blocked:.1f}, "
          f"written after {async_total:.1f} | {weights_bytes / rows[0][1]:.2%} |")
    shutil.rmtree(out, ignore_errors=True)


def full_step_peak() -> None:
    """One AdamW step of the whole model on the same text batch as the LoRA step: weights + gradients + AdamW's two
    moments (4 x 3.75 GB) plus activations."""
    torch.set_num_threads(2)
    model, ids = model_and_text_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = rss_gb()
    t0 = time.time()
    model(ids, torch.ones_like(ids), ids, torch.arange(256)[None]).loss.backward()
    optimizer.step()
    print(f"full step: {time.time() - t0:.1f} s, RSS {before:.1f} -> peak {peak_gb():.1f} GB", flush=True)


if __name__ == "__main__":
    main()
