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


@pytest.mark.parametrize("fault", ["train_step:9", "checkpoint_write:2"])
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(fault, reference_run, data_dir, tmp_path):
    """SIGKILL inside epoch 2 (at optimizer step 9) or while checkpoint_2 is being written; the same command again
    resumes from the newest complete checkpoint and ends with the uninterrupted run's metrics."""
    args = overrides(data_dir, tmp_path)
    killed = run_cli(args, {"MMC_FAULT": fault}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "checkpoint_1" / "COMPLETE").exists() and not (run / "checkpoint_2").exists()
    if fault.startswith("checkpoint_write"):
        assert list(run.glob("checkpoint_2.tmp-*")), "the kill should leave a half-written checkpoint"
    again = run_cli(args)
    assert "resuming from" in again.stdout and "checkpoint_1" in again.stdout
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(reference_run))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(strategy, data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch 4 each = one process with batch 8: same losses."""
    one = overrides(data_dir, tmp_path / "one", num_epochs=2, batch_size_training=8)
    two = overrides(data_dir, tmp_path / "two", num_epochs=2, batch_size_training=4, distributed=strategy)
    assert main([DEMO, *one]) == 0
    run_cli(two, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000)])
    a, b = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert [m["global_step"] for m in a] == [m["global_step"] for m in b] == [6, 12]
    for ma, mb in zip(a, b):
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-4, abs=1e-5)
        assert ma["val_loss"] == pytest.approx(mb["val_loss"], rel=1e-4, abs=1e-5)
    assert (tmp_path / "two" / "run" / "checkpoint_2" / "rng_rank1.pt").exists()


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
    # An absurd learning rate blows the weights up during epoch 2.
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step \d+ .*global step \d+"):
        main([DEMO, *overrides(data_dir, tmp_path, num_epochs=2, lr=1e30)])
    assert (tmp_path / "run" / "checkpoint_1" / "model" / "__0_0.distcp").read_bytes() == good
    assert not (tmp_path / "run" / "checkpoint_2").exists()


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
