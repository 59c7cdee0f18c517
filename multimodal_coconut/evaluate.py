"""Evaluation: generated text -> answer -> predictions file -> metrics. A-OKVQA's official MC / DA accuracy, the
original Coconut's accuracy and CoT match (dataset coconut), and accuracy on the general format (dataset jsonl).
`score_generations` picks the rules by dataset.

    answers = gather_generations(local_texts)                 # {question_id: generated text}, all ranks
    preds = make_predictions(val_records, answers)            # {qid: {"multiple_choice": ..., "direct_answer": ...}}
    write_predictions(run_dir / "predictions_val_epoch3.json", preds)
    metrics = score(val_records, preds)                       # {"mc_accuracy", "da_accuracy", "n_mc", "n_da"}

`score` follows A-OKVQA's official `evaluation/eval_predictions.py` (allenai/aokvqa, commit 42e8c44) line by
line, so `python evaluation/eval_predictions.py --aokvqa-dir DIR --split val --preds FILE` prints the same numbers
for the file `write_predictions` wrote. What that script does, and so what `score` does:

* Multiple choice: over **all** questions of the split (difficult ones included), 1 if the prediction is exactly
  (case- and space-sensitive) `choices[correct_choice_idx]`, else 0.
* Direct answer: over the questions whose `difficult_direct_answer` is false, `min(1, n / 3)` where n counts the
  10 `direct_answers` exactly equal to the prediction. No answer normalisation at scoring time.
* A question without a prediction counts 0 (the script runs with `strict=False`); predictions for questions not
  in the split are ignored; a multiple-choice prediction that is not one of the choices is simply wrong.
* Accuracies are percentages (0-100). A setting no prediction has a key for is not scored (None here; the script
  prints nothing for it).

Only torch.distributed is imported (lazily, by `gather_generations`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

# --- answers from generated text -------------------------------------------------------------------------------


def extract_answer(generated_text: str, eos_token: str | None = None) -> str:
    """The answer the model wrote: the text after the last `###`, up to the end of that line, stripped.

    The model is trained to write its remaining steps one per line and then `### answer` and EOS. Anything from
    `eos_token` on (when given, e.g. a decode that kept special tokens) is dropped first. Without any `###` (a
    model that has not learnt the format, or a generation cut by max_new_tokens), the answer is the last
    non-empty line, stripped; empty text gives "".
    """
    text = generated_text
    if eos_token:
        text = text.split(eos_token, 1)[0]
    marker = text.rfind("###")
    if marker >= 0:
        return text[marker + 3:].split("\n", 1)[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# VQA's answer normalisation (the VQA v2 evaluation script, which A-OKVQA inherits its direct-answer style from):
# lowercase, punctuation, number words -> digits, articles dropped. Its contraction table is left out.
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA-style normal form used to match free text to a choice: 'The Two dogs.' -> '2 dogs'."""
    text = " ".join(text.lower().split())
    for p in _PUNCT:
        # As VQA: punctuation next to a space (or in a number like 1,000) is removed, elsewhere it splits words.
        if f"{p} " in text or f" {p}" in text or re.search(r"\d,\d", text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"\.(?!\d)", "", text)  # periods go, except a decimal point
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def map_to_choice(prediction: str, choices: list[str]) -> str:
    """The choice a free-text prediction stands for.

    1. the choice equal to `prediction`, if any;
    2. else the first choice equal to it after `normalize_answer` (VQA normalisation: case, punctuation,
       articles, number words);
    3. else the choice with the highest character similarity, `difflib.SequenceMatcher(None, p, c).ratio()` of the
       normalised strings; ties go to the first choice (so an empty prediction maps to choices[0]).

    This differs from A-OKVQA's own remapping (`remap_predictions.py` / `map_to_choices`), which picks the choice
    nearest in a sentence-embedding space (GloVe average word embeddings), because that needs a downloaded
    embedding model. The two agree whenever the prediction is a choice, exactly or after normalisation — the case
    for a model trained to write the correct choice (`answer_from: choice`) — so MC accuracy on such predictions
    does not depend on the mapping; only genuinely free-text answers may map differently.
    """
    if not choices:
        raise ValueError("map_to_choice: no choices")
    if prediction in choices:
        return prediction
    normalized = normalize_answer(prediction)
    normalized_choices = [normalize_answer(c) for c in choices]
    if normalized in normalized_choices:
        return choices[normalized_choices.index(normalized)]
    ratios = [difflib.SequenceMatcher(None, normalized, c).ratio() for c in normalized_choices]
    return choices[ratios.index(max(ratios))]


