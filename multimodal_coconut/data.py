"""Data sources: A-OKVQA (official json + COCO images, or the HF parquet copy), the built-in set, and your own data.

    samples = load_samples("aokvqa", "data/aokvqa/aokvqa_v1p0_train.json", image_root="data/coco")
    samples = load_samples("aokvqa_hf", "data/A-OKVQA/data/train-00000-of-00002.parquet", image_root=None)
    samples = load_samples("builtin", "data/generated/builtin/aokvqa_v1p0_train.json", image_root=None)
    samples = load_samples("coconut", "data/prosqa_train.json", image_root=None)     # the original Coconut's json
    samples = load_samples("jsonl", "data/scienceqa/train.jsonl", image_root="data/scienceqa/images")

Every source becomes a list of `Sample`s: question, choices, answers, the reasoning `steps` and a reference to the
image (a file path, or the encoded bytes embedded in the parquet file). Images are never decoded here; the
curriculum dataset (curriculum.py) opens their headers to count tiles and decodes them in DataLoader workers.

Steps. The built-in set has ordered `steps`, and a record's own `steps` field always wins. A-OKVQA has none: its
`rationales` are three annotators' independent explanations of the same answer, not a sequence. `steps_from`:

* `rationales` (default): each rationale is one step. Each is a complete justification on its own, so the
  curriculum replaces whole explanations one at a time; at stage k the model must have absorbed k of the three
  explanations into continuous thoughts and still writes the others. This keeps all the annotated reasoning, gives
  every sample exactly 3 steps (so `max_latent_stage: 3` is the natural curriculum) and makes no assumption about
  sentence structure.
* `first_rationale_sentences`: the first rationale split into sentences, an ordered chain of 1-4 short steps, closer
  to the original Coconut's step-by-step chains but dropping two thirds of the annotation.
* `none`: no steps (a question -> answer baseline under any curriculum).

Any record with its own `steps` may also carry `step_nodes`, one string per step: what that step arrives at (the
hops task of builtin_data.py writes them; analyze.py's probe reads them as the targets of the thoughts). They are
checked (one per step) and kept in `Sample.step_nodes`, else None.

Answers: `answer_from: choice` trains on `choices[correct_choice_idx]`; `direct` on the most common of the ten
direct answers (ties go to the one listed first). The test split has no answers: its samples have `answer=None`
and can be predicted but not trained on.

Your own data. `coconut`: the original Coconut's files unchanged, a JSON list of {"question", "steps", "answer"}
(other fields ignored), text only; the question ids are `{file stem}_{index}`. `jsonl`: a JSON list or JSON Lines of
{"id", "image", "question", "choices", "answer", "steps"}, where only "question" (and "answer", to train or score) is
required; "image" is a path under `image_root` (default: the data file's folder) and rows without one are text only;
with "choices", "answer" is the correct choice's text or 0-based index. How each is scored: evaluate.py.

Bad records (a missing or malformed field, `correct_choice_idx` out of range, an empty question) raise `DataError`
naming the file, the question_id and the field; with `skip_bad_records=True` they are skipped and counted in a
`SkipReport` instead. Nothing is ever dropped silently.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .evaluate import normalize_answer

SPLITS = ("train", "val", "test")
_HF_SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class DataError(ValueError):
    """A record or image that cannot be used. `file`, `question_id` and `field` say where (any may be None)."""

    def __init__(self, message: str, *, file: str | None = None, question_id: str | None = None,
                 field: str | None = None, reason: str = "bad record"):
        where = ": ".join(x for x in (file, f"question_id {question_id!r}" if question_id is not None else None,
                                      f"field '{field}'" if field else None) if x)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.question_id, self.field, self.reason = file, question_id, field, reason


@dataclass
class SkipReport:
    """Records skipped under `skip_bad_records`, counted by reason, with the first few messages as examples.

    A record is counted once per (reason, file, question_id) however many times it is met, so one report can be
    shared by the datasets rebuilt every epoch.
    """

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, error: DataError) -> None:
        key = (error.reason, error.file, error.question_id)
        if key in self._seen:
            return
        self._seen.add(key)
        self.counts[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped records: none"
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        lines = [f"skipped records: {self.total} ({by_reason})", *(f"  e.g. {e}" for e in self.examples)]
        return "\n".join(lines)


def raise_or_skip(error: DataError, skip: bool, report: SkipReport | None) -> None:
    """Raise `error`, or count it in `report` when skipping bad records."""
    if not skip:
        raise error
    if report is not None:
        report.add(error)


@dataclass
class Sample:
    """One question. `image` is a file path, the encoded image bytes (parquet) or None (text only)."""

    question_id: str
    image: str | bytes | None
    question: str
    choices: list[str]
    correct_choice_idx: int | None  # None in the test split
    direct_answers: list[str] | None  # None in the test split
    difficult_direct_answer: bool
    steps: list[str]
    answer: str | None  # the training target; None in the test split
    split: str | None = None  # train / val / test
    source: str = ""  # the data file the record came from (for error messages)
    row: int | None = None  # index of the record in that file
    step_nodes: list[str] | None = None  # what each step arrives at (the hops task), one per step; None if unknown

    def image_name(self) -> str:
        """The image as error messages name it: its path, or the record's place in the parquet file."""
        if isinstance(self.image, str):
            return self.image
        return f"{self.source} (row {self.row}, embedded image)"


