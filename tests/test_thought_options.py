"""Options on the thought (thought_norm: embedding, projection): the cached latent passes equal a naive recompute
(loss, logits, gradients, the projection's included), a batch equals its rows, batched generation equals each row
alone; what each option feeds; the learned projection trains, is saved, resumed, evaluated and exported with the
model. The default (none) is the original Coconut, covered unchanged by tests/test_model.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import collate, loss_and_grads
from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.baselines import naive_forward
from multimodal_coconut.cli import main
from test_model import assert_same_grads, multimodal_batch, prompts, separate_new_rows, trim

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
OPTIONS = ["embedding", "projection"]


def wrap(bb, thought_norm):
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id,
                              thought_norm=thought_norm).eval()
    if thought_norm == "projection":  # away from its initial identity, so that a projection skipped would show
        with torch.no_grad():
            for p in model.thought_projection.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.mark.parametrize("thought_norm", OPTIONS)
@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm_tied"])
def test_latent_passes_equal_naive_recompute(backbone, thought_norm, request):
    bb = request.getfixturevalue(backbone)
    model = wrap(bb, thought_norm)
    n_tiles = (2, 1, 0) if bb.is_multimodal else (0, 0, 0)
    batch = multimodal_batch(bb, latents=(3, 1, 2), n_tiles=n_tiles)
    out, ours = loss_and_grads(model, model, *batch)
    ref, theirs = loss_and_grads(model, lambda *a: naive_forward(model, *a), *batch)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    real = batch[1].bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=1e-5, rtol=1e-5)
    assert_same_grads(ours, theirs)
    if thought_norm == "projection":
        assert ours["thought_projection.linear.weight"].abs().sum() > 0  # the projection trains through the thoughts
    # What is fed: the option's transform of the hidden state before the latent, not the raw state.
    fed = out.inputs_embeds[batch[0] == bb.latent_id]  # (thoughts, C)
    if thought_norm == "embedding":
        torch.testing.assert_close(fed.norm(dim=-1), model.embedding_norm().expand(len(fed)), rtol=1e-5, atol=1e-5)


def test_embedding_norm_keeps_the_direction_and_projection_starts_at_the_token_scale(tiny_lm):
    hidden = torch.randn(4, tiny_lm.model.config.hidden_size) * 30
    scaled = wrap(tiny_lm, "embedding").make_thought(hidden)
    median = tiny_lm.model.get_input_embeddings().weight.norm(dim=-1).median()
    torch.testing.assert_close(scaled.norm(dim=-1), median.expand(4))
    torch.testing.assert_close(scaled / scaled.norm(dim=-1, keepdim=True), hidden / hidden.norm(dim=-1, keepdim=True))
    fresh = MultimodalCoconut(tiny_lm.model, tiny_lm.latent_id, tiny_lm.start_latent_id, tiny_lm.end_latent_id,
                              tiny_lm.eos_token_id, thought_norm="projection")
    projected = fresh.make_thought(hidden)
    torch.testing.assert_close(projected.norm(dim=-1), median.expand(4), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(projected, torch.nn.functional.layer_norm(hidden, (hidden.shape[1],)) * median /
                               hidden.shape[1] ** 0.5, rtol=1e-4, atol=1e-4)
    assert not hasattr(MultimodalCoconut(tiny_lm.model, tiny_lm.latent_id, tiny_lm.start_latent_id,
                                         tiny_lm.end_latent_id, tiny_lm.eos_token_id), "thought_projection")
    with pytest.raises(ValueError, match="thought_norm must be one of"):
        MultimodalCoconut(tiny_lm.model, tiny_lm.latent_id, tiny_lm.start_latent_id, tiny_lm.end_latent_id,
                          tiny_lm.eos_token_id, thought_norm="layer")


@pytest.mark.parametrize("thought_norm", OPTIONS)
def test_batch_equals_rows_and_batched_generate_equals_each_row(thought_norm, tiny):
    model = wrap(tiny, thought_norm)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny)
    batch = model(input_ids, mask, labels, pos, pixel_values)
    for i, (t0, t1) in enumerate([(0, 2), (2, 3), (3, 3)]):
        real = mask[i].bool()
        ids = input_ids[i, real][None]
        alone = model(ids, torch.ones_like(ids), labels[i, real][None], None, pixel_values[t0:t1] if t1 > t0 else None)
        assert (alone.logits[0] - batch.logits[i, real]).abs().max() <= 1e-4
    rows, pv, n_tiles = prompts(tiny)
    input_ids, mask, _, pos = collate(tiny, rows)
    separate_new_rows(model, tiny)
    out = model.generate(input_ids, mask, pv, max_new_tokens=8, position_ids=pos)[:, input_ids.shape[1]:]
    starts = [0, *torch.tensor(n_tiles).cumsum(0).tolist()]
    for i, r in enumerate(rows):
        ids = torch.tensor([r])
        alone = model.generate(ids, torch.ones_like(ids), pv[starts[i]:starts[i + 1]] if n_tiles[i] else None,
                               max_new_tokens=8)[0, len(r):]
        assert trim(out[i], tiny.eos_token_id) == trim(alone, tiny.eos_token_id)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def projection_runs(tmp_path_factory):
    """tiny-text on the prosqa records with thought_norm projection: 3 epochs in one go, and 2 then resumed to 3."""
    save = tmp_path_factory.mktemp("projection")
    args = [str(PROSQA), f"save_path={save}", "thought_norm=projection", "epochs_per_stage=1", "max_latent_stage=2",
            "num_workers=0", "max_new_tokens=8", "lr=1e-3", "batch_size_training=8"]
    assert main([*args, "name=full", "num_epochs=3", "export_hf=true"]) == 0
    assert main([*args, "name=part", "num_epochs=2"]) == 0
    assert main([*args, "name=part", "num_epochs=3"]) == 0
    return save


def test_the_projection_is_trained_saved_resumed_and_exported(projection_runs):
    from multimodal_coconut.checkpoint import read_model_state_dict
    from multimodal_coconut.inference import load_trained

    full, part = projection_runs / "full", projection_runs / "part"
    for a, b in zip(read_metrics(full), read_metrics(part)):  # the resumed run continues the projection exactly
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    saved = read_model_state_dict(full / "checkpoint_3")
    assert {k for k in saved if k.startswith("thought_projection.")} == {
        "thought_projection.linear.weight", "thought_projection.linear.bias", "thought_projection.norm.weight",
        "thought_projection.norm.bias"}
    assert not torch.equal(saved["thought_projection.linear.weight"],
                           torch.eye(saved["thought_projection.linear.weight"].shape[0]))  # it trained
    from_checkpoint, from_export = load_trained(full / "checkpoint_3"), load_trained(full / "hf_model")
    assert from_checkpoint.model.thought_norm == from_export.model.thought_norm == "projection"
    for name, value in from_checkpoint.model.state_dict().items():
        assert torch.equal(value, from_export.model.state_dict()[name]), name
        if name.startswith("thought_projection."):
            assert torch.equal(value, saved[name]), name
    assert (full / "hf_model" / "coconut_weights.safetensors").is_file()


def test_only_eval_and_the_export_tool_use_the_trained_projection(projection_runs, tmp_path):
    from multimodal_coconut.checkpoint import main as export_main
    from multimodal_coconut.inference import LoadError, load_trained

    full = projection_runs / "full"
    args = [str(PROSQA), f"save_path={tmp_path}", "name=eval", "thought_norm=projection", "only_eval=true",
            f"load_model_path={full / 'checkpoint_3'}", "resume=2", "max_latent_stage=2", "max_new_tokens=8"]
    assert main(args) == 0
    assert json.loads((tmp_path / "eval" / "predictions_val_epoch3.json").read_text()) == \
        json.loads((full / "predictions_val_epoch3.json").read_text())
    assert export_main(["export", str(full / "checkpoint_3"), str(tmp_path / "exported")]) == 0
    exported = load_trained(tmp_path / "exported")
    original = load_trained(full / "checkpoint_3")
    for name, value in original.model.state_dict().items():
        assert torch.equal(value, exported.model.state_dict()[name]), name
    (tmp_path / "exported" / "coconut_weights.safetensors").unlink()  # a projection model without its projection
    with pytest.raises(LoadError, match="do not fit thought_norm='projection': missing"):
        load_trained(tmp_path / "exported")
    shutil.rmtree(tmp_path / "exported")


def test_table_rows_without_continuous_thoughts_drop_the_options(tmp_path):
    """A base config with both options and uniform_prob: the experiment runner keeps them on the rows that feed
    continuous thoughts and drops them where they have no meaning (the row's config stays valid): the norm on No-CoT,
    CoT and pause, step supervision on No-CoT, CoT and w/o thought (pause writes its steps from the hidden states
    before its latents), uniform_prob on CoT and the warm-up (no stages to mix; the curriculum refuses it there)."""
    from multimodal_coconut import experiments
    from multimodal_coconut.config import load_config
    from multimodal_coconut.curriculum import Mode

    config = ROOT / "args" / "hops_text.yaml"
    base_cfg = load_config(config, check_paths=False)
    base = ["thought_norm=projection", "thought_supervision=1.0", "uniform_prob=0.3"]
    seen = {}
    for key, _, row in [*experiments.ROWS, *experiments.OPTION_ROWS, ("warmup", "", experiments.WARMUP_ROW)]:
        cfg = load_config(config, experiments.run_overrides(tmp_path, base_cfg, row, 0, base), check_paths=False)
        Mode.from_config(cfg)  # the curriculum accepts it
        seen[key] = (cfg.thought_norm, cfg.thought_supervision, cfg.uniform_prob)
    assert seen == {"no_cot": ("none", 0, 0.3), "cot": ("none", 0, 0), "warmup": ("none", 0, 0),
                    "pause": ("none", 1.0, 0.3), "pause_step": ("none", 1.0, 0.3),
                    "no_thought": ("projection", 0, 0.3), "coconut": ("projection", 1.0, 0.3),
                    "no_curriculum": ("projection", 1.0, 0.3), "coconut_norm": ("projection", 1.0, 0.3),
                    "coconut_step": ("projection", 1.0, 0.3), "coconut_norm_step": ("projection", 1.0, 0.3)}


def test_the_projection_trains_and_exports_beside_lora_adapters(tmp_path):
    """With LoRA the backbone is frozen but the projection (the wrapper's own) trains in full; the checkpoint holds
    it beside the adapters (not the frozen base), and the merged export carries the trained projection."""
    from multimodal_coconut.checkpoint import read_model_state_dict
    from multimodal_coconut.inference import load_trained

    args = [str(PROSQA), f"save_path={tmp_path}", "name=lora", "thought_norm=projection", "lora_r=4",
            "epochs_per_stage=1", "max_latent_stage=1", "num_epochs=2", "num_workers=0", "max_new_tokens=8",
            "lr=1e-3", "batch_size_training=8", "export_hf=true"]
    assert main(args) == 0
    saved = read_model_state_dict(tmp_path / "lora" / "checkpoint_2")
    assert any(".lora_A." in k for k in saved) and "thought_projection.linear.weight" in saved
    assert not any(k.endswith("q_proj.base_layer.weight") for k in saved)  # frozen: not saved
    exported = load_trained(tmp_path / "lora" / "hf_model")
    assert exported.model.thought_norm == "projection"
    for name, value in exported.model.thought_projection.state_dict().items():
        assert torch.equal(value, saved[f"thought_projection.{name}"]), name
    weight = saved["thought_projection.linear.weight"]
    assert not torch.equal(weight, torch.eye(weight.shape[0]))  # it trained
