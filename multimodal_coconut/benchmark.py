"""Speed and memory of MultimodalCoconut against the plain backbone, the original Coconut algorithm and naive recompute.

    python -m multimodal_coconut.benchmark                      # CPU, `small` preset, a few minutes on 2 cores
    python -m multimodal_coconut.benchmark --device cuda --preset internvl3-1b-shape --out bench_gpu.json
    python -m multimodal_coconut.benchmark --preset tiny --repeats 1 --quick   # seconds: a smoke test

One run, one model, the same inputs for every variant (issue 5, docs/benchmarks.md):

  train     forward + backward of a realistic batch (4 rows x 4 tiles x 256 image tokens, a question, 8 thoughts, the
            remaining steps and answer): the plain backbone over the same tokens without thoughts (the floor), ours
            (all-position logits, and `labelled_logits_only` as training runs it), the original algorithm
            (`baselines.original_forward`) and naive recompute (`baselines.naive_forward`);
  generate  32 new tokens for 16 questions: our batched KV-cached `generate`, the backbone's own batched HF
            `generate` on the same prompts (thought positions fed as ordinary tokens), the original algorithm one
            question at a time;
  memory    peak memory of one training step: CUDA `max_memory_allocated`, or on CPU the peak resident-set increase
            (Linux VmHWM, reset before the step, with glibc returning freed blocks to the OS);
  scaling   step time against thoughts (0, 2, 4, 8) and image tokens (1, 4, 13 tiles = 256, 1,024, 3,328 tokens).

Every figure is the median of `--repeats` timed runs after one warm-up; it prints tables and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .backbone import IMG_CONTEXT, IMG_END, IMG_START, Backbone, add_latent_tokens, load_backbone, train_tiny_tokenizer
from .baselines import naive_forward, original_forward, original_generate
from .model import MultimodalCoconut

# bf16 dense peak of the accelerators we know (TFLOP/s, no sparsity), for MFU; `--peak-tflops` for any other.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

QUESTIONS = [
    "What color is the shape to the right of the red circle?",
    "Which shape is directly below the blue square?",
    "How many triangles are there in the picture?",
    "What is the person next to the window holding?",
    "Is the dog sitting on the couch or near the window?",
    "Which shape is at the top left of the image?",
    "What color is the largest shape?",
    "Why is the person holding an umbrella?",
]
REST = ("The red circle is at the top left.\nThe shape to its right is a yellow square.\n"
        "The square is above the green triangle.\n### yellow")


@dataclass
class Setup:
    """What one benchmark run measures (the defaults are the issue's shapes)."""

    preset: str = "small"
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3
    batch: int = 4
    tiles: int = 4  # per row; image tokens per row = tiles x tokens per tile
    thoughts: int = 8  # stage 4 x c_thought 2
    slow_repeats: int = 1  # the original algorithm and naive recompute take many seconds a step on CPU
    gen_questions: int = 16
    gen_tokens: int = 32
    original_gen_questions: int = 16  # the original generates one question at a time: time this many, scale to all
    scaling_tiles: tuple = (1, 4, 13)
    scaling_thoughts: tuple = (0, 2, 4, 8)
    scaling_batch: int = 4
    warmup: bool = True  # one untimed run of every variant first
    peak_tflops: float | None = None
    profile: bool = False


# -- the model -------------------------------------------------------------------------------------------------------


def build_small(seed: int = 0) -> Backbone:
    """An InternVL-architecture model at InternVL3's tile geometry (448px tiles, 14px patches, pixel shuffle: 256
    tokens per tile) and a 32k vocabulary, small enough that the whole CPU benchmark runs in minutes on 2 cores."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from .backbone import _image_processor

    tokenizer = train_tiny_tokenizer([])
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=512, image_size=448, patch_size=14),
        text_config=Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                                tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    start, end, latent = add_latent_tokens(model, tokenizer)
    return Backbone(model, tokenizer, _image_processor(448), 256, config.image_token_id, start, end, latent,
                    tokenizer.eos_token_id, tokenizer.pad_token_id)


def build(preset: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    if preset == "small":
        bb = build_small()
    elif preset == "tiny":
        bb = load_backbone("tiny", image_size=64)
    elif preset == "internvl3-1b-shape":
        bb = load_backbone("internvl3-1b-shape", dtype=dtype)
    else:
        raise ValueError(f"unknown preset {preset!r}; expected tiny, small or internvl3-1b-shape")
    bb.model.to(device=device, dtype=dtype)
    return bb


# -- inputs (the collator's layout, DESIGN.md §1) ------------------------------------------------------------------


def sample(bb: Backbone, i: int, tiles: int, thoughts: int, answer: bool = True) -> tuple[list[int], int]:
    """Token ids of sample i and the length of its prompt (image, question, markers and thoughts; no labels)."""
    tok = bb.tokenizer
    ids = tok.convert_tokens_to_ids([IMG_START] + [IMG_CONTEXT] * (tiles * bb.tokens_per_tile) + [IMG_END])
    ids += tok.encode(QUESTIONS[i % len(QUESTIONS)], add_special_tokens=False)
    ids += [bb.start_latent_id] + [bb.latent_id] * thoughts + [bb.end_latent_id]
    n_prompt = len(ids)
    if answer:
        ids += tok.encode(REST, add_special_tokens=False) + [bb.eos_token_id]
    return ids, n_prompt


def collate(bb: Backbone, rows: list[tuple[list[int], int]], device) -> dict:
    """Left-pad so the column after `<|start-latent|>` lines up, then right-pad; labels only after the prompt."""
    anchors = [ids.index(bb.start_latent_id) + 1 for ids, _ in rows]
    left = [max(anchors) - a for a in anchors]
    T = max(l + len(ids) for l, (ids, _) in zip(left, rows))
    input_ids = torch.full((len(rows), T), bb.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for r, (l, (ids, n_prompt)) in enumerate(zip(left, rows)):
        input_ids[r, l:l + len(ids)] = torch.tensor(ids)
        mask[r, l:l + len(ids)] = 1
        labels[r, l + n_prompt:l + len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=mask, labels=labels,
                                             position_ids=pos).items()}


def pixels(bb: Backbone, n_tiles: int, device, dtype, seed: int = 0) -> torch.Tensor:
    size = bb.image_processor.size["height"]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tiles, 3, size, size, generator=g).to(device=device, dtype=dtype)


def train_batch(bb, batch, tiles, thoughts, device, dtype) -> dict:
    b = collate(bb, [sample(bb, i, tiles, thoughts) for i in range(batch)], device)
    b["pixel_values"] = pixels(bb, batch * tiles, device, dtype)
    return b


# -- FLOPs (for MFU) -------------------------------------------------------------------------------------------------


def step_flops(bb: Backbone, batch: dict, logit_positions: int) -> dict:
    """Matmul FLOPs of one training step by part, and their "total"; backward counts twice the forward (so 6 x
    parameters x tokens, plus attention).

    Vision, per tile of N patches + CLS: 2N (4d^2 + 2 d d_ff) per layer, attention 4 N^2 d per layer (QK^T and AV,
    bidirectional), the patch embedding 2 N 3 p^2 d and the projector 2 (N/4)(4d D + D^2). Language model, per real
    token: 2 (D hd (2H + 2KV) + 3 D F) per layer, attention 4 ctx H hd per layer with ctx the token's causal context
    (keys at or before it, padding excluded: the useful work, not what a padded kernel computes), and the LM head
    2 D V at each of `logit_positions`. Embedding lookups, norms and elementwise ops are not counted (not matmuls),
    so MFU is the usual model-FLOPs utilisation. tests/test_baselines.py checks the matmul parts against
    torch.utils.flop_counter.
    """
    vc, tc = bb.model.config.vision_config, bb.model.config.text_config
    parts = dict.fromkeys(("vision", "vision_attention", "lm", "lm_attention", "lm_head"), 0.0)
    n_tiles = batch["pixel_values"].shape[0] if batch.get("pixel_values") is not None else 0
    if n_tiles:
        p, d, f = vc.patch_size[0], vc.hidden_size, vc.intermediate_size
        n_patch = (vc.image_size[0] // p) ** 2
        n = n_patch + 1
        parts["vision"] = n_tiles * (vc.num_hidden_layers * 2 * n * (4 * d * d + 2 * d * f)
                                     + 2 * n_patch * 3 * p * p * d
                                     + 2 * (n_patch // 4) * (4 * d * tc.hidden_size + tc.hidden_size ** 2))
        parts["vision_attention"] = n_tiles * vc.num_hidden_layers * 4 * n * n * d
    D, F, L, V = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.vocab_size
    H, KV = tc.num_attention_heads, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or D // H
    lengths = batch["attention_mask"].sum(1).double()
    ctx = float((lengths * (lengths + 1) / 2).sum())  # sum over real tokens of their causal context
    parts["lm"] = L * 2 * float(lengths.sum()) * (D * hd * (2 * H + 2 * KV) + 3 * D * F)
    parts["lm_attention"] = L * 4 * ctx * H * hd
    parts["lm_head"] = 2 * logit_positions * D * V
    parts = {k: 3 * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


# -- timing and memory ----------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def bench(variants: dict, device, repeats: int, warmup: bool = True) -> dict:
    """Median seconds per variant; the timed runs of the variants are interleaved, so a change in machine load
    during the run shifts all of them alike instead of one."""
    times = {k: [] for k in variants}
    results = {}
    if warmup:
        for k, fn in variants.items():
            results[k] = timed(fn, device)[1]
    for _ in range(repeats):
        for k, fn in variants.items():
            t, results[k] = timed(fn, device)
            times[k].append(t)
    return {k: {"times_s": [round(t, 4) for t in v], "median_s": statistics.median(v), "result": results[k]}
            for k, v in times.items()}


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


CPU_MEMORY_METHOD = ("peak resident-set increase during one training step (Linux VmHWM, reset just before the "
                     "step; glibc mallopt(M_MMAP_THRESHOLD=64KiB) meanwhile, so freed tensors leave the resident set)")


@contextlib.contextmanager
def _tensors_return_to_os():
    """While inside, freed CPU tensors leave the resident set, so it follows the live tensors: glibc mmaps blocks of
    64 KiB and more and unmaps them on free. Restores glibc's default threshold (128 KiB) afterwards. Linux only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        open("/proc/self/clear_refs", "w").close()
    except OSError as e:
        raise RuntimeError(f"CPU peak memory needs Linux with glibc (/proc/self/clear_refs): {e}") from e
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    try:
        yield libc
    finally:
        libc.mallopt(-3, 128 * 1024)


def peak_memory(step, model, device, libc=None) -> int:
    """Bytes above what was allocated before the step (parameters, inputs), at the step's peak."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) * 1024


# -- the measurements ----------------------------------------------------------------------------------------------


def train_steps(bb: Backbone, model: MultimodalCoconut, b: dict) -> dict:
    """Zero-argument training steps (forward + backward, gradients allocated inside), each returning its loss."""
    args = (b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], b["pixel_values"])

    def run(forward):
        def step():
            model.zero_grad(set_to_none=True)
            loss = forward()
            loss.backward()
            return loss.item()
        return step

    return {
        "plain": run(lambda: bb.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                                      labels=b["labels"]).loss),
        "ours": run(lambda: model(*args).loss),
        "ours_labelled_only": run(lambda: model(*args, labelled_logits_only=True).loss),
        "original": run(lambda: original_forward(model, *args).loss),
        "naive": run(lambda: naive_forward(model, *args).loss),
    }


def measure_train(s: Setup, bb, model, device, dtype) -> dict:
    b = train_batch(bb, s.batch, s.tiles, s.thoughts, device, dtype)
    steps = train_steps(bb, model, b)
    fast = bench({k: steps[k] for k in ("plain", "ours", "ours_labelled_only")}, device, s.repeats, s.warmup)
    slow = bench({k: steps[k] for k in ("original", "naive")}, device, s.slow_repeats, warmup=False)
    labelled = int((b["labels"][:, 1:] != -100).sum())
    real = int(b["attention_mask"].sum())
    peak = s.peak_tflops or _peak_tflops(device)
    out = {"seq_len": b["input_ids"].shape[1], "real_tokens": real, "labelled_positions": labelled}
    for k, r in {**fast, **slow}.items():
        flops = step_flops(bb, b, labelled if k == "ours_labelled_only" else real)["total"]
        tflops = flops / r["median_s"] / 1e12
        out[k] = {"median_s": r["median_s"], "times_s": r["times_s"], "loss": r["result"], "flops": flops,
                  "tflops_per_s": tflops, "mfu": tflops / peak if peak else None}
    plain = out["plain"]["median_s"]
    out["ratios"] = {
        "ours / plain": out["ours"]["median_s"] / plain,
        "ours_labelled_only / plain": out["ours_labelled_only"]["median_s"] / plain,
        "original / ours": out["original"]["median_s"] / out["ours"]["median_s"],
        "naive / ours": out["naive"]["median_s"] / out["ours"]["median_s"],
    }
    return out


def measure_generate(s: Setup, bb, model, device, dtype) -> dict:
    rows = [sample(bb, i, s.tiles, s.thoughts, answer=False) for i in range(s.gen_questions)]
    b = collate(bb, rows, device)
    pv = pixels(bb, s.gen_questions * s.tiles, device, dtype, seed=1)
    ids, mask = b["input_ids"], b["attention_mask"]
    eos = bb.eos_token_id

    def ours():
        return model.generate(ids, mask, pv, max_new_tokens=s.gen_tokens, position_ids=b["position_ids"])

    def hf():  # no EOS: always gen_tokens new tokens, the most work ours can do
        return bb.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=s.gen_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=bb.pad_token_id)

    r = bench({"ours": ours, "hf_generate": hf}, device, s.repeats, s.warmup)
    new = r["ours"]["result"][:, ids.shape[1]:]
    tpt = s.tiles
    k = min(s.original_gen_questions, s.gen_questions)
    original_outputs = []

    def original():
        original_outputs.clear()
        for i in range(k):
            row = torch.tensor([rows[i][0]], device=device)
            original_outputs.append(original_generate(model, row, pv[i * tpt:(i + 1) * tpt], s.gen_tokens))

    t_orig = statistics.median(timed(original, device)[0] for _ in range(s.slow_repeats))
    matches = True
    for i, o in enumerate(original_outputs):
        mine = new[i].tolist()
        mine = mine[: mine.index(eos)] if eos in mine else mine
        matches &= o[0, len(rows[i][0]):].tolist() == mine
    t_orig_all = t_orig * s.gen_questions / k
    total = s.gen_questions * s.gen_tokens
    out = {"questions": s.gen_questions, "new_tokens": s.gen_tokens, "prompt_len": ids.shape[1],
           "rows_stopped_early": int((new == eos).any(1).sum())}
    for name, sec in (("ours", r["ours"]["median_s"]), ("hf_generate", r["hf_generate"]["median_s"])):
        out[name] = {"median_s": sec, "times_s": r[name]["times_s"], "tokens_per_s": total / sec}
    out["original"] = {"median_s": t_orig_all, "measured_questions": k, "measured_s": t_orig,
                       "tokens_per_s": total / t_orig_all}
    out["original_matches_ours"] = bool(matches)
    out["ratios"] = {"ours throughput / original": out["original"]["median_s"] / out["ours"]["median_s"],
                     "ours time / hf_generate": out["ours"]["median_s"] / out["hf_generate"]["median_s"]}
    return out


def measure_scaling(s: Setup, bb, model, device, dtype) -> dict:
    rows = []
    for tiles in s.scaling_tiles:
        variants, seq = {}, {}
        for n in s.scaling_thoughts:
            b = train_batch(bb, s.scaling_batch, tiles, n, device, dtype)
            seq[n] = b["input_ids"].shape[1]
            steps = train_steps(bb, model, b)
            if n == 0:
                variants["plain"] = steps["plain"]
            variants[n] = steps["ours"]
        try:
            r = bench(variants, device, s.repeats, s.warmup)
        except torch.OutOfMemoryError:  # the longest rows may not fit a GPU at --scaling-batch: say so, go on
            rows.append({"tiles": tiles, "image_tokens": tiles * bb.tokens_per_tile, "seq_len": seq, "oom": True})
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        lo, hi = min(s.scaling_thoughts), max(s.scaling_thoughts)
        rows.append({"tiles": tiles, "image_tokens": tiles * bb.tokens_per_tile, "seq_len": seq,
                     "plain_s": r["plain"]["median_s"], "ours_s": {n: r[n]["median_s"] for n in s.scaling_thoughts},
                     "times_s": {str(k): v["times_s"] for k, v in r.items()},
                     # the cost of one thought: the step's growth from the fewest to the most thoughts, per thought
                     "per_thought_s": (r[hi]["median_s"] - r[lo]["median_s"]) / max(hi - lo, 1)})
    return {"batch": s.scaling_batch, "thoughts": list(s.scaling_thoughts), "rows": rows}


def measure_memory(s: Setup, bb, model, device, dtype) -> dict:
    b = train_batch(bb, s.batch, s.tiles, s.thoughts, device, dtype)
    steps = train_steps(bb, model, b)
    cuda = device.type == "cuda"
    out = {"method": "torch.cuda.max_memory_allocated increase during one training step" if cuda else CPU_MEMORY_METHOD}
    with contextlib.nullcontext() if cuda else _tensors_return_to_os() as libc:
        for k in ("plain", "ours", "ours_labelled_only"):
            steps[k]()  # warm-up: one-time allocations stay out of the figure
            out[k] = {"peak_bytes": peak_memory(steps[k], model, device, libc)}
    plain = out["plain"]["peak_bytes"]
    out["ratios"] = {f"{k} / plain": out[k]["peak_bytes"] / plain for k in ("ours", "ours_labelled_only")}
    return out


def profile_steps(s: Setup, bb, model, device, dtype, rows: int = 15) -> dict:
    """Top operators by self time (device time on CUDA) of one step of plain and of ours, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    b = train_batch(bb, s.batch, s.tiles, s.thoughts, device, dtype)
    steps = train_steps(bb, model, b)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for k in ("plain", "ours", "ours_labelled_only"):
        steps[k]()
        with profile(activities=activities) as prof:
            steps[k]()
            _sync(device)
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)
        out[k] = {"total_ms": total / 1e3, "top": [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count}
                                                  for e in events[:rows]]}
        print(f"\n== profile: {k}, {key} {total / 1e3:.0f} ms ==", file=sys.stderr)
        for e in out[k]["top"]:
            print(f"  {e['self_ms']:9.1f} ms {e['calls']:6d} calls  {e['op'][:70]}", file=sys.stderr)
    return out