def clean_direct_answer(answer: str) -> str:
    """The direct-answer string written to the predictions file: lowercased, whitespace collapsed, one trailing
    period dropped. A-OKVQA's direct answers are lowercase, and the official scoring compares exact strings."""
    answer = " ".join(answer.lower().split())
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def _field(sample: Any, name: str) -> Any:
    return sample[name] if isinstance(sample, Mapping) else getattr(sample, name)


def make_predictions(samples_or_records: Iterable[Any], generated: Mapping[str, str],
                     eos_token: str | None = None) -> dict[str, dict[str, str]]:
    """The official predictions file content: `{question_id: {"multiple_choice": choice, "direct_answer": text}}`.

    `samples_or_records`: A-OKVQA records or the data pipeline's samples (dicts or objects with `question_id`
    and `choices`), in the order the file should list them. `generated`: question_id -> generated text (the new
    tokens decoded); the answer is `extract_answer(text, eos_token)`, mapped to a choice by `map_to_choice` and
    written as the direct answer by `clean_direct_answer`. Questions with no generated text are left out (the
    official script then counts them wrong); generated text for a question not in `samples_or_records` is an
    error, as it means the two do not belong together.
    """
    predictions: dict[str, dict[str, str]] = {}
    known = set()
    for sample in samples_or_records:
        qid = _field(sample, "question_id")
        known.add(qid)
        if qid not in generated:
            continue
        answer = extract_answer(generated[qid], eos_token)
        predictions[qid] = {"multiple_choice": map_to_choice(answer, list(_field(sample, "choices"))),
                            "direct_answer": clean_direct_answer(answer)}
    unknown = [q for q in generated if q not in known]
    if unknown:
        raise ValueError(f"generated text for {len(unknown)} question(s) not among the samples, e.g. {unknown[0]!r}")
    return predictions


# --- scoring ---------------------------------------------------------------------------------------------------


def _is_difficult(record: Mapping) -> bool:
    qid = record.get("question_id")
    if "difficult_direct_answer" not in record:
        raise ValueError(f"record {qid!r} has no 'difficult_direct_answer': score() needs the A-OKVQA records "
                         "(the json entries), not the model's samples")
    value = record["difficult_direct_answer"]
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    raise TypeError(f"record {qid!r}: 'difficult_direct_answer' must be a bool, got {value!r}")


