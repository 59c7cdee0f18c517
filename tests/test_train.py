"""End-to-end training: run.py on CPU with the tiny model, resume, crashes, two processes, bad configs, NaN."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multimodal_coconut.cli import main
from official_aokvqa_eval import main_scores as official_scores

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "args" / "demo.yaml")
TIMING_KEYS = {"wall_time_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from multimodal_coconut.builtin_data import generate_builtin

    out = tmp_path_factory.mktemp("builtin")
    generate_builtin(out, {"train": 48, "val": 16}, seed=0)
    return out


def overrides(data_dir, save_path, **extra):
    values = dict(save_path=save_path, train_path=data_dir / "aokvqa_v1p0_train.json",
                  val_path=data_dir / "aokvqa_v1p0_val.json", image_root=data_dir, builtin_train_size=48,
                  builtin_val_size=16, batch_size_training=8, epochs_per_stage=1, max_latent_stage=2, num_epochs=3,
                  max_new_tokens=24, num_workers=0, lr=1e-3, name="run")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def run_cli(args, env_extra=None, launcher=None, check=True):
    # The same thread count as this process, so that float reductions (and so results) are bit-identical.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **(env_extra or {}))
    cmd = (launcher or [sys.executable]) + [str(ROOT / "run.py"), DEMO, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run (stages 0, 1, 2), in this process."""
    save = tmp_path_factory.mktemp("reference")
    assert main([DEMO, *overrides(data_dir, save)]) == 0
    return save / "run"


