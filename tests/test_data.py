"""Data sources: A-OKVQA json + COCO images, the hub's parquet copy, the built-in set; bad records."""

import dataclasses
import json

import pytest

from data_fixtures import RECORDS, SIZES, write_aokvqa, write_hf_parquet
from multimodal_coconut.builtin_data import generate_builtin
from multimodal_coconut.curriculum import CoconutDataset, Mode
from multimodal_coconut.data import DataError, Sample, SkipReport, load_samples, open_image


def test_official_json_fields_steps_and_image_layout(tmp_path):
    path, root = write_aokvqa(tmp_path)
    samples = load_samples("aokvqa", path, image_root=root)
    assert [s.question_id for s in samples] == ["qA", "qB", "qC"]
    a = samples[0]
    assert a.image == str(root / "train2017" / "000000000101.jpg")
    assert a.question == "What color is the circle?" and a.choices == ["red", "green", "blue", "yellow"]
    assert a.correct_choice_idx == 2 and a.answer == "blue" and a.split == "train"
    assert a.steps == RECORDS[0]["rationales"]  # default: each rationale is one step
    assert a.direct_answers == RECORDS[0]["direct_answers"] and a.difficult_direct_answer is False
    assert open_image(a).size == SIZES[101] and open_image(a).mode == "RGB"


def test_steps_from_and_answer_from(tmp_path):
    path, root = write_aokvqa(tmp_path)
    first = load_samples("aokvqa", path, image_root=root, steps_from="first_rationale_sentences")
    assert first[0].steps == ["The circle is blue.", "It sits on the left."]
    assert first[1].steps == ["The left shape is round!", "So it is a circle."]
    assert load_samples("aokvqa", path, image_root=root, steps_from="none")[0].steps == []
    direct = load_samples("aokvqa", path, image_root=root, answer_from="direct", max_samples=2)
    # qA: "blue" and "navy" both 4 times -> the one listed first; qB: "circle" 6 of 10
    assert [s.answer for s in direct] == ["blue", "circle"]


def test_record_steps_win_and_builtin_set(tmp_path):
    paths = generate_builtin(tmp_path / "bi", {"train": 6, "test": 2}, seed=3)
    samples = load_samples("builtin", paths["train"], image_root=None, steps_from="none")
    records = json.loads(paths["train"].read_text())
    assert [s.steps for s in samples] == [r["steps"] for r in records]
    assert [s.answer for s in samples] == [r["choices"][r["correct_choice_idx"]] for r in records]
    assert samples[0].image == str(tmp_path / "bi" / "train2017" / f"{records[0]['image_id']:012d}.jpg")
    # deterministic by seed: a second generation elsewhere gives the same samples (up to the folder)
    again = load_samples("builtin", generate_builtin(tmp_path / "bi2", {"train": 6, "test": 2}, seed=3)["train"],
                         image_root=None)
    strip = lambda s: dataclasses.replace(s, image=s.image.rsplit("/", 2)[1:], source="")  # noqa: E731
    assert [strip(s) for s in again] == [strip(s) for s in samples]
    test = load_samples("builtin", paths["test"], image_root=None)
    assert all(s.answer is None and s.correct_choice_idx is None and s.steps == [] for s in test)


def test_hf_parquet_equals_official_json(tmp_path):
    pytest.importorskip("datasets")
    path, root = write_aokvqa(tmp_path)
    parquet = write_hf_parquet(tmp_path, path, root)
    from_json = load_samples("aokvqa", path, image_root=root)
    from_hf = load_samples("aokvqa_hf", parquet, image_root=None)
    assert len(from_hf) == 3
    for j, h in zip(from_json, from_hf):
        assert isinstance(h.image, bytes) and h.image == open(j.image, "rb").read()
        assert dataclasses.replace(h, image=None, source="") == dataclasses.replace(j, image=None, source="")
        assert open_image(h).tobytes() == open_image(j).tobytes()
    assert from_hf[0].direct_answers == RECORDS[0]["direct_answers"]  # parsed from the hub's string column
    # the folder form, and hub split names ("validation" -> val)
    assert load_samples("aokvqa_hf", parquet.parent, image_root=None) == from_hf
    val_json, _ = write_aokvqa(tmp_path, split="val")
    val = write_hf_parquet(tmp_path, val_json, root, split_name="validation")
    assert {s.split for s in load_samples("aokvqa_hf", val, image_root=None)} == {"val"}
    with pytest.raises(DataError, match="several splits"):
        load_samples("aokvqa_hf", parquet.parent, image_root=None)


