"""Evaluation: answer extraction, choice mapping, and scores equal to A-OKVQA's official scoring."""

import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from multimodal_coconut.builtin_data import generate_builtin
from multimodal_coconut.evaluate import (clean_direct_answer, extract_answer, gather_generations, make_predictions,
                                         map_to_choice, normalize_answer, score, write_predictions)
from official_aokvqa_eval import main_scores


def test_extract_answer():
    assert extract_answer("The cup is at the top left.\nIt is red.\n### red") == "red"
    assert extract_answer("### blue\nextra text") == "blue"
    assert extract_answer("a ### b ### green  ") == "green"  # the last marker wins
    assert extract_answer("### yellow<|im_end|>### red", eos_token="<|im_end|>") == "yellow"
    assert extract_answer("###circle") == "circle"
    assert extract_answer("steps\n### ") == ""  # cut off right after the marker
    # no marker: the last non-empty line
    assert extract_answer("first line\n  the answer is cat  \n\n") == "the answer is cat"
    assert extract_answer("") == ""


def test_normalize_and_map_to_choice():
    assert normalize_answer("The Two  Dogs.") == "2 dogs"
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("3.5") == "3.5"
    choices = ["red car", "2 dogs", "a cat", "tree"]
    assert map_to_choice("tree", choices) == "tree"
    assert map_to_choice("Red Car.", choices) == "red car"
    assert map_to_choice("two dogs", choices) == "2 dogs"
    assert map_to_choice("the cat", choices) == "a cat"
    assert map_to_choice("trees", choices) == "tree"  # nearest by character similarity
    assert map_to_choice("", choices) == "red car"  # all ratios 0: the first choice
    assert map_to_choice("ab", ["xa", "xb"]) == "xa"  # tie: the first
    with pytest.raises(ValueError):
        map_to_choice("x", [])


def record(qid, choices, correct, direct, difficult=False):
    return {"split": "val", "image_id": 1, "question_id": qid, "question": "?", "choices": choices,
            "correct_choice_idx": correct, "direct_answers": direct, "difficult_direct_answer": difficult,
            "rationales": ["r1", "r2", "r3"]}


def varied_case():
    ch = ["red", "green", "blue", "yellow"]
    records = [
        record("q0", ch, 0, ["red"] * 10),                                  # MC right, DA 10/10
        record("q1", ch, 1, ["green"] * 9 + ["blue"]),                      # MC wrong, DA 1/10 -> 1/3
        record("q2", ch, 2, ["blue"] * 8 + ["navy"] * 2),                   # MC right, DA 2/10 -> 2/3
        record("q3", ch, 3, ["gold"] * 3 + ["yellow"] * 7),                 # MC wrong (not a choice), DA 3/10 -> 1
        record("q4", ch, 0, ["red"] * 10, difficult=True),                  # difficult: MC counted, DA not
        record("q5", ch, 1, ["green"] * 10, difficult=True),
        record("q6", ch, 2, ["blue"] * 10),                                 # no prediction at all: 0 for both
        record("q7", ch, 3, ["yellow"] * 10),                               # MC only; DA missing -> 0
        record("q8", ch, 0, ["Red"] * 5 + ["red"] * 5),                     # DA exact strings: "red" matches 5
    ]
    preds = {
        "q0": {"multiple_choice": "red", "direct_answer": "red"},
        "q1": {"multiple_choice": "blue", "direct_answer": "blue"},
        "q2": {"multiple_choice": "blue", "direct_answer": "navy"},
        "q3": {"multiple_choice": "gold", "direct_answer": "gold"},
        "q4": {"multiple_choice": "red", "direct_answer": "wrong"},
        "q5": {"multiple_choice": "red", "direct_answer": "green"},
        "q7": {"multiple_choice": "yellow"},
        "q8": {"multiple_choice": "Red", "direct_answer": "red"},          # MC is case-sensitive: wrong
        "not_in_split": {"multiple_choice": "red", "direct_answer": "red"},  # ignored
    }
    return records, preds


