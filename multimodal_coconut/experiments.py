"""The paper's experiment table (Coconut, arXiv 2412.06769, Table 1) in the multimodal setting: every row trained and
evaluated on the same data, model size, epochs and seeds.

    python -m multimodal_coconut.experiments --out runs/table --seeds 0 1 2      # the table (docs/results.md)
    python -m multimodal_coconut.experiments --out /tmp/table --quick             # every row, tiny: ~2 minutes
    python -m multimodal_coconut.experiments --out DIR --config args/multimodal_coconut.yaml --set num_epochs=12

Rows, as config keys on top of --config (the original Coconut's flags; `curriculum` is ours):

    No-CoT             no_cot: true                  question -> answer
    CoT                cot: true                     question -> every step written -> answer
    Coconut            coconut: true                 the curriculum; a thought is the previous last hidden state
    w/o curriculum     coconut, curriculum: false    the last stage (every step a thought) from the first epoch
    w/o thought        coconut, no_thoughts: true    the curriculum removes steps and puts nothing in their place
    Pause as thought   coconut: false                the curriculum's layout; a thought is a learned <|latent|> token

and, with --rows, the options on the thought: coconut_norm (thought_norm: projection), coconut_step
(thought_supervision: 1.0) and coconut_norm_step (both), each plain Coconut's recipe with the option added, and
pause_step (pause as thought with step supervision: the same signal without feedback between positions).

As in the paper (and the original repository's recipe: train CoT, then set its checkpoint as Coconut's
load_model_path with `resume` skipping stage 0), every row but No-CoT starts from a CoT model: per seed, a run
cot_warmup_seed{S} trains CoT for --cot-warmup epochs; the other rows load its last checkpoint with
resume=epochs_per_stage (stage 0 done) and train the remaining num_epochs - epochs_per_stage epochs. No-CoT trains
from the backbone for as many epochs in all (warm-up + the rest). --cot-warmup 0 trains every row from the backbone.

Each run is run.py's code path in a child process (`cli.main`), in DIR/runs/{row}_seed{S}/, logging to train.log
there. A run whose metrics.jsonl holds all its epochs is reused; an unfinished one resumes from its newest
checkpoint. Stopping the runner (Ctrl-C, SIGTERM, a run that fails) stops the runs it is training. Each finished run's newest checkpoint is then answered once more by `inference.evaluate_trained` (the
code training's evaluation runs) to count what it generates and time it; that is cached in eval.json beside it.
On the built-in set the data is generated once into DIR/data, so every row and seed reads the same files.

The accuracies are those the data set defines, as training's metrics.jsonl has them (`METRICS`): A-OKVQA's
multiple-choice and direct-answer accuracy on A-OKVQA and the built-in set, the original Coconut's accuracy and CoT
match on its format (dataset coconut, e.g. args/prosqa_coconut.yaml), accuracy on jsonl.

Writes DIR/results.json (every run and the mean / std over seeds per row), DIR/results.md (the table) and
DIR/results.png (accuracy per epoch for each row, accuracy against generated tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import Config, load_config

ROWS = [  # (key, name in the table, config overrides)
    ("no_cot", "No-CoT", ["coconut=false", "no_cot=true"]),
    ("cot", "CoT", ["coconut=false", "cot=true"]),
    ("coconut", "Coconut", ["coconut=true"]),
    ("no_curriculum", "w/o curriculum", ["coconut=true", "curriculum=false"]),
    ("no_thought", "w/o thought", ["coconut=true", "no_thoughts=true"]),
    ("pause", "Pause as thought", ["coconut=false"]),
]
# Options on the thought (README "The paper's table"), opt-in with --rows: plain Coconut plus one option or both.
OPTION_ROWS = [
    ("coconut_norm", "Coconut + norm", ["coconut=true", "thought_norm=projection"]),
    ("coconut_step", "Coconut + step supervision", ["coconut=true", "thought_supervision=1.0"]),
    ("coconut_norm_step", "Coconut + norm + step sup.", ["coconut=true", "thought_norm=projection",
                                                         "thought_supervision=1.0"]),
    # the control for step supervision: the same extra signal on pause tokens, which give no feedback (no serial depth)
    ("pause_step", "Pause + step supervision", ["coconut=false", "thought_supervision=1.0"]),
]
# The table's setting on the built-in set: the demo's model and data, 1,600 questions, 3 epochs (300 steps) of CoT
# warm-up, then one epoch per stage up to stage 4 (every step a thought): 400 steps per row after the warm-up.
FULL = ["builtin_train_size=1600", "builtin_val_size=100", "epochs_per_stage=1", "max_latent_stage=3",
        "num_epochs=5", "max_new_tokens=48"]
FULL_WARMUP = 3
# --quick: every row and file, in about 2 minutes (tests)
QUICK = ["builtin_train_size=32", "builtin_val_size=8", "batch_size_training=8", "epochs_per_stage=1",
         "max_latent_stage=1", "num_epochs=2", "max_new_tokens=24", "num_examples_to_print=0"]
QUICK_WARMUP = 1
WARMUP_ROW = ["coconut=false", "cot=true"]
# The accuracies each dataset's evaluation writes to metrics.jsonl (evaluate.score_generations), with their column
# names; the first is the headline (the plot's).
METRICS = {"coconut": {"accuracy": "acc. (%)", "cot_accuracy": "CoT match (%)"},
           "jsonl": {"accuracy": "acc. (%)"}}
AOKVQA_METRICS = {"mc_accuracy": "MC acc. (%)", "da_accuracy": "DA acc. (%)"}


def metrics_of(dataset: str) -> dict[str, str]:
    """{metric key: column name} of the accuracies `dataset`'s evaluation reports."""
    return METRICS.get(dataset, AOKVQA_METRICS)
