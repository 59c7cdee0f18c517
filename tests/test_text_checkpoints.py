"""Text-only models after training: a sharded checkpoint of a causal LM resumes, is evaluated (only_eval), and starts
the next run (load_model_path + resume, the original's CoT -> Coconut recipe), for the tiny-text Qwen2 and for a
GPT-2 (the original Coconut's model: `h` blocks, tied embeddings). The original's prosqa_coconut.yaml and its
fixture records, 3 epochs = stages 0, 1, 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from multimodal_coconut.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
FAST = ["epochs_per_stage=1", "max_latent_stage=2", "num_workers=0", "max_new_tokens=8", "lr=1e-3",
        "batch_size_training=8"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def predictions(run_dir: Path, epoch: int) -> dict:
    return json.loads((run_dir / f"predictions_val_epoch{epoch}.json").read_text())


def same_metrics(a: dict, b: dict) -> None:
    for key in ("epoch", "stage", "global_step", "accuracy", "cot_accuracy"):
        assert a[key] == b[key], key
    for key in ("train_loss", "val_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def build_gpt2(path: Path) -> Path:
    """A 2-layer GPT-2 (tied LM head, learned positions) with the tiny tokenizer, as an HF directory. No dropout: a run
    started from a checkpoint's weights (load_model_path) draws other dropout masks than the resumed run it is compared
    with, which restores the checkpoint's random state."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from multimodal_coconut.backbone import train_tiny_tokenizer
    from multimodal_coconut.data import load_samples

    samples = load_samples("coconut", ROOT / "tests" / "fixtures" / "prosqa" / "prosqa_train.json", image_root=None)
    tok = train_tiny_tokenizer([t for s in samples for t in (s.question, *s.steps, s.answer)])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=1024, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["tiny-text", "gpt2"])
def runs(request, tmp_path_factory):
    """{name: run dir} of: `full` (3 epochs), `part` (2 epochs, then resumed to 3), `cont` (a new run from part's
    checkpoint_2 with load_model_path + resume=2, to 3), `eval` (only_eval of full's checkpoint_2 at its stage)."""
    save = tmp_path_factory.mktemp(f"text-{request.param}")
    model_id = request.param if request.param == "tiny-text" else str(build_gpt2(save / "gpt2"))
    args = [str(PROSQA), f"save_path={save}", f"model_id={model_id}", *FAST]
    assert main([*args, "name=full", "num_epochs=3"]) == 0
    # Written in the background: the run waits for its last checkpoint before it returns. async_checkpoint may change
    # on resume.
    assert main([*args, "name=part", "num_epochs=2", "async_checkpoint=true"]) == 0
    assert (save / "part" / "checkpoint_2" / "COMPLETE").is_file() and not list((save / "part").glob("*.tmp-*"))
    shutil.copytree(save / "part" / "checkpoint_2", save / "part_checkpoint_2")  # as it was before the resume
    assert main([*args, "name=part", "num_epochs=3"]) == 0  # the same command, one more epoch: resumes
    assert main([*args, "name=cont", "num_epochs=3", f"load_model_path={save / 'part_checkpoint_2'}", "resume=2"]) == 0
    assert main([*args, "name=eval", "only_eval=true", f"load_model_path={save / 'full' / 'checkpoint_2'}",
                 "resume=1"]) == 0
    return {name: save / name for name in ("full", "part", "cont", "eval")} | {"ckpt2": save / "part_checkpoint_2"}


def test_resumed_run_equals_an_uninterrupted_one(runs):
    full, part = read_metrics(runs["full"]), read_metrics(runs["part"])
    assert [m["stage"] for m in full] == [0, 1, 2]
    assert len(part) == 3
    for a, b in zip(full, part):
        same_metrics(a, b)
    assert predictions(runs["part"], 3) == predictions(runs["full"], 3)


def test_only_eval_of_a_checkpoint_gives_the_runs_own_evaluation(runs):
    [evaluated] = read_metrics(runs["eval"])
    own = read_metrics(runs["full"])[1]  # the evaluation after epoch 2 (stage 1): what checkpoint_2 holds
    assert (evaluated["stage"], evaluated["accuracy"], evaluated["cot_accuracy"]) == \
        (own["stage"], own["accuracy"], own["cot_accuracy"])
    assert predictions(runs["eval"], 2) == predictions(runs["full"], 2)


def test_load_model_path_and_resume_continue_from_the_checkpoints_weights(runs):
    """The original's recipe: a new run starting at epoch 2 from a checkpoint's weights. Epoch 3 starts stage 2 with a
    fresh optimizer (reset_optimizer) either way, so it equals the resumed run's epoch 3 exactly."""
    [cont] = read_metrics(runs["cont"])
    same_metrics(cont, read_metrics(runs["part"])[2])
    assert predictions(runs["cont"], 3) == predictions(runs["part"], 3)


