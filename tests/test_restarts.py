"""Failures as clusters have them, under torchrun: a rank SIGKILLed during a step, a generation or a checkpoint write
(synchronous or in the background) is restarted by torchrun's elastic agent (--max-restarts) and the run ends with
the metrics of an uninterrupted one; a hung rank becomes an error within dist_timeout_minutes instead of a hang.

The text-only prosqa config on tiny-text, 2 CPU processes (gloo) with batch 4 each = one process with batch 8; the
faults come from MMC_FAULT (checkpoint.fault_point: one fault per torchrun attempt, on one rank)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multimodal_coconut.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
FAST = ["epochs_per_stage=1", "max_latent_stage=2", "num_workers=0", "max_new_tokens=8", "lr=1e-3", "num_epochs=3"]

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(save: Path, faults: str, *extra: str, max_restarts: int, timeout: float = 600):
    env = dict(os.environ, OMP_NUM_THREADS="1", MMC_FAULT=faults)
    port = 29000 + (os.getpid() * 7 + len(faults)) % 900
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts",
                           str(max_restarts), "--master_port", str(port), str(ROOT / "run.py"), str(PROSQA),
                           f"save_path={save}", *FAST, "batch_size_training=4", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, one process with the same global batch (two processes = one: test_own_data.py)."""
    save = tmp_path_factory.mktemp("reference")
    assert main([str(PROSQA), f"save_path={save}", *FAST, "batch_size_training=8"]) == 0
    return read_metrics(save / "prosqa-coconut")


def same_as_reference(run_dir: Path, reference: list[dict]) -> None:
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for ours, theirs in zip(metrics, reference):
        assert (ours["stage"], ours["global_step"]) == (theirs["stage"], theirs["global_step"])
        for key in ("train_loss", "val_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (ours["epoch"], key)
        assert (ours["accuracy"], ours["cot_accuracy"]) == (theirs["accuracy"], theirs["cot_accuracy"])
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_")) == \
        ["checkpoint_2", "checkpoint_3"]  # complete ones only (keep_checkpoints 2): no half-written one left
    for name in ("checkpoint_2", "checkpoint_3"):
        assert (run_dir / name / "COMPLETE").is_file()


def test_killed_ranks_are_restarted_and_the_run_ends_as_an_uninterrupted_one(reference, tmp_path):
    """Three kills in one job, each in the restarted workers of the kill before: rank 1 at optimizer step 3 (epoch 2),
    rank 0 while generating epoch 2's answers, rank 1 while checkpoint_3 is being written. Each restart resumes from
    the newest complete checkpoint (1, 1, 2)."""
    proc = torchrun(tmp_path, "train_step:3@1,generate:2@0,checkpoint_write:3@1", max_restarts=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert [line.split("resuming from ")[1].split(" ")[0].rsplit("_", 1)[1]
            for line in out.splitlines() if "resuming from" in line] == ["1", "1", "2"]
    same_as_reference(tmp_path / "prosqa-coconut", reference)


def test_a_rank_killed_during_a_background_checkpoint_write_is_restarted(reference, tmp_path):
    """async_checkpoint: rank 0 dies while checkpoint_2's shards are being written in the background; the half-written
    checkpoint is never used (the restart resumes from checkpoint_1) and is replaced by a complete one."""
    proc = torchrun(tmp_path, "checkpoint_write:2@0", "async_checkpoint=true", max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "checkpoint_1 (epoch 1 done" in proc.stdout
    same_as_reference(tmp_path / "prosqa-coconut", reference)


def test_a_hung_rank_becomes_an_error_naming_the_rank_within_the_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP) after optimizer step 3: its socket stays open, so rank 0 waits in the next all_reduce.
    With dist_timeout_minutes 0.1 (6 s) rank 0 fails with a message naming itself and the operation, and torchrun
    (no restarts left) ends the job instead of waiting 30 minutes or for ever."""
    start = time.time()
    proc = torchrun(tmp_path, "train_step:3@1~stop", "dist_timeout_minutes=0.1", max_restarts=0, timeout=300)
    assert proc.returncode != 0
    assert "rank 0 of 2: all_reduce (sum) did not complete" in proc.stderr
    assert "Timed out waiting 6000ms" in proc.stderr
    assert time.time() - start < 240  # process start-up on 2 busy cores included; the wait itself is 6 s


def test_a_lost_node_leaves_the_survivor_to_finish_on_its_own(reference, tmp_path):
    """Two torchrun agents ("nodes", one process each) joined by a c10d rendezvous with --nnodes 1:2; the second agent
    and its worker are SIGKILLed once a checkpoint is complete. The survivor's collective fails within
    dist_timeout_minutes (or at once: "Connection reset by peer"), its agent restarts its worker, the rendezvous closes with the one node left, and the run
    resumes from the newest complete checkpoint on 1 process and finishes. (The global batch halves with the world:
    batch_size_training is per process.)"""
    import signal

    port = 29000 + (os.getpid() * 11) % 900
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
              "--max-restarts", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
              "--rdzv_id", f"lost-node-{os.getpid()}", "--rdzv_conf", "last_call_timeout=5",
              str(ROOT / "run.py"), str(PROSQA), f"save_path={tmp_path}", *FAST[:-1], "num_epochs=4",
              "batch_size_training=4", "dist_timeout_minutes=0.2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "host.log", "w")  # a file, not a pipe nobody reads while the run goes on (it would block)
    host = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(2)  # the first agent hosts the rendezvous
    lost = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run = tmp_path / "prosqa-coconut"
    deadline = time.time() + 300
    while not (run / "checkpoint_1" / "COMPLETE").exists():
        assert time.time() < deadline and host.poll() is None and lost.poll() is None
        time.sleep(0.2)
    # The node is gone: its agent and its worker (torchrun starts workers in sessions of their own).
    subprocess.run(["pkill", "-KILL", "-P", str(lost.pid)], check=True)
    os.killpg(lost.pid, signal.SIGKILL)
    host.wait(timeout=600)
    log.close()
    out = (tmp_path / "host.log").read_text()
    assert host.returncode == 0, out[-3000:]
    assert "failed (exitcode: 1)" in out  # the survivor's worker saw its peer die (in a collective) and failed
    resumed = [line for line in out.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1
    done = int(resumed[0].split("(epoch ")[1].split(" ")[0])
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    for ours, theirs in zip(metrics[:done], reference):  # before the loss of the node: 2 processes = 1
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4, abs=1e-5)
    assert json.loads((run / "checkpoint_4" / "progress.json").read_text())["world_size"] == 1
