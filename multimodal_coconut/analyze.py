"""Are the continuous thoughts used, and what do they hold? Four measurements on a trained checkpoint.

    python -m multimodal_coconut.analyze runs/demo --data data/generated/builtin/aokvqa_v1p0_val.json --out DIR

CHECKPOINT is anything `inference.load_trained` takes (a run directory: its newest checkpoint). Writes
DIR/analysis.json, DIR/analysis.md and DIR/{ablations,norms,attention_layers,attention_image}.png:

* ablations: MC / DA accuracy with the thoughts as computed ("intact": the same answering code and batches as
  training's evaluation, so it equals that evaluation of this checkpoint on this data), and with every fed thought
  replaced by zeros ("zero"), by Gaussian noise of the thought's own norm ("noise"), by the thought another
  question of the batch computed at the same index ("shuffle": the batch rolled by one row), or by the <|latent|>
  token's embedding ("pause", what the thought would be without Coconut's feedback). A replaced thought feeds the
  next one, so later thoughts are computed from the replacement, as they would be at test time.
* decoding (the paper's Figure 4 reading): each thought's top-k tokens under the LM head, and on the built-in set
  the share of thoughts whose top-k holds a key word of the step the thought replaced (the colour / shape words
  that step adds: "The object is a red circle." -> red, circle; "After red comes green." -> green).
* norms: thought norms per thought index against the norms of the token embeddings (coconut issue #29 found
  thoughts far larger than tokens).
* attention: for each thought, the share of attention (mean over heads) of the position that computed it on the
  image tokens, per layer; and for one question, that attention over the image's tokens drawn on the image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .inference import (Trained, decode_thoughts, evaluate_trained, load_trained, prompt_loader, prompt_set,
                        thought_attention, thought_vectors)

ABLATIONS = ("intact", "zero", "noise", "shuffle", "pause")


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


def ablations(trained: Trained, samples, seed: int = 0) -> dict:
    out = {}
    for name in ABLATIONS:
        ev = evaluate_trained(trained, samples, thought_hook=ablation_hook(name, trained.model, seed))
        out[name] = {k: ev[k] for k in ("mc_accuracy", "da_accuracy", "written_tokens")}
    return out


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


def decoding(trained: Trained, batches, samples, k: int = 5) -> dict:
    """Top-k tokens of every thought, and (built-in set) the share whose top-k holds its step's key word."""
    model, tok, c = trained.model, trained.backbone.tokenizer, max(trained.config.c_thought, 1)
    per_question, hits, top1_hits, counted = [], {}, {}, {}
    for batch in batches:
        for idx, thoughts in zip(batch["idx"].tolist(), thought_vectors(model, batch)):
            sample = samples[idx]
            tops = decode_thoughts(model, tok, thoughts, k=k)
            keys = step_key_words(sample.steps)
            rows = []
            for j, top in enumerate(tops):
                step = j // c
                key = keys[step] if step < len(keys) else set()
                words = [t.strip().lower() for t in top]
                hit = bool(key) and any(w in key for w in words)
                rows.append({"top_k": top, "step": sample.steps[step] if step < len(sample.steps) else None,
                             "key_words": sorted(key), "hit": hit})
                if key:
                    counted[j] = counted.get(j, 0) + 1
                    hits[j] = hits.get(j, 0) + hit
                    top1_hits[j] = top1_hits.get(j, 0) + (words[0] in key)
            per_question.append({"question_id": sample.question_id, "question": sample.question,
                                 "thoughts": rows})
    n = sum(counted.values())
    # Chance level of the same test: each thought's top-k against the key words of another question's step at the
    # same index (a thought that always decodes to the same common word scores here as well).
    pairs = [(j, [w.strip().lower() for w in t["top_k"]]) for q in per_question for j, t in enumerate(q["thoughts"])]
    keys = [(j, set(t["key_words"])) for q in per_question for j, t in enumerate(q["thoughts"])]
    other = [any(w in keys[(a + 1) % len(keys)][1] for w in words)
             for a, (j, words) in enumerate(pairs) if keys[(a + 1) % len(keys)][1]] if len(keys) > 1 else []
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

def norms(trained: Trained, batches) -> dict:
    model = trained.model
    per_index: dict[int, list[float]] = {}
    for batch in batches:
        for thoughts in thought_vectors(model, batch):
            for j, n in enumerate(thoughts.float().norm(dim=-1).tolist()):
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
    """Share of each thought's attention on image tokens per layer: mean over questions, (n_thoughts, layers)."""
    model = trained.model
    sums, counts, example = {}, {}, None
    for batch in batches:
        is_image = batch["input_ids"] == model.image_token_id if model.image_token_id is not None else None
        for i, weights in enumerate(thought_attention(model, batch)):  # (n_latents, layers, T)
            if is_image is None or weights.shape[0] == 0:
                continue
            share = weights[:, :, is_image[i]].sum(-1)  # (n_latents, layers)
            for j in range(share.shape[0]):
                sums[j] = sums.get(j, 0) + share[j]
                counts[j] = counts.get(j, 0) + 1
            if example is None:
                example = {"idx": int(batch["idx"][i]), "image_weights": weights[:, :, is_image[i]]}
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

