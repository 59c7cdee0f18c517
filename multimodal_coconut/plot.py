"""Pictures of runs: every run's curves, and the experiment table's plot.

    python -m multimodal_coconut.plot RUN_DIR       # -> RUN_DIR/curves.png (training calls it at the end of a run)

curves.png: training and validation loss, and MC / DA accuracy, per epoch from RUN_DIR/metrics.jsonl, with the
curriculum's stage boundaries marked (a dotted line where the stage changes, its number on top).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    return plt


def _stage_marks(ax, epochs: list[int], stages: list[int]) -> None:
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            x = (epochs[i - 1] + epochs[i]) / 2
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    for i, (e, s) in enumerate(zip(epochs, stages)):
        if i == 0 or stages[i - 1] != s:
            ax.annotate(f"stage {s}", (e, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                        ha="left", va="bottom")


def write_curves(run_dir: str | Path) -> Path | None:
    """RUN_DIR/curves.png from RUN_DIR/metrics.jsonl; None (nothing written) when there are no metrics yet."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not metrics:
        return None
    plt = _pyplot()
    epochs = [m["epoch"] for m in metrics]
    stages = [m.get("stage", 0) for m in metrics]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        points = [(e, m[key]) for e, m in zip(epochs, metrics) if m.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker="o", label=label)
    for key, label in (("mc_accuracy", "MC accuracy"), ("da_accuracy", "DA accuracy")):
        points = [(e, m[key]) for e, m in zip(epochs, metrics) if m.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points), marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss per label token")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    for ax in (loss_ax, acc_ax):
        _stage_marks(ax, epochs, stages)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_results_plot(results: dict, out: str | Path) -> Path:
    """The experiment table's picture: the headline accuracy per epoch for each row (mean over seeds, stages marked),
    and that accuracy against tokens per answer (written + thoughts), with the std over seeds as error bars. The
    headline is the first of results["metrics"] ({key: column name}, the data set's accuracies; A-OKVQA's MC
    accuracy when absent)."""
    key, label = next(iter((results.get("metrics") or {"mc_accuracy": "MC acc. (%)"}).items()))
    label = "val " + label.replace("acc.", "accuracy")
    plt = _pyplot()
    fig, (curve_ax, cost_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for row_key, row in results["rows"].items():
        curves = [r["curve"] for r in results["runs"][row_key].values()]
        n = min(len(c) for c in curves)
        epochs = [curves[0][i]["epoch"] for i in range(n)]
        acc = [sum(c[i][key] or 0 for c in curves) / len(curves) for i in range(n)]
        curve_ax.plot(epochs, acc, marker="o", label=row["name"])
        tokens = row["written_tokens"] + row["thoughts"]
        cost_ax.errorbar(tokens, row[key], yerr=row[f"{key}_std"], xerr=row["written_tokens_std"],
                         marker="o", capsize=3, label=row["name"])
    coconut = results["runs"].get("coconut")
    if coconut:
        curve = next(iter(coconut.values()))["curve"]
        _stage_marks(curve_ax, [m["epoch"] for m in curve], [m["stage"] for m in curve])
    curve_ax.set(xlabel="epoch (Coconut's stage marked)", ylabel=label, ylim=(0, 100))
    cost_ax.set(xlabel="tokens per answer (written + thoughts)", ylabel=label, ylim=(0, 100))
    curve_ax.legend(fontsize=8)
    cost_ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m multimodal_coconut.plot RUN_DIR", file=sys.stderr)
        return 2
    out = write_curves(argv[0])
    if out is None:
        print(f"error: {argv[0]} has no metrics.jsonl with metrics", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
