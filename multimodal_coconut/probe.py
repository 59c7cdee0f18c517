"""What does each continuous thought hold? Read the node its step arrives at out of it, two ways.

A sample of the hops task carries `step_nodes[s]`, the node that step s (0-based) arrives at. Thought j (0-based)
stands for step j // c_thought, the step it replaced in the curriculum, so it is compared with that step's node.
Both probes are also run against the node the step starts from, the previous step's node (`previous`; none for
a first step, whose start is in the question or the image): a thought may hold the pointer one hop behind, which
is what the step loss asks of it when the step's text opens with that node (`red>blue.`).

* decoding: how often the thought's top-1 / top-k tokens under the LM head (`inference.decode_thoughts`) are the
  node word. Tokens and node are compared stripped and lowercased. A node word the tokenizer splits into several
  tokens (as written mid-sentence, " " + node) also counts when the token is its first non-blank piece, the token a
  model writing the step would emit first (a looser test: other words may share that piece); such nodes are counted
  (`n_multi_token_nodes`). Chance level of the same test: each thought against the node of another question's step
  at the same index.
* linear: a multinomial logistic regression from thought j to its node, fitted on half the questions (a split drawn
  from the seed, the same for every j) and scored on the other half, beside the chance level (the share of the
  held-out half's most common node: what always answering it scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def node_targets(tokenizer, node: str) -> tuple[set[str], bool]:
    """(the stripped, lowercased token strings that count as `node`; whether `node` is several tokens): the word,
    and for a word split into several tokens its first piece that is not blank (" qzxv" -> " ", "q", ...: "q")."""
    word = node.strip().lower()
    ids = tokenizer.encode(" " + node.strip(), add_special_tokens=False)
    if len(ids) <= 1:
        return {word}, False
    first = next((p for p in (tokenizer.decode([i]).strip().lower() for i in ids) if p), word)
    return {word, first}, True


def thought_nodes(samples, n_thoughts: dict[int, int], c_thought: int, lag: int = 0) -> dict[int, list[str | None]]:
    """{sample index: the node of each of its thoughts (None past its steps)} for the samples with step_nodes; with
    `lag` 1 the node of the step before the thought's step (None for the first step)."""
    c = max(c_thought, 1)
    out = {}
    for idx, n in n_thoughts.items():
        sample = samples[idx]
        nodes = getattr(sample, "step_nodes", None)
        if nodes is not None:
            if len(nodes) != len(sample.steps):
                raise ValueError(f"question_id {sample.question_id!r}: {len(nodes)} step_nodes for "
                                 f"{len(sample.steps)} steps (one node per step expected)")
            out[idx] = [nodes[j // c - lag] if 0 <= j // c - lag and j // c < len(nodes) else None
                        for j in range(n)]
    return out


def decoding_probe(tops: dict[int, list[list[str]]], nodes: dict[int, list[str | None]], tokenizer) -> dict:
    """Per thought index (1-based, a list of rows): share of thoughts whose top-1 / top-k token is their node, and
    the top-k share against another question's node at the same index (the next question that has one, cyclically)."""
    per_index: dict[int, list[tuple[list[str], str]]] = {}
    multi = set()
    for idx in sorted(nodes):
        for j, node in enumerate(nodes[idx]):
            if node is not None:
                per_index.setdefault(j + 1, []).append(([t.strip().lower() for t in tops[idx][j]], node))
    targets = {}
    for rows in per_index.values():
        for _, node in rows:
            if node not in targets:
                targets[node], is_multi = node_targets(tokenizer, node)
                if is_multi:
                    multi.add(node)
    out = []
    for j, rows in sorted(per_index.items()):
        top1 = sum(words[0] in targets[node] for words, node in rows)
        topk = sum(any(w in targets[node] for w in words) for words, node in rows)
        other = sum(any(w in targets[rows[(a + 1) % len(rows)][1]] for w in words)
                    for a, (words, _) in enumerate(rows)) if len(rows) > 1 else None
        out.append({"thought": j, "n": len(rows), "top1": top1 / len(rows), "top_k": topk / len(rows),
                    "top_k_other_question": None if other is None else other / len(rows)})
    return {"per_index": out, "n_multi_token_nodes": len(multi), "multi_token_nodes": sorted(multi)[:20]}


def split_questions(indices: list[int], seed: int) -> tuple[set[int], set[int]]:
    """(fit half, held-out half) of the questions `indices`, drawn from `seed` (the fit half has the smaller half)."""
    order = sorted(indices)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    fit = {order[p] for p in perm[: len(order) // 2]}
    return fit, set(order) - fit


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, l2: float = 1e-3,
                 steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, K), b (K,)) of a multinomial logistic regression on `x` (N, C) and class indices `y` (N,): mean
    cross-entropy + l2 * |W|^2, full-batch L-BFGS for up to `steps` iterations, float64 (deterministic on CPU)."""
    x = x.double()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(x_fit: torch.Tensor, y_fit: list[str], x_test: torch.Tensor, y_test: list[str], *,
                 l2: float = 1e-3, steps: int = 200) -> dict:
    """Fit on (x_fit, y_fit), score on (x_test, y_test); features standardised with the fit half's mean and std.
    A held-out label never seen in the fit half cannot be predicted (it counts wrong; `n_test_unseen`)."""
    classes = sorted(set(y_fit))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = x_fit.double().mean(0), x_fit.double().std(0, unbiased=False).clamp(min=1e-6)
    w, b = fit_logistic((x_fit.double() - mean) / std, torch.tensor([index[c] for c in y_fit]), len(classes),
                        l2=l2, steps=steps)
    predicted = ((x_test.double() - mean) / std @ w + b).argmax(-1).tolist()
    right = sum(classes[p] == y for p, y in zip(predicted, y_test))
    majority = max(y_test.count(c) for c in set(y_test))
    return {"accuracy": right / len(y_test), "chance": majority / len(y_test), "n_fit": len(y_fit),
            "n_test": len(y_test), "n_classes": len(classes), "n_test_unseen": sum(y not in index for y in y_test)}


def probe(thoughts: dict[int, torch.Tensor], tops: dict[int, list[list[str]]], samples, tokenizer, c_thought: int,
          *, seed: int = 0, l2: float = 1e-3, steps: int = 200) -> dict:
    """Both probes over the thoughts of every question ({sample index: (n, C)}, top-k tokens {sample index: ...}).
    {"skipped": reason} when no question has step_nodes or thoughts."""
    if not any(t.shape[0] for t in thoughts.values()):
        return {"skipped": "the checkpoint feeds no thoughts on this data"}
    n_thoughts = {i: t.shape[0] for i, t in thoughts.items()}
    nodes = thought_nodes(samples, n_thoughts, c_thought)
    if not nodes:
        return {"skipped": "no question of this data has step_nodes (the node each step arrives at, written by the "
                           "hops task), so there is nothing to compare the thoughts with"}
    fit, test = split_questions(list(nodes), seed)

    def linear(targets):  # one probe per thought index, on the same fit / held-out split for every target set
        out = []
        for j in range(max(len(v) for v in targets.values())):
            have = [i for i in sorted(targets) if j < len(targets[i]) and targets[i][j] is not None]
            f, t = [i for i in have if i in fit], [i for i in have if i in test]
            if not f or not t:
                out.append({"thought": j + 1, "skipped": f"{len(f)} questions to fit and {len(t)} to score on"})
                continue
            scores = linear_probe(torch.stack([thoughts[i][j] for i in f]), [targets[i][j] for i in f],
                                  torch.stack([thoughts[i][j] for i in t]), [targets[i][j] for i in t],
                                  l2=l2, steps=steps)
            out.append({"thought": j + 1, **scores})
        return {"seed": seed, "l2": l2, "per_index": out}
    previous = thought_nodes(samples, n_thoughts, c_thought, lag=1)
    return {"n_questions": len(nodes), "n_without_step_nodes": len(thoughts) - len(nodes),
            "decoding": decoding_probe(tops, nodes, tokenizer), "linear": linear(nodes),
            "previous": {"decoding": decoding_probe(tops, previous, tokenizer), "linear": linear(previous)}}


# -- report ---------------------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def probe_report(p: dict, k: int) -> list[str]:
    """Markdown lines of `probe`'s result."""
    if "skipped" in p:
        return [f"Skipped: {p['skipped']}."]
    dec, lin = p["decoding"], p["linear"]
    lines = [f"{p['n_questions']} questions with step_nodes ({p['n_without_step_nodes']} without). Decoding: the "
             f"thought's top-1 / top-{k} token is the node (a node of several tokens also counts on its first "
             f"non-blank token; {dec['n_multi_token_nodes']} such nodes). Linear: logistic regression fitted on half "
             f"the questions (seed {lin['seed']}), accuracy on the other half; chance = that half's most common node.",
             "", "| thought | top-1 (%) | top-k (%) | top-k, other question's node (%) | linear probe (%) | chance (%) "
             "| fit / held-out | classes |", "|---|---|---|---|---|---|---|---|"]
    linear = {r["thought"]: r for r in lin["per_index"]}
    for r in dec["per_index"]:
        q = linear.get(r["thought"], {})
        lines.append(f"| {r['thought']} | {_pct(r['top1'])} | {_pct(r['top_k'])} | {_pct(r['top_k_other_question'])} "
                     f"| {_pct(q.get('accuracy'))} | {_pct(q.get('chance'))} | {q.get('n_fit', '-')} / "
                     f"{q.get('n_test', '-')} | {q.get('n_classes', q.get('skipped', '-'))} |")
    if "previous" in p:
        prev_dec = {r["thought"]: r for r in p["previous"]["decoding"]["per_index"]}
        prev_lin = {r["thought"]: r for r in p["previous"]["linear"]["per_index"]}
        lines += ["", "The same against the node the thought's step starts from (the previous step's node; none for "
                  "a first step):", "", "| thought | top-1 (%) | linear probe (%) | chance (%) |", "|---|---|---|---|"]
        for r in dec["per_index"]:
            d, q = prev_dec.get(r["thought"], {}), prev_lin.get(r["thought"], {})
            lines.append(f"| {r['thought']} | {_pct(d.get('top1'))} | {_pct(q.get('accuracy'))} "
                         f"| {_pct(q.get('chance'))} |")
    return lines


def probe_picture(ax, p: dict, k: int) -> None:
    """Both probes per thought index on a matplotlib axis, each beside its chance level (dotted, same colour)."""
    dec, lin = p["decoding"]["per_index"], [r for r in p["linear"]["per_index"] if "accuracy" in r]
    prev = [r for r in p.get("previous", {}).get("linear", {}).get("per_index", []) if "accuracy" in r]
    for label, rows, key, style in (("decodes to its node (top-1)", dec, "top1", "C0o-"),
                                    (f"decodes to its node (top-{k})", dec, "top_k", "C1o-"),
                                    ("... to another question's node (chance)", dec, "top_k_other_question", "C1o:"),
                                    ("linear probe (held-out half)", lin, "accuracy", "C3s-"),
                                    ("majority node (chance)", lin, "chance", "C3s:"),
                                    ("linear probe, previous step's node", prev, "accuracy", "C2^--")):
        points = [(r["thought"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="thought", ylabel="% of thoughts", ylim=(0, 100), title="is the step's node in the thought?")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes: inside, it hid points
