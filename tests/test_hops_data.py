"""The hops task (builtin_data.py): a positive control whose answers need the steps.

Every question is parsed back (its own map, start and k) and chased here, independently of the generator; the maps
are single cycles; nothing repeats that a model could memorise; the data loads with step_nodes; both recipes load
and train a few steps; the default built-in set is unchanged.
"""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal_coconut.builtin_data import (HOPS_COLORS, Hops, builtin_mismatch, builtin_path, generate_builtin,
                                             main as builtin_main)
from multimodal_coconut.config import HOPS_MAX_NODES, Config, ConfigError, load_config
from multimodal_coconut.data import DataError, load_samples

ROOT = Path(__file__).resolve().parents[1]
QUESTION = re.compile(r"Arrows:(\S+)\. Start at (.+?) and follow (\d+) arrows?\. Which colour do you reach\?")


def parse(question):
    """(successor map, start or None when it is the image's, k) from the question's text alone."""
    m = QUESTION.fullmatch(question)
    assert m, question
    edges = [e.split(">") for e in m[1].split(",")]
    succ = dict(edges)
    assert len(succ) == len(edges), question  # one arrow out of each node
    start = None if m[2] == "the object's colour" else m[2]
    return succ, start, int(m[3]), [a for a, _ in edges]


def chase(succ, node, k):
    walk = [node]
    for _ in range(k):
        walk.append(succ[walk[-1]])
    return walk


def generate(out, hops, splits=None, seed=0):
    paths = generate_builtin(out, splits or {"train": 240, "val": 24}, seed=seed, hops=hops)
    return {s: json.loads(p.read_text()) for s, p in paths.items()}


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("hops_text")
    return out, generate(out, Hops(k=3, nodes=6, text=True))


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("hops")
    return out, generate(out, Hops(k=3, nodes=6, text=False), {"train": 240, "val": 24, "test": 4})


def test_every_answer_and_step_follows_the_questions_own_map(text_set, image_set):
    names = list(HOPS_COLORS)[:6]
    for variant, (_, recs) in (("text", text_set), ("image", image_set)):
        for r in recs["train"] + recs["val"]:
            succ, start, k, _ = parse(r["question"])
            assert k == 3 and set(succ) == set(succ.values()) == set(names)
            # a single cycle through all nodes: from any node, n arrows come back and fewer never do
            cycle = chase(succ, names[0], 6)
            assert cycle[-1] == names[0] and len(set(cycle[:-1])) == 6, (variant, r["question"])
            if variant == "image":
                start = r["step_nodes"][0]  # what the image shows: checked against the pixels below
                answer = r["choices"][r["correct_choice_idx"]]
                assert r["direct_answers"] == [answer] * 10
            else:
                answer = r["answer"]
            walk = chase(succ, start, k)
            assert walk[-1] == answer and len(set(walk)) == k + 1  # never back at the start, nor anywhere twice
            nodes = walk[1:] if variant == "text" else walk
            assert r["step_nodes"] == nodes
            # arrow style (the default): each step restates the node it leaves, then the one it reaches
            arrows = [f"{a}>{b}." for a, b in zip(walk, walk[1:])]
            assert r["steps"] == (arrows if variant == "text" else [f"object>{start}.", *arrows])


def test_node_style_opens_with_the_node_reached(tmp_path):
    for text in (True, False):
        recs = generate(tmp_path / str(text), Hops(k=2, nodes=5, step_style="node", text=text), {"train": 40})
        for r in recs["train"]:
            succ, start, k, _ = parse(r["question"])
            walk = chase(succ, start or r["step_nodes"][0], k)
            assert r["step_nodes"] == (walk[1:] if text else walk)
            assert r["steps"] == [f"{n}." for n in r["step_nodes"]]


def test_the_image_shows_the_start(image_set):
    out, recs = image_set
    palette = {name: np.array(rgb) for name, rgb in list(HOPS_COLORS.items())[:6]}
    for split in ("train", "val", "test"):
        for r in recs[split]:
            px = np.asarray(Image.open(out / f"{split}2017" / f"{r['image_id']:012d}.jpg").convert("RGB"), float)
            centre = px[32, 32]
            seen = min(palette, key=lambda c: np.abs(palette[c] - centre).sum())
            assert np.abs(palette[seen] - centre).max() < 40
            assert "the object's colour" in r["question"]
            if split != "test":
                assert r["step_nodes"][0] == seen and len(r["steps"]) == 4
    test = recs["test"][0]  # no answers in the test split, as in A-OKVQA's
    assert not {"correct_choice_idx", "direct_answers", "steps", "step_nodes", "rationales"} & set(test)


def test_maps_differ_across_questions(text_set):
    _, recs = text_set
    rs = recs["train"]
    maps = Counter(frozenset(parse(r["question"])[0].items()) for r in rs)
    orders = {tuple(parse(r["question"])[3]) for r in rs}
    # 5! = 120 cycles of 6 nodes: 240 questions draw ~105 distinct ones; no map is a recurring lookup
    assert len(maps) >= 90 and max(maps.values()) <= 8, (len(maps), maps.most_common(1))
    # 6! = 720 written orders: 240 draws give ~204 distinct ones (a fixed order would give 1)
    assert len(orders) >= 180, len(orders)
    assert len({r["question"] for r in rs}) >= len(rs) - 2


