"""Are the continuous thoughts used, and what do they hold? Measurements on a trained checkpoint.

    python -m multimodal_coconut.analyze runs/demo --data data/generated/builtin/aokvqa_v1p0_val.json --out DIR
    python -m multimodal_coconut.analyze runs/prosqa-coconut --data prosqa_valid.json --out DIR   # a text-only run

CHECKPOINT is anything `inference.load_trained` takes (a run directory: its newest checkpoint), multimodal or a
text-only causal LM. Accuracy is the data set's own metric as training's evaluation computes it: MC / DA on A-OKVQA
and the built-in set, `accuracy` on the original Coconut's json (dataset coconut) and on jsonl. Writes
DIR/analysis.json, DIR/analysis.md and DIR/{ablations, ablations_per_thought, thought_curve, probe, norms,
attention_layers, attention_image}.png (each where it applies):

* ablations: accuracy with the thoughts as computed ("intact": the same answering code and batches as training's
  evaluation, so it equals that evaluation of this checkpoint on this data), and with every fed thought replaced by
  zeros ("zero"), by Gaussian noise of the thought's own norm ("noise"), by the thought another question of the batch
  computed at the same index ("shuffle": the batch rolled by one row; a question alone in its batch keeps its own,
  counted; where that row has fewer thoughts, its hidden state at the same column), or by the <|latent|> token's
  embedding ("pause", what the thought would be without Coconut's feedback).
  A replaced thought feeds the next one, so later thoughts are computed from the replacement, as at test time.
* ablations per thought: the same with only thought i replaced (zero / shuffle / pause), for each i.
* accuracy against the number of thoughts (the paper's Figure 3): the prompt built at stage s = 0 .. max_latent_stage
  (s * c_thought latents; at stage 0 the model writes its chain) instead of the checkpoint's stage. Below the
  checkpoint's stage the model has steps to write: it gets max_new_tokens plus the longest of those extra steps.
  On data with step_nodes (the hops task), also the share of answers that are the node of step s (1-based), the
  node s thoughts stand for: a model that answers there from s thoughts has taken one hop per thought.
* decoding (the paper's Figure 4 reading): each thought's top-k tokens under the LM head, and on the built-in set
  the share of thoughts whose top-k holds a key word of the step the thought replaced (the colour / shape words
  that step adds: "The object is a red circle." -> red, circle; "After red comes green." -> green).
* probe (samples with step_nodes, the hops task): does thought i decode to, and linearly encode, the node step i
  arrives at, and the node it starts from (probe.py).
* norms: thought norms per thought index against the norms of the token embeddings (coconut issue #29 found
  thoughts far larger than tokens).
* attention (multimodal checkpoints on questions with images): for each thought, the share of attention (mean over
  heads) of the position that computed it on the image tokens, per layer; and for one question, that attention over
  the image's tokens drawn on the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .curriculum import default_max_new_tokens
from .evaluate import normalize_answer
from .inference import (Trained, decode_thoughts, evaluate_trained, load_trained, model_device, prompt_loader,
                        prompt_set, thought_attention, thought_vectors)
from .probe import probe, probe_picture, probe_report

ABLATIONS = ("intact", "zero", "noise", "shuffle", "pause")
PER_THOUGHT = ("zero", "shuffle", "pause")
LABELS = {"mc_accuracy": "MC acc. (%)", "da_accuracy": "DA acc. (%)", "accuracy": "accuracy (%)",
          "cot_accuracy": "CoT match (%)", "answers_reached_node": "answers the thoughts' node (%)"}


def metric_keys(dataset: str) -> tuple[str, ...]:
    """The accuracies training's evaluation reports on `dataset` (evaluate.score_generations)."""
    return ("accuracy",) if dataset in ("coconut", "jsonl") else ("mc_accuracy", "da_accuracy")


def _row(ev: dict, metrics) -> dict:
    return {**{k: ev[k] for k in metrics}, "written_tokens": ev["written_tokens"]}


