"""Resume anywhere: a checkpoint written by 2 FSDP2 processes continues on 1 process and the reverse, and DDP <-> FSDP2,
ending with the losses of an uninterrupted run with the same global batch (8). keep_checkpoints and
weights_only_checkpoints after a 6-epoch run. LoRA under FSDP2.

Tolerance: rel 1e-4 / abs 1e-5 on train and validation losses, as for "two processes equal one" (tests/test_train.py):
a different number of processes sums the same gradients in another order, so the weights differ in the last bits.
"""

import json
import os
import sys

import pytest

from multimodal_coconut.cli import main
from test_train import DEMO, overrides, read_metrics, run_cli

TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from multimodal_coconut.builtin_data import generate_builtin

    out = tmp_path_factory.mktemp("builtin")
    generate_builtin(out, {"train": 32, "val": 8}, seed=0)
    return out


def args(data_dir, save, **extra):
    base = dict(builtin_train_size=32, builtin_val_size=8, max_new_tokens=4, num_epochs=2)
    return overrides(data_dir, save, **{**base, **extra})


def torchrun(a):
    return run_cli(a, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", str(29300 + os.getpid() % 1000)])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Two epochs on one process, batch 8, uninterrupted."""
    save = tmp_path_factory.mktemp("reference")
    assert main([DEMO, *args(data_dir, save, batch_size_training=8)]) == 0
    return read_metrics(save / "run")


def assert_same_losses(got, expected):
    assert [m["global_step"] for m in got] == [m["global_step"] for m in expected] == [4, 8]
    for a, b in zip(got, expected):
        assert a["train_loss"] == pytest.approx(b["train_loss"], **TOL)
        assert a["val_loss"] == pytest.approx(b["val_loss"], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("fsdp2", "one"), ("one", "fsdp2"), ("ddp2", "fsdp2")])
def test_resume_on_another_number_of_processes(first, second, data_dir, tmp_path, reference):
    def launch(kind, epochs):
        if kind == "one":
            assert main([DEMO, *args(data_dir, tmp_path, batch_size_training=8, num_epochs=epochs)]) == 0
        else:
            torchrun(args(data_dir, tmp_path, batch_size_training=4, num_epochs=epochs, distributed=kind[:-1]))

    launch(first, 1)
    written = json.loads((tmp_path / "run" / "checkpoint_1" / "progress.json").read_text())
    assert written["world_size"] == (1 if first == "one" else 2)
    launch(second, 2)
    assert_same_losses(read_metrics(tmp_path / "run"), reference)


def test_keep_checkpoints_after_six_epochs(data_dir, tmp_path):
    """keep_checkpoints=2 with weights_only_checkpoints: the newest 2 resumable, every older epoch's weights kept
    (model/ and the model files, no optimizer); the best is never thinned. Then without weights_only: exactly 2
    (plus the best)."""
    from multimodal_coconut.checkpoint import is_weights_only, list_checkpoints, read_model_state_dict

    common = dict(num_epochs=6, batch_size_training=16, eval_every_epoch=True, max_latent_stage=1)
    assert main([DEMO, *args(data_dir, tmp_path / "a", keep_checkpoints=2, weights_only_checkpoints=True,
                             **common)]) == 0
    run = tmp_path / "a" / "run"
    metrics = read_metrics(run)
    best = next(m["epoch"] for m in metrics if m["mc_accuracy"] == max(x["mc_accuracy"] for x in metrics))
    found = {e: p for e, p in list_checkpoints(run, log=None)}
    assert sorted(found) == [1, 2, 3, 4, 5, 6]
    resumable = sorted(e for e, p in found.items() if not is_weights_only(p))
    assert resumable == sorted({5, 6, best})
    for epoch, path in found.items():
        assert (path / "optimizer").exists() == (epoch in resumable)
        assert read_model_state_dict(path)  # every epoch's weights are there
    assert not list(run.glob("*.tmp-*"))

    assert main([DEMO, *args(data_dir, tmp_path / "b", keep_checkpoints=2, **common)]) == 0
    assert sorted(e for e, _ in list_checkpoints(tmp_path / "b" / "run", log=None)) == sorted({5, 6, best})


@pytest.mark.slow
def test_lora_two_fsdp_processes_equal_one(data_dir, tmp_path):
    """LoRA under FSDP2 (adapters and token rows sharded with their layers): 2 x 4 = 1 x 8, and the checkpoint holds
    only what trains, the merged export loads as a plain model, and the 2-process LoRA run resumes on 1 process."""
    lora = dict(lora_r=4, lora_alpha=8, num_epochs=1, export_hf=True)
    assert main([DEMO, *args(data_dir, tmp_path / "one", batch_size_training=8, **lora)]) == 0
    torchrun(args(data_dir, tmp_path / "two", batch_size_training=4, distributed="fsdp", **lora))
    one, two = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert one[0]["train_loss"] == pytest.approx(two[0]["train_loss"], **TOL)
    assert one[0]["val_loss"] == pytest.approx(two[0]["val_loss"], **TOL)
    from multimodal_coconut.checkpoint import read_model_state_dict

    saved = read_model_state_dict(tmp_path / "two" / "run" / "checkpoint_1")
    assert saved and all("lora_" in k or "trainable_tokens_delta" in k or "vision" in k or "projector" in k
                         for k in saved), sorted(saved)[:5]
    # the merged export is a plain HF folder with the LoRA run's accuracy
    from multimodal_coconut.inference import load_trained

    assert load_trained(tmp_path / "two" / "run" / "hf_model").stage == 0
    # and the 2-process LoRA checkpoint resumes on one process
    assert main([DEMO, *args(data_dir, tmp_path / "two", batch_size_training=8, **{**lora, "num_epochs": 2})]) == 0
    assert [m["global_step"] for m in read_metrics(tmp_path / "two" / "run")] == [4, 8]