def test_test_split_loads_for_prediction_not_training(tmp_path, tiny):
    test_records = [{k: v for k, v in r.items() if k not in ("correct_choice_idx", "direct_answers", "rationales")}
                    for r in RECORDS]
    path, root = write_aokvqa(tmp_path, test_records, split="test")
    samples = load_samples("aokvqa", path, image_root=root)
    assert all(s.answer is None and s.steps == [] and s.split == "test" for s in samples)
    assert samples[0].image.endswith("test2017/000000000101.jpg")
    pytest.importorskip("datasets")
    parquet = write_hf_parquet(tmp_path, path, root, split_name="test")
    assert [s.answer for s in load_samples("aokvqa_hf", parquet, image_root=None)] == [None] * 3

    mode = Mode(coconut=True, max_latent_stage=2)
    with pytest.raises(DataError, match=r"aokvqa_v1p0_test\.json.*'qA'.*'answer'.*not trained"):
        CoconutDataset(samples, tiny, mode, 1, train=True, max_length=4096, seed=0, epoch=0)
    with pytest.raises(DataError, match="not trained"):  # skipping would drop the whole split: still an error
        CoconutDataset(samples, tiny, mode, 1, train=True, max_length=4096, seed=0, epoch=0, skip_bad_records=True)
    prompts = CoconutDataset(samples, tiny, mode, 2, train=False, max_length=4096, seed=0, epoch=0)
    # steps unknown: the prompt gets the scheduled number of thoughts
    assert prompts[0]["input_ids"].count(tiny.latent_id) == 2 and prompts[0]["labels"] is None


def _edit(records, qid, **changes):
    out = json.loads(json.dumps(records))
    for r in out:
        if r["question_id"] == qid:
            for k, v in changes.items():
                if v is ...:
                    del r[k]
                else:
                    r[k] = v
    return out


@pytest.mark.parametrize("change, field, reason", [
    (dict(choices=...), "choices", "missing field"),
    (dict(correct_choice_idx=4), "correct_choice_idx", "correct_choice_idx out of range"),
    (dict(correct_choice_idx=-1), "correct_choice_idx", "correct_choice_idx out of range"),
    (dict(question="  "), "question", "empty question"),
    (dict(rationales=...), "rationales", "missing field"),
    (dict(direct_answers="bus"), "direct_answers", "bad field"),
])
def test_bad_records_error_or_counted_skip(tmp_path, change, field, reason):
    path, root = write_aokvqa(tmp_path, _edit(RECORDS, "qB", **change))
    with pytest.raises(DataError) as e:
        load_samples("aokvqa", path, image_root=root)
    assert str(path) in str(e.value) and "'qB'" in str(e.value) and f"'{field}'" in str(e.value)
    assert (e.value.file, e.value.question_id, e.value.field) == (str(path), "qB", field)
    report = SkipReport()
    samples = load_samples("aokvqa", path, image_root=root, skip_bad_records=True, report=report)
    assert [s.question_id for s in samples] == ["qA", "qC"]
    assert report.counts == {reason: 1} and "qB" in report.summary() and report.summary().startswith(
        f"skipped records: 1 ({reason}: 1)")


def test_unknown_split_is_an_error(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{k: v for k, v in RECORDS[0].items() if k != "split"}]))
    with pytest.raises(DataError, match=r"questions\.json: question_id 'qA': field 'split'"):
        load_samples("aokvqa", path, image_root=tmp_path)