def ablation_hook(name: str, model, seed: int = 0):
    """`thought_hook(i, thoughts) -> thoughts` for MultimodalCoconut that performs ablation `name` (None: intact)."""
    if name == "intact":
        return None
    if name == "zero":
        return lambda i, t: torch.zeros_like(t)
    if name == "noise":
        generator = torch.Generator().manual_seed(seed)

        def noise(i, t):  # (B, C): Gaussian directions, each scaled to the norm of the thought it replaces
            n = torch.randn(t.shape, generator=generator).to(t)
            return n * (t.norm(dim=-1, keepdim=True) / n.norm(dim=-1, keepdim=True))
        return noise
    if name == "shuffle":
        return lambda i, t: t.roll(1, dims=0)  # row b takes row b-1's thought: no row keeps its own (B > 1)
    if name == "pause":
        return lambda i, t: model.embedding.weight[model.latent_token_id].to(t).expand_as(t)
    raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")


def index_hook(name: str, model, indices, seed: int = 0):
    """Ablation `name` on the thoughts whose index (1-based) is in `indices` only; the others are fed as computed.
    With every index it is `ablation_hook(name)` itself."""
    hook, indices = ablation_hook(name, model, seed), set(indices)
    if hook is None:
        return None
    return lambda i, t: hook(i, t) if i in indices else t


def ablations(trained: Trained, samples, metrics, seed: int = 0) -> dict:
    out = {}
    for name in ABLATIONS:
        ev = evaluate_trained(trained, samples, thought_hook=ablation_hook(name, trained.model, seed))
        out[name] = _row(ev, metrics)
    return out


def shuffled_accuracy(trained: Trained, samples) -> float:
    """The headline accuracy with each question fed another question's thoughts (the `shuffle` ablation)."""
    metric = metric_keys(trained.config.dataset)[0]
    return evaluate_trained(trained, samples, thought_hook=ablation_hook("shuffle", trained.model))[metric]


def thought_use(trained: Trained, samples) -> str:
    """One line a user can read: the headline accuracy with the thoughts intact and with each question fed another
    question's thoughts (shuffle), and what the difference means."""
    metric = metric_keys(trained.config.dataset)[0]
    intact, shuffled = evaluate_trained(trained, samples)[metric], shuffled_accuracy(trained, samples)
    if not trained.model.continuous_thoughts or trained.stage == 0:
        return f"{metric} {intact:.1f}%: this checkpoint feeds no continuous thoughts (stage {trained.stage})"
    gap = intact - shuffled
    reading = ("the answers depend on what the thoughts hold" if gap >= 10 else
               "the answers barely depend on the thoughts: the layers after them solve the question without them"
               if gap < 3 else "the thoughts carry part of the answer")
    return (f"{metric} with the thoughts intact {intact:.1f}%, with another question's thoughts {shuffled:.1f}% "
            f"(a gap of {gap:+.1f} points): {reading}")


def per_thought_ablations(trained: Trained, samples, metrics, n_thoughts: int, names=PER_THOUGHT) -> dict:
    """{ablation: [row of thought 1, ..., row of thought n]}: only thought i replaced, i = 1 .. n."""
    out = {}
    for name in names:
        out[name] = []
        for i in range(1, n_thoughts + 1):
            ev = evaluate_trained(trained, samples, thought_hook=index_hook(name, trained.model, [i]))
            out[name].append({"thought": i, **_row(ev, metrics)})
    return out


# -- accuracy against the number of thoughts ---------------------------------------------------------------------

def curve_budgets(trained: Trained, samples) -> dict[int, int]:
    """max_new_tokens per stage 0 .. max_latent_stage: the checkpoint's own from the stage whose prompt is the
    checkpoint's, and below it that plus the longest stretch of extra steps a sample has to write there."""
    mode, cfg = trained.mode, trained.config
    own = min(trained.stage, mode.max_latent_stage)
    dataset = prompt_set(trained, samples)
    longest_own = default_max_new_tokens(dataset, trained.stage) or 0
    return {s: cfg.max_new_tokens if s >= own else
            cfg.max_new_tokens + max(0, (default_max_new_tokens(dataset, s) or 0) - longest_own)
            for s in range(mode.max_latent_stage + 1)}


