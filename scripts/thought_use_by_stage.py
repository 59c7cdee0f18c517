"""Do the answers need the thoughts, stage by stage? For every run of an experiment table (multimodal_coconut.
experiments) whose row feeds continuous thoughts, every checkpoint after stage 0: the headline accuracy with the
thoughts intact and with each question fed another question's thoughts (analyze's `shuffle`), on the table's
validation data. Prints a markdown table and writes it, with the numbers, to DIR/thought_use_by_stage.{md,json}.

    python scripts/thought_use_by_stage.py runs/hops_text_table [--rows coconut coconut_step]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal_coconut.analyze import _load, metric_keys, shuffled_accuracy  # noqa: E402
from multimodal_coconut.experiments import OPTION_ROWS, ROWS  # noqa: E402
from multimodal_coconut.inference import evaluate_trained  # noqa: E402

FEEDS_THOUGHTS = ["coconut", "no_curriculum", *(key for key, _, _ in OPTION_ROWS)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("table", type=Path, help="the experiment runner's --out folder")
    p.add_argument("--rows", nargs="+", default=FEEDS_THOUGHTS, choices=FEEDS_THOUGHTS)
    args = p.parse_args(argv)
    names = {key: name for key, name, _ in ROWS + OPTION_ROWS}
    found = []
    for key in args.rows:
        for run in sorted((args.table / "runs").glob(f"{key}_seed*")):
            seed = int(run.name.rsplit("_seed", 1)[1])
            val_path = yaml.safe_load((run / "config.yaml").read_text())["val_path"]
            for ckpt in sorted(run.glob("checkpoint_*"), key=lambda c: int(c.name.split("_")[1])):
                trained, samples = _load(ckpt, val_path)
                if trained.stage == 0:
                    continue
                metric = metric_keys(trained.config.dataset)[0]
                intact, shuffled = evaluate_trained(trained, samples)[metric], shuffled_accuracy(trained, samples)
                found.append({"row": key, "seed": seed, "epoch": int(ckpt.name.split("_")[1]),
                              "stage": trained.stage, "metric": metric, "intact": intact, "shuffled": shuffled})
                print(found[-1], flush=True)
    lines = ["| method | seed | epoch | stage | accuracy (%) | thoughts shuffled (%) | gap (points) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {names[f['row']]} | {f['seed']} | {f['epoch']} | {f['stage']} | {f['intact']:.1f} | "
              f"{f['shuffled']:.1f} | {f['intact'] - f['shuffled']:+.1f} |" for f in found]
    (args.table / "thought_use_by_stage.json").write_text(json.dumps(found, indent=1))
    (args.table / "thought_use_by_stage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
