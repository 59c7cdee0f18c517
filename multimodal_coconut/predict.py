"""Predict a whole split with a trained model: the predictions file training's evaluation writes, resumable.

    python -m multimodal_coconut.predict runs/demo --data data/aokvqa/aokvqa_v1p0_test.json --image-root data/coco \
        --out predictions_test.json
    python -m multimodal_coconut.predict runs/prosqa-coconut --data data/prosqa_test.json --out predictions_test.json

Any split works, the test split (no answers) included; when the split has answers its metrics are printed. The
prompts, batches, generation, answer mapping and file are those of training's evaluation (the same dataset, collator,
sampler, `inference.generate_texts` and `evaluate.score_generations`), so a checkpoint's answers equal its run's
`predictions_val_epochN.json`: A-OKVQA's official file ({question_id: {multiple_choice, direct_answer}}) for
A-OKVQA and the built-in set, {question_id: {output, answer, cot}} for the original Coconut's format and
{question_id: {output, answer}} for jsonl. The file is rewritten atomically after every batch; re-running the same
command keeps what is already written and answers only the rest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .data import DataError, load_samples
from .evaluate import score, score_generations, write_json_atomic
from .inference import (InputError, LoadError, autocast_for, default_device, generate_texts, load_trained,
                        model_device, prompt_loader, prompt_set)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multimodal_coconut.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint_N directory or exported HF folder")
    p.add_argument("--data", required=True,
                   help="a split: aokvqa_v1p0_{train,val,test}.json, a parquet file, the original Coconut's json "
                        "or a jsonl file")
    p.add_argument("--image-root", default=None,
                   help="COCO folder holding {split}2017/ (default: the data file's folder, as the built-in set; "
                        "jsonl: the folder its image paths are relative to)")
    p.add_argument("--dataset", default=None, choices=KINDS,
                   help="the data's format (default: see data_kind)")
    p.add_argument("--out", required=True, help="predictions file to write (and to resume)")
    p.add_argument("--thoughts", type=int, default=None, metavar="N",
                   help="curriculum stage to prompt at (default: the checkpoint's stage)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch size")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


KINDS = ["aokvqa", "aokvqa_hf", "builtin", "coconut", "jsonl"]


def data_kind(data: str, image_root: str | None, trained_on: str) -> str:
    """The format of --data when --dataset does not say: parquet (or a folder of it): aokvqa_hf; `.jsonl`: jsonl;
    A-OKVQA's file name (aokvqa_v1p0_{split}.json): aokvqa with --image-root, else builtin (images beside the
    file); any other file: the format the model was trained on when that is the original Coconut's or jsonl (a
    text model's own kind of file), else as A-OKVQA's file name."""
    path = Path(data)
    if data.endswith(".parquet") or path.is_dir():
        return "aokvqa_hf"
    if path.name.endswith(".jsonl"):
        return "jsonl"
    if trained_on in ("coconut", "jsonl") and not re.fullmatch(r"aokvqa_v1p0_\w+\.json", path.name):
        return trained_on
    return "aokvqa" if image_root else "builtin"


def read_existing(out: Path, question_ids: set[str], key: str) -> dict:
    """The predictions already in `out` (none when it does not exist); each must have `key` (the format's field).
    One that is not a predictions file, or that holds questions of another split, is an error rather than something
    to overwrite."""
    if not out.exists():
        return {}
    try:
        done = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{out}: exists but is not a readable predictions file ({e}); move it away or choose "
                         "another --out") from None
    if not isinstance(done, dict) or not all(isinstance(v, dict) and key in v for v in done.values()):
        raise InputError(f"{out}: exists but is not a predictions file of this format ({{question_id: {{{key!r}: "
                         "...}}}}); move it away or choose another --out")
    foreign = [q for q in done if q not in question_ids]
    if foreign:
        raise InputError(f"{out}: holds predictions for {len(foreign)} question(s) not in --data (e.g. "
                         f"{foreign[0]!r}); it belongs to another split: choose another --out")
    return done


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.is_dir():
            raise InputError(f"{out}: --out is a directory; give a file name, e.g. {out / 'predictions.json'}")
        trained = load_trained(args.model, device=args.device or default_device())
        cfg = trained.config
        dataset = args.dataset or data_kind(args.data, args.image_root, cfg.dataset)
        samples = load_samples(dataset, args.data, image_root=args.image_root, steps_from=cfg.steps_from,
                               answer_from=cfg.answer_from)
        if not samples:
            raise InputError(f"{args.data}: no questions")
        text_format = dataset in ("coconut", "jsonl")  # predictions keep the generated text: {output, answer, ...}
        predictions = read_existing(out, {s.question_id for s in samples},
                                    "output" if text_format else "multiple_choice")
        todo = [s for s in samples if s.question_id not in predictions]
        if predictions:
            print(f"{out}: {len(predictions)} of {len(samples)} questions already answered; answering the other "
                  f"{len(todo)}", file=sys.stderr)

        by_id = {s.question_id: s for s in todo}

        def save(texts: dict[str, str]) -> None:
            if texts:
                predictions.update(score_generations([by_id[q] for q in texts], texts, dataset)[0])
            write_json_atomic(out, {s.question_id: predictions[s.question_id] for s in samples
                                    if s.question_id in predictions})

        if todo:
            loader = prompt_loader(trained, prompt_set(trained, todo, args.thoughts), args.batch_size,
                                   args.num_workers)
            generate_texts(trained.model.generate, loader, todo, trained.backbone.tokenizer,
                           max_new_tokens=cfg.max_new_tokens, device=model_device(trained),
                           autocast=autocast_for(trained), desc="predict", on_batch=save)
        else:
            save({})
    except (InputError, LoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(predictions)} predictions to {out}")
    if text_format:  # the metrics of training's evaluation, from the generated text the file keeps
        metrics = score_generations(samples, {q: p["output"] for q, p in predictions.items()}, dataset)[1]
        if metrics.get("accuracy") is not None:
            print(json.dumps(metrics))
    elif samples[0].correct_choice_idx is not None:
        print(json.dumps(score([_record(s) for s in samples], predictions)))
    return 0


def _record(sample) -> dict:
    """The A-OKVQA record fields the official scorer reads."""
    return {"question_id": sample.question_id, "choices": sample.choices,
            "correct_choice_idx": sample.correct_choice_idx, "direct_answers": sample.direct_answers,
            "difficult_direct_answer": sample.difficult_direct_answer}


if __name__ == "__main__":
    sys.exit(main())