# -- report -------------------------------------------------------------------------------------------------------


def targets(r: dict) -> list[dict]:
    """Issue 5's targets, each with the measured value."""
    out = []

    def add(name, value, goal, at_most):
        out.append({"target": name, "value": value, "goal": ("<= " if at_most else ">= ") + f"{goal:g}",
                    "met": value <= goal if at_most else value >= goal})

    if "train" in r:
        t = r["train"]["ratios"]
        add("training step / plain step (all-position logits)", t["ours / plain"], 1.10, True)
        add("training step / plain step (labelled_logits_only)", t["ours_labelled_only / plain"], 1.10, True)
        add("original algorithm step / ours", t["original / ours"], 3.0, False)
        add("naive recompute step / ours", t["naive / ours"], 3.0, False)
    if "generate" in r:
        g = r["generate"]["ratios"]
        add("generation throughput / original's", g["ours throughput / original"], 20.0, False)
        add("generation time / HF generate's", g["ours time / hf_generate"], 1.30, True)
    if "memory" in r:
        m = r["memory"]["ratios"]
        add("peak memory / plain step's (labelled_logits_only)", m["ours_labelled_only / plain"], 1.0, True)
        add("peak memory / plain step's (all-position logits)", m["ours / plain"], 1.0, True)
    return out