def score(records: list[Mapping], predictions: Mapping[str, Mapping[str, str]], *,
          multiple_choice: bool = True, direct_answer: bool = True) -> dict[str, float | int | None]:
    """Official A-OKVQA accuracies of `predictions` (the predictions file content) on `records` (a split's json).

    Returns `{"mc_accuracy": %, "da_accuracy": %, "n_mc": int, "n_da": int}`: accuracies in percent as the
    official script prints them, n_* the number of questions each is averaged over (all questions for MC, the
    non-difficult ones for DA; n_da is None when direct_answer is off). An accuracy is None when that setting is
    switched off, when no prediction has its key, or (DA) when every question is difficult (where the official
    script would divide by zero). Rules: see the module docstring. Records without answers (the test split)
    raise ValueError: write predictions only.
    """
    if not records:
        raise ValueError("score: no records")
    dataset: dict[str, Mapping] = {}
    for record in records:
        qid = record["question_id"]
        if qid in dataset:
            raise ValueError(f"question_id {qid!r} appears twice in the records")
        missing = [k for k in ("choices", "correct_choice_idx", "direct_answers") if k not in record]
        if missing:
            raise ValueError(f"record {qid!r} has no {', '.join(missing)}: it carries no answers (the A-OKVQA test "
                             "split does not), so it cannot be scored; write its predictions only")
        dataset[qid] = record
    for qid, pred in predictions.items():
        if not isinstance(pred, Mapping):
            raise TypeError(f"prediction for {qid!r} must be a dict with 'multiple_choice' / 'direct_answer' keys "
                            f"(the official unified format), got {type(pred).__name__}")

    result: dict[str, float | int | None] = {"mc_accuracy": None, "da_accuracy": None,
                                             "n_mc": len(dataset), "n_da": None}
    if multiple_choice:
        mc = {q: p["multiple_choice"] for q, p in predictions.items() if "multiple_choice" in p}
        if mc:
            acc = []
            for qid, record in dataset.items():
                if qid not in mc:
                    acc.append(0.0)
                    continue
                acc.append(float(mc[qid] == record["choices"][record["correct_choice_idx"]]))
            result["mc_accuracy"] = sum(acc) / len(acc) * 100  # same float operations as the official script

    if direct_answer:
        easy = {q: r for q, r in dataset.items() if not _is_difficult(r)}
        result["n_da"] = len(easy)
        da = {q: p["direct_answer"] for q, p in predictions.items() if "direct_answer" in p}
        if da and easy:
            acc = []
            for qid, record in easy.items():
                if qid not in da:
                    acc.append(0.0)
                    continue
                num_match = sum(da[qid] == answer for answer in record["direct_answers"])
                acc.append(min(1.0, num_match / 3.0))
            result["da_accuracy"] = sum(acc) / len(acc) * 100
    return result


# --- the original Coconut's rules (dataset coconut) and the general format (dataset jsonl) -------------------------


def coconut_answer(text: str) -> str:
    """The original Coconut's answer: the text after the last '#', commas removed, stripped ("### 1,234" -> "1234")."""
    return text.split("#")[-1].replace(",", "").strip()


def coconut_cot(text: str) -> str:
    """The original Coconut's written chain of thought: the generated text before the first '#', stripped.

    The original decodes prompt and generation together and drops the first line (the question); we decode only
    the new tokens, so nothing is dropped. Compared with `"\n".join(steps)` of the record (`score_coconut`).
    """
    return text.split("#")[0].strip()


def score_coconut(samples: Iterable[Any], generated: Mapping[str, str]) -> tuple[dict, dict]:
    """(predictions, metrics) by the original Coconut's run.py.

    accuracy: `coconut_answer(output) == answer.replace(",", "").strip()`; cot_accuracy (the original's "CoT
    match"): `coconut_cot(output) == "\n".join(steps)`, all the record's steps, so, as in the original, it can only
    be non-zero for a model that writes its whole chain (stage 0, CoT). Both in percent over the samples; a sample
    without generated text counts wrong. predictions: {question_id: {"output", "answer", "cot"}}.
    """
    predictions, correct, cot_correct, n = {}, 0, 0, 0
    for sample in samples:
        qid, n = _field(sample, "question_id"), n + 1
        if qid not in generated:
            continue
        text = generated[qid]
        predictions[qid] = {"output": text, "answer": coconut_answer(text), "cot": coconut_cot(text)}
        correct += predictions[qid]["answer"] == _field(sample, "answer").replace(",", "").strip()
        cot_correct += predictions[qid]["cot"] == "\n".join(_field(sample, "steps"))
    if not n:
        raise ValueError("score_coconut: no samples")
    return predictions, {"accuracy": correct / n * 100, "cot_accuracy": cot_correct / n * 100, "n_eval": n}