def thought_curve(trained: Trained, samples, metrics) -> dict:
    """Accuracy and written tokens with the prompt at each stage 0 .. max_latent_stage (s * c_thought latents)."""
    mode = trained.mode
    if not mode.markers or mode.thoughts_per_step == 0:
        kind = "cot" if mode.cot else "no_cot" if mode.no_cot else "no_thoughts" if mode.no_thoughts else "c_thought 0"
        return {"skipped": f"a {kind} checkpoint: its prompts hold no thoughts to vary"}
    own = min(trained.stage, mode.max_latent_stage)
    points = []
    for stage, budget in curve_budgets(trained, samples).items():
        at = dataclasses.replace(trained, stage=stage,
                                 config=dataclasses.replace(trained.config, max_new_tokens=budget))
        ev = evaluate_trained(at, samples)
        extra = {"cot_accuracy": ev["cot_accuracy"]} if "cot_accuracy" in ev else {}
        reached = reached_node_share(samples, ev["answers"], stage)
        if reached is not None:
            extra["answers_reached_node"] = reached
        points.append({"stage": stage, "thoughts": ev["thoughts"], **_row(ev, metrics), **extra,
                       "max_new_tokens": budget, "checkpoint": stage == own})
    return {"checkpoint_stage": own, "points": points}


def reached_node_share(samples, answers: dict[str, str], stage: int) -> float | None:
    """% of the questions with step_nodes (and at least `stage` steps) whose answer is the node of step stage - 1:
    the node the stage's thoughts stand for. At the last step it is the answer; below, a model whose thoughts each
    take one hop, given fewer of them, answers where they got to. None at stage 0 or without step_nodes."""
    pairs = [(answers.get(s.question_id, ""), s.step_nodes[stage - 1]) for s in samples
             if stage >= 1 and getattr(s, "step_nodes", None) and len(s.step_nodes) >= stage]
    if not pairs:
        return None
    hits = sum(normalize_answer(answer) == normalize_answer(node) for answer, node in pairs)
    return round(100 * hits / len(pairs), 2)


# -- decoding ---------------------------------------------------------------------------------------------------

def _builtin_words() -> set[str]:
    from .builtin_data import COLORS, SHAPES

    return set(COLORS) | set(SHAPES)


def step_key_words(steps: list[str]) -> list[set[str]]:
    """The built-in set's key words of each step: the colour / shape words it adds to the chain."""
    vocab, seen, out = _builtin_words(), set(), []
    for step in steps:
        words = {w.strip(".,").lower() for w in step.split()} & vocab
        out.append(words - seen if words - seen else words)
        seen |= words
    return out


def collect_thoughts(trained: Trained, batches, k: int) -> tuple[dict[int, torch.Tensor], dict[int, list]]:
    """({sample index: its thoughts as fed, (n, C) float32 on the CPU}, {sample index: top-k tokens of each})."""
    model, tok, device = trained.model, trained.backbone.tokenizer, model_device(trained)
    thoughts, tops = {}, {}
    for batch in batches:
        batch = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
        for idx, t in zip(batch["idx"].tolist(), thought_vectors(model, batch)):
            thoughts[idx], tops[idx] = t.float().cpu(), decode_thoughts(model, tok, t, k=k)
    return thoughts, tops