def test_end_to_end_outputs(reference_run):
    metrics = read_metrics(reference_run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["stage"] for m in metrics] == [0, 1, 2]
    assert [m["global_step"] for m in metrics] == [6, 12, 18]  # 48 samples / batch 8
    assert all(m["train_loss"] > 0 and m["val_loss"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    for name in ("config.yaml", "checkpoint_2", "checkpoint_3", "predictions_val_epoch3.json"):
        assert (reference_run / name).exists(), name
    best = next(m["epoch"] for m in metrics if m["mc_accuracy"] == max(x["mc_accuracy"] for x in metrics))
    assert (reference_run / "checkpoint_1").exists() == (best == 1)  # keep_checkpoints: 2, and the best
    assert {p.name for p in (reference_run / "checkpoint_3").iterdir()} >= {
        "model", "optimizer", "rng_rank0.pt", "progress.json", "COMPLETE"}


def test_reported_accuracy_equals_official_scoring(reference_run, data_dir):
    records = json.loads((data_dir / "aokvqa_v1p0_val.json").read_text())
    for m in read_metrics(reference_run):
        predictions = json.loads((reference_run / f"predictions_val_epoch{m['epoch']}.json").read_text())
        official = official_scores(records, predictions)
        assert m["mc_accuracy"] == official["MC"] and m["da_accuracy"] == official["DA"]


def test_resume_continues_stage_optimizer_and_metrics(reference_run, data_dir, tmp_path):
    """Two epochs, stop; then the same command with num_epochs=3 continues to exactly the uninterrupted result."""
    assert main([DEMO, *overrides(data_dir, tmp_path, num_epochs=2)]) == 0
    run = tmp_path / "run"
    from multimodal_coconut.checkpoint import read_dcp

    optimizer = read_dcp(run / "checkpoint_2" / "optimizer")  # keyed "state.<parameter>.<name>"
    steps = {int(v) for k, v in optimizer.items() if k.endswith(".step")}
    assert steps == {12}  # AdamW state after 12 optimizer steps is carried over, not restarted
    assert main([DEMO, *overrides(data_dir, tmp_path, num_epochs=3)]) == 0
    resumed = read_metrics(run)
    assert [m["stage"] for m in resumed] == [0, 1, 2]
    assert without_timing(resumed) == without_timing(read_metrics(reference_run))


def test_resume_with_a_changed_config_is_refused_unless_safe_or_allowed(reference_run, data_dir, tmp_path, capsys):
    """c_thought changed: exit 2 naming it, nothing written; num_epochs changed: resumes; so does
    allow_config_change."""
    import shutil

    shutil.copytree(reference_run, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    assert main([DEMO, *overrides(data_dir, tmp_path, c_thought=2, lr=2e-3)]) == 2
    err = capsys.readouterr().err
    assert "c_thought: 1 -> 2" in err and "lr: 0.001 -> 0.002" in err and "allow_config_change: true" in err
    assert str(tmp_path / "run") in err and "num_epochs" not in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before

    assert main([DEMO, *overrides(data_dir, tmp_path, num_epochs=4, num_workers=1, log_every=3)]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]

    assert main([DEMO, *overrides(data_dir, tmp_path, num_epochs=4, c_thought=2, allow_config_change=True)]) == 0
    assert "resuming from" in capsys.readouterr().out  # 4 epochs are done: nothing left to train


@pytest.mark.parametrize("fault, asynchronous", [("train_step:9", False), ("checkpoint_write:2", False),
                                                 ("checkpoint_write:2", True)])
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(fault, asynchronous, reference_run, data_dir, tmp_path):
    """SIGKILL inside epoch 2 (at optimizer step 9) or while checkpoint_2 is being written (with async_checkpoint:
    while its shards are written in the background); the same command again resumes from the newest complete
    checkpoint and ends with the uninterrupted (synchronous) run's metrics."""
    args = overrides(data_dir, tmp_path, async_checkpoint=asynchronous)
    killed = run_cli(args, {"MMC_FAULT": fault}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "checkpoint_1" / "COMPLETE").exists() and not (run / "checkpoint_2").exists()
    if fault.startswith("checkpoint_write"):
        assert list(run.glob("checkpoint_2.tmp-*")), "the kill should leave a half-written checkpoint"
    again = run_cli(args)
    assert "resuming from" in again.stdout and "checkpoint_1" in again.stdout
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(reference_run))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(strategy, data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch 4 each = one process with batch 8: same losses."""
    one = overrides(data_dir, tmp_path / "one", num_epochs=2, batch_size_training=8)
    # the 2-process FSDP run writes its checkpoints in the background (async_checkpoint, collectives on a Gloo group)
    two = overrides(data_dir, tmp_path / "two", num_epochs=2, batch_size_training=4, distributed=strategy,
                    async_checkpoint=strategy == "fsdp")
    assert main([DEMO, *one]) == 0
    run_cli(two, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000)])
    a, b = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert [m["global_step"] for m in a] == [m["global_step"] for m in b] == [6, 12]
    for ma, mb in zip(a, b):
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-4, abs=1e-5)
        assert ma["val_loss"] == pytest.approx(mb["val_loss"], rel=1e-4, abs=1e-5)
    assert (tmp_path / "two" / "run" / "checkpoint_2" / "rng_rank1.pt").exists()
    assert (tmp_path / "two" / "run" / "checkpoint_2" / "COMPLETE").exists()
    assert not list((tmp_path / "two" / "run").glob("*.tmp-*"))


@pytest.mark.slow
def test_first_torchrun_on_an_empty_model_cache_then_one_process(data_dir, tmp_path, monkeypatch):
    """An empty MMC_CACHE: torchrun with 2 processes builds the tiny model once (rank 0; transformers saves only
    there), then a single-process run uses the same cache entry."""
    cache = tmp_path / "cache"
    args = overrides(data_dir, tmp_path / "two", num_epochs=1, max_val_samples=4, distributed="ddp")
    run_cli(args, {"MMC_CACHE": str(cache)}, launcher=[sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", "2",
                                                       "--master_port", str(29500 + (os.getpid() + 7) % 1000)])
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    assert {"COMPLETE", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    monkeypatch.setenv("MMC_CACHE", str(cache))
    assert main([DEMO, *overrides(data_dir, tmp_path / "one", num_epochs=1, max_val_samples=4)]) == 0
    assert [p for p in cache.iterdir() if p.is_dir()] == [entry]


@pytest.mark.parametrize("args, message", [
    (["c_thougt=2"], "unknown key 'c_thougt' (did you mean 'c_thought'?)"),
    (["batch_size_training=eight"], "batch_size_training"),
    (["coconut=true", "cot=true"], "coconut"),
    (["dataset=aokvqa", "train_path=/nonexistent/train.json", "image_root=/tmp"], "/nonexistent/train.json"),
])
def test_bad_configs_fail_fast_naming_the_key(args, message):
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), DEMO, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert time.time() - start < 5


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    assert main([DEMO, *overrides(data_dir, tmp_path, num_epochs=1)]) == 0
    good = (tmp_path / "run" / "checkpoint_1" / "model" / "__0_0.distcp").read_bytes()
    # An absurd learning rate blows the weights up during epoch 2 (a changed lr on resume must be allowed).
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step \d+ .*global step \d+"):
        main([DEMO, *overrides(data_dir, tmp_path, num_epochs=2, lr=1e30, allow_config_change=True)])
    assert (tmp_path / "run" / "checkpoint_1" / "model" / "__0_0.distcp").read_bytes() == good
    assert not (tmp_path / "run" / "checkpoint_2").exists()


def test_a_checkpoint_written_in_the_background_is_completed_when_the_loss_blows_up(data_dir, tmp_path, monkeypatch):
    """async_checkpoint: checkpoint_1 is still being written while epoch 2 trains; a non-finite loss there stops the
    run, and checkpoint_1 is completed first (it holds the last good weights)."""
    from multimodal_coconut import train

    epoch_of = train.train_epoch

    def blows_up_in_epoch_2(*args):
        if args[7] == 1:  # the epoch index
            raise FloatingPointError("the loss is nan at epoch 2")
        return epoch_of(*args)

    monkeypatch.setattr(train, "train_epoch", blows_up_in_epoch_2)
    with pytest.raises(FloatingPointError):
        main([DEMO, *overrides(data_dir, tmp_path, num_epochs=2, async_checkpoint=True)])
    run = tmp_path / "run"
    assert (run / "checkpoint_1" / "COMPLETE").exists() and not list(run.glob("checkpoint_1.tmp-*"))
    assert not (run / "checkpoint_2").exists()


def test_gradient_checkpointing_keeps_the_latent_cache(tiny):
    """Activation checkpointing with the per-pass KV cache gives the same loss and gradients."""
    from helpers import collate, loss_and_grads, row_tokens
    from multimodal_coconut import MultimodalCoconut
    from multimodal_coconut.train import enable_gradient_checkpointing

    model = MultimodalCoconut(tiny.model, tiny.latent_id, tiny.start_latent_id, tiny.end_latent_id,
                              tiny.eos_token_id).train()
    rows = [row_tokens(tiny, "What color?", 1, 3, "It is red.\n### red"), row_tokens(tiny, "Which?", 1, 1, "### a")]
    batch = collate(tiny, rows)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    plain_out, plain = loss_and_grads(model, model, *batch, pixel_values)
    enable_gradient_checkpointing(model)
    assert model.decoder.layers[0].gradient_checkpointing
    ckpt_out, checkpointed = loss_and_grads(model, model, *batch, pixel_values)
    torch.testing.assert_close(ckpt_out.loss, plain_out.loss, atol=1e-6, rtol=1e-6)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


# -- gradient accumulation --------------------------------------------------------------------------------------


def _epoch_with_recorded_steps(tiny, data_dir, n_samples, batch, accum):
    """train_epoch on the first n_samples of the built-in set with plain SGD; records every optimizer step's
    gradients and the parameters before it, and the micro-batches the loader produced, in order."""
    from multimodal_coconut import MultimodalCoconut
    from multimodal_coconut.config import Config
    from multimodal_coconut.curriculum import CoconutDataset, Collator, Mode
    from multimodal_coconut.data import load_samples
    from multimodal_coconut.distributed import DistEnv
    from multimodal_coconut.train import train_epoch

    cfg = Config(dataset="builtin", batch_size_training=batch, gradient_accumulation_steps=accum, num_workers=0,
                 max_grad_norm=0, lr=0.5, weight_decay=0.0, save_path=str(data_dir / "unused"))
    samples = load_samples("builtin", data_dir / "aokvqa_v1p0_train.json", image_root=data_dir)[:n_samples]
    mode = Mode.from_config(cfg)
    dataset = CoconutDataset(samples, tiny, mode, 0, train=True, max_length=4096, seed=0, epoch=0)
    model = MultimodalCoconut(tiny.model, tiny.latent_id, tiny.start_latent_id, tiny.end_latent_id,
                              tiny.eos_token_id)
    batches = []

    def collate(features):
        out = Collator(tiny)(features)
        batches.append(out)
        return out

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    steps = []
    step = optimizer.step

    def recording_step():
        steps.append({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      "n_batches": len(batches)})
        step()

    optimizer.step = recording_step
    state = {"global_step": 0}
    loss, _ = train_epoch(model, model, optimizer, dataset, collate, cfg, DistEnv(), 0, 0, state, total_steps=100)
    return model, steps, batches, loss, state


def test_partial_accumulation_window_steps_on_its_own_tokens(tiny, data_dir):
    """5 micro-batches, accumulation 2: 3 optimizer steps; the last, on one micro-batch, is the SGD step of that
    micro-batch's own per-token mean loss (the original steps on the partial window; we used to drop it)."""
    model, steps, batches, loss, state = _epoch_with_recorded_steps(tiny, data_dir, n_samples=10, batch=2, accum=2)
    assert len(batches) == 5 and state["global_step"] == 3 == len(steps)
    assert [s["n_batches"] for s in steps] == [2, 4, 5]
    last = steps[-1]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(last["params"][name])
    b = batches[-1]
    model.zero_grad()
    model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], b["pixel_values"]).loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert reference.keys() == last["grads"].keys()
    for name in reference:
        torch.testing.assert_close(last["grads"][name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
    for name, p in final.items():  # and the update applied is that SGD step (lr 0.5, constant schedule)
        expected = last["params"][name] - 0.5 * reference[name] if name in reference else last["params"][name]
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert loss > 0


def test_an_epoch_shorter_than_one_window_still_trains(tiny, data_dir):
    model, steps, batches, loss, state = _epoch_with_recorded_steps(tiny, data_dir, n_samples=4, batch=2, accum=8)
    assert len(batches) == 2 and state["global_step"] == 1 and loss > 0


def test_steps_per_epoch_counts_the_partial_window():
    from multimodal_coconut.train import steps_per_epoch

    assert [steps_per_epoch(n, 2) for n in (1, 2, 5, 6)] == [1, 1, 3, 3]


def test_reset_optimizer_per_stage_or_per_epoch():
    from multimodal_coconut.config import Config
    from multimodal_coconut.train import resets_optimizer

    def resets(**kw):
        cfg = Config(dataset="builtin", epochs_per_stage=2, num_epochs=6, **kw)
        return [e for e in range(6) if resets_optimizer(cfg, e)]

    assert resets(reset_optimizer=False) == []
    assert resets(reset_optimizer=True) == [2, 4]  # the default: each new stage
    assert resets(reset_optimizer=True, reset_optimizer_every="epoch") == [1, 2, 3, 4, 5]  # the original Coconut's


def test_builtin_data_of_other_settings_is_refused_unless_regenerate(tmp_path):
    from multimodal_coconut.config import Config
    from multimodal_coconut.distributed import DistEnv
    from multimodal_coconut.train import prepare_builtin

    def cfg(**kw):
        return Config(dataset="builtin", image_root=str(tmp_path), builtin_train_size=8, builtin_val_size=4, **kw)

    prepare_builtin(cfg(), DistEnv())
    before = (tmp_path / "aokvqa_v1p0_train.json").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{tmp_path} .*seed 0 -> 3"):
        prepare_builtin(cfg(builtin_seed=3), DistEnv())
    assert (tmp_path / "aokvqa_v1p0_train.json").read_bytes() == before
    prepare_builtin(cfg(builtin_seed=3, builtin_regenerate=True), DistEnv())
    assert (tmp_path / "aokvqa_v1p0_train.json").read_bytes() != before


# -- evaluation -------------------------------------------------------------------------------------------------


def test_bad_val_records_count_as_wrong_and_outputs_without_marker_are_counted(data_dir, tmp_path, capsys):
    """skip_bad_records with a val image missing and a malformed val record: no crash printing examples, accuracy
    over all 16 questions (a skipped one scores 0, as the official scorer), the skips reported; outputs cut off by
    max_new_tokens before `###` counted in metrics.jsonl."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    records = json.loads((data / "aokvqa_v1p0_val.json").read_text())
    missing_image = records[0]["question_id"]
    (data / "val2017" / f"{records[0]['image_id']:012d}.jpg").unlink()
    del records[1]["question_id"]  # malformed: not even read
    (data / "aokvqa_v1p0_val.json").write_text(json.dumps(records))

    args = overrides(data, tmp_path, num_epochs=1, skip_bad_records=True, max_new_tokens=2, num_examples_to_print=3)
    assert main([DEMO, *args]) == 0
    out = capsys.readouterr().out
    assert "2 of 16 questions were skipped as bad records" in out and "skipped records: 2" in out
    [m] = read_metrics(tmp_path / "run")
    predictions = json.loads((tmp_path / "run" / "predictions_val_epoch1.json").read_text())
    assert len(predictions) == 14 and missing_image not in predictions
    correct = sum(predictions[r["question_id"]]["multiple_choice"] == r["choices"][r["correct_choice_idx"]]
                  for r in records[2:])
    assert (m["n_skipped"], m["n_mc"]) == (2, 16)
    assert m["mc_accuracy"] == pytest.approx(100 * correct / 16)
    assert m["max_new_tokens"] == 2 and m["n_no_answer_marker"] == 14  # 2 tokens never reach `### answer`


def test_max_new_tokens_from_the_data_unless_set(tiny, data_dir):
    from multimodal_coconut.config import Config
    from multimodal_coconut.curriculum import CoconutDataset, Mode, default_max_new_tokens
    from multimodal_coconut.data import load_samples
    from multimodal_coconut.train import generation_config

    cfg = Config(dataset="builtin", coconut=True, max_latent_stage=2)
    assert cfg.max_new_tokens is None
    samples = load_samples("builtin", data_dir / "aokvqa_v1p0_train.json", image_root=data_dir)
    ds = CoconutDataset(samples, tiny, Mode.from_config(cfg), 0, train=True, max_length=4096, seed=0, epoch=0)
    assert generation_config(cfg, ds, 0).max_new_tokens == default_max_new_tokens(ds, 0) > 24
    assert generation_config(cfg, ds, 2).max_new_tokens == default_max_new_tokens(ds, 2) < default_max_new_tokens(ds, 0)
    cfg.max_new_tokens = 7
    assert generation_config(cfg, ds, 0).max_new_tokens == 7