def test_image_problems_found_at_construction(tmp_path, tiny):
    path, root = write_aokvqa(tmp_path)
    (root / "train2017" / "000000000102.jpg").unlink()
    (root / "train2017" / "000000000103.jpg").write_bytes(b"not a jpeg")
    samples = load_samples("aokvqa", path, image_root=root)  # images are not opened when loading
    mode = Mode(coconut=True)
    with pytest.raises(DataError) as e:
        CoconutDataset(samples, tiny, mode, 0, train=True, max_length=4096, seed=0, epoch=0)
    assert "000000000102.jpg" in str(e.value) and "'qB'" in str(e.value) and "'image'" in str(e.value)
    assert "not found" in str(e.value)
    with pytest.raises(DataError, match=r"000000000103\.jpg: question_id 'qC': field 'image': cannot decode"):
        open_image(samples[2])
    report = SkipReport()
    kw = dict(train=True, max_length=4096, seed=0, epoch=0, skip_bad_records=True, report=report)
    ds = CoconutDataset(samples, tiny, mode, 0, **kw)
    assert [ds[i]["idx"] for i in range(len(ds))] == [0]  # idx: position in the list given
    CoconutDataset(samples, tiny, mode, 1, **kw)  # the next epoch's dataset meets the same records: counted once
    assert report.counts == {"missing image": 1, "unreadable image": 1} and report.total == 2


def test_too_long_is_an_error_or_counted_skip(tmp_path, tiny):
    path, root = write_aokvqa(tmp_path)
    samples = load_samples("aokvqa", path, image_root=root)
    mode = Mode(coconut=True)
    full = CoconutDataset(samples, tiny, mode, 0, train=True, max_length=4096, seed=0, epoch=0)
    limit = sorted(full.lengths)[1]  # qC (5 tiles) is the longest
    with pytest.raises(DataError, match=rf"question_id 'qC': field 'max_length': .* \(5 image tiles x 16\).*{limit}"):
        CoconutDataset(samples, tiny, mode, 0, train=True, max_length=limit, seed=0, epoch=0)
    report = SkipReport()
    ds = CoconutDataset(samples, tiny, mode, 0, train=True, max_length=limit, seed=0, epoch=0,
                        skip_bad_records=True, report=report)
    assert len(ds) == 2 and report.counts == {"too long": 1}


def test_skip_report_summary():
    report = SkipReport(max_examples=1)
    assert report.summary() == "skipped records: none"
    report.add(DataError("x", file="f.json", question_id="q1", field="image", reason="missing image"))
    report.add(DataError("x", file="f.json", question_id="q1", field="image", reason="missing image"))
    report.add(DataError("y", file="f.json", question_id="q2", field="question", reason="empty question"))
    assert report.summary().splitlines() == [
        "skipped records: 2 (empty question: 1, missing image: 1)",
        "  e.g. f.json: question_id 'q1': field 'image': x",
    ]


def test_open_image_without_image():
    s = Sample("q", None, "Why?", ["a"], 0, ["a"], False, [], "a", "train", "f.json", 0)
    with pytest.raises(DataError, match="f.json: question_id 'q': field 'image'"):
        open_image(s)


def test_torchvision_and_pil_processors_make_the_same_tiles():
    """The processor used when torchvision is installed (GotOcr2ImageProcessor) tiles as the PIL one: the same grid
    (12 tiles of 448 px + thumbnail for a 640x480 photo) and pixel values within 0.04 after ImageNet normalisation
    (about 2/255 of a pixel: the resampling filters differ in rounding). Runs where torchvision is installed (not on
    CI's CPU-only torch 2.13, which has no matching torchvision wheel)."""
    pytest.importorskip("torchvision")
    import io

    import numpy as np
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from multimodal_coconut.backbone import _image_processor, image_processor_class
    from multimodal_coconut.curriculum import image_tiles

    assert image_processor_class().__name__ == "GotOcr2ImageProcessor"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 480.0
    base = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(1, 6))
                     for _ in range(3)], -1)
    pixels = (base * 90 + 128 + rng.normal(0, 18, (480, 640, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    # 640x480 at 448 px: a 4x3 grid + thumbnail; the built-in set's 64 px square at 64 px: one tile (no thumbnail)
    for size, img, n_tiles in ((448, image, 13), (64, image.resize((64, 64)), 1)):
        fast = image_tiles(img, _image_processor(size))
        pil = image_tiles(img, _image_processor(size, cls=GotOcr2ImageProcessorPil))
        assert fast.shape == pil.shape == (n_tiles, 3, size, size)
        assert (fast - pil).abs().max() < 0.04, (size, float((fast - pil).abs().max()))
