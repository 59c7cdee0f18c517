"""Stopping the experiment runner (SIGTERM, as `kill` or a scheduler sends) stops the runs it is training: none is
left training unwatched, and the runner says which it stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return pids


def test_sigterm_stops_the_runs_being_trained(tmp_path):
    out = tmp_path / "table"
    runner = subprocess.Popen([sys.executable, "-m", "multimodal_coconut.experiments", "--out", str(out), "--quick",
                               "--config", str(ROOT / "args/demo.yaml"), "--jobs", "2", "--set",
                               "builtin_train_size=16", "builtin_val_size=4", "batch_size_training=4"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not lines or not lines[-1].startswith("training no_cot"):  # --jobs 2: the warm-up and No-CoT at once
        lines.append(runner.stdout.readline())
        assert lines[-1], "".join(lines)
    deadline = time.time() + 60
    while len(processes_mentioning(str(out))) < 3 and time.time() < deadline:  # the runner and its 2 runs
        time.sleep(0.2)
    assert len(processes_mentioning(str(out))) == 3, "".join(lines)
    runner.send_signal(signal.SIGTERM)
    rest, _ = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "stopped cot_warmup_seed0" in rest and "stopped no_cot_seed0" in rest
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:300] for pid in processes_mentioning(str(out))}
    assert left == {}, rest