def test_score_equals_official_on_varied_predictions():
    records, preds = varied_case()
    official = main_scores(records, preds)
    ours = score(records, preds)
    assert ours["mc_accuracy"] == official["MC"] and ours["da_accuracy"] == official["DA"]
    # by hand: MC right on q0 q2 q4 q7 of 9 questions; DA over the 7 non-difficult ones
    assert ours["n_mc"] == 9 and ours["n_da"] == 7
    assert ours["mc_accuracy"] == pytest.approx(4 / 9 * 100)
    assert ours["da_accuracy"] == pytest.approx((1 + 1 / 3 + 2 / 3 + 1 + 0 + 0 + 1) / 7 * 100)


def test_score_settings_and_errors():
    records, preds = varied_case()
    only_mc = {q: {"multiple_choice": p["multiple_choice"]} for q, p in preds.items()}
    assert main_scores(records, only_mc).keys() == {"MC"}
    assert score(records, only_mc)["da_accuracy"] is None  # the official script prints no DA either
    assert score(records, preds, direct_answer=False) == {"mc_accuracy": score(records, preds)["mc_accuracy"],
                                                          "da_accuracy": None, "n_mc": 9, "n_da": None}
    assert score(records, {})["mc_accuracy"] is None
    test_records = [{k: v for k, v in r.items() if k not in ("correct_choice_idx", "direct_answers", "rationales")}
                    for r in records]
    with pytest.raises(ValueError, match="test split"):
        score(test_records, preds)
    with pytest.raises(TypeError, match="unified format"):
        score(records, {"q0": "red"})
    with pytest.raises(ValueError, match="twice"):
        score(records + records[:1], preds)
    with pytest.raises(ValueError, match="difficult_direct_answer"):
        score([{k: v for k, v in records[0].items() if k != "difficult_direct_answer"}], preds)


def test_builtin_pipeline_matches_official_file_scoring(tmp_path):
    paths = generate_builtin(tmp_path / "data", {"val": 12, "test": 4}, seed=1, image_px=16)
    val = json.loads(paths["val"].read_text())
    # generations: right, wrong, free text near a choice, missing format, and one question not generated
    generated = {}
    for i, r in enumerate(val[:-1]):
        answer = r["choices"][r["correct_choice_idx"]]
        wrong = r["choices"][(r["correct_choice_idx"] + 1) % 4]
        generated[r["question_id"]] = [f"step one.\n### {answer}<eos>junk", f"### {wrong}",
                                       f"### The {answer.upper()}.", answer][i % 4]
    preds = make_predictions(val, generated, eos_token="<eos>")
    assert len(preds) == 11 and val[-1]["question_id"] not in preds
    first = preds[val[0]["question_id"]]
    assert first == {"multiple_choice": val[0]["choices"][val[0]["correct_choice_idx"]],
                     "direct_answer": val[0]["choices"][val[0]["correct_choice_idx"]]}
    assert preds[val[2]["question_id"]]["multiple_choice"] == val[2]["choices"][val[2]["correct_choice_idx"]]
    file = write_predictions(tmp_path / "run" / "predictions_val_epoch1.json", preds)
    official = main_scores(json.loads(paths["val"].read_text()), json.loads(file.read_text()))
    ours = score(val, preds)
    assert (ours["mc_accuracy"], ours["da_accuracy"]) == (official["MC"], official["DA"])
    assert ours["mc_accuracy"] == pytest.approx(8 / 12 * 100)  # 3 right of every 4, the 12th not generated

    # test split: predictions are made and written, scoring refuses
    test = json.loads(paths["test"].read_text())
    test_preds = make_predictions(test, {r["question_id"]: f"### {r['choices'][1]}" for r in test})
    assert all(p["multiple_choice"] == r["choices"][1] for p, r in zip(test_preds.values(), test))
    with pytest.raises(ValueError, match="cannot be scored"):
        score(test, test_preds)
    with pytest.raises(ValueError, match="not among the samples"):
        make_predictions(test[:1], {"other": "### red"})


