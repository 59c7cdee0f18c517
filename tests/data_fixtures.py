"""Small A-OKVQA fixture files: records in the official v1p0 json + COCO-layout JPEGs, and the hub's parquet copy."""

import copy
import io
import json
from pathlib import Path

from PIL import Image

# image_id -> (width, height). With the tiny backbone (64px tiles, up to 4 tiles): 1 tile, 2+thumbnail, 4+thumbnail.
SIZES = {101: (64, 64), 102: (130, 60), 103: (128, 128)}

RECORDS = [
    {
        "split": "train", "image_id": 101, "question_id": "qA",
        "question": "What color is the circle?",
        "choices": ["red", "green", "blue", "yellow"], "correct_choice_idx": 2,
        "direct_answers": ["blue", "navy", "navy", "blue", "blue", "navy", "sky", "blue", "navy", "teal"],
        "difficult_direct_answer": False,
        "rationales": ["The circle is blue. It sits on the left.", "Its fill is blue.", "It looks blue to me."],
    },
    {
        "split": "train", "image_id": 102, "question_id": "qB",
        "question": "Which shape is left of the square?",
        "choices": ["circle", "cross", "triangle", "square"], "correct_choice_idx": 0,
        "direct_answers": ["circle"] * 6 + ["disk"] * 4,
        "difficult_direct_answer": True,
        "rationales": ["The left shape is round! So it is a circle.", "A circle is there.", "Round means circle."],
    },
    {
        "split": "train", "image_id": 103, "question_id": "qC",
        "question": "How many shapes are red?",
        "choices": ["one", "two", "three", "four"], "correct_choice_idx": 1,
        "direct_answers": ["2"] * 10,
        "difficult_direct_answer": False,
        "rationales": ["Two shapes are red.", "I count two red ones.", "There are 2 red shapes."],
    },
]


def jpeg_bytes(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_aokvqa(root: Path, records=None, split="train", sizes=None) -> tuple[Path, Path]:
    """Write aokvqa_v1p0_{split}.json and {root}/coco/{split}2017/{image_id:012d}.jpg; return (json, image_root)."""
    records = copy.deepcopy(RECORDS if records is None else records)
    sizes = SIZES if sizes is None else sizes
    image_root = root / "coco"
    (image_root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    for r in records:
        if "image_id" in r and r["image_id"] in sizes:
            path = image_root / f"{split}2017" / f"{r['image_id']:012d}.jpg"
            path.write_bytes(jpeg_bytes(sizes[r["image_id"]], color=(10 * (r["image_id"] % 20), 120, 30)))
        r["split"] = split
    path = root / f"aokvqa_v1p0_{split}.json"
    path.write_text(json.dumps(records))
    return path, image_root


def write_hf_parquet(root: Path, json_path: Path, image_root: Path, split_name="train") -> Path:
    """The hub's HuggingFaceM4/A-OKVQA schema: image {bytes, path}, direct_answers as a string (the list's repr),
    no image_id / split columns. Written with `datasets`, as the hub's export is; images are the COCO files' bytes."""
    from datasets import Dataset, Features, Image as ImageFeature, List, Value

    records = json.loads(Path(json_path).read_text())
    split = "val" if split_name == "validation" else split_name
    features = Features({
        "image": ImageFeature(),
        "question_id": Value("string"),
        "question": Value("string"),
        "choices": List(Value("string")),
        "correct_choice_idx": Value("int8"),
        "direct_answers": Value("string"),
        "difficult_direct_answer": Value("bool"),
        "rationales": List(Value("string")),
    })
    columns = {name: [] for name in features}
    for r in records:
        image_file = image_root / f"{split}2017" / f"{r['image_id']:012d}.jpg"
        columns["image"].append({"bytes": image_file.read_bytes(), "path": None})
        columns["question_id"].append(r["question_id"])
        columns["question"].append(r["question"])
        columns["choices"].append(r["choices"])
        columns["correct_choice_idx"].append(r.get("correct_choice_idx"))
        da = r.get("direct_answers")
        columns["direct_answers"].append(None if da is None else str(da))
        columns["difficult_direct_answer"].append(r["difficult_direct_answer"])
        columns["rationales"].append(r.get("rationales"))
    out = root / "hf" / f"{split_name}-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(out))
    return out
