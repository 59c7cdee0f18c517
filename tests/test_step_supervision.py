"""thought_supervision (SIM-CoT's step supervision with the model's own decoder and LM head): the collator's step
targets are exactly the replaced steps; the step loss of the cached passes equals a straightforward recompute (naive
latent passes, then one decoder call per (row, step)), loss and gradients; a batch is the token-weighted
combination of its rows; the option off (or at stage 0) changes nothing; a run logs train_step_loss, and the loss
trains the thoughts to write their steps."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_fixtures import write_aokvqa
from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.baselines import naive_forward
from multimodal_coconut.cli import main
from multimodal_coconut.config import RESUME_SAFE_KEYS, Config, ConfigError, load_config
from multimodal_coconut.curriculum import CoconutDataset, Collator, Mode
from multimodal_coconut.data import load_samples
from test_model import assert_same_grads
from test_lora import lora_model
from test_thought_options import wrap as wrap_with_norm

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
PROSQA_TRAIN = ROOT / "tests" / "fixtures" / "prosqa" / "prosqa_train.json"
WEIGHT = 0.5
BATCH_KEYS = {"input_ids", "attention_mask", "position_ids", "pixel_values", "idx", "labels"}


def wrap(bb):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()


@pytest.fixture(scope="module")
def prosqa_samples():
    return load_samples("coconut", PROSQA_TRAIN, image_root=None)  # 16 records of 1, 2 or 3 steps


@pytest.fixture
def aokvqa_samples(tmp_path):
    path, root = write_aokvqa(tmp_path, sizes={101: (64, 64), 102: (64, 64), 103: (64, 64)})  # 3 steps each, 1 tile
    return load_samples("aokvqa", path, image_root=root)


def dataset(bb, samples, c_thought, stage=1, **mode):
    mode = Mode(coconut=True, c_thought=c_thought, max_latent_stage=2, pad_latent_to_max=True, step_targets=True,
                **mode)
    return CoconutDataset(samples, bb, mode, stage, train=True, max_length=4096, seed=0, epoch=0)


def mixed_items(ds, plan):
    """Items at different stages in one batch, as uniform_prob makes them: plan = [(stage, item index)]."""
    return [ds.with_stage(stage)[i] for stage, i in plan]


# (stage, index): on the text records (1, 2, 3, 1 steps): a pad group without a step, one of two steps, past
# max_latent_stage (3 steps removed, 2 groups), stage 0; on the A-OKVQA records (3 steps each): 1, 2 (past max), 0.
TEXT_PLAN = [(2, 0), (1, 1), (3, 2), (0, 3)]
IMAGE_PLAN = [(1, 0), (3, 1), (0, 2)]


def model_args(batch):
    return (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
            batch["pixel_values"])


def reference_step_loss(model, features, input_ids, fed, c_thought):
    """The definition, straightforwardly: for each row and each step j it lists, the thought fed at the row's
    ((j + 1) * c_thought)-th latent, then the step's tokens, through the decoder alone at positions 0..; the step
    tokens' summed cross-entropy over their number. Returns (loss, number of step tokens)."""
    total, count = 0.0, 0
    for b, f in enumerate(features):
        latent_columns = (input_ids[b] == model.latent_token_id).nonzero()[:, 0]
        for j, step in enumerate(f["step_ids"]):
            thought = fed[b, latent_columns[(j + 1) * c_thought - 1]]  # (C,)
            ids = torch.tensor(step)
            x = torch.cat([thought[None], model.embedding(ids[:-1])])[None]  # (1, len, C)
            h = model.decoder(inputs_embeds=x, position_ids=torch.arange(len(ids))[None]).last_hidden_state
            total = total + F.cross_entropy(model.lm_head(h[0]).float(), ids, reduction="sum")
            count += len(ids)
    return total / count, count


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


# --- the data: exactly the replaced steps --------------------------------------------------------------------------