def test_balanced_starts_answers_and_positions(text_set, image_set):
    block = 6 * 5 * 4  # start x answer x position among 4 choices
    _, text = text_set
    _, image = image_set
    for rs in (text["train"][:block], image["train"][:block], image["train"][block:2 * block]):
        starts = Counter(r["step_nodes"][0] if "choices" in r else parse(r["question"])[1] for r in rs)
        assert set(starts.values()) == {block // 6}
        if "choices" in rs[0]:
            answers = Counter(r["choices"][r["correct_choice_idx"]] for r in rs)
            positions = Counter(r["correct_choice_idx"] for r in rs)
            assert set(positions.values()) == {block // 4} and set(answers.values()) == {block // 6}
            for r in rs:  # the start is never among the choices: it is never the answer, and would give that away
                assert len(r["choices"]) == 4 == len(set(r["choices"])) and r["step_nodes"][0] not in r["choices"]
        else:
            pairs = Counter((parse(r["question"])[1], r["answer"]) for r in rs)
            assert len(pairs) == 30 and set(pairs.values()) == {4}


def test_one_seed_gives_both_variants_the_same_questions(text_set, image_set):
    (_, text), (_, image) = text_set, image_set
    for t, i in zip(text["train"], image["train"]):
        assert parse(t["question"])[0] == parse(i["question"])[0]
        assert t["answer"] == i["choices"][i["correct_choice_idx"]] and t["step_nodes"] == i["step_nodes"][1:]


def test_deterministic_by_seed(tmp_path):
    def files(d):
        return {p.relative_to(d): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}

    small = {"train": 20, "val": 4}
    for text in (True, False):
        a, b, c = (tmp_path / f"{name}{text}" for name in "abc")
        for out, seed in ((a, 5), (b, 5), (c, 6)):
            generate(out, Hops(text=text), small, seed)
        a, b, c = files(a), files(b), files(c)
        assert a == b and a.keys() == c.keys() and a != c
        assert len(a) == (3 if text else 20 + 4 + 3)  # json files and meta (and images)


def test_default_builtin_set_is_unchanged(tmp_path):
    """The shapes set, byte for byte as before the hops task existed (sha256 of its files, names and bytes)."""
    generate_builtin(tmp_path, {"train": 40, "val": 8, "test": 4}, seed=0)
    h = hashlib.sha256()
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(tmp_path)).encode())
            h.update(p.read_bytes())
    assert h.hexdigest() == "6e20fd7be2427b99d64b7bae1d9f6ac39ebc43466add5b1f95cab8f7a489a743"


