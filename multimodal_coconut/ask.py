"""Ask a trained model a question (about an image, for a vision-language model), and see its continuous thoughts.

    python -m multimodal_coconut.ask runs/demo --image photo.jpg --question "What color is the shape?"
    python -m multimodal_coconut.ask runs/demo/checkpoint_8 --image photo.jpg --question "…" --choices red blue \
        green yellow --json
    python -m multimodal_coconut.ask runs/prosqa-coconut --question "Every yumpus is a rempus. … Is Tom a rempus?"

MODEL is a run directory (its newest checkpoint), a checkpoint directory or an exported HF folder. The prompt is
laid out, answered and mapped to a choice exactly as training's evaluation does (inference.answer_question); the
number of thoughts is the checkpoint's curriculum stage unless --thoughts says otherwise. A text-only model takes no
--image; a vision-language model needs one, unless it was trained on the jsonl format, whose rows may have no image
(inference.check_images). Bad input (a missing or unreadable image, an image the model cannot take or an image
missing, an empty question, a folder that is not a usable model) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .data import DataError
from .inference import InputError, LoadError, answer_question, default_device, load_trained, question_sample


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multimodal_coconut.ask", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint_N directory or exported HF folder")
    p.add_argument("--image", default=None,
                   help="image file (a vision-language model needs one; a text-only model takes none)")
    p.add_argument("--question", required=True)
    p.add_argument("--choices", nargs="+", default=[], help="multiple-choice options (the answer is one of them)")
    p.add_argument("--thoughts", type=int, default=None, metavar="N",
                   help="curriculum stage to prompt at: N reasoning steps as continuous thoughts (N x c_thought "
                        "latent tokens, at most max_latent_stage x c_thought); default: the checkpoint's stage")
    p.add_argument("--top-k", type=int, default=5, help="decoded tokens shown per thought")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.thoughts is not None and args.thoughts < 0:
            raise InputError(f"--thoughts must be >= 0, got {args.thoughts}")
        sample = question_sample(args.image, args.question, args.choices)  # bad input fails before loading
        trained = load_trained(args.model, device=args.device or default_device())
        answered = answer_question(trained, sample, stage=args.thoughts, top_k=args.top_k)
    except (InputError, LoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answered.to_json(), ensure_ascii=False))
        return 0
    print(f"answer: {answered.answer}")
    print(f"continuous thoughts: {len(answered.thoughts)} (stage {answered.stage}, model {trained.path})")
    for i, tokens in enumerate(answered.thoughts, 1):
        print(f"  thought {i}: " + "  ".join(repr(t) for t in tokens))
    print(f"generated: {answered.generated!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
