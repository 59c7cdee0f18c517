"""analyze on a text-only checkpoint (the data set's own accuracy; intact = the run's evaluation; attention skipped),
the per-thought ablations (only thought i and what follows it changes; every index at once = the all-thought
ablation), accuracy against the number of thoughts (the checkpoint's own stage = intact), and the probes (a planted
linear signal is found, random labels score chance; decoding hits; the thought -> step mapping)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.analyze import (ablation_hook, analyze_trained, index_hook, main, reached_node_share,
                                       thought_curve)
from multimodal_coconut.cli import main as run_main
from multimodal_coconut.config import Config
from multimodal_coconut.data import load_samples
from multimodal_coconut.evaluate import coconut_answer
from multimodal_coconut.inference import Trained, evaluate_trained, load_trained, prompt_loader, prompt_set
from multimodal_coconut.probe import decoding_probe, linear_probe, probe, probe_report, split_questions

ROOT = Path(__file__).resolve().parents[1]
PROSQA_VAL = ROOT / "tests" / "fixtures" / "prosqa" / "prosqa_valid.json"


@pytest.fixture(scope="module")
def text_val(tmp_path_factory):
    """4 of the ProsQA-format validation records (the analysis answers each question 15 times)."""
    path = tmp_path_factory.mktemp("prosqa_data") / "prosqa_valid4.json"
    path.write_text(json.dumps(json.loads(PROSQA_VAL.read_text())[:4]))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_val):
    """The original's prosqa config on tiny-text, one epoch without the curriculum: a checkpoint at stage 3, past
    max_latent_stage 2 (two thoughts per question), evaluated on `text_val`."""
    save = tmp_path_factory.mktemp("prosqa")
    assert run_main([str(ROOT / "args" / "prosqa_coconut.yaml"), f"save_path={save}", f"val_path={text_val}",
                     "num_epochs=1", "curriculum=false", "max_latent_stage=2", "num_workers=0", "max_new_tokens=8",
                     "lr=1e-5", "batch_size_training=8"]) == 0
    return save / "prosqa-coconut"


@pytest.fixture(scope="module")
def text_trained(text_run):
    return load_trained(text_run)


@pytest.fixture(scope="module")
def text_samples(text_trained, text_val):
    return load_samples(text_trained.config.dataset, text_val, image_root=None)


def planted(trained, samples):
    """The samples with their answers replaced by what the checkpoint answers: intact accuracy is 100%, so an
    ablation or another number of thoughts that changes an answer shows as a real drop."""
    generated = evaluate_trained(trained, samples)["generated"]
    return [dataclasses.replace(s, answer=coconut_answer(generated[s.question_id])) for s in samples]


def fed_thoughts(model, batch, hook=None):
    """The thoughts fed at the latent positions of a prompt batch, (B, n, C) (every row has n latents here)."""
    out = model(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"], thought_hook=hook)
    is_latent = batch["input_ids"] == model.latent_token_id
    n = int(is_latent.sum(1)[0])
    assert (is_latent.sum(1) == n).all()
    return out.inputs_embeds[is_latent].view(is_latent.shape[0], n, -1)


# --- a text-only checkpoint, end to end -------------------------------------------------------------------------


def test_text_checkpoint_analysis_end_to_end(text_run, text_val, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main([str(text_run), "--data", str(text_val), "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    last = [json.loads(line) for line in (text_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["metrics"] == ["accuracy"] and result["stage"] == last["stage"] == 3
    assert result["ablations"]["intact"]["accuracy"] == last["accuracy"]  # the run's own evaluation
    assert set(result["ablations"]) == {"intact", "zero", "noise", "shuffle", "pause"}
    assert result["n_samples"] == 4 and result["thoughts_per_question"] == 2
    assert {name: [r["thought"] for r in rows] for name, rows in result["ablations_per_thought"].items()} == {
        "zero": [1, 2], "shuffle": [1, 2], "pause": [1, 2]}
    assert all(0 <= r["accuracy"] <= 100 and r["written_tokens"] > 0
               for rows in result["ablations_per_thought"].values() for r in rows)
    # Stage 3 prompts as stage 2 (max_latent_stage) does: that point is the checkpoint's, with its max_new_tokens;
    # below it the model has steps to write, and more room to write them.
    curve = result["thought_curve"]
    points = curve["points"]
    assert curve["checkpoint_stage"] == 2
    assert [(p["stage"], p["thoughts"], p["checkpoint"]) for p in points] == [(0, 0, False), (1, 1, False),
                                                                            (2, 2, True)]
    assert points[2]["max_new_tokens"] == 8 and points[0]["max_new_tokens"] > points[1]["max_new_tokens"] > 8
    assert {k: points[2][k] for k in ("accuracy", "written_tokens")} == result["ablations"]["intact"]
    assert "text-only" in result["attention"]["skipped"] and "step_nodes" in result["probe"]["skipped"]
    md = (out / "analysis.md").read_text()
    assert "Skipped: a text-only language model" in md and "| 2 (checkpoint) | 2.00 |" in md
    for name in ("ablations.png", "ablations_per_thought.png", "thought_curve.png", "norms.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "attention_layers.png").exists() and not (out / "probe.png").exists()
    assert f"intact accuracy {last['accuracy']}" in capsys.readouterr().out


def test_curve_at_the_checkpoints_stage_is_intact_and_other_stages_differ(text_trained, text_samples):
    samples = planted(text_trained, text_samples)
    curve = thought_curve(text_trained, samples, ["accuracy"])
    own = [p for p in curve["points"] if p["checkpoint"]]
    assert [p["stage"] for p in own] == [2] and own[0]["accuracy"] == 100 and own[0]["thoughts"] == 2
    assert min(p["accuracy"] for p in curve["points"]) < 100  # fewer thoughts change some answer


def test_reached_node_share_scores_the_node_the_stages_thoughts_stand_for():
    """Stage s's answers against step_nodes[s - 1], as normalize_answer matches words; questions with fewer than s
    steps, or without step_nodes, are left out; stage 0 (no thought) and data without nodes give None."""
    class S:
        def __init__(self, qid, nodes):
            self.question_id, self.step_nodes = qid, nodes

    samples = [S("a", ["red", "blue", "green"]), S("b", ["blue", "red", "pink"]), S("c", ["red"]), S("d", None)]
    answers = {"a": "Blue.", "b": "red", "c": "red", "d": "blue"}
    assert reached_node_share(samples, answers, 0) is None
    assert reached_node_share(samples, answers, 1) == 33.33  # a: blue != red; b: red != blue; c: hit
    assert reached_node_share(samples, answers, 2) == 100.0  # a and b; c has one step
    assert reached_node_share(samples, {"a": "green"}, 3) == 50.0  # b has no answer: a miss
    assert reached_node_share(samples, answers, 4) is None
    assert reached_node_share([S("d", None)], answers, 1) is None


# --- per-thought ablations ----------------------------------------------------------------------------------------


def test_replacing_thought_i_changes_it_and_the_later_ones_only(text_trained, text_samples):
    model = text_trained.model
    [batch] = prompt_loader(text_trained, prompt_set(text_trained, text_samples))
    intact = fed_thoughts(model, batch)  # (4, 2, C)
    assert intact.shape[:2] == (4, 2)
    shuffled_1 = fed_thoughts(model, batch, index_hook("shuffle", model, [1]))
    torch.testing.assert_close(shuffled_1[:, 0], intact[:, 0].roll(1, dims=0))  # another question's thought 1
    assert (shuffled_1[:, 1] - intact[:, 1]).abs().amax(-1).min() > 1e-3  # thought 2 computed from it
    for name in ("zero", "shuffle", "pause"):
        second = fed_thoughts(model, batch, index_hook(name, model, [2]))
        assert torch.equal(second[:, 0], intact[:, 0])  # the earlier thought untouched
        assert (second[:, 1] - intact[:, 1]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(fed_thoughts(model, batch, index_hook("shuffle", model, [2]))[:, 1],
                               intact[:, 1].roll(1, dims=0))
    assert index_hook("intact", model, [1]) is None


def test_every_index_ablated_is_the_all_thought_ablation(text_trained, text_samples):
    model = text_trained.model
    [batch] = prompt_loader(text_trained, prompt_set(text_trained, text_samples))
    for name in ("zero", "noise", "shuffle", "pause"):
        torch.testing.assert_close(fed_thoughts(model, batch, index_hook(name, model, [1, 2], seed=3)),
                                   fed_thoughts(model, batch, ablation_hook(name, model, seed=3)), rtol=0, atol=0)


# --- probes -----------------------------------------------------------------------------------------------------


def planted_features(n, dim, n_classes, seed, signal):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(n_classes, (n,), generator=g)
    means = torch.randn(n_classes, dim, generator=g)
    x = signal * means[labels] + torch.randn(n, dim, generator=g)
    return x, [f"node{int(c)}" for c in labels]


def test_linear_probe_finds_a_planted_signal_and_not_random_labels():
    x, y = planted_features(240, 32, 5, seed=0, signal=2.0)
    found = linear_probe(x[:120], y[:120], x[120:], y[120:])
    assert found["accuracy"] >= 0.95 and found["chance"] < 0.4 and found["n_classes"] == 5
    assert found["n_fit"] == found["n_test"] == 120 and found["n_test_unseen"] == 0
    _, random_labels = planted_features(240, 32, 5, seed=1, signal=0.0)  # labels independent of x
    chance = linear_probe(x[:120], random_labels[:120], x[120:], random_labels[120:])
    majority = max(random_labels[120:].count(c) for c in set(random_labels[120:])) / 120
    assert chance["chance"] == majority
    assert abs(chance["accuracy"] - 0.2) < 0.12  # 5 classes: near 1/5, far from the planted 95%


def test_split_is_deterministic_disjoint_and_covers():
    fit, test = split_questions(list(range(11)), seed=0)
    assert (fit, test) == split_questions(list(range(11)), seed=0)
    assert fit | test == set(range(11)) and not fit & test and len(fit) == 5
    assert split_questions(list(range(11)), seed=1)[0] != fit


class Sample:  # what the probe reads of a sample
    def __init__(self, i, steps, step_nodes):
        self.question_id, self.steps, self.step_nodes = f"q{i}", steps, step_nodes


def test_probe_reads_thought_j_against_the_node_of_step_j_div_c():
    """c_thought 2: thoughts 1-2 stand for step 1, 3-4 for step 2. Thought 1 encodes step 1's node, thought 3 step 2's
    node; thoughts 2 and 4 are noise. Half the questions have no step_nodes."""
    n, dim = 200, 24
    x1, nodes1 = planted_features(n, dim, 4, seed=0, signal=2.0)
    x3, nodes2 = planted_features(n, dim, 4, seed=1, signal=2.0)
    g = torch.Generator().manual_seed(2)
    thoughts = {i: torch.stack([x1[i], torch.randn(dim, generator=g), x3[i], torch.randn(dim, generator=g)])
                for i in range(n)}
    samples = [Sample(i, ["a", "b"], [nodes1[i], nodes2[i]]) for i in range(n)]
    samples += [Sample(n + i, ["a", "b"], None) for i in range(10)]
    thoughts.update({n + i: torch.randn(4, dim, generator=g) for i in range(10)})
    tops = {i: [["x"]] * 4 for i in thoughts}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [0]
    result = probe(thoughts, tops, samples, Tok(), c_thought=2, seed=0)
    assert result["n_questions"] == n and result["n_without_step_nodes"] == 10
    acc = {r["thought"]: r for r in result["linear"]["per_index"]}
    assert acc[1]["accuracy"] >= 0.9 and acc[3]["accuracy"] >= 0.9
    for j in (2, 4):  # noise: about chance (the held-out majority share), far below the planted thoughts
        assert acc[j]["accuracy"] < 0.45 and acc[j]["chance"] < 0.4
    assert [r["n"] for r in result["decoding"]["per_index"]] == [n] * 4

    samples[0].step_nodes = ["only one"]
    with pytest.raises(ValueError, match="1 step_nodes for 2 steps"):
        probe(thoughts, tops, samples, Tok(), c_thought=2)
    none = [Sample(i, ["a"], None) for i in range(3)]
    assert "step_nodes" in probe({i: torch.zeros(1, 4) for i in range(3)}, {}, none, Tok(), 1)["skipped"]


def test_probe_tells_a_thought_one_hop_behind_from_one_on_time():
    """Three steps, one thought each; thoughts 2 and 3 hold the node of the step before theirs (the node their step
    starts from), thought 1 noise. The `previous` probe reads them; the probe of their own step's node does not, and
    thought 1 has no previous step. Decoding likewise: the top-1 token is the previous node."""
    n, dim = 200, 24
    x1, nodes1 = planted_features(n, dim, 4, seed=0, signal=2.0)
    x2, nodes2 = planted_features(n, dim, 4, seed=1, signal=2.0)
    _, nodes3 = planted_features(n, dim, 4, seed=3, signal=0.0)
    g = torch.Generator().manual_seed(2)
    thoughts = {i: torch.stack([torch.randn(dim, generator=g), x1[i], x2[i]]) for i in range(n)}
    samples = [Sample(i, ["a", "b", "c"], [nodes1[i], nodes2[i], nodes3[i]]) for i in range(n)]
    tops = {i: [["x"], [nodes1[i]], [nodes2[i]]] for i in range(n)}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [0]
    result = probe(thoughts, tops, samples, Tok(), c_thought=1, seed=0)
    own = {r["thought"]: r for r in result["linear"]["per_index"]}
    prev = {r["thought"]: r for r in result["previous"]["linear"]["per_index"]}
    assert "skipped" in prev[1] and [r["thought"] for r in result["previous"]["decoding"]["per_index"]] == [2, 3]
    for j in (2, 3):
        assert prev[j]["accuracy"] >= 0.9 and own[j]["accuracy"] < 0.45
    assert [r["top1"] for r in result["previous"]["decoding"]["per_index"]] == [1.0, 1.0]
    own_top1 = [r["top1"] for r in result["decoding"]["per_index"]]
    assert own_top1[0] == 0.0 and max(own_top1[1:]) < 0.45  # "x" is never a node; nodes of independent draws
    report = "\n".join(probe_report(result, 5))
    assert "starts from" in report and "| 1 | - | - | - |" in report


def test_decoding_probe_hits_multi_token_nodes_and_chance(text_trained):
    tok = text_trained.backbone.tokenizer
    assert len(tok.encode(" wumpus", add_special_tokens=False)) == 1
    multi = "qzxv"
    pieces = [tok.decode([i]) for i in tok.encode(" " + multi, add_special_tokens=False)]
    assert pieces[:2] == [" ", "q"]  # the first non-blank piece is "q"
    first = "Q"
    tops = {0: [[" wumpus", "is"], ["is", first]],  # thought 1: top-1 hit; thought 2: the multi-token node's first piece
            1: [["is", " Wumpus"], ["is", "."]],  # thought 1: top-2 hit (case and space ignored); thought 2: miss
            2: [["yumpus", "is"], ["x", "y"]]}
    nodes = {0: ["wumpus", multi], 1: ["wumpus", multi], 2: ["rompus", "zumpus"]}
    result = decoding_probe(tops, nodes, tok)
    one, two = result["per_index"]
    assert (one["thought"], one["n"], one["top1"], one["top_k"]) == (1, 3, 1 / 3, 2 / 3)
    assert (two["top1"], two["top_k"]) == (0, 1 / 3)
    # chance: question 0 against question 1's node (wumpus: hit), 1 against 2's (rompus: miss), 2 against 0's (miss)
    assert one["top_k_other_question"] == 1 / 3
    assert result["n_multi_token_nodes"] == 1 and result["multi_token_nodes"] == [multi]


# --- a multimodal checkpoint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_val(tmp_path_factory):
    from multimodal_coconut.builtin_data import generate_builtin

    out = tmp_path_factory.mktemp("builtin")
    generate_builtin(out, {"val": 8}, seed=0)
    return out / "aokvqa_v1p0_val.json"


def test_multimodal_analysis_with_step_nodes(tiny, builtin_val, tmp_path):
    """The tiny InternVL (random weights) at stage 2, on the built-in set with step_nodes planted (the colour word of
    each step; questions of one step and of more): MC / DA, attention, the curve and both probes."""
    cfg = Config(dataset="builtin", model_id="tiny", coconut=True, max_latent_stage=2, c_thought=1,
                 max_new_tokens=4, image_size=64, max_num_patches=4, batch_size_training=4)
    model = MultimodalCoconut(tiny.model, tiny.latent_id, tiny.start_latent_id, tiny.end_latent_id,
                              tiny.eos_token_id).eval()
    trained = Trained(model=model, backbone=tiny, config=cfg, stage=2, path=Path("tiny"))
    samples = load_samples("builtin", builtin_val, image_root=None)
    samples = [s for s in samples if len(s.steps) == 1][:2] + [s for s in samples if len(s.steps) > 1][:2]
    for s in samples:
        s.step_nodes = [s.steps[i].split()[-1].strip(".") for i in range(len(s.steps))]
    result = analyze_trained(trained, samples, tmp_path, data=builtin_val, per_thought=False)  # as the text test
    assert result["metrics"] == ["mc_accuracy", "da_accuracy"]
    intact = evaluate_trained(trained, samples)
    assert result["ablations"]["intact"]["mc_accuracy"] == intact["mc_accuracy"]
    n_latents = [min(len(s.steps), 2) for s in samples]
    assert n_latents == [1, 1, 2, 2] and result["thoughts_per_question"] == 1.5
    assert result["ablations_per_thought"] == {"skipped": "--no-per-thought"}
    points = result["thought_curve"]["points"]
    assert [p["thoughts"] for p in points] == [0, 1, 1.5]
    assert "answers_reached_node" not in points[0] and all(0 <= p["answers_reached_node"] <= 100 for p in points[1:])
    assert {k: points[2][k] for k in ("mc_accuracy", "da_accuracy", "written_tokens")} == \
        result["ablations"]["intact"]
    assert len(result["attention"]["image_share"]) == 2
    dec = result["probe"]["decoding"]["per_index"]
    assert [(r["thought"], r["n"]) for r in dec] == [(1, 4), (2, 2)]
    assert [r["thought"] for r in result["probe"]["linear"]["per_index"]] == [1, 2]
    for name in ("probe.png", "thought_curve.png", "attention_layers.png", "attention_image.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "ablations_per_thought.png").exists()
    assert "Skipped: --no-per-thought." in (tmp_path / "analysis.md").read_text()


def test_thought_use_line_reports_intact_and_shuffled_accuracy(text_trained, text_samples, text_run, text_val, capsys):
    """The demo's last line: intact and shuffled accuracy as evaluate_trained gives them, their gap, and a reading.
    With planted answers (intact 100%) the shuffled accuracy is whatever another question's thoughts leave right."""
    from multimodal_coconut.analyze import ablation_hook, thought_use
    from multimodal_coconut.inference import evaluate_trained

    samples = planted(text_trained, text_samples)
    shuffled = evaluate_trained(text_trained, samples, thought_hook=ablation_hook("shuffle", text_trained.model))
    line = thought_use(text_trained, samples)
    assert line.startswith(f"accuracy with the thoughts intact 100.0%, with another question's thoughts "
                           f"{shuffled['accuracy']:.1f}% (a gap of {100 - shuffled['accuracy']:+.1f} points): ")
    assert main([str(text_run), "--data", str(text_val), "--thought-use"]) == 0
    assert "with the thoughts intact" in capsys.readouterr().out