def decoding(tops: dict[int, list], samples, c_thought: int, k: int = 5) -> dict:
    """Top-k tokens of every thought, and (built-in set) the share whose top-k holds its step's key word."""
    c = max(c_thought, 1)
    per_question, hits, top1_hits, counted = [], {}, {}, {}
    by_index: dict[int, list[tuple[list[str], set[str]]]] = {}  # thought index -> (top-k words, key words)
    for idx, thought_tops in tops.items():
        sample = samples[idx]
        keys = step_key_words(sample.steps)
        rows = []
        for j, top in enumerate(thought_tops):
            step = j // c
            key = keys[step] if step < len(keys) else set()
            words = [t.strip().lower() for t in top]
            hit = bool(key) and any(w in key for w in words)
            rows.append({"top_k": top, "step": sample.steps[step] if step < len(sample.steps) else None,
                         "key_words": sorted(key), "hit": hit})
            by_index.setdefault(j, []).append((words, key))
            if key:
                counted[j] = counted.get(j, 0) + 1
                hits[j] = hits.get(j, 0) + hit
                top1_hits[j] = top1_hits.get(j, 0) + (words[0] in key)
        per_question.append({"question_id": sample.question_id, "question": sample.question, "thoughts": rows})
    n = sum(counted.values())
    # Chance level of the same test: each thought's top-k against the key words of the next question's step at the
    # same index (a thought that always decodes to the same common word scores here as well).
    other = [any(w in rows[(a + 1) % len(rows)][1] for w in words) for rows in by_index.values() if len(rows) > 1
             for a, (words, _) in enumerate(rows) if rows[(a + 1) % len(rows)][1]]
    return {
        "k": k,
        "key_word_share": sum(hits.values()) / n if n else None,
        "key_word_share_other_question": sum(other) / len(other) if other else None,
        "key_word_top1_share": sum(top1_hits.values()) / n if n else None,
        "key_word_share_per_thought": {j + 1: hits[j] / counted[j] for j in sorted(counted)},
        "n_thoughts_with_key_word": n,
        "questions": per_question,
    }


# -- norms --------------------------------------------------------------------------------------------------------

def norms(trained: Trained, thoughts: dict[int, torch.Tensor]) -> dict:
    model = trained.model
    per_index: dict[int, list[float]] = {}
    for t in thoughts.values():
        for j, n in enumerate(t.norm(dim=-1).tolist()):
            per_index.setdefault(j + 1, []).append(n)
    emb = model.embedding.weight.detach().float().norm(dim=-1)  # (V,)
    q = torch.tensor([0.05, 0.5, 0.95])
    e5, e50, e95 = torch.quantile(emb, q).tolist()
    all_thoughts = [n for v in per_index.values() for n in v]
    mean = sum(all_thoughts) / len(all_thoughts) if all_thoughts else None
    return {
        "token_embedding": {"mean": emb.mean().item(), "p5": e5, "median": e50, "p95": e95,
                            "latent_token": emb[model.latent_token_id].item()},
        "thought_mean_per_index": {j: sum(v) / len(v) for j, v in per_index.items()},
        "thought_mean": mean,
        "ratio_to_median_token": mean / e50 if mean else None,
        "_values": {"tokens": emb.tolist(), "thoughts": per_index},
    }


# -- attention ----------------------------------------------------------------------------------------------------