def _pictures(result: dict, trained: Trained, samples, out: Path, norm_values: dict, example) -> list[str]:
    from PIL import Image

    from .data import open_image
    from .plot import _pyplot

    plt = _pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(result["ablations"])
    mc = [result["ablations"][n]["mc_accuracy"] or 0 for n in names]
    da = [result["ablations"][n]["da_accuracy"] or 0 for n in names]
    x = torch.arange(len(names)).float()
    ax.bar(x - 0.2, mc, 0.4, label="MC")
    ax.bar(x + 0.2, da, 0.4, label="DA")
    ax.set_xticks(x.tolist(), names)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="thoughts replaced at test time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablations.png", dpi=90)
    plt.close(fig)
    written.append("ablations.png")

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
        fig.tight_layout()
        fig.savefig(out / "norms.png", dpi=90)
        plt.close(fig)
        written.append("norms.png")

    share = result["attention"]["image_share"]
    if share:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for j, row in enumerate(share):
            ax.plot(range(1, len(row) + 1), [100 * v for v in row], marker="o", label=f"thought {j + 1}")
        ax.set(xlabel="layer", ylabel="attention on image tokens (%)", ylim=(0, 100))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "attention_layers.png", dpi=90)
        plt.close(fig)
        written.append("attention_layers.png")

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
        fig.tight_layout()
        fig.savefig(out / "attention_image.png", dpi=90)
        plt.close(fig)
        written.append("attention_image.png")
        result["attention"]["example"] = {"question_id": sample.question_id, "question": sample.question,
                                          "map": maps.tolist()}
    return written


def _markdown(result: dict) -> str:
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# Analysis of {result['checkpoint']}", "",
             f"Stage {result['stage']} ({result['thoughts_per_question']:.2f} thoughts per question), "
             f"{result['n_samples']} questions of {result['data']}.", "",
             "## Ablations (thoughts replaced at test time)", "", "| thoughts | MC acc. (%) | DA acc. (%) |",
             "|---|---|---|"]
    for name, row in result["ablations"].items():
        lines.append(f"| {name} | {fmt(row['mc_accuracy'])} | {fmt(row['da_accuracy'])} |")
    d = result["decoding"]
    lines += ["", "## Decoding (top-k tokens of each thought under the LM head)", "",
              f"Share of thoughts whose top-{d['k']} holds a key word of the step they replaced: "
              f"{fmt(d['key_word_share'] and 100 * d['key_word_share'])}% (top-1: "
              f"{fmt(d['key_word_top1_share'] and 100 * d['key_word_top1_share'])}%; against another question's "
              f"step, the chance level of this test: "
              f"{fmt(d['key_word_share_other_question'] and 100 * d['key_word_share_other_question'])}%), over "
              f"{d['n_thoughts_with_key_word']} thoughts; per thought index: "
              + ", ".join(f"{j}: {100 * v:.1f}%" for j, v in d["key_word_share_per_thought"].items()), ""]
    for q in d["questions"][:3]:
        lines.append(f"- {q['question']}")
        for j, t in enumerate(q["thoughts"]):
            lines.append(f"  - thought {j + 1} {t['top_k']} (step: {t['step']!r}, key {t['key_words']})")
    n = result["norms"]
    e = n["token_embedding"]
    lines += ["", "## Norms", "", f"Token embeddings: median {fmt(e['median'], 3)} (5-95%: {fmt(e['p5'], 3)}-"
              f"{fmt(e['p95'], 3)}), <|latent|> {fmt(e['latent_token'], 3)}. Thoughts: mean {fmt(n['thought_mean'], 3)}"
              f" ({fmt(n['ratio_to_median_token'], 2)}x the median token); per index: "
              + ", ".join(f"{j}: {v:.3f}" for j, v in n["thought_mean_per_index"].items()), "",
              "## Attention on the image", "", "Share (%) of each thought's attention on image tokens, per layer:", ""]
    for j, row in enumerate(result["attention"]["image_share"]):
        lines.append(f"- thought {j + 1}: " + ", ".join(f"{100 * v:.1f}" for v in row))
    lines += [""] + [f"![{p}]({p})" for p in result["pictures"]]
    return "\n".join(lines) + "\n"


def analyze(checkpoint, data, out, *, image_root=None, k: int = 5, max_samples: int | None = None,
            seed: int = 0) -> dict:
    """Run the four measurements; write analysis.json, analysis.md and the pictures into `out`; return the json."""
    from .data import load_samples

    trained = load_trained(checkpoint)
    cfg = trained.config
    samples = load_samples(cfg.dataset, data, image_root=image_root or cfg.image_root if cfg.dataset != "builtin"
                           else image_root, steps_from=cfg.steps_from, answer_from=cfg.answer_from,
                           skip_bad_records=cfg.skip_bad_records, max_samples=max_samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batches = list(prompt_loader(trained, prompt_set(trained, samples)))
    n_thoughts = sum(int((b["input_ids"] == trained.model.latent_token_id).sum()) for b in batches)
    result = {"checkpoint": str(trained.path), "data": str(data), "stage": trained.stage, "n_samples": len(samples),
              "continuous_thoughts": trained.model.continuous_thoughts,
              "thoughts_per_question": n_thoughts / max(len(samples), 1),
              "ablations": ablations(trained, samples, seed)}
    result["decoding"] = decoding(trained, batches, samples, k)
    result["norms"] = norms(trained, batches)
    norm_values = result["norms"].pop("_values")
    result["attention"] = attention(trained, batches)
    example = result["attention"].pop("_example")
    result["pictures"] = _pictures(result, trained, samples, out, norm_values, example)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / "analysis.md").write_text(_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a run directory, a checkpoint_N directory or an exported folder")
    p.add_argument("--data", required=True, help="the A-OKVQA-format json (or parquet) to analyse on")
    p.add_argument("--image-root", default=None, help="images folder (default: the training config's)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--max-samples", type=int, default=None, help="the first N questions only")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise ablation")
    args = p.parse_args(argv)
    result = analyze(args.checkpoint, args.data, args.out, image_root=args.image_root, k=args.top_k,
                     max_samples=args.max_samples, seed=args.seed)
    print((args.out / "analysis.md").read_text())
    print(f"wrote {args.out / 'analysis.json'}; intact MC accuracy {result['ablations']['intact']['mc_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