RUN_CODE = "import sys; from multimodal_coconut.cli import main; sys.exit(main(sys.argv[1:]))"


def hops_of(cfg: Config):
    """The hops task a config generates (builtin_data.Hops), None for the shapes set or files of one's own."""
    if cfg.dataset != "builtin" or cfg.builtin_task == "shapes":
        return None
    from .builtin_data import Hops

    return Hops(k=cfg.hops_k, nodes=cfg.hops_nodes, step_style=cfg.hops_step_style,
                text=cfg.builtin_task == "hops_text")


def run_overrides(out: Path, cfg: Config, row: list[str], seed: int, base: list[str]) -> list[str]:
    """key=value overrides of one run: the shared ones, the row's, its seed, its folder and (built-in) the data."""
    data = []
    if cfg.dataset == "builtin":
        from .builtin_data import builtin_path

        d, hops = out / "data", hops_of(cfg)
        data = [f"train_path={builtin_path(d, 'train', hops)}", f"val_path={builtin_path(d, 'val', hops)}",
                f"image_root={d}"]
    # Options on the thought, so that a base config may set them: the rows without continuous thoughts (No-CoT, CoT,
    # pause) drop thought_norm, and those without latent positions (No-CoT, CoT, w/o thought) step supervision; CoT
    # (the table's row and every warm-up) has no stages to mix, so it drops uniform_prob.
    if "coconut=false" in row:
        data += ["thought_norm=none"]
    if {"cot=true", "no_cot=true", "no_thoughts=true"} & set(row):
        data += ["thought_supervision=0"]
    if "cot=true" in row:
        data += ["uniform_prob=0"]
    return [*base, *data, *row, f"seed={seed}", f"save_path={out / 'runs'}"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(run_dir: Path, num_epochs: int) -> bool:
    metrics = read_metrics(run_dir)
    return bool(metrics) and metrics[-1]["epoch"] >= num_epochs


def train_runs(jobs: list[tuple[str, Path, list[str]]], config: str, parallel: int) -> None:
    """Train the unfinished runs, `parallel` child processes at a time (one torch thread each when more than one).
    However this stops (a run failed, Ctrl-C, SIGTERM: `main` makes it an exit), the runs still training are stopped
    with it, never left training unwatched; each resumes from its newest checkpoint on the next call."""
    env = dict(os.environ)
    if min(parallel, len(jobs)) > 1:  # a lone run (e.g. a single seed's warm-up) keeps every core
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running = list(jobs), []
    try:
        _train(pending, running, config, env, parallel)
    finally:
        for name, _, proc, log in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
                print(f"stopped {name}", flush=True)
            log.close()


_STOP = {"asked": False}  # set by SIGTERM within sigterm_exits; _train exits at its next check


def _on_sigterm(signum, frame):
    _STOP["asked"] = True


@contextlib.contextmanager
def sigterm_exits():
    """Within this block SIGTERM (kill, a scheduler's stop) makes `_train` exit (SystemExit 143) at its next check,
    at most a second later and never between starting a run and listing it, so that `train_runs` stops every run on
    the way out. Only the main thread can take signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    _STOP["asked"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _exit_if_asked() -> None:
    if _STOP["asked"]:
        sys.exit(128 + signal.SIGTERM)


def _train(pending: list, running: list, config: str, env: dict, parallel: int) -> None:
    while pending or running:
        while pending and len(running) < parallel:
            name, run_dir, overrides = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a")
            print(f"training {name}", flush=True)
            proc = subprocess.Popen([sys.executable, "-c", RUN_CODE, config, *overrides], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((name, run_dir, proc, log))
            _exit_if_asked()
        time.sleep(1)
        _exit_if_asked()
        for item in list(running):
            name, run_dir, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                if proc.returncode != 0:
                    tail = (run_dir / "train.log").read_text()[-2000:]
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}); end of {run_dir}/train.log:\n{tail}")
                print(f"finished {name}", flush=True)


def evaluate_run(run_dir: Path, keys: list[str]) -> dict:
    """The accuracies `keys`, generated tokens and inference time of the run's newest checkpoint (cached in
    eval.json), with the accuracies its training's last evaluation wrote (train_{key}) and its curves."""
    cache = run_dir / "eval.json"
    metrics = read_metrics(run_dir)
    if cache.exists():
        result = json.loads(cache.read_text())
        if result.get("epoch") == metrics[-1]["epoch"] and all(k in result for k in (*keys, "shuffled")):
            return result
    from .data import load_samples
    from .inference import evaluate_trained, load_trained

    trained = load_trained(run_dir)
    cfg = trained.config
    samples = load_samples(cfg.dataset, cfg.val_path, image_root=cfg.image_root, steps_from=cfg.steps_from,
                           answer_from=cfg.answer_from, skip_bad_records=cfg.skip_bad_records,
                           max_samples=cfg.max_val_samples)
    ev = evaluate_trained(trained, samples)
    result = {k: ev.get(k) for k in (*keys, "written_tokens", "thoughts", "inference_s")}
    # Do the answers need the thoughts? The headline accuracy with each question fed another question's thoughts
    # (analyze's `shuffle`); None for a run that feeds none (No-CoT, CoT, pause, w/o thought, stage 0).
    result["shuffled"] = None
    if trained.model.continuous_thoughts and not cfg.no_thoughts and trained.stage > 0:
        from .analyze import shuffled_accuracy

        result["shuffled"] = shuffled_accuracy(trained, samples)
    result.update(epoch=metrics[-1]["epoch"], stage=trained.stage,
                  train_s=round(sum(m.get("wall_time_s") or 0 for m in metrics), 1),
                  **{f"train_{k}": metrics[-1].get(k) for k in keys},
                  curve=[{k: m.get(k) for k in ("epoch", "stage", "train_loss", "val_loss", *keys)} for m in metrics])
    cache.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, dict[int, dict]], keys: list[str]) -> dict:
    """Per row: mean and std over seeds of every number of the table (the accuracies `keys` first)."""
    table = {}
    for key, name, _ in ROWS + OPTION_ROWS:
        if key not in runs:
            continue
        seeds = runs[key]
        row = {"name": name, "seeds": sorted(seeds)}
        for field in (*keys, "shuffled", "written_tokens", "thoughts", "train_s", "inference_s"):
            row[field], row[f"{field}_std"] = _mean_std([r[field] for r in seeds.values()])
        table[key] = row
    return table