@pytest.mark.parametrize("c_thought", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])  # 3: past max_latent_stage (2)
@pytest.mark.parametrize("pad", [True, False])
def test_the_step_targets_are_the_replaced_steps(tiny_lm, prosqa_samples, c_thought, stage, pad):
    mode = Mode(coconut=True, c_thought=c_thought, max_latent_stage=2, pad_latent_to_max=pad, step_targets=True)
    ds = CoconutDataset(prosqa_samples, tiny_lm, mode, stage, train=True, max_length=4096, seed=0, epoch=0)
    features = [ds[i] for i in range(len(ds))]
    batch = Collator(tiny_lm)(features)
    B, S, L = batch["step_ids"].shape
    expected = [s.steps[:min(stage, 2, len(s.steps))] for s in prosqa_samples]  # a group's step, not past its last
    assert S == max(len(e) for e in expected) and S == min(stage, 2)
    assert L == max(len(ids) for f in features for ids in f["step_ids"])
    for b in range(B):
        steps = expected[features[b]["idx"]]
        latents = (batch["input_ids"][b] == tiny_lm.latent_id).nonzero()[:, 0].tolist()
        for j in range(S):
            ids, column = batch["step_ids"][b, j], batch["step_columns"][b, j].item()
            if j < len(steps):
                assert tiny_lm.tokenizer.decode(ids[ids != -100]) == steps[j] + "\n"  # one line, as laid out
                assert (ids[:(ids != -100).sum()] != -100).all()  # the step first, then only -100
                assert column == latents[(j + 1) * c_thought - 1]  # the last thought of the step's group
            else:  # a pad group (no step) or a shorter row: nothing
                assert (ids == -100).all() and column == -1
        # Token for token what the chain of thought (stage 0) trains on: its labelled text starts with the steps.
        written = [t for t in ds.with_stage(0)[b]["labels"] if t != -100]
        flat = sum(features[b]["step_ids"], [])
        assert flat and written[:len(flat)] == flat


def test_uniform_prob_rows_supervise_their_own_steps_and_stage_0_has_none(tiny_lm, prosqa_samples):
    mode = Mode(coconut=True, max_latent_stage=2, uniform_prob=1.0, step_targets=True)
    ds = CoconutDataset(prosqa_samples * 2, tiny_lm, mode, 1, train=True, max_length=4096, seed=3, epoch=1)
    assert len(set(ds.stages)) >= 3  # drawn stages 0..n_steps
    for i in range(len(ds)):
        item, steps = ds[i], ds.items[i].sample.steps
        n = min(ds.stages[i], 2, len(steps))
        assert [tiny_lm.tokenizer.decode(s) for s in item["step_ids"]] == [s + "\n" for s in steps[:n]]
        assert item["step_thoughts"] == list(range(n))
    stage0 = Collator(tiny_lm)([dataset(tiny_lm, prosqa_samples, 1, stage=0)[i] for i in range(4)])
    assert stage0["step_ids"].shape == (4, 0, 0) and stage0["step_columns"].shape == (4, 0)


# --- the model: cached passes = the definition, a batch = its rows -------------------------------------------------


@pytest.mark.parametrize("backbone, c_thought, variant", [
    ("tiny", 1, "none"), ("tiny", 2, "none"), ("tiny_lm", 1, "none"), ("tiny_lm", 2, "none"),
    ("tiny_lm", 2, "projection"),  # thought_norm: the thought that writes is the one fed, after the projection
    ("tiny", 2, "lora"),  # the step loss runs through the adapters and trains them
])
def test_step_loss_equals_a_naive_recompute(backbone, c_thought, variant, request, prosqa_samples):
    bb = request.getfixturevalue(backbone)
    samples, plan = (request.getfixturevalue("aokvqa_samples"), IMAGE_PLAN) if bb.is_multimodal \
        else (prosqa_samples, TEXT_PLAN)
    model = lora_model(bb) if variant == "lora" else wrap_with_norm(bb, variant)
    features = mixed_items(dataset(bb, samples, c_thought), plan)
    batch = Collator(bb)(features)
    out = model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"])
    ref = naive_forward(model, *model_args(batch))
    ref_step, n_tokens = reference_step_loss(model, features, batch["input_ids"], ref.inputs_embeds, c_thought)
    assert n_tokens == (batch["step_ids"] != -100).sum() > 10
    assert torch.isfinite(out.step_loss) and out.step_loss.item() > 1.0
    torch.testing.assert_close(out.step_loss, ref_step, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    answer = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    step = dict(zip(names, torch.autograd.grad(out.step_loss, params, allow_unused=True)))
    ours = {n: a + WEIGHT * step[n] for n, a in zip(names, answer) if a is not None}
    assert_same_grads(ours, grads_of(model, ref.loss + WEIGHT * ref_step))
    name = next(n for n in names if "layers.0.self_attn.q_proj." + ("lora_B" if variant == "lora" else "weight") in n)
    assert step[name].abs().max() > 1e-6  # the step loss trains the decoder (its adapters with LoRA)
    if variant == "projection":
        assert step["thought_projection.linear.weight"].abs().max() > 1e-6
    if bb.is_multimodal:  # and, through the thoughts, the vision tower
        assert step["base_model.model.vision_tower.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm"])