def _peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def machine(device) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": device.type,
            "load_average_at_start": os.getloadavg()}  # other processes on the machine skew CPU timings
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _fmt_s(x):
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
             f"{r['machine'].get('gpu', 'no GPU')}, torch {r['machine']['torch']}, transformers "
             f"{r['machine']['transformers']}, device {r['machine']['device']}, load average "
             f"{r['machine']['load_average_at_start'][0]:.1f} at start",
             f"model: {r['config']['preset']} ({r['config']['params_m']:.1f}M parameters, {r['config']['dtype']}), "
             f"{r['config']['tokens_per_tile']} tokens per tile"]
    if "train" in r:
        t = r["train"]
        c = r["config"]
        lines += ["", f"training step: batch {c['batch']} x {t['seq_len']} columns, {c['tiles']} tiles "
                  f"({c['tiles'] * c['tokens_per_tile']} image tokens) per row, "
                  f"{c['thoughts']} thoughts, {t['labelled_positions']} labelled positions",
                  f"  {'variant':<22}{'median':>10}{'TFLOP/s':>10}{'MFU':>8}{'loss':>10}"]
        for k in ("plain", "ours", "ours_labelled_only", "original", "naive"):
            v = t[k]
            mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "-"
            lines.append(f"  {k:<22}{_fmt_s(v['median_s']):>10}{v['tflops_per_s']:>10.3f}{mfu:>8}{v['loss']:>10.4f}")
        lines += [f"  {k}: {v:.2f}x" for k, v in t["ratios"].items()]
    if "generate" in r:
        g = r["generate"]
        lines += ["", f"generation: {g['questions']} questions x {g['new_tokens']} new tokens, "
                  f"prompt {g['prompt_len']} columns", f"  {'variant':<22}{'time':>10}{'tokens/s':>10}"]
        for k in ("ours", "hf_generate", "original"):
            lines.append(f"  {k:<22}{_fmt_s(g[k]['median_s']):>10}{g[k]['tokens_per_s']:>10.1f}")
        if g["original"]["measured_questions"] < g["questions"]:
            lines.append(f"  (original: {g['original']['measured_questions']} questions timed, scaled to "
                         f"{g['questions']}; one question at a time, so time is linear in questions)")
        lines += [f"  {k}: {v:.2f}x" for k, v in g["ratios"].items()]
        lines.append(f"  original gives the same tokens as ours: {g['original_matches_ours']}")
        if g["rows_stopped_early"]:
            lines.append(f"  note: {g['rows_stopped_early']} rows of ours reached EOS early "
                         "(HF generate was run without EOS)")
    if "memory" in r:
        m = r["memory"]
        lines += ["", f"peak memory of a training step ({m['method']}):"]
        lines += [f"  {k:<22}{m[k]['peak_bytes'] / 2**20:>10.0f} MiB" for k in ("plain", "ours", "ours_labelled_only")]
        lines += [f"  {k}: {v:.2f}x" for k, v in m["ratios"].items()]
    if "scaling" in r:
        sc = r["scaling"]
        lines += ["", f"scaling: training step time (ours, all-position logits), batch {sc['batch']}",
                  f"  {'image tokens':<14}{'columns':>9}{'plain':>10}"
                  + "".join(f"{f'{n} thoughts':>12}" for n in sc["thoughts"]) + f"{'per thought':>13}"]
        for row in sc["rows"]:
            cols = max(row["seq_len"].values())
            if row.get("oom"):
                lines.append(f"  {row['image_tokens']:<14}{cols:>9}  out of memory at batch {sc['batch']}")
                continue
            lines.append(f"  {row['image_tokens']:<14}{cols:>9}{_fmt_s(row['plain_s']):>10}"
                         + "".join(f"{_fmt_s(row['ours_s'][n]):>12}" for n in sc["thoughts"])
                         + f"{_fmt_s(row['per_thought_s']):>13}")
    if r.get("targets"):
        lines += ["", "targets (issue 5):"]
        lines += [f"  {'met ' if t['met'] else 'MISS'} {t['target']}: {t['value']:.2f}x (goal {t['goal']}x)"
                  for t in r["targets"]]
    return "\n".join(lines)


