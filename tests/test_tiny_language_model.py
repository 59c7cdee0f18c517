"""The tiny InternVL around a trained text model (`tiny_language_model`): the `tiny` preset's vision side with random
weights and, as its language model, a text-only model this project trained (here `tiny-text` after one epoch of
CoT on the text hops task), as InternVL3 is built around a pretrained Qwen2.5. On a question without an image it
computes exactly what the text model does; a multimodal run starts from it and keeps its tokenizer."""

from pathlib import Path

import pytest
import torch

from multimodal_coconut import load_backbone
from multimodal_coconut.backbone import TINY_COMPLETE
from multimodal_coconut.cli import main
from multimodal_coconut.config import Config, ConfigError
from multimodal_coconut.inference import load_trained

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["num_epochs=1", "builtin_train_size=16", "builtin_val_size=4", "batch_size_training=8", "max_new_tokens=24"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"text": the text model's checkpoint, "vlm": a multimodal hops run (CoT, one epoch) started around it}."""
    save = tmp_path_factory.mktemp("tiny_on")
    text_data, mm_data = save / "data_text", save / "data_mm"
    assert main([str(ROOT / "args" / "hops_text.yaml"), f"save_path={save}", "name=text", "coconut=false", "cot=true",
                 f"train_path={text_data}/hops_text_train.json", f"val_path={text_data}/hops_text_val.json",
                 *SMALL]) == 0
    text = save / "text" / "checkpoint_1"
    assert main([str(ROOT / "args" / "hops.yaml"), f"save_path={save}", "name=vlm", "coconut=false", "cot=true",
                 f"tiny_language_model={text}", f"train_path={mm_data}/aokvqa_v1p0_train.json",
                 f"val_path={mm_data}/aokvqa_v1p0_val.json", f"image_root={mm_data}", *SMALL]) == 0
    return {"text": text, "vlm": save / "vlm" / "checkpoint_1"}


def test_on_text_the_vlm_computes_what_its_language_model_does(runs):
    text = load_trained(runs["text"])
    vlm = load_backbone("tiny", image_size=64, max_num_patches=1, seed=0, tiny_language_model=runs["text"])
    other = load_backbone("tiny", image_size=64, max_num_patches=1, seed=1, tiny_language_model=runs["text"])
    assert vlm.is_multimodal and vlm.tokenizer.get_vocab() == text.backbone.tokenizer.get_vocab()
    ids = text.backbone.tokenizer(["Arrows:red>blue,blue>green,green>red. Start at red and follow 2 arrows."],
                                  return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text.backbone.model(input_ids=ids).logits
        for model in (vlm.model, other.model):
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    # the seed draws the vision side only
    differ = [not torch.equal(a, b) for a, b in zip(vlm.model.model.vision_tower.parameters(),
                                                      other.model.model.vision_tower.parameters())]
    assert sum(differ) >= 8, differ  # the random matrices (constant-initialised norms and scales are the same)


def test_a_multimodal_run_starts_around_it_and_keeps_its_tokenizer(runs):
    vlm, text = load_trained(runs["vlm"]), load_trained(runs["text"])
    assert vlm.backbone.is_multimodal and vlm.config.tiny_language_model == str(runs["text"])
    assert vlm.backbone.tokenizer.get_vocab() == text.backbone.tokenizer.get_vocab()
    # trained one epoch from the text model's weights: moved, but from there (not from a random init)
    a = vlm.backbone.model.model.language_model.layers[0].mlp.up_proj.weight
    b = text.backbone.model.model.layers[0].mlp.up_proj.weight
    assert 0 < (a - b).norm() < 0.5 * b.norm()


def test_a_multimodal_or_other_model_is_refused(runs):
    with pytest.raises(ValueError, match="text-only Qwen2"):
        load_backbone("tiny", image_size=64, tiny_language_model=runs["vlm"])
    with pytest.raises(ValueError, match="model_id is 'tiny-text'"):
        load_backbone("tiny-text", tiny_language_model=runs["text"])
    with pytest.raises(ConfigError, match="tiny_language_model.*model_id 'tiny', but model_id is 'tiny-text'"):
        Config(model_id="tiny-text", tiny_language_model=str(runs["text"]), dataset="coconut", train_path="x.json")


@pytest.mark.slow
def test_two_processes_build_it_once_and_train_as_one(runs, tmp_path):
    """The multimodal run of the fixture again, on 2 DDP processes under the NCCL-like process group
    (tests/nccl_shim.py) with an empty model cache: rank 0 builds the model around the text checkpoint while rank 1
    waits, and the run's losses equal the one-process run's (the same global batch, 8)."""
    import os
    import subprocess
    import sys

    from test_train import read_metrics

    data = runs["vlm"].parents[1] / "data_mm"
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MMC_CACHE=str(cache))
    shim = str(Path(__file__).with_name("nccl_shim.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(31100 + os.getpid() % 500), shim, str(ROOT / "args" / "hops.yaml"),
           f"save_path={tmp_path}", "name=vlm", "coconut=false", "cot=true", "distributed=ddp",
           f"tiny_language_model={runs['text']}", f"train_path={data}/aokvqa_v1p0_train.json",
           f"val_path={data}/aokvqa_v1p0_val.json", f"image_root={data}", "batch_size_training=4",
           *(a for a in SMALL if not a.startswith("batch_size_training="))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert len([p for p in cache.iterdir() if (p / TINY_COMPLETE).is_file()]) == 1  # built once, by rank 0
    (two,), (one,) = read_metrics(tmp_path / "vlm"), read_metrics(runs["vlm"].parent)
    for key in ("train_loss", "val_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