def test_a_text_checkpoint_loads_with_its_weights_checked(runs):
    from multimodal_coconut import checkpoint as ckpt
    from multimodal_coconut.backbone import load_backbone
    from multimodal_coconut.inference import load_trained

    trained = load_trained(runs["full"])
    assert trained.stage == 2 and not trained.backbone.is_multimodal
    saved = ckpt.read_model_state_dict(trained.path)
    for name, value in trained.model.base_model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
    assert {n for n in saved} <= set(trained.model.base_model.state_dict())
    # A weight missing from the checkpoint is an error naming it, not a randomly initialised layer.
    name = next(n for n in saved if ".0." in n)
    with pytest.raises(ValueError, match=r"do not fit .* missing keys \['" + name.replace(".", r"\.")):
        load_backbone(str(trained.path), state_dict={k: v for k, v in saved.items() if k != name})


def test_the_export_tool_makes_a_folder_that_loads_on_its_own(runs, tmp_path):
    """`python -m multimodal_coconut.checkpoint export CKPT OUT`: a plain HF folder (weights, config, tokenizer with
    Coconut's tokens, coconut.json) that transformers and load_trained read without the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multimodal_coconut.checkpoint import main as export_main, read_model_state_dict
    from multimodal_coconut.inference import load_trained

    ckpt = runs["full"] / "checkpoint_3"
    out = tmp_path / "exported"
    assert export_main(["export", str(ckpt), str(out)]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # nothing in it points back at the checkpoint
    saved = read_model_state_dict(ckpt)
    plain = AutoModelForCausalLM.from_pretrained(moved)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert "<|latent|>" in AutoTokenizer.from_pretrained(moved).get_vocab()
    exported, original = load_trained(moved), load_trained(ckpt)
    assert exported.stage == original.stage == 2
    assert exported.backbone.tokenizer.get_vocab() == original.backbone.tokenizer.get_vocab()
    for (name, a), b in zip(original.model.state_dict().items(), exported.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_default_max_new_tokens_is_sized_on_the_training_split_at_each_stage(tmp_path):
    """max_new_tokens unset: each evaluation generates the longest training target at its stage + the margin
    (curriculum.default_max_new_tokens, tested on its own in test_curriculum.py); the validation split's targets are
    shorter here, so sizing on it, or at stage 0 whatever the stage, gives other numbers."""
    from multimodal_coconut.curriculum import CoconutDataset, Mode, default_max_new_tokens
    from multimodal_coconut.data import load_samples
    from multimodal_coconut.inference import load_trained

    long = {"question": "Is Tom a wumpus?", "answer": "Tom is a wumpus.",
            "steps": ["Tom is a lempus, every lempus is a rompus, and this is a long step indeed."] * 3}
    short = {"question": "Is Rex a wumpus?", "answer": "Rex is.", "steps": ["Rex is a yumpus.", "So yes.", "Yes."]}
    (tmp_path / "train.json").write_text(json.dumps([long, short] * 4))
    (tmp_path / "val.json").write_text(json.dumps([short] * 2))
    args = [str(PROSQA), f"save_path={tmp_path}", "name=run", f"train_path={tmp_path / 'train.json'}",
            f"val_path={tmp_path / 'val.json'}", *[a for a in FAST if not a.startswith("max_new_tokens")],
            "num_epochs=3", "max_new_tokens=null"]
    assert main(args) == 0
    metrics = read_metrics(tmp_path / "run")
    trained = load_trained(tmp_path / "run")

    def sized(path, stage):
        data = CoconutDataset(load_samples("coconut", path, image_root=None), backbone=trained.backbone,
                              mode=Mode.from_config(trained.config), stage=stage, train=True, epoch=0,
                              max_length=trained.config.max_length, seed=0)
        return default_max_new_tokens(data, stage)

    assert [m["stage"] for m in metrics] == [0, 1, 2]
    expected = [sized(tmp_path / "train.json", stage) for stage in range(3)]
    assert [m["max_new_tokens"] for m in metrics] == expected
    assert expected[0] > expected[1] > expected[2] > sized(tmp_path / "val.json", 2)


def test_tiny_internvl_runs_the_original_config_without_image_size(tmp_path):
    """model_id=tiny with the original's prosqa_coconut.yaml, which names no image_size: the checkpoint's 64px tiles."""
    assert main([str(PROSQA), f"save_path={tmp_path}", "model_id=tiny", *FAST, "num_epochs=1"]) == 0
    [metrics] = read_metrics(tmp_path / "prosqa-coconut")
    assert metrics["train_loss"] > 0 and metrics["n_eval"] == 8