def score_jsonl(samples: Iterable[Any], generated: Mapping[str, str]) -> tuple[dict, dict]:
    """(predictions, metrics) of the general format.

    The answer is `extract_answer(output)` (after the last `###`). A question with choices is right when
    `map_to_choice(answer, choices)` is its correct choice (as A-OKVQA's multiple choice); one without when
    `normalize_answer(answer) == normalize_answer(reference)` (VQA normalisation). accuracy is in percent over the
    questions that have an answer (None when none has: predictions only). predictions: {question_id: {"output",
    "answer"}}, where "answer" is the chosen choice for a question with choices.
    """
    predictions, correct, n = {}, 0, 0
    for sample in samples:
        qid, choices, reference = (_field(sample, k) for k in ("question_id", "choices", "answer"))
        n += reference is not None
        if qid not in generated:
            continue
        answer = extract_answer(generated[qid])
        if choices:
            answer = map_to_choice(answer, list(choices))
            right = reference is not None and answer == choices[_field(sample, "correct_choice_idx")]
        else:
            right = reference is not None and normalize_answer(answer) == normalize_answer(reference)
        predictions[qid] = {"output": generated[qid], "answer": answer}
        correct += right
    return predictions, {"accuracy": correct / n * 100 if n else None, "n_eval": n}


def score_generations(samples: list[Any], generated: Mapping[str, str], dataset: str) -> tuple[dict, dict]:
    """(predictions file content, metrics) of `generated` ({question_id: new tokens decoded}) by `dataset`'s rules.

    aokvqa / aokvqa_hf / builtin: the official A-OKVQA predictions file and `score` (mc_accuracy, da_accuracy;
    no metrics for the unannotated test split). coconut: `score_coconut`. jsonl: `score_jsonl`.
    """
    if dataset == "coconut":
        return score_coconut(samples, generated)
    if dataset == "jsonl":
        return score_jsonl(samples, generated)
    predictions = make_predictions(samples, generated)
    if not samples or _field(samples[0], "correct_choice_idx") is None:
        return predictions, {}
    records = [{"question_id": s.question_id, "choices": s.choices, "correct_choice_idx": s.correct_choice_idx,
                "direct_answers": s.direct_answers, "difficult_direct_answer": s.difficult_direct_answer}
               for s in samples]
    return predictions, score(records, predictions)


# --- files and ranks -------------------------------------------------------------------------------------------


def write_predictions(path: str | os.PathLike, predictions: Mapping[str, Any],
                      log: Callable[[str], None] | None = print) -> Path:
    """Write the predictions json atomically (temporary file, fsync, rename); returns `path`.

    An existing file with the same content is left as it is. One with different content (e.g. from a run killed
    after its evaluation and resumed from the checkpoint before it) is never overwritten: it is renamed to
    `{path}.replaced-{time}`, with a message, before the new file takes its name.
    """
    path = Path(path)
    if path.exists():
        try:
            same = json.loads(path.read_text()) == json.loads(json.dumps(predictions))
        except json.JSONDecodeError:
            same = False
        if same:
            return path
        aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.rename(path, aside)
        if log:
            log(f"write_predictions: {path} held different predictions; kept them as {aside.name}")
    return write_json_atomic(path, predictions)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as json to `path` through a temporary file, fsync and rename: a reader (or a crash) sees the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def gather_generations(local: Mapping[str, str], group=None) -> dict[str, str]:
    """Merge every rank's `{question_id: text}` so metrics are computed over all ranks (all ranks get the union).

    Collective: every rank of `group` must call it. Without an initialised process group it returns a copy of
    `local`. A question generated on several ranks (a DistributedSampler pads the last batch by repeating
    samples) keeps the text of the lowest rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(local)
    parts: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, dict(local), group=group)
    merged: dict[str, str] = {}
    for part in parts:
        for qid, text in part.items():
            merged.setdefault(qid, text)
    return merged
