"""Where does a hops checkpoint's written chain go wrong? From an evaluation's predictions file (a run's
predictions_val_epoch{N}.json) and its data: for the steps it wrote (those after its thoughts), the share of
questions whose first written node is the one its step reaches, and the share whose written nodes follow the
question's own map (each one the successor of the one before: the lookups from written nodes are right, whatever
node the chain starts from; over the questions with two written nodes or more). Text hops variant; a step is written
as a node or an arrow (`red.` or `green>red.`).

    python scripts/hops_written_chain.py runs/hops_text_node/runs/coconut_seed0/predictions_val_epoch2.json \
        --data runs/hops_text_node/data/hops_text_val.json --stage 1
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def written_nodes(output: str) -> list[str]:
    """The node each written line reaches ('red.' or 'green>red.' -> 'red'), up to the answer marker."""
    return [line.rstrip(".").split(">")[-1].strip() for line in output.split("###")[0].split("\n") if line.strip()]


def successor_map(question: str) -> dict[str, str]:
    arrows = re.search(r"Arrows:(.*?)\. Start", question).group(1)
    return dict(arrow.split(">") for arrow in arrows.split(","))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("predictions")
    p.add_argument("--data", required=True, help="the {question, steps, answer, step_nodes} file it answered")
    p.add_argument("--stage", type=int, required=True, help="the thoughts it was given (steps 1..stage are latent)")
    args = p.parse_args(argv)
    # the question ids of a {question, steps, answer} file: `{file stem}_{index}` (multimodal_coconut.data)
    by_id = {f"{Path(args.data).stem}_{i}": record for i, record in enumerate(json.loads(Path(args.data).read_text()))}
    predictions = json.loads(Path(args.predictions).read_text())
    first_right = follows_map = chains = 0  # chains: questions with two written nodes or more
    for qid, pred in predictions.items():
        record = by_id[qid]
        nodes, successor = written_nodes(pred["output"]), successor_map(record["question"])
        first_right += bool(nodes) and nodes[0] == record["step_nodes"][args.stage]
        if len(nodes) >= 2:
            chains += 1
            follows_map += all(successor.get(a) == b for a, b in zip(nodes, nodes[1:]))
    n = len(predictions)
    result = {"questions": n, "stage": args.stage, "first_written_node_right": round(100 * first_right / n, 1),
              "written_chain_follows_the_map": round(100 * follows_map / chains, 1) if chains else None,
              "questions_with_two_written_nodes": chains}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
