"""Mutation check of the training-loop and generation tests (issue 13): put one known bug at a time into a scratch
copy of the repository, run the tests that should catch it there, and report which test failed first.

    python scripts/mutation_check.py                 # every mutation
    python scripts/mutation_check.py stage0 cosine   # some of them (names: --list)

Never touches the tree it is run from: each mutation gets a fresh copy under a temporary directory (the files git
tracks plus untracked, not ignored ones), deleted afterwards. A mutation whose source text is no longer found
(the code changed) is reported as "stale", so update its `old` text rather than trusting a silent pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINER = "tests/test_trainer_behaviour.py"
GENERATION = "tests/test_generation_reference.py"
EVALUATE = "tests/test_evaluate.py"
TEXT = "tests/test_text_checkpoints.py"
CONFIG = "tests/test_config.py"
CHECKPOINT = "tests/test_checkpoint.py"

# name: (file, old text, new text, pytest arguments selecting the tests to run). The old text must occur once.
MUTATIONS = {
    "stage0": ("multimodal_coconut/train.py", "train_set.with_stage(stage, seed=cfg.seed, epoch=epoch)",
               "train_set.with_stage(0, seed=cfg.seed, epoch=epoch)", [TRAINER, "-k", "test_training_and_validation"]),
    "uniform_prob_ignored": ("multimodal_coconut/curriculum.py", "if rng.random() < mode.uniform_prob else stage",
                             "if rng.random() < 0 else stage", [TRAINER, "-k", "test_uniform_prob"]),
    "uniform_prob_always": ("multimodal_coconut/curriculum.py", "if rng.random() < mode.uniform_prob else stage",
                            "if rng.random() < 1 else stage", [TRAINER, "-k", "test_uniform_prob"]),
    "uniform_draws_past_steps": ("multimodal_coconut/curriculum.py", "rng.choice(range(n + 1))",
                                 "rng.choice(range(mode.max_latent_stage + 2))", [TRAINER, "-k", "test_uniform_prob"]),
    "val_prompts_stage0": ("multimodal_coconut/train.py", "val_gen_set.with_stage(stage, seed=cfg.seed, epoch=epoch)",
                           "val_gen_set.with_stage(0, seed=cfg.seed, epoch=epoch)",
                           [TRAINER, "-k", "test_training_and_validation"]),
    "no_reset_optimizer": ("multimodal_coconut/train.py",
                           "if resets_optimizer(cfg, epoch):", "if False:", [TRAINER, "-k", "test_reset_optimizer"]),
    "reset_every_epoch": ("multimodal_coconut/train.py",
                          'return cfg.reset_optimizer_every == "epoch" or epoch % cfg.epochs_per_stage == 0',
                          "return True", [TRAINER, "-k", "test_reset_optimizer"]),
    "freeze_nothing": ("multimodal_coconut/train.py", "module.requires_grad_(False)", "pass",
                       [TRAINER, "-k", "test_frozen_towers"]),
    "accumulate_first_only": ("multimodal_coconut/train.py",
                              "(token_sum * env.world_size / global_labels.to(out.loss.device)).backward()",
                              "(token_sum * env.world_size / global_labels.to(out.loss.device) * (i == 0)).backward()",
                              [TRAINER, "-k", "test_accumulated_step"]),
    "cosine": ("multimodal_coconut/train.py", "math.cos(math.pi * progress)", "math.cos(math.pi * progress / 2)",
               [TRAINER, "-k", "test_learning_rate_of_every_step"]),
    "sampler_epoch": ("multimodal_coconut/train.py", "sampler.set_epoch(epoch)", "pass",
                      [TRAINER, "-k", "test_sample_order"]),
    "qid_pairing": ("multimodal_coconut/inference.py", 'zip(batch["idx"].tolist(), new)',
                    'zip(batch["idx"].tolist()[::-1], new)', [TRAINER, "-k", "test_predictions_hold"]),
    "rank1_not_gathered": ("multimodal_coconut/train.py", "generated = gather_generations(generated)",
                           "generated = dict(generated)", [TRAINER, "-k", "test_only_eval_loads"]),
    "position_plus_one": ("multimodal_coconut/model.py", "next_pos = position_ids[rows, last] + 1",
                          "next_pos = position_ids[rows, last] + 2", [GENERATION, "-k", "test_every_step"]),
    "position_plus_seven": ("multimodal_coconut/model.py", "next_pos = position_ids[rows, last] + 1",
                            "next_pos = position_ids[rows, last] + 8", [GENERATION, "-k", "test_every_step"]),
    "position_from_column": ("multimodal_coconut/model.py", "next_pos = position_ids[rows, last] + 1",
                             "next_pos = last + 1", [GENERATION, "-k", "test_every_step"]),
    "synced_one_token": ("multimodal_coconut/model.py", "done = not _any_rank_busy(not done, input_ids.device)",
                         "done = not _any_rank_busy(not done, input_ids.device) or step >= 0",
                         [GENERATION, "-k", "test_synced_gpus"]),
    "checkpoints_as_strings": ("multimodal_coconut/checkpoint.py", "found.append((int(m.group(1)), path))",
                               "found.append((m.group(1), path))", [TRAINER, "-k", "test_resume_past_epoch_ten"]),
    "da_no_lower": ("multimodal_coconut/evaluate.py", 'answer = " ".join(answer.lower().split())',
                    'answer = " ".join(answer.split())', [EVALUATE]),
    "normalize_no_lower": ("multimodal_coconut/evaluate.py", 'text = " ".join(text.lower().split())',
                           'text = " ".join(text.split())', [EVALUATE]),
    "normalize_no_punctuation": ("multimodal_coconut/evaluate.py", "    for p in _PUNCT:\n", '    for p in "":\n',
                                 [EVALUATE]),
    "da_keeps_final_period": ("multimodal_coconut/evaluate.py",
                              'return answer[:-1].rstrip() if answer.endswith(".") else answer', "return answer",
                              [EVALUATE]),
    "export_no_tokenizer": ("multimodal_coconut/checkpoint.py",
                            'not item.name.startswith("rng_rank"):',
                            'not item.name.startswith("rng_rank") and "token" not in item.name:', [TEXT, "-k", "export"]),
    "max_latent_stage_resume_safe": ("multimodal_coconut/config.py", '"name", "save_path", "resume",',
                                     '"name", "save_path", "resume", "max_latent_stage",',
                                     [CONFIG, "-k", "resume_refuses"]),
    "async_refused_on_resume": ("multimodal_coconut/config.py", '"weights_only_checkpoints", "async_checkpoint",',
                                '"weights_only_checkpoints",', [CONFIG, "-k", "resume_refuses"]),
    "max_new_tokens_from_val": ("multimodal_coconut/train.py", "generation_config(cfg, train_set or val_gen_set, stage)",
                                "generation_config(cfg, val_gen_set or train_set, stage)", [TEXT, "-k", "default_max"]),
    "max_new_tokens_stage0": ("multimodal_coconut/train.py", "generation_config(cfg, train_set or val_gen_set, stage)",
                              "generation_config(cfg, train_set or val_gen_set, 0)", [TEXT, "-k", "default_max"]),
    "complete_before_write": ("multimodal_coconut/checkpoint.py", "            future.result()  # raises",
                              "            pass  # raises", [CHECKPOINT, "-k", "asynchronous"]),
    "no_wait_after_last_epoch": ("multimodal_coconut/train.py", "    finish()\n    if test_samples:",
                                 "    if test_samples:", [TEXT, "-k", "resumed and tiny-text"]),
    "weights_unchecked": ("multimodal_coconut/backbone.py", "    if any(wrong.values()):", "    if False:",
                          [TEXT, "-k", "weights_checked and tiny-text"]),
    "text_global_step_from_zero": ("multimodal_coconut/train.py",
                                   "steps_per_epoch(micro_batches, cfg.gradient_accumulation_steps) * cfg.resume",
                                   "0", [TEXT, "-k", "load_model_path and tiny-text"]),
}


def copy_tree(dest: Path) -> None:
    """The files git knows of (tracked, and untracked but not ignored), as they are now in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def first_failure(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return None


def check(name: str, tests: list[str] | None) -> tuple[str, str, float]:
    file, old, new, default_tests = MUTATIONS[name]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        source = (copy / file).read_text()
        if source.count(old) != 1:
            return "stale", f"{file}: the text to mutate occurs {source.count(old)} times", 0.0
        (copy / file).write_text(source.replace(old, new))
        # `-o addopts=` first: pyproject's own -q on top of this one would hide the summary line read below.
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-x", "-q", "-p", "no:cacheprovider", "--runslow",
               *(tests or default_tests)]
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    failed = first_failure(proc.stdout)
    if proc.returncode == 0 and " passed" not in proc.stdout:
        return "error", "no selected test ran (all skipped or deselected)", time.time() - start
    if proc.returncode == 0:
        return "SURVIVED", "all selected tests passed", time.time() - start
    if failed is None:  # not a test failure: the copy did not even run (import error, bad selection...)
        return "error", (proc.stdout[-800:] + proc.stderr[-800:]).replace("\n", " / "), time.time() - start
    return "caught", failed, time.time() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="mutations to check (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--jobs", type=int, default=1, help="mutations checked at the same time")
    p.add_argument("--tests", nargs="+", help="pytest arguments for every mutation instead of each one's own "
                   "(e.g. --tests tests: the whole suite)")
    args = p.parse_args()
    if args.list:
        for name, (file, old, new, tests) in MUTATIONS.items():
            print(f"{name:26s} {file}: {old!r} -> {new!r}   [{', '.join(tests)}]")
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        p.error(f"unknown mutation(s) {unknown}; see --list")
    bad = 0
    names = args.names or list(MUTATIONS)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each check is its own pytest process
        for name, (status, detail, seconds) in zip(names, pool.map(lambda n: check(n, args.tests), names)):
            bad += status != "caught"
            print(f"| {name} | {status} | {detail} | {seconds:.0f} s |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