def _read_image(sample: Sample, read, failure: str):
    """`read(PIL image)` on the sample's image; a missing or unreadable image is a DataError naming file and question."""
    if sample.image is None:
        raise DataError("the sample has no image", file=sample.source, question_id=sample.question_id,
                        field="image", reason="missing image")
    try:
        with Image.open(sample.image if isinstance(sample.image, str) else io.BytesIO(sample.image)) as img:
            return read(img)
    except FileNotFoundError:
        raise DataError("image file not found", file=sample.image_name(), question_id=sample.question_id,
                        field="image", reason="missing image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{failure} ({e})", file=sample.image_name(), question_id=sample.question_id,
                        field="image", reason="unreadable image") from None


def open_image(sample: Sample) -> Image.Image:
    """Decode the sample's image as RGB (convert() loads the pixels, so decoding errors surface here)."""
    return _read_image(sample, lambda img: img.convert("RGB"), "cannot decode the image")


def image_size(sample: Sample) -> tuple[int, int]:
    """(width, height) from the image header alone (no decoding)."""
    return _read_image(sample, lambda img: img.size, "not a readable image")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_samples(
    dataset: str,
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None,
    steps_from: str = "rationales",
    answer_from: str = "choice",
    skip_bad_records: bool = False,
    max_samples: int | None = None,
    report: SkipReport | None = None,
) -> list[Sample]:
    """Read one split of `dataset` ("aokvqa", "aokvqa_hf", "builtin", "coconut" or "jsonl") into Samples, in file order.

    The split (train / val / test) is the record's `split` field, else the file name (`aokvqa_v1p0_{split}.json`,
    or `{train,validation,test}-*.parquet` as the hub names them). Images of aokvqa are
    `{image_root}/{split}2017/{image_id:012d}.jpg`; the built-in set keeps them beside its json, which is the
    default `image_root`. `max_samples` keeps the first N records (before any is skipped).
    """
    if steps_from not in ("rationales", "first_rationale_sentences", "none"):
        raise ValueError(f"steps_from must be 'rationales', 'first_rationale_sentences' or 'none', got {steps_from!r}")
    if answer_from not in ("choice", "direct"):
        raise ValueError(f"answer_from must be 'choice' or 'direct', got {answer_from!r}")
    path = os.fspath(path)
    if dataset in ("coconut", "jsonl"):
        return _load_own(dataset, path, image_root, skip_bad_records, max_samples, report)
    if dataset in ("aokvqa", "builtin"):
        if image_root is None:
            if dataset == "aokvqa":
                raise ValueError("dataset 'aokvqa' needs image_root: the COCO folder holding train2017/, val2017/")
            image_root = os.path.dirname(path)
        records = _read_json(path)
    elif dataset == "aokvqa_hf":
        records = _read_parquet(path)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected 'aokvqa', 'aokvqa_hf', 'builtin', 'coconut' or "
                         "'jsonl'")
    if max_samples is not None:
        records = records[:max_samples]

    samples = []
    for row, (file, record) in enumerate(records):
        try:
            samples.append(_to_sample(record, file, row, dataset, image_root, steps_from, answer_from))
        except DataError as e:
            raise_or_skip(e, skip_bad_records, report)
    return samples