def test_write_predictions_is_atomic_and_never_overwrites(tmp_path):
    path = tmp_path / "p.json"
    preds = {"q0": {"multiple_choice": "red", "direct_answer": "red"}}
    write_predictions(path, preds)
    assert json.loads(path.read_text()) == preds
    assert os.listdir(tmp_path) == ["p.json"]  # no temporary file left behind
    write_predictions(path, dict(preds))  # same content: nothing to do
    assert os.listdir(tmp_path) == ["p.json"]
    messages = []
    new = {"q0": {"multiple_choice": "blue", "direct_answer": "blue"}}
    write_predictions(path, new, log=messages.append)
    assert json.loads(path.read_text()) == new
    (aside,) = tmp_path.glob("p.json.replaced-*")  # the old predictions are kept, and said so
    assert json.loads(aside.read_text()) == preds and aside.name in messages[0]


def _gather_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = {f"q{i}": f"### r{rank}" for i in range(rank, 5, world_size)}
        local["q0"] = f"### dup from rank {rank}"  # padded duplicate: the lowest rank's text wins
        merged = gather_generations(local)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(merged, f)
    finally:
        dist.destroy_process_group()


def test_gather_generations(tmp_path):
    assert gather_generations({"a": "x"}) == {"a": "x"}  # no process group
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    merged = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert merged[0] == merged[1] == {"q0": "### dup from rank 0", "q1": "### r1", "q2": "### r0",
                                      "q3": "### r1", "q4": "### r0"}


# The rules of the VQA answer normalisation (visualqa.org/evaluation.html, vqaEval.py), on their own examples.
@pytest.mark.parametrize("raw, normal", [
    ("YES", "yes"), ("Red Car", "red car"),                                  # lower-case everything
    ("two", "2"), ("Ten", "10"), ("none", "0"),                              # number words -> digits
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"),             # articles dropped
    ("dogs.", "dogs"), ("3.5", "3.5"), ("it is 2.5 m.", "it is 2.5 m"),      # periods go, except a decimal point
    ("t-shirt", "t shirt"), ("black/white", "black white"),                  # punctuation inside a word: a space
    ("yes!", "yes"), ("what?", "what"), ("(left)", "left"),
    ("red , blue", "red blue"), ("hot dog ;", "hot dog"),                    # punctuation next to a space: removed
    ("100,978", "100978"),                                                   # a comma between digits: removed
    ("man's", "man's"), ("12:30", "12:30"),                                  # apostrophe and colon are kept
    ("  two   White  Dogs. ", "2 white dogs"),                               # whitespace collapsed
])
def test_normalize_answer_follows_the_vqa_rules(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("raw, written", [
    ("Red", "red"), ("RED.", "red"), ("  Light   Blue ", "light blue"), ("3.5", "3.5"), ("U.S.A.", "u.s.a"),
    ("The Cat.", "the cat"),
])
def test_clean_direct_answer_lowercases_and_drops_the_final_period(raw, written):
    assert clean_direct_answer(raw) == written


def test_predictions_normalise_the_direct_answer_and_map_the_choice():
    records = [record("q0", ["red car", "2 dogs", "a cat", "tree"], 1, ["2 dogs"] * 10),
               record("q1", ["red car", "2 dogs", "a cat", "tree"], 0, ["red car"] * 10)]
    preds = make_predictions(records, {"q0": "steps\n### TWO Dogs!", "q1": "### The Red Car."})
    assert preds == {"q0": {"multiple_choice": "2 dogs", "direct_answer": "two dogs!"},
                     "q1": {"multiple_choice": "red car", "direct_answer": "the red car"}}
