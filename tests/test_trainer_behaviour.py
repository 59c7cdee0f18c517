"""What the trainer actually does, observed from outside while `main([...])` runs (one process, CPU, tiny model).

Spies, monkeypatched for one run and undone after it: the collator (which samples each batch holds),
`MultimodalCoconut.forward` / `.generate` (what the model is fed in training, validation loss and generation),
`torch.optim.AdamW.step` (learning rate, Adam's moments and gradients at each optimizer step, weights after it).
Every expected value is written out here, independently of the trainer: the curriculum's number of thoughts per
epoch, the learning-rate formula, a plain AdamW step on the loss of one batch as large as the accumulation window.
`python scripts/mutation_check.py` puts the bugs these tests exist to catch into a scratch copy, one at a time.
"""

import copy
import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.baselines import naive_forward
from multimodal_coconut.builtin_data import generate_builtin
from multimodal_coconut.checkpoint import save_checkpoint
from multimodal_coconut.cli import main
from multimodal_coconut.curriculum import Collator

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "args" / "demo.yaml")

# The spy run: a Coconut curriculum of 2 epochs per stage, 2 thoughts per step, at most 2 steps as thoughts.
C, EPS, M = 2, 2, 2
EPOCHS, BATCH, N_TRAIN, N_VAL, MAX_VAL, N_TEST = 5, 4, 16, 8, 6, 4
STEPS_PER_EPOCH = N_TRAIN // BATCH
LR, WARMUP, WD = 1e-3, 3, 0.01  # WD: demo.yaml's weight_decay


# --- references ------------------------------------------------------------------------------------------------


def train_thoughts(stage, n_steps, m=M):
    """Thoughts in a training sample (pad_latent_to_max false): k*c up to stage m, then one group per step, <= m."""
    return C * (stage if stage <= m else min(n_steps, m))


def prompt_thoughts(stage, n_steps):
    """Thoughts in a generation prompt: min(stage, M) groups, at most one per step (unannotated: not capped)."""
    return C * min(stage, M, M if n_steps is None else n_steps)