def test_pause_writes_each_step_from_the_hidden_state_before_its_latent(backbone, request, prosqa_samples):
    """Pause as thought (coconut false) feeds its <|latent|> embedding; its step j is written from the last hidden
    state of the column before the step's latent (what Coconut would feed there): one plain pass, then the same
    reference as Coconut's, loss and gradients."""
    bb = request.getfixturevalue(backbone)
    samples, plan = (request.getfixturevalue("aokvqa_samples"), IMAGE_PLAN) if bb.is_multimodal \
        else (prosqa_samples, TEXT_PLAN)
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id,
                              continuous_thoughts=False).eval()
    mode = Mode(c_thought=1, max_latent_stage=2, pad_latent_to_max=True, step_targets=True)  # pause: no mode flag
    features = mixed_items(CoconutDataset(samples, bb, mode, 1, train=True, max_length=4096, seed=0, epoch=0), plan)
    batch = Collator(bb)(features)
    out = model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])  # the plain backbone: one pass, nothing fed back
    hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).last_hidden_state
    before = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)  # column c: the state of c - 1
    ref_step, n_tokens = reference_step_loss(model, features, batch["input_ids"], before, 1)
    assert n_tokens == (batch["step_ids"] != -100).sum() > 10
    assert torch.isfinite(out.step_loss) and out.step_loss.item() > 1.0
    torch.testing.assert_close(out.step_loss, ref_step, atol=1e-5, rtol=1e-5)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    ours = dict(zip(names, torch.autograd.grad(out.step_loss, params, allow_unused=True)))
    ref = dict(zip(names, torch.autograd.grad(ref_step, params, allow_unused=True)))
    assert_same_grads({n: g for n, g in ours.items() if g is not None}, {n: g for n, g in ref.items() if g is not None})
    # a step after the first is written from the state at the previous latent, so the pause embedding learns from it
    assert ours[next(n for n in names if n.endswith("embed_tokens.weight"))][bb.latent_id].abs().max() > 0


@pytest.mark.parametrize("c_thought", [1, 2])
def test_gradients_reach_exactly_the_thoughts_up_to_each_rows_last_supervised_one(tiny_lm, prosqa_samples, c_thought):
    model = wrap(tiny_lm)
    features = mixed_items(dataset(tiny_lm, prosqa_samples, c_thought), TEXT_PLAN)
    batch = Collator(tiny_lm)(features)
    thoughts = []

    def keep(i, thought):  # the i-th thoughts of every row, as fed
        thought.retain_grad()
        thoughts.append(thought)
        return thought

    out = model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"], thought_hook=keep)
    out.step_loss.backward()
    for b, f in enumerate(features):
        last = len(f["step_ids"]) * c_thought  # the last supervised thought (1-based); later ones feed no step
        reached = [thoughts[i].grad[b].abs().max().item() > 0 for i in range(len(thoughts))]
        assert reached == [i < last for i in range(len(thoughts))], (b, reached)
    assert any(len(f["step_ids"]) * c_thought < (f["input_ids"].count(tiny_lm.latent_id)) for f in features)  # a pad