# -- entry point ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[Setup, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=["tiny", "small", "internvl3-1b-shape"], default=None,
                   help="default: small on CPU, internvl3-1b-shape on CUDA")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median), after one warm-up")
    p.add_argument("--slow-repeats", type=int, default=None,
                   help="timed runs of the original algorithm and naive recompute "
                        "(default: 1 on CPU, --repeats on CUDA)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tiles", type=int, default=4, help="tiles per row")
    p.add_argument("--thoughts", type=int, default=8)
    p.add_argument("--gen-questions", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--original-gen-questions", type=int, default=None,
                   help="questions the original generate is timed on, scaled to --gen-questions "
                        "(default: 2 on CPU, all on CUDA)")
    p.add_argument("--scaling-batch", type=int, default=None,
                   help="batch of the scaling table "
                        "(default: 1 on CPU, where 13 tiles x 4 rows take too long; --batch on CUDA)")
    p.add_argument("--only", nargs="+", choices=["train", "generate", "memory", "scaling", "profile"], default=None)
    p.add_argument("--quick", action="store_true", help="microscopic shapes: a smoke test of the whole benchmark")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of a step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s, for MFU")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    s = Setup(preset=a.preset or ("internvl3-1b-shape" if cuda else "small"), device=a.device,
              dtype=a.dtype or ("bfloat16" if cuda else "float32"), repeats=a.repeats,
              slow_repeats=a.slow_repeats or (a.repeats if cuda else 1), batch=a.batch, tiles=a.tiles,
              thoughts=a.thoughts, gen_questions=a.gen_questions, gen_tokens=a.gen_tokens,
              original_gen_questions=a.original_gen_questions or (a.gen_questions if cuda else 2),
              scaling_batch=a.scaling_batch or (a.batch if cuda else 1),
              peak_tflops=a.peak_tflops and a.peak_tflops * 1e12,
              profile=a.profile)
    if a.quick:
        s.batch, s.tiles, s.thoughts, s.gen_questions, s.gen_tokens = 2, 2, 4, 3, 4
        s.original_gen_questions, s.scaling_batch, s.scaling_tiles, s.scaling_thoughts = 2, 2, (1, 2), (0, 2)
        s.warmup = False
    return s, a


