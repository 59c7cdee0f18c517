import json
import re
import runpy
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal_coconut.builtin_data import COLORS, SHAPES, generate_builtin, main

FIELDS = ["split", "image_id", "question_id", "question", "choices", "correct_choice_idx", "direct_answers",
          "difficult_direct_answer", "rationales", "steps"]
TEST_FIELDS = ["split", "image_id", "question_id", "question", "choices", "difficult_direct_answer"]
SIZES = {"train": 2000, "val": 200, "test": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    paths = generate_builtin(out, SIZES, seed=0)
    return out, {s: json.loads(p.read_text()) for s, p in paths.items()}


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    small = {"train": 60, "val": 10, "test": 5}
    a, b, c = (_files_after(tmp_path / n, small, seed) for n, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert len(a) == 60 + 10 + 5 + 3 + 1
    assert a == b
    assert a.keys() == c.keys()
    differ = [k for k in a if a[k] != c[k]]
    assert Path("aokvqa_v1p0_train.json") in differ and sum(k.suffix == ".jpg" for k in differ) > 50


def _files_after(out, splits, seed):
    generate_builtin(out, splits, seed=seed)
    return _files(out)


def test_aokvqa_format(data):
    out, recs = data
    assert {s: len(r) for s, r in recs.items()} == SIZES
    qids, image_ids = set(), set()
    for split, rs in recs.items():
        for r in rs:
            assert list(r) == (TEST_FIELDS if split == "test" else FIELDS)
            assert r["split"] == split and r["difficult_direct_answer"] is False
            assert isinstance(r["image_id"], int) and isinstance(r["question_id"], str)
            assert isinstance(r["question"], str) and r["question"].endswith("?")
            vocab = set(COLORS) if "color" in r["question"] else set(SHAPES)
            assert len(r["choices"]) == 4 and set(r["choices"]) == vocab
            qids.add(r["question_id"])
            image_ids.add(r["image_id"])
            with Image.open(out / f"{split}2017" / f"{r['image_id']:012d}.jpg") as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
            if split == "test":
                continue
            answer = r["choices"][r["correct_choice_idx"]]
            assert r["direct_answers"] == [answer] * 10
            assert len(r["rationales"]) == 3 and all(isinstance(x, str) and x for x in r["rationales"])
            assert 1 <= len(r["steps"]) <= 4 and all(isinstance(x, str) and x for x in r["steps"])
            assert answer in r["steps"][-1]
    n = sum(SIZES.values())
    assert len(qids) == n and len(image_ids) == n  # unique across splits too


def _qtype(r):
    return "color" if "color" in r["question"] else "shape", len(r["steps"])


def test_answers_not_guessable_from_text(data):
    _, recs = data
    train, val = recs["train"], recs["val"]
    steps = Counter(len(r["steps"]) for r in train)
    assert sorted(steps) == [1, 2, 3, 4] and max(steps.values()) / len(train) <= 0.27

    by_type = defaultdict(list)
    for r in train:
        by_type[_qtype(r)].append(r)
    assert len(by_type) == 8
    for qtype, rs in by_type.items():
        top_idx = Counter(r["correct_choice_idx"] for r in rs).most_common(1)[0][1] / len(rs)
        top_ans = Counter(r["direct_answers"][0] for r in rs).most_common(1)[0][1] / len(rs)
        assert top_idx <= 0.30 and top_ans <= 0.30, (qtype, top_idx, top_ans)

    # Strongest blind predictor: the majority train answer for the exact question text.
    per_text = defaultdict(Counter)
    for r in train:
        per_text[r["question"]][r["direct_answers"][0]] += 1
    overall = Counter(r["direct_answers"][0] for r in train).most_common(1)[0][0]
    hits = [(per_text[r["question"]].most_common(1)[0][0] if r["question"] in per_text else overall)
            == r["direct_answers"][0] for r in val]
    blind = sum(hits) / len(hits)
    print(f"blind majority-per-question on val: {blind:.3f} ({len(per_text)} distinct train questions)")
    assert blind <= 0.40


# ---- pixel oracle: read the scene off the decoded JPEG, answer the question by parsing its text ----

def read_scene(path):
    """(color, shape) of the one object, from the pixels: probing points at fixed offsets from the centre."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    size = px.shape[0]
    r = 0.375 * size
    palette = {name: np.array(rgb) for name, rgb in COLORS.items()}

    def at(dx, dy):
        return px[int(size / 2 + dy), int(size / 2 + dx)]

    centre = at(0, 0)
    color = min(palette, key=lambda k: np.abs(palette[k] - centre).sum())
    assert np.abs(palette[color] - centre).max() < 40, (path, centre)

    def filled(dx, dy):
        return np.abs(at(dx, dy) - palette[color]).sum() < np.abs(at(dx, dy) - 128).sum()

    if filled(-0.83 * r, -0.83 * r):  # top-left corner: only the square reaches it
        shape = "square"
    elif filled(-0.58 * r, 0.92 * r):  # near the bottom-left corner: the triangle's base
        shape = "triangle"
    elif filled(-0.5 * r, -0.5 * r):  # the diagonal: circle, not the cross's arms
        shape = "circle"
    else:
        shape = "cross"
    return color, shape


def oracle_answer(scene, question):
    """Answer from the pixels and the question text alone."""
    m = re.fullmatch(r"What is the (color|shape) of the object\?", question)
    if m:
        kind, cycle, hops = m[1], None, 0
    else:
        m = re.fullmatch(r"In the cycle (.+), which (color|shape) comes (\d) places? after the object's (\2)\?",
                         question)
        kind, cycle, hops = m[2], m[1].split(", "), int(m[3])
    value = scene[0 if kind == "color" else 1]
    if cycle is None:
        return value
    return cycle[(cycle.index(value) + hops) % len(cycle)]


def test_pixel_oracle_answers_every_question(data):
    out, recs = data
    for split in ("train", "val"):
        for r in recs[split]:
            scene = read_scene(out / f"{split}2017" / f"{r['image_id']:012d}.jpg")
            assert oracle_answer(scene, r["question"]) == r["choices"][r["correct_choice_idx"]], r
            # the first step names the object in the picture; the others walk the cycle
            assert r["steps"][0] == "The object is a {} {}.".format(*scene), (r["steps"], scene)
            assert len(r["steps"]) == 1 + (int(re.search(r"comes (\d)", r["question"])[1])
                                           if "cycle" in r["question"] else 0)


def test_oracle_at_other_image_size(tmp_path):
    paths = generate_builtin(tmp_path, {"train": 40}, seed=1, image_px=96)
    for r in json.loads(paths["train"].read_text()):
        path = tmp_path / "train2017" / f"{r['image_id']:012d}.jpg"
        assert Image.open(path).size == (96, 96)
        assert oracle_answer(read_scene(path), r["question"]) == r["choices"][r["correct_choice_idx"]]


def test_idempotent_refuses_other_settings_and_regenerates_when_asked(tmp_path):
    paths = generate_builtin(tmp_path, {"train": 30, "val": 5}, seed=0)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert generate_builtin(tmp_path, {"val": 5, "train": 30}, seed=0) == paths
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes

    # Other settings: an error naming the directory and what differs; nothing is touched.
    with pytest.raises(FileExistsError, match=rf"{tmp_path}.*seed 0 -> 1, splits .*'train': 30.*'train': 20.*"
                                              r"builtin_regenerate: true"):
        generate_builtin(tmp_path, {"train": 20, "val": 5}, seed=1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes

    generate_builtin(tmp_path, {"train": 20, "val": 5}, seed=0, regenerate=True)
    assert len(json.loads(paths["train"].read_text())) == 20
    assert len(list((tmp_path / "train2017").iterdir())) == 20  # no stale images left behind
    meta = json.loads((tmp_path / "builtin_meta.json").read_text())
    assert meta["splits"] == {"train": 20, "val": 5} and meta["seed"] == 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_refuses_foreign_aokvqa_dir(tmp_path):
    (tmp_path / "aokvqa_v1p0_train.json").write_text("[]")
    with pytest.raises(FileExistsError, match="not a built-in set"):
        generate_builtin(tmp_path, {"train": 4})
    with pytest.raises(ValueError, match="size"):
        generate_builtin(tmp_path / "x", {"train": 0})


def test_cli(tmp_path, capsys, monkeypatch):
    main(["--out", str(tmp_path / "a"), "--train", "8", "--val", "4", "--seed", "2"])
    assert "train:" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "a" / "aokvqa_v1p0_val.json").read_text())) == 4
    # `python -m` entry point, run in-process (a fresh interpreter would re-import torch via the package)
    monkeypatch.setattr(sys, "argv", ["builtin_data", "--out", str(tmp_path / "b"), "--train", "8", "--val", "4",
                                      "--seed", "2"])
    monkeypatch.delitem(sys.modules, "multimodal_coconut.builtin_data")  # run_module wants a fresh module
    runpy.run_module("multimodal_coconut.builtin_data", run_name="__main__")
    assert "val:" in capsys.readouterr().out
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