def test_a_batch_is_the_token_weighted_combination_of_its_rows(tiny, aokvqa_samples):
    model = wrap(tiny)
    features = mixed_items(dataset(tiny, aokvqa_samples, 2), IMAGE_PLAN)
    batch = Collator(tiny)(features)
    whole = model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"]).step_loss
    calls = []
    hook = model.decoder.register_forward_hook(lambda *_: calls.append(1))
    losses, counts = [], []
    for f in features:
        row = Collator(tiny)([f])
        calls.clear()
        out = model(*model_args(row), step_ids=row["step_ids"], step_columns=row["step_columns"])
        assert len(calls) == model.num_passes(row["input_ids"]) + 1  # one step call, steps or none (FSDP lock-step)
        losses.append(out.step_loss)
        counts.append((row["step_ids"] != -100).sum())
    hook.remove()
    combined = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(whole, combined, atol=1e-5, rtol=1e-5)
    assert counts[2] == 0 and losses[2].item() == 0.0 and losses[2].requires_grad  # the stage-0 row: a dummy call
    grads = grads_of(model, losses[2])
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_step_columns_must_point_at_thoughts(tiny_lm, prosqa_samples):
    model = wrap(tiny_lm)
    batch = Collator(tiny_lm)(mixed_items(dataset(tiny_lm, prosqa_samples, 1), TEXT_PLAN))
    with pytest.raises(ValueError, match="hold no <\\|latent\\|>"):
        model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"] - 1)
    pause = MultimodalCoconut(tiny_lm.model, tiny_lm.latent_id, tiny_lm.start_latent_id, tiny_lm.end_latent_id,
                              tiny_lm.eos_token_id, continuous_thoughts=False)  # pause as thought: the same rule
    with pytest.raises(ValueError, match="hold no <\\|latent\\|>"):
        pause(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"] - 1)


# --- off: nothing changes ----------------------------------------------------------------------------------------


def test_the_option_off_leaves_batches_and_losses_as_they_were(tiny, aokvqa_samples):
    assert Mode.from_config(Config(dataset="builtin")) == Mode() == \
        Mode.from_config(Config(dataset="builtin", thought_supervision=0.0))
    assert Mode.from_config(Config(dataset="builtin", coconut=True, thought_supervision=0.3)).step_targets
    off = CoconutDataset(aokvqa_samples, tiny, Mode(coconut=True, c_thought=2, max_latent_stage=2), 2, train=True,
                         max_length=4096, seed=0, epoch=0)
    on = dataset(tiny, aokvqa_samples, 2, stage=2)
    plain, with_steps = Collator(tiny)([off[i] for i in range(3)]), Collator(tiny)([on[i] for i in range(3)])
    assert set(plain) == BATCH_KEYS and set(with_steps) == BATCH_KEYS | {"step_ids", "step_columns"}
    for key in BATCH_KEYS:
        assert torch.equal(plain[key], with_steps[key]), key
    model = wrap(tiny)
    a = model(*model_args(plain))
    b = model(*model_args(plain), step_ids=with_steps["step_ids"], step_columns=with_steps["step_columns"])
    assert a.step_loss is None and b.step_loss is not None
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)  # the answer loss is untouched