def test_other_task_or_settings_in_the_same_folder_are_refused(tmp_path):
    generate_builtin(tmp_path, {"train": 8}, seed=0)
    with pytest.raises(FileExistsError, match=r"task 'shapes' -> 'hops'.*k None -> 3"):
        generate_builtin(tmp_path, {"train": 8}, seed=0, hops=Hops())
    assert builtin_mismatch(tmp_path, {"train": 8}, seed=0) is None
    generate_builtin(tmp_path, {"train": 8}, seed=0, hops=Hops(text=True), regenerate=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin_meta.json", "hops_text_train.json"]
    assert "step_style 'arrow' -> 'node'" in builtin_mismatch(tmp_path, {"train": 8}, 0, hops=Hops(step_style="node",
                                                                                                      text=True))
    assert builtin_mismatch(tmp_path, {"train": 8}, seed=0).startswith("task 'hops_text' -> 'shapes', version 1 -> 3")
    with pytest.raises(ValueError, match=r"hops k must be .* \[1, nodes // 2 = 3\], got 4"):
        Hops(k=4, nodes=6)
    with pytest.raises(ValueError, match="hops nodes"):
        Hops(nodes=HOPS_MAX_NODES + 1)
    assert len(HOPS_COLORS) == HOPS_MAX_NODES


def test_both_variants_load_with_step_nodes(text_set, image_set, tmp_path):
    out, recs = image_set
    samples = load_samples("builtin", out / "aokvqa_v1p0_val.json", image_root=None)
    assert [s.step_nodes for s in samples] == [r["step_nodes"] for r in recs["val"]]
    assert Path(samples[0].image).is_file() and len(samples[0].steps) == 4
    assert all(s.step_nodes is None for s in load_samples("builtin", out / "aokvqa_v1p0_test.json", image_root=None))
    out, recs = text_set
    samples = load_samples("coconut", builtin_path(out, "val", Hops(text=True)), image_root=None)
    assert [(s.step_nodes, s.answer, s.image) for s in samples] == [(r["step_nodes"], r["answer"], None)
                                                                     for r in recs["val"]]
    # the general jsonl format carries them too; a wrong count is an error naming the field
    rows = [{"question": "q", "steps": ["a.", "b."], "answer": "b", "step_nodes": ["a", "b"]},
            {"question": "q", "steps": ["a."], "answer": "a"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [s.step_nodes for s in load_samples("jsonl", tmp_path / "x.jsonl", image_root=None)] == [["a", "b"], None]
    rows[1]["step_nodes"] = ["a", "b"]
    for name, fmt in (("x.jsonl", "jsonl"), ("x.json", "coconut")):
        (tmp_path / name).write_text(json.dumps(rows))
        with pytest.raises(DataError, match=r"field 'step_nodes': 2 nodes for 1 steps"):
            load_samples(fmt, tmp_path / name, image_root=None)


def test_cli(tmp_path, capsys):
    builtin_main(["--out", str(tmp_path), "--train", "6", "--val", "2", "--task", "hops_text", "--hops-k", "2",
                  "--hops-step-style", "arrow"])
    assert "hops_text_val.json" in capsys.readouterr().out
    meta = json.loads((tmp_path / "builtin_meta.json").read_text())
    assert meta == {"version": 1, "task": "hops_text", "seed": 0, "k": 2, "nodes": 6, "step_style": "arrow",
                    "splits": {"train": 6, "val": 2}}


# -- configs -------------------------------------------------------------------------------------------------------


def test_configs_load_and_bad_hops_keys_are_errors():
    mm = load_config(ROOT / "args" / "hops.yaml", check_paths=False)
    text = load_config(ROOT / "args" / "hops_text.yaml", check_paths=False)
    assert (mm.builtin_task, mm.model_id, mm.dataset, mm.coconut) == ("hops", "tiny", "builtin", True)
    assert (text.builtin_task, text.model_id, text.dataset, text.coconut) == ("hops_text", "tiny-text", "builtin", True)
    for path in ("hops.yaml", "hops_text.yaml"):
        assert (ROOT / "args" / path).read_text().startswith(f"# python run.py args/{path}\n")
    # The text recipe on a user's own file: the hops keys stay valid and play no part.
    own = load_config(ROOT / "args" / "hops_text.yaml", ["dataset=coconut", "train_path=a.json", "val_path=b.json"],
                      check_paths=False)
    assert own.dataset == "coconut" and own.train_path == "a.json"
    for overrides, message in [
        (["hops_k=4"], r"key 'hops_k' must be in \[1, hops_nodes // 2 = 3\], got 4"),
        (["hops_nodes=9"], r"key 'hops_nodes' must be in \[3, 8\]"),
        (["builtin_task=hops"], r"builtin_task: hops' reads the start off an image.*tiny-text"),
        (["builtin_task=shapes", "hops_k=2"], r"key\(s\) 'hops_k' set, but 'builtin_task' is 'shapes'"),
        (["hops_step_style=edge"], r"key 'hops_step_style' expects one of 'node', 'arrow'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "args" / "hops_text.yaml", overrides, check_paths=False)
    assert Config(dataset="builtin").builtin_task == "shapes"


def test_paths_that_are_not_the_generated_files_are_an_error(tmp_path):
    from multimodal_coconut.distributed import DistEnv
    from multimodal_coconut.train import prepare_builtin

    cfg = Config(dataset="builtin", builtin_task="hops_text", model_id="tiny-text", builtin_train_size=8,
                 builtin_val_size=4, train_path=str(tmp_path / "train.json"),
                 val_path=str(tmp_path / "hops_text_val.json"))
    with pytest.raises(ConfigError, match=r"key 'train_path' is .*train.json, but builtin_task 'hops_text' writes"):
        prepare_builtin(cfg, DistEnv())
    cfg.train_path = str(tmp_path / "hops_text_train.json")
    prepare_builtin(cfg, DistEnv())
    assert cfg.dataset == "coconut"  # read and scored as the original Coconut's files
    assert len(json.loads((tmp_path / "hops_text_train.json").read_text())) == 8


def _tiny_run(config, tmp_path, *extra):
    from multimodal_coconut.cli import main

    data = tmp_path / "data"
    files = {"hops.yaml": ("aokvqa_v1p0_train.json", "aokvqa_v1p0_val.json"),
             "hops_text.yaml": ("hops_text_train.json", "hops_text_val.json")}[config]
    args = [str(ROOT / "args" / config), f"save_path={tmp_path}", "name=run", f"train_path={data / files[0]}",
            f"val_path={data / files[1]}", "builtin_train_size=16", "builtin_val_size=4", "batch_size_training=8",
            "epochs_per_stage=1", "num_epochs=2", "max_new_tokens=8", "num_examples_to_print=0", *extra]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [0, 1]
    return metrics


def test_the_text_recipe_trains_and_is_scored_as_coconut(tmp_path):
    metrics = _tiny_run("hops_text.yaml", tmp_path)
    assert {"accuracy", "cot_accuracy"} <= set(metrics[-1])
    saved = json.loads(next((tmp_path / "run").glob("checkpoint_*/coconut.json")).read_text())
    assert saved["config"]["dataset"] == "coconut" and saved["config"]["builtin_task"] == "hops_text"


def test_the_multimodal_recipe_trains(tmp_path):
    metrics = _tiny_run("hops.yaml", tmp_path, "image_root=" + str(tmp_path / "data"))
    assert {"mc_accuracy", "da_accuracy"} <= set(metrics[-1])