def main(argv=None) -> dict:
    s, a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    t0 = time.perf_counter()
    bb = build(s.preset, device, dtype)
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).train()
    result = {"machine": machine(device),
              "config": {**asdict(s), "tokens_per_tile": bb.tokens_per_tile,
                         "command": " ".join(["python -m multimodal_coconut.benchmark",
                                              *(sys.argv[1:] if argv is None else argv)]),
                         "params_m": sum(p.numel() for p in bb.model.parameters()) / 1e6}}
    sections = a.only or ["train", "generate", "scaling", "memory"]  # memory last: on CPU it tunes malloc
    if s.profile and "profile" not in sections:
        sections.insert(0, "profile")
    for name in sections:
        t = time.perf_counter()
        fn = {"train": measure_train, "generate": measure_generate, "scaling": measure_scaling,
              "memory": measure_memory, "profile": profile_steps}[name]
        model.train(name != "generate")
        with torch.no_grad() if name == "generate" else torch.enable_grad():
            result[name] = fn(s, bb, model, device, dtype)
        result[name]["section_s"] = time.perf_counter() - t
        print(f"[{name}: {result[name]['section_s']:.0f} s]", file=sys.stderr, flush=True)
    result["targets"] = targets(result)
    result["total_s"] = time.perf_counter() - t0
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(report(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