def attention(trained: Trained, batches) -> dict:
    """Share of each thought's attention on image tokens per layer: mean over the questions with an image,
    (n_thoughts, layers). {"skipped": reason} for a text-only model or data without images."""
    model = trained.model
    if model.image_token_id is None:
        return {"skipped": "a text-only language model: there is no image to attend to"}
    sums, counts, example = {}, {}, None
    for batch in batches:
        is_image = batch["input_ids"] == model.image_token_id  # (B, T)
        if not is_image.any():
            continue
        device_batch = {k: v.to(model_device(trained)) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for i, weights in enumerate(thought_attention(model, device_batch)):  # (n_latents, layers, T)
            if weights.shape[0] == 0 or not is_image[i].any():
                continue
            share = weights[:, :, is_image[i]].sum(-1).cpu()  # (n_latents, layers)
            for j in range(share.shape[0]):
                sums[j] = sums.get(j, 0) + share[j]
                counts[j] = counts.get(j, 0) + 1
            if example is None:
                example = {"idx": int(batch["idx"][i]), "image_weights": weights[:, :, is_image[i]].cpu()}
    if not counts:
        return {"skipped": "no question of this data has both an image and thoughts"}
    share = [(sums[j] / counts[j]).tolist() for j in sorted(sums)]
    return {"image_share": share, "n_questions_per_thought": [counts[j] for j in sorted(counts)], "_example": example}


def attention_map(image_weights: torch.Tensor, tokens_per_tile: int, n_tiles: int) -> torch.Tensor:
    """(n_latents, layers, tiles * tokens_per_tile) weights on image tokens -> (n_latents, side, side) over the
    image, mean over layers: the single tile, else the thumbnail (InternVL puts it last); tokens row-major."""
    side = int(round(tokens_per_tile ** 0.5))
    tile = 0 if n_tiles == 1 else n_tiles - 1
    w = image_weights.mean(1)[:, tile * tokens_per_tile:(tile + 1) * tokens_per_tile]  # (n_latents, tokens)
    return w.reshape(w.shape[0], side, side)


# -- pictures and report --------------------------------------------------------------------------------------------

def _save(fig, plt, out: Path, name: str, written: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
    plt.close(fig)
    written.append(name)


def _pictures(result: dict, trained: Trained, samples, out: Path, norm_values: dict, example) -> list[str]:
    from PIL import Image

    from .data import open_image
    from .plot import _pyplot

    plt = _pyplot()
    written, metrics = [], result["metrics"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(result["ablations"])
    x = torch.arange(len(names)).float()
    width = 0.8 / len(metrics)
    for m, key in enumerate(metrics):
        values = [result["ablations"][n][key] or 0 for n in names]
        ax.bar(x - 0.4 + width * (m + 0.5), values, width, label=LABELS[key])
    ax.set_xticks(x.tolist(), names)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="thoughts replaced at test time")
    ax.legend(fontsize=8)
    _save(fig, plt, out, "ablations.png", written)

    per_thought = result["ablations_per_thought"]
    if "skipped" not in per_thought:
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.2), squeeze=False)
        for ax, key in zip(axes[0], metrics):
            for name, rows in per_thought.items():
                ax.plot([r["thought"] for r in rows], [r[key] or 0 for r in rows], marker="o", label=name)
            ax.axhline(result["ablations"]["intact"][key] or 0, color="grey", linestyle="--", label="intact")
            ax.set(xlabel="thought replaced (the others as computed)", ylabel=LABELS[key], ylim=(0, 100))
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
        _save(fig, plt, out, "ablations_per_thought.png", written)

    curve = result.get("thought_curve") or {}
    if curve.get("points"):
        points = curve["points"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        stages = [p["stage"] for p in points]
        for key in metrics:
            ax.plot(stages, [p[key] or 0 for p in points], marker="o", label=LABELS[key])
        reached = [(p["stage"], p["answers_reached_node"]) for p in points if "answers_reached_node" in p]
        if reached:
            ax.plot(*zip(*reached), marker="x", linestyle=":", label=LABELS["answers_reached_node"])
        own = [p for p in points if p["checkpoint"]]
        if own:
            ax.axvline(own[0]["stage"], color="grey", linestyle=":", linewidth=1, label="checkpoint's stage")
        ax.set(xlabel=f"thoughts (stage; {trained.mode.thoughts_per_step} latent(s) each)", ylabel="accuracy (%)",
               ylim=(0, 104), title="accuracy against the number of thoughts")
        ax.xaxis.get_major_locator().set_params(integer=True)
        tokens = ax.twinx()
        tokens.plot(stages, [p["written_tokens"] for p in points], color="black", linestyle="--", marker=".",
                    label="written tokens")
        tokens.set(ylabel="written tokens per question")
        handles = ax.get_legend_handles_labels()
        more = tokens.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, ncol=2, loc="upper center",
                  bbox_to_anchor=(0.5, -0.3))  # below the axes: inside, it covered points at 100%
        _save(fig, plt, out, "thought_curve.png", written)

    if "skipped" not in result["probe"]:
        fig, ax = plt.subplots(figsize=(8, 3.2))  # the legend sits beside the axes
        probe_picture(ax, result["probe"], result["decoding"]["k"])
        _save(fig, plt, out, "probe.png", written)

    if norm_values["thoughts"]:
        import numpy as np

        values = norm_values["tokens"] + [v for vs in norm_values["thoughts"].values() for v in vs]
        bins = np.geomspace(max(min(values), 1e-6), max(values) * 1.01, 80)  # log scale: they differ ~50x
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(norm_values["tokens"], bins=bins, alpha=0.6, density=True, label="token embeddings")
        for j, v in norm_values["thoughts"].items():
            ax.hist(v, bins=bins, alpha=0.6, density=True, label=f"thought {j}")
        ax.set_xscale("log")
        ax.set(xlabel="L2 norm (log scale)", ylabel="density", title="thought norms vs token-embedding norms")
        ax.legend(fontsize=7)
        _save(fig, plt, out, "norms.png", written)

    share = result["attention"].get("image_share")
    if share:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for j, row in enumerate(share):
            ax.plot(range(1, len(row) + 1), [100 * v for v in row], marker="o", label=f"thought {j + 1}")
        ax.set(xlabel="layer", ylabel="attention on image tokens (%)", ylim=(0, 100))
        ax.legend(fontsize=7)
        _save(fig, plt, out, "attention_layers.png", written)

    if example is not None:
        sample = samples[example["idx"]]
        image = open_image(sample)
        tpt = trained.backbone.tokens_per_tile
        maps = attention_map(example["image_weights"], tpt, example["image_weights"].shape[-1] // tpt)
        n = maps.shape[0]
        fig, axes = plt.subplots(1, n, figsize=(max(2.6 * n, 5), 3.2), squeeze=False)
        for j in range(n):
            heat = maps[j] / maps[j].max().clamp(min=1e-12)
            heat = Image.fromarray((heat.numpy() * 255).astype("uint8")).resize(image.size, Image.NEAREST)
            axes[0, j].imshow(image)
            axes[0, j].imshow(heat, cmap="inferno", alpha=0.45)
            axes[0, j].set_title(f"thought {j + 1}", fontsize=8)
            axes[0, j].axis("off")
        fig.suptitle(f"{sample.question}\n(answer: {sample.answer}; attention of each thought on the image, mean "
                     "over layers and heads)", fontsize=6)
        _save(fig, plt, out, "attention_image.png", written)
        result["attention"]["example"] = {"question_id": sample.question_id, "question": sample.question,
                                          "map": maps.tolist()}
    return written


def _fmt(v, d=1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(result: dict) -> str:
    metrics, fmt = result["metrics"], _fmt
    cols = " | ".join(LABELS[k] for k in metrics)
    lines = [f"# Analysis of {result['checkpoint']}", "",
             f"Stage {result['stage']} ({result['thoughts_per_question']:.2f} thoughts per question), "
             f"{result['n_samples']} questions of {result['data']}.", "",
             "## Ablations (thoughts replaced at test time)", "", f"| thoughts | {cols} | written tokens |",
             "|---" * (len(metrics) + 2) + "|"]
    for name, row in result["ablations"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[k]) for k in metrics) + f" | {fmt(row['written_tokens'])} |")
    if result["shuffle_unchanged_questions"]:
        lines += ["", f"{result['shuffle_unchanged_questions']} question(s) sit alone in their batch: \"shuffle\" "
                      "feeds them their own thoughts."]

    per_thought = result["ablations_per_thought"]
    lines += ["", "## Ablations per thought (only thought i replaced; later ones computed from it)", ""]
    if "skipped" in per_thought:
        lines.append(f"Skipped: {per_thought['skipped']}.")
    else:
        for key in metrics:
            names = list(per_thought)
            lines += [f"{LABELS[key]}, intact {fmt(result['ablations']['intact'][key])}:", "",
                      "| thought | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for i, rows in enumerate(zip(*per_thought.values())):
                lines.append(f"| {i + 1} | " + " | ".join(fmt(r[key]) for r in rows) + " |")
            lines.append("")

    curve = result["thought_curve"]
    lines += ["", "## Accuracy against the number of thoughts (prompt built at stage s)", ""]
    if "skipped" in curve:
        lines.append(f"Skipped: {curve['skipped']}.")
    else:
        extra = [k for k in ("cot_accuracy", "answers_reached_node") if any(k in p for p in curve["points"])]
        lines += [f"| stage | latents per question | {' | '.join(LABELS[k] for k in metrics + extra)} | written "
                  "tokens | max_new_tokens |", "|---" * (len(metrics) + len(extra) + 4) + "|"]
        for p in curve["points"]:
            own = " (checkpoint)" if p["checkpoint"] else ""
            lines.append(f"| {p['stage']}{own} | {fmt(p['thoughts'], 2)} | "
                         + " | ".join(fmt(p.get(k)) for k in metrics + extra)
                         + f" | {fmt(p['written_tokens'])} | {p['max_new_tokens']} |")

    d = result["decoding"]
    lines += ["", "## Decoding (top-k tokens of each thought under the LM head)", ""]
    if d["n_thoughts_with_key_word"]:
        lines += [f"Share of thoughts whose top-{d['k']} holds a key word of the step they replaced: "
                  f"{_pct(d['key_word_share'])}% (top-1: {_pct(d['key_word_top1_share'])}%; against another "
                  f"question's step, the chance level of this test: {_pct(d['key_word_share_other_question'])}%), "
                  f"over {d['n_thoughts_with_key_word']} thoughts; per thought index: "
                  + ", ".join(f"{j}: {100 * v:.1f}%" for j, v in d["key_word_share_per_thought"].items()), ""]
    else:
        lines += ["No step holds a key word (the built-in set's colour / shape words), so only the tokens are shown.",
                  ""]
    for q in d["questions"][:3]:
        lines.append(f"- {q['question']}")
        for j, t in enumerate(q["thoughts"]):
            lines.append(f"  - thought {j + 1} {t['top_k']} (step: {t['step']!r}, key {t['key_words']})")

    lines += ["", "## Probe: is the node step i arrives at in thought i?", ""]
    lines += probe_report(result["probe"], d["k"]) + [""]

    n = result["norms"]
    e = n["token_embedding"]
    lines += ["", "## Norms", "", f"Token embeddings: median {fmt(e['median'], 3)} (5-95%: {fmt(e['p5'], 3)}-"
              f"{fmt(e['p95'], 3)}), <|latent|> {fmt(e['latent_token'], 3)}. Thoughts: mean {fmt(n['thought_mean'], 3)}"
              f" ({fmt(n['ratio_to_median_token'], 2)}x the median token); per index: "
              + ", ".join(f"{j}: {v:.3f}" for j, v in n["thought_mean_per_index"].items()), "",
              "## Attention on the image", ""]
    if "skipped" in result["attention"]:
        lines.append(f"Skipped: {result['attention']['skipped']}.")
    else:
        lines += ["Share (%) of each thought's attention on image tokens, per layer:", ""]
        for j, row in enumerate(result["attention"]["image_share"]):
            lines.append(f"- thought {j + 1}: " + ", ".join(f"{100 * v:.1f}" for v in row))
    lines += [""] + [f"![{p}]({p})" for p in result["pictures"]]
    return "\n".join(lines) + "\n"


def analyze(checkpoint, data, out, *, image_root=None, k: int = 5, max_samples: int | None = None,
            seed: int = 0, per_thought: bool = True, curve: bool = True, probe_thoughts: bool = True) -> dict:
    """Load the checkpoint and the data, run the measurements (`analyze_trained`), write them into `out`."""
    trained, samples = _load(checkpoint, data, image_root, max_samples)
    return analyze_trained(trained, samples, out, data=data, k=k, seed=seed, per_thought=per_thought, curve=curve,
                           probe_thoughts=probe_thoughts)


def _load(checkpoint, data, image_root=None, max_samples=None):
    """(the trained model, the samples of `data` read as its training read its data)."""
    from .data import load_samples

    trained = load_trained(checkpoint)
    cfg = trained.config
    samples = load_samples(cfg.dataset, data, image_root=image_root or cfg.image_root if cfg.dataset != "builtin"
                           else image_root, steps_from=cfg.steps_from, answer_from=cfg.answer_from,
                           skip_bad_records=cfg.skip_bad_records, max_samples=max_samples)
    return trained, samples


def analyze_trained(trained: Trained, samples, out, *, data="", k: int = 5, seed: int = 0, per_thought: bool = True,
                    curve: bool = True, probe_thoughts: bool = True) -> dict:
    """Run the measurements on `samples`; write analysis.json, analysis.md and the pictures into `out`; return the
    json. `per_thought`, `curve`, `probe_thoughts`: the slower parts, each skipped (and said so) when False."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = metric_keys(trained.config.dataset)
    batches = list(prompt_loader(trained, prompt_set(trained, samples)))
    thoughts, tops = collect_thoughts(trained, batches, k)
    n_max = max((t.shape[0] for t in thoughts.values()), default=0)
    result = {"checkpoint": str(trained.path), "data": str(data), "stage": trained.stage, "n_samples": len(samples),
              "continuous_thoughts": trained.model.continuous_thoughts, "metrics": list(metrics),
              "thoughts_per_question": sum(t.shape[0] for t in thoughts.values()) / max(len(samples), 1),
              "ablations": ablations(trained, samples, metrics, seed),
              "shuffle_unchanged_questions": sum(len(b["idx"]) for b in batches if len(b["idx"]) == 1 and n_max)}
    result["ablations_per_thought"] = (
        {"skipped": "--no-per-thought"} if not per_thought else
        {"skipped": "the checkpoint feeds no thoughts on this data"} if not n_max else
        per_thought_ablations(trained, samples, metrics, n_max))
    result["thought_curve"] = thought_curve(trained, samples, metrics) if curve else {"skipped": "--no-curve"}
    result["decoding"] = decoding(tops, samples, trained.config.c_thought, k)
    result["probe"] = (probe(thoughts, tops, samples, trained.backbone.tokenizer, trained.config.c_thought, seed=seed)
                       if probe_thoughts else {"skipped": "--no-probe"})
    result["norms"] = norms(trained, thoughts)
    norm_values = result["norms"].pop("_values")
    result["attention"] = attention(trained, batches)
    example = result["attention"].pop("_example", None)
    result["pictures"] = _pictures(result, trained, samples, out, norm_values, example)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / "analysis.md").write_text(_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a run directory, a checkpoint_N directory or an exported folder")
    p.add_argument("--data", required=True, help="the data file to analyse on, in the run's dataset format")
    p.add_argument("--image-root", default=None, help="images folder (default: the training config's)")
    p.add_argument("--out", type=Path, help="where the analysis goes (not needed with --thought-use)")
    p.add_argument("--thought-use", action="store_true",
                   help="only print the accuracy with the thoughts intact and shuffled across questions (one line)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--max-samples", type=int, default=None, help="the first N questions only")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise ablation and of the probe's split")
    p.add_argument("--per-thought", action=argparse.BooleanOptionalAction, default=True,
                   help="ablate each thought on its own (3 evaluations per thought index)")
    p.add_argument("--curve", action=argparse.BooleanOptionalAction, default=True,
                   help="accuracy against the number of thoughts (one evaluation per stage)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="decoding and linear probes of the step's node (data with step_nodes)")
    args = p.parse_args(argv)
    if args.thought_use:
        print(thought_use(*_load(args.checkpoint, args.data, args.image_root, args.max_samples)))
        return 0
    if args.out is None:
        p.error("--out is required (unless --thought-use)")
    result = analyze(args.checkpoint, args.data, args.out, image_root=args.image_root, k=args.top_k,
                     max_samples=args.max_samples, seed=args.seed, per_thought=args.per_thought, curve=args.curve,
                     probe_thoughts=args.probe)
    print((args.out / "analysis.md").read_text())
    intact = result["ablations"]["intact"]
    print(f"wrote {args.out / 'analysis.json'}; intact " + ", ".join(f"{k} {intact[k]}" for k in result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