def _epoch(bb, samples, stage, weight):
    """train_epoch at `stage` on the 16 text records (2 steps of batch 8), from the same weights; (model, loss,
    state). weight None: the key is left out of the config."""
    from multimodal_coconut.distributed import DistEnv
    from multimodal_coconut.train import train_epoch

    extra = {} if weight is None else {"thought_supervision": weight}
    cfg = Config(dataset="builtin", coconut=True, max_latent_stage=2, batch_size_training=8, num_workers=0, lr=1e-3,
                 save_path="unused", **extra)
    ds = CoconutDataset(samples, bb, Mode.from_config(cfg), stage, train=True, max_length=4096, seed=0, epoch=0)
    model = MultimodalCoconut(copy.deepcopy(bb.model), bb.latent_id, bb.start_latent_id, bb.end_latent_id,
                              bb.eos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    state = {"global_step": 0}
    loss, _ = train_epoch(model, model, optimizer, ds, Collator(bb), cfg, DistEnv(), 0, stage, state, total_steps=10)
    return model, loss, state


def test_training_with_the_option_at_stage_0_is_training_without_it(tiny_lm, prosqa_samples):
    """At stage 0 nothing is supervised: the zero-weighted step call leaves every weight bit-identical; at stage 1 the
    epoch logs its step loss and trains other weights."""
    absent, loss, state = _epoch(tiny_lm, prosqa_samples, 0, None)
    assert "train_step_loss" not in state
    on, on_loss, on_state = _epoch(tiny_lm, prosqa_samples, 0, 0.5)
    assert on_loss == loss and on_state["train_step_loss"] is None
    for (name, p), q in zip(absent.named_parameters(), on.parameters()):
        assert torch.equal(p, q), name
    at_1, loss_1, state_1 = _epoch(tiny_lm, prosqa_samples, 1, 0.5)
    plain_1, plain_loss_1, _ = _epoch(tiny_lm, prosqa_samples, 1, 0.0)
    assert state_1["train_step_loss"] > 1.0 and loss_1 > 1.0 and plain_loss_1 > 1.0
    assert any(not torch.equal(p, q) for p, q in zip(at_1.parameters(), plain_1.parameters()))


def test_accumulation_takes_the_global_mean_over_the_windows_step_tokens(tiny_lm, prosqa_samples):
    """Two micro-batches in one accumulation window: the SGD update is that of answer loss + weight x step loss, each
    a mean over all the window's tokens (not the mean of the micro-batches' means)."""
    from multimodal_coconut.distributed import DistEnv
    from multimodal_coconut.train import train_epoch

    cfg = Config(dataset="builtin", coconut=True, max_latent_stage=2, thought_supervision=WEIGHT, batch_size_training=4,
                 gradient_accumulation_steps=2, num_workers=0, max_grad_norm=0, lr=0.1, weight_decay=0.0,
                 save_path="unused")
    ds = CoconutDataset(prosqa_samples[:8], tiny_lm, Mode.from_config(cfg), 2, train=True, max_length=4096, seed=0,
                        epoch=0)
    model = MultimodalCoconut(copy.deepcopy(tiny_lm.model), tiny_lm.latent_id, tiny_lm.start_latent_id,
                              tiny_lm.end_latent_id, tiny_lm.eos_token_id)
    reference = copy.deepcopy(model)
    batches = []

    def collate(features):
        batches.append(Collator(tiny_lm)(features))
        return batches[-1]

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    state = {"global_step": 0}
    train_epoch(model, model, optimizer, ds, collate, cfg, DistEnv(), 0, 2, state, total_steps=1)
    assert state["global_step"] == 1 and len(batches) == 2
    outs = [reference(*model_args(b), step_ids=b["step_ids"], step_columns=b["step_columns"],
                      labelled_logits_only=True) for b in batches]
    n = [(b["labels"][:, 1:] != -100).sum() for b in batches]
    m = [(b["step_ids"] != -100).sum() for b in batches]
    assert m[0] != m[1]  # so that the mean of the means would differ
    answer = sum(o.loss * k for o, k in zip(outs, n)) / sum(n)
    step = sum(o.step_loss * k for o, k in zip(outs, m)) / sum(m)
    (answer + WEIGHT * step).backward()
    assert state["train_step_loss"] == pytest.approx(step.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q - cfg.lr * q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_step_loss_teaches_the_thoughts_their_steps(tiny_lm, prosqa_samples):
    """Overfit one batch at stage 2 (8 rows, 13 supervised steps, 213 step tokens): with the step loss (weight 1) it
    falls from 6.17 to 0.65 in 40 AdamW steps; without it (weight 0, measured only) to 2.36, from learning the
    remaining steps' text alone."""
    features = [dataset(tiny_lm, prosqa_samples, 1, stage=2)[i] for i in range(8)]
    batch = Collator(tiny_lm)(features)
    curves = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = MultimodalCoconut(copy.deepcopy(tiny_lm.model), tiny_lm.latent_id, tiny_lm.start_latent_id,
                                  tiny_lm.end_latent_id, tiny_lm.eos_token_id).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        curve = []
        for _ in range(40):
            out = model(*model_args(batch), step_ids=batch["step_ids"], step_columns=batch["step_columns"],
                        labelled_logits_only=True)
            (out.loss + weight * out.step_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(out.step_loss.item())
        curves[weight] = curve
    print({w: [round(v, 3) for v in c[::5] + c[-1:]] for w, c in curves.items()})
    assert curves[0.0][0] == curves[1.0][0] > 3.0
    assert curves[1.0][-1] < 0.2 * curves[1.0][0]
    assert curves[1.0][-1] < 0.5 * curves[0.0][-1]


# --- config and a run ----------------------------------------------------------------------------------------------


def test_config_rules():
    assert Config(dataset="builtin").thought_supervision == 0.0
    assert "thought_supervision" not in RESUME_SAFE_KEYS
    for bad in ({"cot": True}, {"no_cot": True}, {"coconut": True, "no_thoughts": True}):
        with pytest.raises(ConfigError, match="'thought_supervision: 0.5'.*needs latent positions") as e:
            Config(dataset="builtin", thought_supervision=0.5, **bad)
        assert "thought_supervision" in e.value.keys
    assert Config(dataset="builtin", thought_supervision=0.5).thought_supervision == 0.5  # pause as thought
    with pytest.raises(ConfigError, match="'thought_supervision' must be >= 0"):
        Config(dataset="builtin", coconut=True, thought_supervision=-1)
    cfg = load_config(PROSQA, ["thought_supervision=1"])
    assert cfg.thought_supervision == 1.0 and isinstance(cfg.thought_supervision, float)


RUN = [str(PROSQA), "thought_supervision=0.5", "epochs_per_stage=1", "max_latent_stage=2", "batch_size_training=8",
       "max_new_tokens=8", "lr=1e-3", "num_workers=0", "log_every=1"]


def test_a_run_logs_the_step_loss_beside_the_answer_loss(tmp_path, monkeypatch, capsys):
    from multimodal_coconut import train

    logged = []
    monkeypatch.setattr(train, "_log_step", lambda cfg, step, values: logged.append((step, values)))
    assert main([*RUN, f"save_path={tmp_path}", "num_epochs=2"]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "prosqa-coconut" / "metrics.jsonl").open()]
    assert (first["stage"], second["stage"]) == (0, 1)
    assert first["train_step_loss"] is None  # stage 0: no thoughts, no steps to supervise
    assert second["train_step_loss"] > 1.0 and second["train_loss"] > 1.0
    steps = {step: values for step, values in logged if "train/loss" in values}
    assert [steps[s]["train/step_loss"] is None for s in (1, 2, 3, 4)] == [True, True, False, False]
    assert "train_step_loss" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,coconut", [("ddp", "true"), ("fsdp", "true"), ("fsdp", "false")])
def test_two_processes_equal_one_with_the_option(strategy, coconut, tmp_path):
    """torchrun, 2 CPU processes (gloo) with batch 2 each = one process with batch 4, with the step loss on: the step
    tokens' global mean is taken across ranks as the answer's is. uniform_prob draws stage-0 samples into later
    stages, so that a rank's batch may have no step to supervise while the other's has (FSDP: both still make the
    step call). coconut=false: pause as thought, whose steps are written from the states before its latent tokens."""
    common = [*RUN[1:], "num_epochs=3", "uniform_prob=0.5", f"distributed={strategy}", f"coconut={coconut}"]
    assert main([str(PROSQA), *common, "batch_size_training=4", f"save_path={tmp_path / 'one'}"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29800 + os.getpid() % 1000), str(ROOT / "run.py"), str(PROSQA), *common,
                           "batch_size_training=2", f"save_path={tmp_path / 'two'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda d: [json.loads(line) for line in (d / "prosqa-coconut" / "metrics.jsonl").open()]  # noqa: E731
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert [m["stage"] for m in one] == [0, 1, 2] and [m["global_step"] for m in two] == [4, 8, 12]
    assert all(m["train_step_loss"] > 1.0 for m in one)  # uniform_prob: steps replaced at stage 0 too
    for a, b in zip(one, two):
        for key in ("train_loss", "train_step_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