def format_table(table: dict, setting: str, metrics: dict[str, str]) -> str:
    """The markdown table: one column per accuracy of `metrics` ({key: column name}), then the costs."""
    def cell(row, field, digits=1):
        mean, std = row[field], row[f"{field}_std"]
        return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    shuffled = f"{next(iter(metrics.values()))}, thoughts shuffled"
    columns = [*metrics.values(), shuffled, "written tokens", "thoughts", "train (s)", "inference (s)"]
    lines = [f"Mean ± std over seeds; {setting}.", "",
             "| method | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in table.values():
        cells = [cell(row, k) for k in (*metrics, "shuffled", "written_tokens", "thoughts")] + [
            cell(row, "train_s", 0), cell(row, "inference_s", 1)]
        lines.append(f"| {row['name']} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    lines += ["", f"{shuffled}: the same accuracy with every question fed another question's thoughts (the batch "
              "rolled by one row, as `analyze`'s shuffle), for the rows that feed continuous thoughts: the gap to "
              "the accuracy is what the answers owe to the thoughts. "
              "written tokens: new tokens per question before EOS (steps, `### `, the answer); thoughts: latent "
              "positions per question (counted as generated tokens in the paper's table); train: wall time of all "
              "epochs, their evaluations included; inference: answering the validation set once. Times are on a "
              "shared machine and only roughly comparable."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and the results")
    p.add_argument("--config", default="args/demo.yaml", help="the base config every row starts from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="a tiny setting (one seed unless --seeds): ~2 minutes")
    p.add_argument("--rows", nargs="+", choices=[k for k, _, _ in ROWS + OPTION_ROWS],
                   help="the rows to train (default: the six of the paper's table; the options' rows on request)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--cot-warmup", type=int, metavar="EPOCHS",
                   help="epochs of CoT that every row but No-CoT starts from; 0: every row from the backbone "
                        f"(default: {FULL_WARMUP} on the built-in set, {QUICK_WARMUP} with --quick, else 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the results of the runs already finished (rows and seeds that have one)")
    args = p.parse_args(argv)
    seeds = [0] if args.quick and "--seeds" not in (argv if argv is not None else sys.argv) else args.seeds
    base_cfg = load_config(args.config, check_paths=False)
    shapes = base_cfg.dataset == "builtin" and base_cfg.builtin_task == "shapes"
    # The shapes set gets the table's setting (FULL); a hops config is its own recipe; --quick shrinks either.
    base = ([] if not shapes else (QUICK if args.quick else FULL)) + list(args.set)
    if args.quick and not shapes:
        sizes = QUICK[:2] if base_cfg.dataset == "builtin" else ["max_val_samples=8"]
        base = QUICK[2:] + sizes + list(args.set)
    rows = [r for r in ROWS + OPTION_ROWS if r[0] in args.rows] if args.rows else ROWS
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = load_config(args.config, run_overrides(args.out, base_cfg, [], seeds[0], base), check_paths=False)
    if cfg.dataset == "builtin":  # once, before the runs, so they never race to write it
        from .builtin_data import generate_builtin

        generate_builtin(args.out / "data", {"train": cfg.builtin_train_size, "val": cfg.builtin_val_size},
                         seed=cfg.builtin_seed, hops=hops_of(cfg))
    warmup = args.cot_warmup
    if warmup is None:  # a hops recipe's warm-up is its own stage 0
        warmup = (0 if cfg.dataset != "builtin" else QUICK_WARMUP if args.quick
                  else FULL_WARMUP if shapes else cfg.epochs_per_stage)
    if warmup < 0:
        raise SystemExit(f"--cot-warmup must be >= 0, got {warmup}")
    first, then, dirs = [], [], {}  # warm-ups and runs from the backbone first; runs from a warm-up after them
    n_finished = 0  # rows of the table (warm-ups not counted)
    for seed in seeds:
        start = {}
        if warmup:
            name = f"cot_warmup_seed{seed}"
            overrides = run_overrides(args.out, base_cfg, WARMUP_ROW, seed, base) + [f"num_epochs={warmup}",
                                                                                     f"name={name}"]
            run_dir = Path(load_config(args.config, overrides).save_path) / name
            if not finished(run_dir, warmup):
                first.append((name, run_dir, overrides))
            start = {"from_warmup": [f"load_model_path={run_dir / f'checkpoint_{warmup}'}",
                                     f"resume={cfg.epochs_per_stage}"],
                     "no_cot": [f"num_epochs={cfg.num_epochs - cfg.epochs_per_stage + warmup}"]}
        for key, _, row in rows:
            name = f"{key}_seed{seed}"
            extra = start.get("no_cot" if key == "no_cot" else "from_warmup", [])
            overrides = run_overrides(args.out, base_cfg, row, seed, base) + extra + [f"name={name}"]
            # every run's config is checked before any trains (a warm-up checkpoint is made by the first phase)
            run_cfg = load_config(args.config, overrides, check_paths=not extra or key == "no_cot")
            run_dir = Path(run_cfg.save_path) / run_cfg.name
            dirs[(key, seed)] = run_dir
            if finished(run_dir, run_cfg.num_epochs):
                n_finished += 1
            else:
                (then if warmup and key != "no_cot" else first).append((name, run_dir, overrides))
    jobs = first + then
    print(f"{len(dirs)} runs, {n_finished} already finished"
          + (f"; every row but No-CoT starts from {warmup} epochs of CoT" if warmup else ""), flush=True)
    if args.report_only:
        for name, run_dir, _ in jobs:
            dirs = {k: d for k, d in dirs.items() if d != run_dir}
        if not dirs:
            raise SystemExit("--report-only: no finished run")
    else:
        with sigterm_exits():
            train_runs(first, args.config, args.jobs)
            train_runs(then, args.config, args.jobs)

    metrics = metrics_of("coconut" if cfg.builtin_task == "hops_text" and cfg.dataset == "builtin" else cfg.dataset)
    runs: dict[str, dict[int, dict]] = {}
    for (key, seed), run_dir in dirs.items():
        runs.setdefault(key, {})[seed] = evaluate_run(run_dir, list(metrics))
    table = summarise(runs, list(metrics))
    setting = (f"config {args.config} with {' '.join(base) or 'no overrides'}: {cfg.num_epochs} epochs, "
               f"{cfg.epochs_per_stage} per stage, max_latent_stage {cfg.max_latent_stage}, c_thought {cfg.c_thought}")
    if warmup:
        after = cfg.num_epochs - cfg.epochs_per_stage  # epochs trained after the warm-up
        setting += (f"; every row but No-CoT starts from {warmup} epochs of CoT (its stage 0) and trains {after} "
                    f"more; No-CoT trains {after + warmup} from the backbone")
    results = {"setting": setting, "config": args.config, "overrides": base, "cot_warmup": warmup,
               "dataset": cfg.dataset, "metrics": metrics, "seeds": sorted({s for _, s in dirs}), "rows": table,
               "runs": {k: {str(s): r for s, r in v.items()} for k, v in runs.items()}}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    markdown = format_table(table, setting, metrics)
    (args.out / "results.md").write_text(markdown + "\n")
    from .plot import write_results_plot

    write_results_plot(results, args.out / "results.png")
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
