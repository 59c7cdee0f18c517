"""How far does a CoT checkpoint's written chain stay right? For each step i, the share of questions whose first i
written lines are exactly their first i steps (the chain right through step i), and the headline accuracy.

    python scripts/chain_accuracy.py runs/hops_table/runs/cot_warmup_seed0/checkpoint_4 \
        --data runs/hops_table/data/aokvqa_v1p0_val.json [--image-root DIR] [--max-samples 100]

On the hops task this says which part a model has learnt: reading the start (step 1 of the multimodal variant) or
the lookups (the arrows). The checkpoint is loaded and answered as training's evaluation does
(`analyze`'s loading, `inference.evaluate_trained`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal_coconut.analyze import _load, metric_keys  # noqa: E402
from multimodal_coconut.inference import evaluate_trained  # noqa: E402


def chain_right_through(samples, generated: dict[str, str]) -> list[float]:
    """[% of questions whose written lines 1..i equal steps 1..i, for i = 1 .. the most steps a question has]; a
    question with fewer steps than i counts as right through i when all its steps are."""
    most = max(len(s.steps) for s in samples)
    right = [0] * most
    for s in samples:
        lines = [line.strip() for line in generated[s.question_id].split("\n")]
        for i in range(most):
            if all(j < len(lines) and lines[j] == s.steps[j].strip() for j in range(min(i + 1, len(s.steps)))):
                right[i] += 1
    return [round(100 * r / len(samples), 2) for r in right]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--max-samples", type=int, default=None, help="the first N questions only")
    args = p.parse_args(argv)
    trained, samples = _load(args.checkpoint, args.data, args.image_root, args.max_samples)  # as analyze reads them
    ev = evaluate_trained(trained, samples)
    result = {"checkpoint": args.checkpoint, "n": len(samples),
              "chain_right_through_step": chain_right_through(samples, ev["generated"]),
              **{k: ev.get(k) for k in metric_keys(trained.config.dataset)}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
