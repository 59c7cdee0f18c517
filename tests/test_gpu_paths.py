"""The paths a GPU cluster takes, with their constraints imposed on CPU: a process group that rejects what NCCL
rejects (tests/nccl_shim.py), decisions that lead into collectives under 2 processes, FSDP2 on the original-format
InternVL, and checkpoints that carry everything needed to use them elsewhere."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal_coconut.cli import main
from test_backbone import write_standin
from test_train import DEMO, ROOT, overrides, read_metrics

SHIM = str(Path(__file__).with_name("nccl_shim.py"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from multimodal_coconut.builtin_data import generate_builtin

    out = tmp_path_factory.mktemp("builtin")
    generate_builtin(out, {"train": 48, "val": 16}, seed=0)
    return out


def torchrun_shim(args, timeout=900):
    """2 CPU processes under the NCCL-like shim; a hang (a rank waiting in a collective the others skip) fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29700 + os.getpid() % 200), SHIM, DEMO, *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"2-process run did not finish in {timeout} s (a rank hung in a collective)\n"
                             f"{(e.stdout or b'')[-3000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert "requested backend 'cpu:gloo,cuda:nccl'" in proc.stdout
    return proc


@pytest.mark.slow
def test_ddp_under_nccl_rules_with_save_only_improve(data_dir, tmp_path):
    """DDP, 2 processes, a whole training run with evaluation every epoch, under a process group that takes only
    the tensors NCCL-on-GPU takes; save_only_improve decides on rank 0's score and every rank must follow it. The
    checkpoints are written in the background (async_checkpoint: its two Gloo groups beside the GPU backend)."""
    torchrun_shim(overrides(data_dir, tmp_path, num_epochs=3, batch_size_training=4, distributed="ddp",
                            save_only_improve=True, max_new_tokens=12, keep_checkpoints=0, async_checkpoint=True))
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    best, improved = None, []
    for m in metrics:
        if best is None or m["mc_accuracy"] > best:
            best, improved = m["mc_accuracy"], improved + [m["epoch"]]
    saved = sorted(int(p.name.split("_")[1]) for p in run.glob("checkpoint_*") if (p / "COMPLETE").exists())
    assert saved == improved
    assert not list(run.glob("*.tmp-*"))  # every checkpoint started was completed


@pytest.mark.slow
def test_fsdp_on_the_original_format_two_processes_equal_one(data_dir, tmp_path):
    """FSDP2 over the original-format InternVL (whose _no_split_modules names a tower and the layers inside it),
    2 processes with batch 4 = 1 process with batch 8, under the NCCL-like shim."""
    standin = write_standin(tmp_path / "internvl_chat")
    common = dict(model_id=standin, trust_remote_code=True, num_epochs=2, max_new_tokens=8)
    assert main([DEMO, *overrides(data_dir, tmp_path / "one", batch_size_training=8, **common)]) == 0
    torchrun_shim(overrides(data_dir, tmp_path / "two", batch_size_training=4, distributed="fsdp", **common))
    one, two = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert [m["global_step"] for m in one] == [m["global_step"] for m in two] == [6, 12]
    for a, b in zip(one, two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)
    # Written under FSDP, the checkpoint is still a whole, usable model.
    from multimodal_coconut.inference import load_trained

    assert load_trained(tmp_path / "two" / "run").model.kind == "original_internvl"


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("trained")
    assert main([DEMO, *overrides(data_dir, save, num_epochs=2, export_hf=True)]) == 0
    return save / "run"


def test_only_eval_of_a_checkpoint_uses_its_own_tokenizer(trained_run, data_dir, tmp_path):
    """A checkpoint evaluated elsewhere (a copy of the validation file, another training file configured) gives the
    training run's own predictions: the tokenizer, model config and image settings come from the checkpoint."""
    val_copy = tmp_path / "aokvqa_v1p0_val.json"
    shutil.copy(data_dir / "aokvqa_v1p0_val.json", val_copy)
    other_train = tmp_path / "aokvqa_v1p0_train.json"
    records = json.loads((data_dir / "aokvqa_v1p0_train.json").read_text())[:5]
    other_train.write_text(json.dumps([dict(r, question=r["question"] + " Unrelated words here.") for r in records]))
    assert main([DEMO, *overrides(data_dir, tmp_path, name="eval", only_eval=True, resume=1, dataset="aokvqa",
                                  val_path=val_copy, train_path=other_train,
                                  load_model_path=trained_run / "checkpoint_2")]) == 0
    ours = json.loads((tmp_path / "eval" / "predictions_val_epoch2.json").read_text())
    theirs = json.loads((trained_run / "predictions_val_epoch2.json").read_text())
    assert ours == theirs
    assert read_metrics(tmp_path / "eval")[-1]["mc_accuracy"] == read_metrics(trained_run)[-1]["mc_accuracy"]


def test_checkpoint_and_export_load_on_their_own(trained_run):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from multimodal_coconut.checkpoint import load_safetensors, main as export_main, read_model_state_dict
    from multimodal_coconut.inference import LoadError, load_trained

    ckpt = trained_run / "checkpoint_2"
    info = json.loads((ckpt / "coconut.json").read_text())
    assert info["stage"] == 1 and info["epoch"] == 2 and info["config"]["c_thought"] == 1
    # A checkpoint directory holds an HF model's config and its sharded (DCP) weights; the export is a plain HF folder.
    plain = InternVLForConditionalGeneration.from_pretrained(trained_run / "hf_model")
    saved = read_model_state_dict(ckpt)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # The export tool: one safetensors file, or a folder that plain from_pretrained loads.
    out = trained_run.parent / "exported"
    assert export_main(["export", str(ckpt), str(out)]) == 0
    assert export_main(["export", str(ckpt), str(out / "single.safetensors")]) == 0
    exported = InternVLForConditionalGeneration.from_pretrained(out)
    single = load_safetensors(out / "single.safetensors")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved[name]) and torch.equal(single[name], saved[name]), name
    assert "<|latent|>" in AutoTokenizer.from_pretrained(out).get_vocab()  # the export carries the tokenizer
    # The run directory, the checkpoint and the export load to the same model at the same stage.
    loaded = [load_trained(p) for p in (trained_run, ckpt, trained_run / "hf_model")]
    assert [t.path for t in loaded[:2]] == [ckpt, ckpt]
    assert [t.stage for t in loaded] == [1, 1, 1]
    for t in loaded[1:]:
        assert t.backbone.tokenizer.get_vocab() == loaded[0].backbone.tokenizer.get_vocab()
        for (name, a), b in zip(loaded[0].model.state_dict().items(), t.model.state_dict().values()):
            assert torch.equal(a, b), name
    incomplete = trained_run.parent / "checkpoint_9"
    shutil.copytree(ckpt, incomplete)
    (incomplete / "COMPLETE").unlink()
    for bad, why in [(trained_run / "nope", "no such file"), (ckpt / "config.json", "not a directory"),
                     (incomplete, "incomplete checkpoint"), (trained_run.parent, "no complete checkpoint_N")]:
        with pytest.raises(LoadError, match=why):
            load_trained(bad)