def _read_json(path: str) -> list[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise DataError("data file not found", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", file=path) from None
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of records, got {type(records).__name__}", file=path)
    return [(path, r) for r in records]


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
        if not files:
            raise DataError("no .parquet files in this folder", file=path)
        splits = {_split_from_name(f) for f in files}
        if len(splits) > 1:
            raise DataError(f"the folder holds several splits ({sorted(map(str, splits))}); give one split's "
                            "file(s), e.g. data/validation-00000-of-00001.parquet", file=path)
        return files
    if not os.path.exists(path):
        raise DataError("data file not found", file=path)
    return [path]


def _read_parquet(path: str) -> list[tuple[str, dict]]:
    """Rows of the hub's parquet export, images left encoded ({bytes, path} structs)."""
    import datasets

    files = _parquet_files(path)
    records = []
    # Streaming reads the files row group by row group and writes no Arrow copy; the temporary cache_dir only
    # catches the lock file that `datasets` writes even when streaming.
    with tempfile.TemporaryDirectory(prefix="mmc_parquet_") as cache_dir:
        for file in files:
            ds = datasets.load_dataset("parquet", data_files=[file], split="train", streaming=True,
                                       cache_dir=cache_dir)
            if "image" in (ds.features or {}):
                ds = ds.cast_column("image", datasets.Image(decode=False))
            records += [(file, dict(r)) for r in ds]
    return records


def _split_from_name(path: str) -> str | None:
    name = os.path.basename(path)
    m = re.fullmatch(r"aokvqa_v1p0_(\w+)\.json", name)
    if m:
        return m.group(1)
    m = re.match(r"(train|validation|val|test)[-_.]", name)
    return _HF_SPLIT_NAMES[m.group(1)] if m else None


def _to_sample(record, file, row, dataset, image_root, steps_from, answer_from) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"record {row} is not a JSON object", file=file, reason="malformed record")
    qid = record.get("question_id")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or qid == "":
        raise DataError(f"record {row} has no question_id", file=file, field="question_id",
                        reason="missing field")
    qid = str(qid)

    def bad(f, message, reason="bad field"):
        return DataError(message, file=file, question_id=qid, field=f, reason=reason)

    def get(f, *types, required=True):
        value = record.get(f)
        if value is None:
            if required:
                raise bad(f, "missing", "missing field")
            return None
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise bad(f, f"expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
        return value

    split = record.get("split") or _split_from_name(file)
    if split not in SPLITS:
        raise bad("split", f"cannot tell the split ({split!r}): name the file aokvqa_v1p0_{{train,val,test}}.json "
                  "(parquet: {train,validation,test}-*.parquet) or give records a 'split' field")
    annotated = split != "test"

    question = get("question", str)
    if not question.strip():
        raise bad("question", "the question is empty", "empty question")
    choices = get("choices", list)
    if not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        raise bad("choices", f"expected a non-empty list of non-empty strings, got {choices!r}")
    difficult = get("difficult_direct_answer", bool)

    correct = get("correct_choice_idx", int, required=annotated)
    if correct is not None and not 0 <= correct < len(choices):
        raise bad("correct_choice_idx", f"{correct} is out of range for {len(choices)} choices",
                  "correct_choice_idx out of range")
    direct = record.get("direct_answers")
    if isinstance(direct, str):  # the hub's copy stores the list as its Python repr: "['ride', 'bus', ...]"
        try:
            direct = ast.literal_eval(direct)
        except (ValueError, SyntaxError):
            raise bad("direct_answers", f"not a list: {direct!r}") from None
    if direct is None:
        if annotated:
            raise bad("direct_answers", "missing", "missing field")
    elif not (isinstance(direct, list) and direct and all(isinstance(a, str) for a in direct)):
        raise bad("direct_answers", f"expected a non-empty list of strings, got {direct!r}")

    steps: list[str] = []
    if record.get("steps") is not None:
        steps = get("steps", list)
    elif annotated and steps_from != "none":
        rationales = get("rationales", list)
        if not rationales or not all(isinstance(r, str) and r.strip() for r in rationales):
            raise bad("rationales", f"expected a non-empty list of non-empty strings, got {rationales!r}")
        steps = rationales if steps_from == "rationales" else _SENTENCE_END.split(rationales[0].strip())
    if not all(isinstance(s, str) and s.strip() for s in steps):
        raise bad("steps", f"expected a list of non-empty strings, got {steps!r}")
    steps = [" ".join(s.split()) for s in steps]  # one line each: the layout puts one step per line
    step_nodes = _step_nodes(record, steps, bad)

    answer = None
    if annotated:
        answer = choices[correct] if answer_from == "choice" else max(dict.fromkeys(direct), key=direct.count)
        answer = " ".join(answer.split())

    if dataset == "aokvqa_hf":
        image = record.get("image")
        image = image.get("bytes") if isinstance(image, dict) else None
        if not image:
            raise bad("image", "no embedded image bytes", "missing image")
    else:
        image_id = get("image_id", int)
        image = os.path.join(os.fspath(image_root), f"{split}2017", f"{image_id:012d}.jpg")

    return Sample(question_id=qid, image=image, question=question.strip(), choices=list(choices),
                  correct_choice_idx=correct, direct_answers=None if direct is None else list(direct),
                  difficult_direct_answer=difficult, steps=steps, answer=answer, split=split, source=file, row=row,
                  step_nodes=step_nodes)


# ---------------------------------------------------------------------------------------------------------------
# Your own data: the original Coconut's json, and the general jsonl format
# ---------------------------------------------------------------------------------------------------------------


def _load_own(dataset, path, image_root, skip_bad_records, max_samples, report) -> list[Sample]:
    """Samples of the `coconut` or `jsonl` format (see the module docstring); ids must be unique in a file."""
    records = _read_json(path) if dataset == "coconut" else _read_json_or_lines(path)
    if max_samples is not None:
        records = records[:max_samples]
    if image_root is None:
        image_root = os.path.dirname(path)  # jsonl: image paths relative to the data file
    stem = Path(path).name.split(".")[0]
    to_sample = _coconut_sample if dataset == "coconut" else _jsonl_sample
    samples, seen = [], {}
    for row, (file, record) in enumerate(records):
        try:
            sample = to_sample(record, file, row, f"{stem}_{row}", image_root)
            if sample.question_id in seen:
                raise DataError(f"record {row} has the id of record {seen[sample.question_id]}; ids must be unique",
                                file=file, question_id=sample.question_id, field="id", reason="duplicate id")
            seen[sample.question_id] = row
            samples.append(sample)
        except DataError as e:
            raise_or_skip(e, skip_bad_records, report)
    return samples


def _read_json_or_lines(path: str) -> list[tuple[str, dict]]:
    """A JSON list of records, or JSON Lines (one record per line; blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError("data file not found", file=path) from None
    if text.lstrip().startswith("["):
        return _read_json(path)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((path, json.loads(line)))
        except json.JSONDecodeError as e:
            # A line that is not JSON cannot be skipped: the records after it would shift their derived ids.
            raise DataError(f"line {n} is not valid JSON: {e}", file=path) from None
    return records


def _text(record: dict, name: str, bad, *, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise bad(name, "missing", "missing field")
        return None
    if not isinstance(value, str):
        raise bad(name, f"expected a string, got {value!r}")
    if not value.strip():
        raise bad(name, "is empty", f"empty {name}")
    return value


def _steps(record: dict, bad) -> list[str]:
    steps = record.get("steps")
    if steps is None:
        return []
    if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
        raise bad("steps", f"expected a list of non-empty strings, got {steps!r}")
    return steps


def _step_nodes(record: dict, steps: list[str], bad) -> list[str] | None:
    """The record's optional `step_nodes` (the hops task: the node each step arrives at), one per own step."""
    nodes = record.get("step_nodes")
    if nodes is None:
        return None
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n.strip() for n in nodes):
        raise bad("step_nodes", f"expected a list of non-empty strings, got {nodes!r}")
    if record.get("steps") is None:
        raise bad("step_nodes", "given without the record's own 'steps' (one node per step)")
    if len(nodes) != len(steps):
        raise bad("step_nodes", f"{len(nodes)} nodes for {len(steps)} steps: expected one per step")
    return list(nodes)


def _record_checker(record, file, row, default_id, id_field):
    """(question_id, bad): the record's id (or `default_id`) and a DataError factory naming file, id and field."""
    if not isinstance(record, dict):
        raise DataError(f"record {row} is not a JSON object", file=file, question_id=default_id,
                        reason="malformed record")
    qid = record.get(id_field) if id_field else None
    if id_field and qid is not None:
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or qid == "":
            raise DataError(f"record {row}: expected a string or integer id, got {qid!r}", file=file,
                            question_id=default_id, field=id_field)
        qid = str(qid)
    qid = qid or default_id

    def bad(f, message, reason="bad field"):
        return DataError(message, file=file, question_id=qid, field=f, reason=reason)

    return qid, bad


def _coconut_sample(record, file, row, default_id, image_root) -> Sample:
    """A record of the original Coconut's files: {"question", "steps", "answer"}; other fields are ignored.

    Kept as the original reads them: the question, steps and answer are not re-spaced (the original's round-trip
    check tokenises them as they are), and the id is `{file stem}_{index}` (the original's `idx`).
    """
    qid, bad = _record_checker(record, file, row, default_id, id_field=None)
    question = _text(record, "question", bad)
    if record.get("steps") is None:
        raise bad("steps", "missing", "missing field")
    steps = _steps(record, bad)
    answer = _text(record, "answer", bad)
    return Sample(question_id=qid, image=None, question=question, choices=[], correct_choice_idx=None,
                  direct_answers=None, difficult_direct_answer=False, steps=steps, answer=answer, source=file, row=row,
                  step_nodes=_step_nodes(record, steps, bad))


def _jsonl_sample(record, file, row, default_id, image_root) -> Sample:
    """A record of the general format: {"id", "image", "question", "choices", "answer", "steps"}.

    Only "question" is required ("answer" too for training and scoring). With "choices", "answer" is the correct
    choice (its text, equal exactly or after `normalize_answer`, or its 0-based index). "image" is a path relative
    to `image_root` (default: the data file's folder); a row without it is text only.
    """
    qid, bad = _record_checker(record, file, row, default_id, id_field="id")
    question = _text(record, "question", bad)
    image = _text(record, "image", bad, required=False)
    choices = record.get("choices")
    if choices is not None and (not isinstance(choices, list) or not choices
                                or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise bad("choices", f"expected a non-empty list of non-empty strings, got {choices!r}")
    answer, correct = record.get("answer"), None
    if choices and isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise bad("answer", f"index {answer} is out of range for {len(choices)} choices",
                      "answer not among the choices")
        correct, answer = answer, choices[answer]
    elif answer is not None:
        answer = _text(record, "answer", bad)
        if choices:  # the answer is found among the choices as predictions are mapped to them
            exact = [i for i, c in enumerate(choices) if c == answer]
            loose = [i for i, c in enumerate(choices) if normalize_answer(c) == normalize_answer(answer)]
            if not (exact or loose):
                raise bad("answer", f"{answer!r} is not one of the choices {choices}", "answer not among the choices")
            correct = (exact or loose)[0]
            answer = choices[correct]
    steps = [" ".join(s.split()) for s in _steps(record, bad)]
    return Sample(question_id=qid, image=None if image is None else os.path.join(os.fspath(image_root), image),
                  question=question.strip(), choices=list(choices or []), correct_choice_idx=correct,
                  direct_answers=None, difficult_direct_answer=False,
                  steps=steps, answer=None if answer is None else " ".join(answer.split()), source=file, row=row,
                  step_nodes=_step_nodes(record, steps, bad))