def lr_at(step, total, kind, warmup, lr=LR):
    """The schedule, written out: linear warmup to lr over `warmup` steps (step s gets (s+1)/warmup), then
    constant, linear to 0, or half a cosine to 0 over the remaining total - warmup steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]


def tower(name):
    """Which part of the InternVL backbone a parameter belongs to."""
    if ".vision_tower." in name:
        return "vision"
    if ".multi_modal_projector." in name:
        return "projector"
    assert ".language_model." in name or "lm_head" in name, name
    return "llm"


# --- the spy -----------------------------------------------------------------------------------------------------


class Spy:
    """Everything one run fed the model, in order."""

    def __init__(self, stub_generate=False):
        self.stub_generate = stub_generate
        self.events = []  # ("train" | "val_loss" | "generate", record) in call order
        self.collated = []  # every batch the collator built: {"idx", "input_ids", "used"}
        self.steps = []  # per optimizer step: {"lr", "fresh", "grads" (first step only)}
        self.model = None  # the model the trainer trains (its weights after the run)
        self.initial = None  # deep copy of the model at its first forward (initial weights, frozen flags)
        self.names = {}
        self.after_first_step = self.after_last_step = None  # {name: tensor}
        self.tokenizer = None

    def match(self, input_ids):
        """Sample indices of the rows of `input_ids`: the oldest collated batch not yet consumed that equals it
        (None when batches are collated in DataLoader workers, out of the spy's sight)."""
        if not self.collated:
            return None
        for c in self.collated:
            if not c["used"] and torch.equal(c["input_ids"], input_ids):
                c["used"] = True
                return c["idx"]
        raise AssertionError("the model was fed a batch the collator never built")

    def of(self, kind):
        return [r for k, r in self.events if k == kind]

    def epochs(self):
        """Per epoch: (training records, validation-loss records, generation records) between training phases."""
        out = []
        for kind, record in self.events:
            if kind == "train" and (not out or out[-1][1] or out[-1][2]):
                out.append(([], [], []))
            if not out:
                continue
            out[-1][{"train": 0, "val_loss": 1, "generate": 2}[kind]].append(record)
        return out


def echo_generation(spy, model, input_ids, attention_mask):
    """A generator stub: each row answers "### <its own question and choices>", read back from its prompt."""
    tok = spy.tokenizer
    skip = set(tok.all_special_ids) | {model.latent_token_id, model.start_latent_id, model.end_latent_id}
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        text = tok.decode([t for t in ids[mask.bool()].tolist() if t not in skip])
        rows.append(tok.encode("### " + " ".join(text.split()), add_special_tokens=False) + [model.eos_token_id])
    width = max(map(len, rows))
    new = torch.tensor([r + [model.eos_token_id] * (width - len(r)) for r in rows])
    return torch.cat([input_ids, new], dim=1)


@contextmanager
def spying(spy):
    mp = pytest.MonkeyPatch()
    init, call = Collator.__init__, Collator.__call__
    forward, generate, step = MultimodalCoconut.forward, MultimodalCoconut.generate, torch.optim.AdamW.step

    def spy_init(self, backbone, *args, **kwargs):
        spy.tokenizer = backbone.tokenizer
        init(self, backbone, *args, **kwargs)

    def spy_call(self, features):
        batch = call(self, features)
        spy.collated.append({"idx": batch["idx"].tolist(), "input_ids": batch["input_ids"].clone(), "used": False})
        return batch

    def spy_forward(self, input_ids, attention_mask, labels=None, position_ids=None, pixel_values=None, **kwargs):
        if spy.initial is None:
            spy.model, spy.initial = self, copy.deepcopy(self)
            spy.names = {id(p): n for n, p in self.named_parameters()}
        record = {"idx": spy.match(input_ids), "input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                  "labels": None if labels is None else labels.clone(), "position_ids": position_ids.clone(),
                  "pixel_values": None if pixel_values is None else pixel_values.clone()}
        spy.events.append(("train" if self.training and torch.is_grad_enabled() else "val_loss", record))
        return forward(self, input_ids, attention_mask, labels, position_ids, pixel_values, **kwargs)

    def spy_generate(self, input_ids, attention_mask, *args, **kwargs):
        spy.model = spy.model or self
        spy.events.append(("generate", {"idx": spy.match(input_ids), "input_ids": input_ids.clone()}))
        if spy.stub_generate:
            return echo_generation(spy, self, input_ids, attention_mask)
        return generate(self, input_ids, attention_mask, *args, **kwargs)

    def spy_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        record = {"lr": [group["lr"] for group in self.param_groups],
                  "fresh": all(p not in self.state or not self.state[p] for p in params)}
        if not spy.steps:
            record["grads"] = {spy.names[id(p)]: p.grad.clone() for p in params if p.grad is not None}
        out = step(self, *args, **kwargs)
        spy.steps.append(record)
        spy.after_last_step = {spy.names[id(p)]: p.detach().clone() for p in params}
        if len(spy.steps) == 1:
            spy.after_first_step = spy.after_last_step
        return out

    mp.setattr(Collator, "__init__", spy_init)
    mp.setattr(Collator, "__call__", spy_call)
    mp.setattr(MultimodalCoconut, "forward", spy_forward)
    mp.setattr(MultimodalCoconut, "generate", spy_generate)
    mp.setattr(torch.optim.AdamW, "step", spy_step)
    try:
        yield spy
    finally:
        mp.undo()


# --- runs --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 train, 8 val and 4 test questions of the built-in set (read as A-OKVQA files: the format is the same)."""
    out = tmp_path_factory.mktemp("small_builtin")
    paths = generate_builtin(out, {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}, seed=0)
    records = {split: json.loads(path.read_text()) for split, path in paths.items()}
    return out, records


def overrides(data_dir, save_path, **extra):
    values = dict(save_path=save_path, name="run", dataset="aokvqa", image_root=data_dir,
                  train_path=data_dir / "aokvqa_v1p0_train.json", val_path=data_dir / "aokvqa_v1p0_val.json",
                  coconut="true", c_thought=C, epochs_per_stage=EPS, max_latent_stage=M, pad_latent_to_max="false",
                  uniform_prob=0.0, batch_size_training=BATCH, num_workers=0, lr=LR, seed=0, max_new_tokens=8)
    values.update(extra)
    return [DEMO] + [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def spy_run(data, tmp_path_factory):
    """5 epochs (stages 0, 0, 1, 1, 2) with reset_optimizer, a warmed-up cosine schedule, frozen vision tower and
    projector, save_only_improve, max_val_samples and a test split; generation is the echo stub."""
    data_dir, _ = data
    save = tmp_path_factory.mktemp("spy")
    with spying(Spy(stub_generate=True)) as spy:
        assert main(overrides(data_dir, save, num_epochs=EPOCHS, reset_optimizer="true", lr_scheduler="cosine",
                              warmup_steps=WARMUP, freeze_vision="true", freeze_projector="true",
                              save_only_improve="true", max_val_samples=MAX_VAL, eval_batch_size=8,
                              test_path=data_dir / "aokvqa_v1p0_test.json")) == 0
    return spy, save / "run"


MAX_NORM = 0.05


@pytest.fixture(scope="module")
def accumulation_run(data, tmp_path_factory):
    """1 epoch of 2 optimizer steps, each accumulating 2 micro-batches of 4; language model frozen, clipping on, a
    linear schedule; validation on one question only; debug (no checkpoints); exported as an HF folder."""
    data_dir, _ = data
    save = tmp_path_factory.mktemp("accumulation")
    args = overrides(data_dir, save, num_epochs=1, gradient_accumulation_steps=2, freeze_llm="true",
                     lr_scheduler="linear", warmup_steps=0, max_grad_norm=MAX_NORM, max_val_samples=1,
                     max_new_tokens=2, debug="true", export_hf="true")
    with spying(Spy()) as spy:
        assert main(args) == 0
    return spy, save / "run", args


# --- 1. what the trainer feeds the model -------------------------------------------------------------------------


def test_training_and_validation_batches_follow_the_curriculum(spy_run, data):
    spy, _ = spy_run
    _, records = data
    train, val, test = records["train"], records["val"][:MAX_VAL], records["test"]
    epochs = spy.epochs()
    assert len(epochs) == EPOCHS
    for epoch, (training, val_loss, generation) in enumerate(epochs):
        stage = epoch // EPS
        assert len(training) == STEPS_PER_EPOCH
        assert sorted(i for r in training for i in r["idx"]) == list(range(N_TRAIN))  # every sample once
        for r in training:
            got = (r["input_ids"] == spy.tokenizer.convert_tokens_to_ids("<|latent|>")).sum(1).tolist()
            assert got == [train_thoughts(stage, len(train[i]["steps"])) for i in r["idx"]], (epoch, r["idx"])
        assert sorted(i for r in val_loss for i in r["idx"]) == list(range(MAX_VAL))
        for r in val_loss:
            got = (r["input_ids"] == spy.tokenizer.convert_tokens_to_ids("<|latent|>")).sum(1).tolist()
            assert got == [train_thoughts(stage, len(val[i]["steps"])) for i in r["idx"]], (epoch, r["idx"])
        val_gen, test_gen = generation[:1], generation[1:]
        assert sorted(val_gen[0]["idx"]) == list(range(MAX_VAL))
        got = (val_gen[0]["input_ids"] == spy.tokenizer.convert_tokens_to_ids("<|latent|>")).sum(1).tolist()
        assert got == [prompt_thoughts(stage, len(val[i]["steps"])) for i in val_gen[0]["idx"]], epoch
        if epoch < EPOCHS - 1:
            assert not test_gen
    # the test split is generated once, after the last epoch, at its stage (unannotated: thoughts not capped)
    (test_gen,) = epochs[-1][2][1:]
    assert sorted(test_gen["idx"]) == list(range(N_TEST))
    got = (test_gen["input_ids"] == spy.tokenizer.convert_tokens_to_ids("<|latent|>")).sum(1).tolist()
    assert got == [prompt_thoughts((EPOCHS - 1) // EPS, None)] * N_TEST
    assert all(not r.get("steps") for r in test)


UNIFORM_EPOCHS, UNIFORM_PROB, UNIFORM_M = 4, 0.5, 4  # max_latent_stage 4: every drawable stage has its own count


@pytest.fixture(scope="module")
def uniform_run(data, tmp_path_factory):
    """4 epochs, all at stage 0 (epochs_per_stage 10), with uniform_prob 0.5 and max_latent_stage 4; evaluation
    only at the end, on one question (generation is the echo stub)."""
    data_dir, _ = data
    save = tmp_path_factory.mktemp("uniform")
    with spying(Spy(stub_generate=True)) as spy:
        assert main(overrides(data_dir, save, num_epochs=UNIFORM_EPOCHS, epochs_per_stage=10, uniform_prob=UNIFORM_PROB,
                              max_latent_stage=UNIFORM_M, eval_every_epoch="false", max_val_samples=1,
                              debug="true")) == 0
    return spy


def test_uniform_prob_draws_a_stage_per_training_sample(uniform_run, data):
    """With probability uniform_prob a training sample takes a stage drawn uniformly from 0..its number of steps
    (the original's get_cot_latent_dataset), else the scheduled one (0 here); validation always the scheduled one."""
    spy = uniform_run
    _, records = data
    latent = spy.tokenizer.convert_tokens_to_ids("<|latent|>")
    training_batches = spy.of("train")  # no evaluation between epochs: STEPS_PER_EPOCH batches each
    assert len(training_batches) == UNIFORM_EPOCHS * STEPS_PER_EPOCH
    drawn, expected, per_epoch = 0, 0.0, []
    for epoch in range(UNIFORM_EPOCHS):
        training = training_batches[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]
        counts = {}
        for r in training:
            for i, got in zip(r["idx"], (r["input_ids"] == latent).sum(1).tolist()):
                n = len(records["train"][i]["steps"])
                assert got in {train_thoughts(stage, n, UNIFORM_M) for stage in range(n + 1)}, (i, n, got)
                counts[i] = got
                drawn += got > 0
                expected += UNIFORM_PROB * n / (n + 1)  # P(a draw, and not stage 0)
        assert sorted(counts) == list(range(N_TRAIN))
        per_epoch.append(counts)
    assert spy.of("val_loss")
    for r in spy.of("val_loss"):
        assert not (r["input_ids"] == latent).any()  # validation: the scheduled stage 0
    # 64 draws: the count is within 3.3 standard deviations of its expectation (about 21 of 64; always drawing
    # would give about 43, never drawing 0), and the draws differ between epochs.
    sd = math.sqrt(expected * (1 - expected / (N_TRAIN * UNIFORM_EPOCHS)))
    assert abs(drawn - expected) < 3.3 * sd, (drawn, expected)
    assert len({tuple(sorted(c.items())) for c in per_epoch}) > 1


def training_order(spy, epoch):
    return [i for r in spy.epochs()[epoch][0] for i in r["idx"]]


def test_sample_order_changes_every_epoch_and_repeats_on_a_rerun(spy_run, accumulation_run):
    spy, _ = spy_run
    orders = [training_order(spy, e) for e in range(EPOCHS)]
    assert orders[0] != orders[1]  # same stage, same lengths: only the epoch differs
    assert len({tuple(o) for o in orders}) == EPOCHS
    # The accumulation run has the same data, seed and batch size: its first epoch holds the same batches, in order.
    other, _, _ = accumulation_run
    assert [r["idx"] for r in other.epochs()[0][0]] == [r["idx"] for r in spy.epochs()[0][0]]


# --- 2. optimizer and schedule -----------------------------------------------------------------------------------


def test_learning_rate_of_every_step_follows_warmup_then_cosine(spy_run):
    spy, _ = spy_run
    total = EPOCHS * STEPS_PER_EPOCH
    assert len(spy.steps) == total
    for step, record in enumerate(spy.steps):
        assert record["lr"] == [pytest.approx(lr_at(step, total, "cosine", WARMUP), rel=1e-9, abs=1e-15)], step


def test_learning_rate_linear_schedule(accumulation_run):
    spy, _, _ = accumulation_run
    assert [r["lr"] for r in spy.steps] == [[pytest.approx(lr_at(s, 2, "linear", 0))] for s in range(2)]
    assert lr_at(1, 2, "linear", 0) == LR / 2


def test_reset_optimizer_empties_adam_exactly_at_stage_starts(spy_run):
    spy, _ = spy_run
    fresh = [r["fresh"] for r in spy.steps]
    expected = [step % (EPS * STEPS_PER_EPOCH) == 0 for step in range(EPOCHS * STEPS_PER_EPOCH)]
    assert fresh == expected


def test_frozen_towers_stay_bit_identical_and_the_rest_trains(spy_run, accumulation_run):
    for (spy, *_), frozen in ((spy_run, {"vision", "projector"}), (accumulation_run, {"llm"})):
        initial = dict(spy.initial.named_parameters())
        final = dict(spy.model.named_parameters())
        assert initial.keys() == final.keys()
        assert {tower(n) for n in initial} == {"vision", "projector", "llm"}
        for name, before in initial.items():
            if tower(name) in frozen:
                assert torch.equal(before, final[name]), f"{name} is frozen but changed"
            else:
                assert not torch.equal(before, final[name]), f"{name} did not change"


def test_accumulated_step_equals_plain_adamw_on_one_big_batch(accumulation_run):
    """The first optimizer step of the run (2 micro-batches of 4 accumulated) against, computed here: the mean
    token loss over the 8 samples by the naive Coconut forward, its gradient clipped to MAX_NORM, one AdamW step."""
    spy, _, _ = accumulation_run
    micro = spy.of("train")[:2]
    model = spy.initial  # the initial weights, frozen flags as the trainer set them
    model.zero_grad()
    n = [int((r["labels"][:, 1:] != -100).sum()) for r in micro]
    loss = sum(naive_forward(model, r["input_ids"], r["attention_mask"], r["labels"], r["position_ids"],
                             r["pixel_values"]).loss * k for r, k in zip(micro, n)) / sum(n)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and {tower(name) for name in grads} == {"vision", "projector"}  # the language model is frozen
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())).item()
    assert norm > 2 * MAX_NORM, "the test needs a gradient that gets clipped"
    grads = {name: g * (MAX_NORM / (norm + 1e-6)) for name, g in grads.items()}

    got = spy.steps[0]["grads"]
    assert got.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got[name], grads[name], rtol=1e-4, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert math.sqrt(sum(g.double().pow(2).sum().item() for g in got.values())) == pytest.approx(MAX_NORM, rel=1e-4)

    lr, (beta1, beta2), eps = spy.steps[0]["lr"][0], (0.9, 0.999), 1e-8
    for name, p in model.named_parameters():
        if name not in grads:
            continue
        g = grads[name]
        m, v = (1 - beta1) * g, (1 - beta2) * g * g
        expected = p.detach() * (1 - lr * WD) - lr * (m / (1 - beta1)) / ((v / (1 - beta2)).sqrt() + eps)
        torch.testing.assert_close(spy.after_first_step[name], expected, rtol=1e-5, atol=lr * 1e-3,
                                   msg=lambda m: f"{name}: {m}")


# --- 4. predictions ----------------------------------------------------------------------------------------------


def echoed(record):
    return " ".join(f"{record['question']} Choices: {', '.join(record['choices'])}".lower().split())


def test_predictions_hold_each_questions_own_generation(spy_run, data):
    """With the echo stub every generation names its own question, so a mix-up of question ids shows."""
    _, run = spy_run
    _, records = data
    val = records["val"][:MAX_VAL]
    assert len({echoed(r) for r in val}) == MAX_VAL, "the stub's answers must tell the questions apart"
    for epoch in range(1, EPOCHS + 1):
        predictions = json.loads((run / f"predictions_val_epoch{epoch}.json").read_text())
        assert list(predictions) == [r["question_id"] for r in val]  # max_val_samples: the first ones only
        for r in val:
            assert predictions[r["question_id"]]["direct_answer"] == echoed(r)
            assert predictions[r["question_id"]]["multiple_choice"] in r["choices"]
    test = json.loads((run / f"predictions_test_epoch{EPOCHS}.json").read_text())
    assert {q: p["direct_answer"] for q, p in test.items()} == {r["question_id"]: echoed(r) for r in records["test"]}
    assert not list(run.glob("predictions_test_epoch[0-4].json"))


def test_save_only_improve_keeps_only_improving_checkpoints(spy_run):
    """The echo stub's accuracy is the same every epoch: only the first evaluation improves on "none yet"."""
    _, run = spy_run
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    assert [m["stage"] for m in metrics] == [e // EPS for e in range(EPOCHS)]
    assert len({m["mc_accuracy"] for m in metrics}) == 1
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_1"]


# --- 5. trainer paths --------------------------------------------------------------------------------------------


def test_resume_past_epoch_ten_takes_the_newest_checkpoint(accumulation_run, tmp_path):
    """checkpoint_9 and checkpoint_10 (numbers, not strings: 10 is newer); the rerun continues after epoch 10.
    With eval_every_epoch false only the last epoch is evaluated."""
    spy, _, args = accumulation_run
    new_run = tmp_path / "run"
    optimizer = torch.optim.AdamW([p for p in spy.model.parameters() if p.requires_grad], lr=LR)
    for epoch, step in ((9, 90), (10, 100)):
        metrics = [{"epoch": e, "stage": (e - 1) // EPS, "global_step": 10 * e} for e in range(1, epoch + 1)]
        save_checkpoint(new_run, epoch, spy.model, optimizer, global_step=step, metrics=metrics, log=None)
    args = [a for a in args if not a.startswith(("save_path=", "num_epochs=", "debug=", "export_hf="))]
    with spying(Spy()) as resumed:
        assert main(args + [f"save_path={tmp_path}", "num_epochs=12", "eval_every_epoch=false",
                            "keep_checkpoints=0"]) == 0
    assert len(resumed.of("train")) == 2 * 2 * 2  # epochs 11 and 12: 2 steps of 2 micro-batches each
    metrics = [json.loads(line) for line in (new_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 13))
    assert [m["global_step"] for m in metrics[-2:]] == [102, 104]
    assert [m["stage"] for m in metrics[-2:]] == [10 // EPS, 11 // EPS]
    assert "mc_accuracy" not in metrics[-2] and metrics[-1]["mc_accuracy"] is not None
    assert sorted(p.name for p in new_run.glob("checkpoint_*")) == [f"checkpoint_{e}" for e in (10, 11, 12, 9)]


def test_debug_writes_no_checkpoint_and_export_hf_loads_with_from_pretrained(accumulation_run):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    spy, run, _ = accumulation_run
    assert not list(run.glob("checkpoint_*"))
    hf = InternVLForConditionalGeneration.from_pretrained(run / "hf_model")
    loaded = hf.state_dict()
    final = {k.removeprefix("base_model."): v for k, v in spy.model.state_dict().items()}
    assert loaded.keys() == final.keys()
    for k in final:
        assert torch.equal(loaded[k], final[k]), k
    vocab = AutoTokenizer.from_pretrained(run / "hf_model").get_vocab()
    assert {"<|start-latent|>", "<|end-latent|>", "<|latent|>"} <= vocab.keys()


@pytest.fixture(scope="module")
def only_eval_runs(accumulation_run, data, tmp_path_factory):
    """The accumulation run's final weights evaluated three ways: wrapper keys (one process), bare backbone keys
    (as the original Coconut's stage-0 model) with 2 DataLoader workers (one process), bare keys under torchrun with
    2 processes."""
    from safetensors.torch import save_file

    spy, run, _ = accumulation_run
    data_dir, _ = data
    save = tmp_path_factory.mktemp("only_eval")
    wrapper_keys = save / "wrapper_keys.safetensors"
    save_file({k: v.contiguous() for k, v in spy.model.state_dict().items()}, wrapper_keys)
    bare_keys = save / "bare_keys.safetensors"
    save_file({k.removeprefix("base_model."): v.contiguous() for k, v in spy.model.state_dict().items()}, bare_keys)
    common = dict(only_eval="true", eval_batch_size=4, max_new_tokens=8)
    spies = {}
    for name, path, workers in (("wrapper", wrapper_keys, 0), ("bare", bare_keys, 2)):
        with spying(Spy()) as spies[name]:
            assert main(overrides(data_dir, save, name=name, load_model_path=path, num_workers=workers,
                                  **common)) == 0
    args = overrides(data_dir, save, name="two", load_model_path=bare_keys, **common)[1:]
    run_cli(args, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(30500 + os.getpid() % 1000)])
    return spies, save


def run_cli(args, launcher):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = launcher + [str(ROOT / "run.py"), DEMO, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_only_eval_loads_weights_and_two_processes_predict_as_one(only_eval_runs, accumulation_run, data):
    spies, save = only_eval_runs
    trained = accumulation_run[0].model.state_dict()
    for spy in spies.values():  # the evaluated model holds the loaded weights (wrapper keys and bare keys alike)
        assert not spy.of("train") and not spy.steps
        got = spy.model.state_dict()
        assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)
    _, records = data
    qids = [r["question_id"] for r in records["val"]]
    predictions = {n: json.loads((save / n / "predictions_val_epoch1.json").read_text()) for n in
                   ("wrapper", "bare", "two")}
    assert sorted(predictions["wrapper"]) == sorted(qids)
    assert predictions["bare"] == predictions["wrapper"] and predictions["two"] == predictions["wrapper"]
    metrics = {n: json.loads((save / n / "metrics.jsonl").read_text()) for n in predictions}
    for key in ("mc_accuracy", "da_accuracy"):
        assert metrics["two"][key] == metrics["bare"][key] == metrics["wrapper"][key] is not None


def test_load_model_path_accepts_the_exported_hf_weights(accumulation_run, data, tmp_path):
    _, run, _ = accumulation_run
    data_dir, _ = data
    assert main(overrides(data_dir, tmp_path, only_eval="true", max_val_samples=1, max_new_tokens=2,
                          load_model_path=run / "hf_model" / "model.safetensors")) == 0