def test_chain_accuracy_counts_the_written_lines_right_through_each_step():
    """scripts/chain_accuracy.py: question q is right through step i when its first i written lines are its first i
    steps (stripped); a question with fewer steps counts once all of its are right."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_accuracy", ROOT / "scripts" / "chain_accuracy.py")
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)

    class S:
        def __init__(self, qid, steps):
            self.question_id, self.steps = qid, steps

    samples = [S("a", ["object>red.", "red>blue.", "blue>pink."]), S("b", ["object>red.", "red>blue.", "blue>pink."]),
               S("c", ["object>red.", "red>blue.", "blue>pink."]), S("d", ["x>y."])]
    generated = {"a": "object>red.\nred>blue.\nblue>pink.\n### pink", "b": "object>red.\n red>blue. \nblue>red.\n### red",
                 "c": "object>green.\ngreen>red.\nred>blue.\n### blue", "d": "x>y.\n### y"}
    assert chain.chain_right_through(samples, generated) == [75.0, 75.0, 50.0]


def test_hops_written_chain_counts_the_first_node_and_the_lookups_from_written_nodes(tmp_path):
    """scripts/hops_written_chain.py at stage 1 (hop 1 a thought): the first written node against step 2's node, and
    whether each written node is the question's successor of the one before (only questions writing two or more)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hops_written_chain", ROOT / "scripts" / "hops_written_chain.py")
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)

    question = "Arrows:red>blue,blue>green,green>red. Start at red and follow 3 arrows. Which colour do you reach?"
    record = {"question": question, "steps": ["blue.", "green.", "red."], "answer": "red",
              "step_nodes": ["blue", "green", "red"]}
    data = tmp_path / "hops_text_val.json"
    data.write_text(json.dumps([record] * 4))
    outputs = ["green.\nred.\n### red",          # right from the thought on
               "red.\nblue.\n### blue",          # a wrong first node, then the map followed
               "blue>red.\nred>green.\n### green",  # arrows: the node reached is after '>'; red's successor is blue
               "green.\n### green"]              # right, but one written node: no lookup to check
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({f"hops_text_val_{i}": {"output": o} for i, o in enumerate(outputs)}))
    assert chain.main([str(predictions), "--data", str(data), "--stage", "1"]) == {
        "questions": 4, "stage": 1, "first_written_node_right": 50.0, "written_chain_follows_the_map": 66.7,
        "questions_with_two_written_nodes": 3}
