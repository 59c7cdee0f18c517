"""Built-in visual reasoning set: 2x2 grids of coloured shapes, written in the A-OKVQA v1p0 format.

    python -m multimodal_coconut.builtin_data --out data/generated/builtin --train 2000 --val 200 --seed 0

Every image shows one large filled shape (a colour of COLORS, a shape of SHAPES) on a grey background. A
question reads one attribute of it and then walks 0-3 places further along a fixed cycle of that attribute,
so it needs 1-4 chained steps, the first of which only the image answers:

    1 step   What is the color of the object?
    2 steps  In the cycle red, green, blue, yellow, which color comes 1 place after the object's color?
    4 steps  In the cycle circle, square, triangle, cross, which shape comes 3 places after the object's shape?

`steps` holds the chain in order: "The object is a red circle.", then one "After red comes green." per place.
The object's attributes are drawn independently of the question, so without the image a model can only guess
(25% on multiple choice). Number of steps x answer kind x answer x position of the answer among the choices is
balanced exactly in blocks of 128 questions. Why one object rather than a grid of them: a question about "the
shape at the top left" asks the language model to find one of several image regions from the words, which a
tiny model trained from random weights on a CPU does not learn within the demo's minutes (we tried: chance
after 2,000 steps), while reading the one object's colour takes it ~50 steps.

Files (what A-OKVQA's loader and official evaluation script read):
    {out_dir}/aokvqa_v1p0_{split}.json          list of records, A-OKVQA fields plus `steps`
    {out_dir}/{split}2017/{image_id:012d}.jpg   COCO-2017 naming; image ids are unique across splits
    {out_dir}/builtin_meta.json                 what was generated; a matching file means nothing to do
As in the official files, "test" records carry no answers: no `correct_choice_idx`, `direct_answers`,
`rationales`, nor `steps` (the steps give the answer away).

The "hops" task (`hops=Hops(...)`, config `builtin_task: hops | hops_text`): a positive control whose thoughts
are needed. Every question carries its own successor map over `nodes` colours, a single cycle through all of them
written as arrows in random order, and asks for the colour reached after `k` arrows from a start:

    Arrows:cyan>red,blue>green,red>blue,green>cyan. Start at red and follow 2 arrows. Which colour do you reach?
                                                                                    steps: "blue.", "green."

Nothing can be memorised in the weights (the map is drawn afresh for every question: (nodes-1)! cycles, in
nodes! written orders), k < nodes arrows never come back to the start, and k <= nodes / 2 keeps the way back
(nodes - k arrows against the arrows) at least as long as the way forward. Each step is one arrow, written
"blue." (`step_style="node"`: the step opens with what the hop finds) or "red>blue." (`"arrow"`: it restates
the known node first, as the map writes the arrow). The map has no spaces, so that a colour is the same token in
the map as at the start of a step's line (a byte-level BPE gives " red" and "red" different ids). Every record
carries `step_nodes`, the node each step arrives at. Start x answer x the answer's position among the choices is
balanced exactly in blocks of nodes x (nodes-1) x choices questions.
Two variants, drawn from the same random stream (one seed gives the same maps, starts and answers in both):

* multimodal (`text=False`): the start is the colour of the object in the image (the shape is drawn at random
  and plays no part), so the first step, "red." / "object>red.", reads the image and the k others follow
  arrows; k + 1 steps. A-OKVQA v1p0 files as above, plus `steps` and `step_nodes`; `min(4, nodes-1)` choices
  drawn from the nodes other than the start (so the start, never the answer, gives nothing away).
  Chance: 1 / #choices (25%) on multiple choice, 1 / nodes on a free answer.
* text (`text=True`): the start is named in the question; k steps. The original Coconut's files:
      {out_dir}/hops_text_{split}.json   list of {"question", "steps", "answer", "step_nodes"}
  (dataset `coconut` reads them; a free answer, chance 1 / nodes, or 1 / (nodes-1) for a guess that knows the
  answer is never the start). There is no unanswered test split in this format: every split carries answers.
Both write builtin_meta.json as above (with the task's settings), so a set of other settings is never reused.
"""

import argparse
import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

VERSION = 3  # bump when the content changes, so existing generated sets are rebuilt
COLORS = {"red": (230, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 230), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
# Close to the ImageNet mean, so the background is ~0 after the vision encoder's normalisation.
BACKGROUND = (128, 128, 128)
_SPLIT_ORDER = ("train", "val", "test")
_META = "builtin_meta.json"
# (number of steps, answer kind, answer index, position among the choices): balanced in blocks of these
_BLOCK = [(n, kind, v, i) for n in (1, 2, 3, 4) for kind in ("color", "shape") for v in range(4) for i in range(4)]

HOPS_VERSION = 1  # bump when the hops task's content changes
# The hops task's nodes, in order (`nodes` takes the first ones); far apart in colour so a 64 px JPEG tells them apart.
HOPS_COLORS = {"red": (230, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 230), "yellow": (240, 210, 20),
               "purple": (140, 40, 190), "orange": (245, 130, 20), "cyan": (20, 200, 210), "white": (250, 250, 250)}


def render_scene(colors, shapes, image_px=64, palette=COLORS):
    """Draw 1 (or 4, as a 2x2 grid) objects: object k (row-major) is shapes[k] filled with palette[colors[k]]."""
    if len(colors) not in (1, 4) or len(shapes) != len(colors):
        raise ValueError(f"render_scene draws 1 or 4 objects, got {len(colors)} colours and {len(shapes)} shapes")
    img = Image.new("RGB", (image_px, image_px), BACKGROUND)
    draw = ImageDraw.Draw(img)
    side = 1 if len(colors) == 1 else 2
    cell = image_px / side
    r = 0.375 * cell  # half-size of a shape: 24 px in a 64 px image
    w = r / 3  # half-width of the cross's arms
    for k, (color, shape) in enumerate(zip(colors, shapes)):
        cx, cy = (k % side + 0.5) * cell, (k // side + 0.5) * cell
        fill = palette[color]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif shape == "cross":
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


def _make_example(rng, n_steps, kind, value_idx, choice_idx):
    """One object and question whose answer is the `value_idx`-th colour/shape, at `choice_idx` among the choices."""
    hops = n_steps - 1
    vocab = list(COLORS) if kind == "color" else list(SHAPES)
    answer = vocab[value_idx]
    start = vocab[(value_idx - hops) % len(vocab)]  # the object's attribute: `hops` places before the answer
    color = start if kind == "color" else rng.choice(list(COLORS))
    shape = start if kind == "shape" else rng.choice(SHAPES)
    cycle = ", ".join(vocab)
    if hops == 0:
        question = f"What is the {kind} of the object?"
    else:
        place = "place" if hops == 1 else "places"
        question = f"In the cycle {cycle}, which {kind} comes {hops} {place} after the object's {kind}?"
    steps = [f"The object is a {color} {shape}."]
    walk = [start]
    for _ in range(hops):
        walk.append(vocab[(vocab.index(walk[-1]) + 1) % len(vocab)])
        steps.append(f"After {walk[-2]} comes {walk[-1]}.")
    rationales = [
        " ".join(steps),
        f"The object is {color} and a {shape}; {hops} places on from {start} in the cycle {cycle} is {answer}.",
        f"The answer is {answer}: the object's {kind} is {start}, and the question moves {hops} places on.",
    ]
    others = [v for v in vocab if v != answer]
    rng.shuffle(others)
    choices = others[:choice_idx] + [answer] + others[choice_idx:]
    return [color], [shape], question, choices, steps, rationales


def _split_records(split, n, seed, first_image_id, image_px, image_dir):
    """Generate one split: write its images and return its records."""
    rng = random.Random(f"builtin-v{VERSION}-{seed}-{split}")
    records, block = [], []
    for i in range(n):
        if not block:  # exact balance within every block of len(_BLOCK) questions
            block = list(_BLOCK)
            rng.shuffle(block)
        n_steps, kind, value_idx, choice_idx = block.pop()
        colors, shapes, question, choices, steps, rationales = _make_example(rng, n_steps, kind, value_idx, choice_idx)
        image_id = first_image_id + i
        _atomic_save_jpeg(render_scene(colors, shapes, image_px), image_dir / f"{image_id:012d}.jpg")
        record = {"split": split, "image_id": image_id, "question_id": f"builtin_{split}_{i:06d}",
                  "question": question, "choices": choices}
        if split == "test":
            record["difficult_direct_answer"] = False
        else:
            record.update(correct_choice_idx=choice_idx, direct_answers=[choices[choice_idx]] * 10,
                          difficult_direct_answer=False, rationales=rationales, steps=steps)
        records.append(record)
    return records


@dataclass(frozen=True)
class Hops:
    """Settings of the hops task (module docstring): `k` arrows over `nodes` colours, steps in `step_style`, the
    text variant or the multimodal one."""

    k: int = 3
    nodes: int = 6
    step_style: str = "arrow"
    text: bool = False

    def __post_init__(self):
        if not (isinstance(self.nodes, int) and 3 <= self.nodes <= len(HOPS_COLORS)):
            raise ValueError(f"hops nodes must be an int in [3, {len(HOPS_COLORS)}], got {self.nodes!r}")
        if not (isinstance(self.k, int) and 1 <= self.k <= self.nodes // 2):
            raise ValueError(f"hops k must be an int in [1, nodes // 2 = {self.nodes // 2}], got {self.k!r}: "
                             f"on a cycle of {self.nodes} nodes, {self.k} arrows forward end where "
                             f"{self.nodes - self.k} arrows backward do, a shorter way")
        if self.step_style not in ("node", "arrow"):
            raise ValueError(f"hops step_style must be 'node' or 'arrow', got {self.step_style!r}")

    @property
    def n_choices(self) -> int:
        return min(4, self.nodes - 1)

    def block(self) -> list[tuple[int, int, int]]:
        """(start, answer, position of the answer among the choices): each once per block."""
        n = self.nodes
        return [(s, a, i) for s in range(n) for a in range(n) if a != s for i in range(self.n_choices)]


def _hops_example(rng, hops: Hops, start_idx, answer_idx, choice_idx):
    """(question, choices, steps, step_nodes, shape) of one hops question whose start and answer are given."""
    names = list(HOPS_COLORS)[:hops.nodes]
    start, answer = names[start_idx], names[answer_idx]
    # A uniformly random single cycle through every node with `answer` k places after `start`.
    others = [c for c in names if c not in (start, answer)]
    rng.shuffle(others)
    cycle = [start, *others[:hops.k - 1], answer, *others[hops.k - 1:]]
    succ = {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
    edges = list(succ.items())
    rng.shuffle(edges)
    # No spaces inside the map: a colour is then the same token in the map and at the start of a step.
    arrows = ",".join(f"{a}>{b}" for a, b in edges)
    walk = [start]
    for _ in range(hops.k):
        walk.append(succ[walk[-1]])
    assert walk[-1] == answer and len(set(walk)) == len(walk)
    plural = "arrow" if hops.k == 1 else "arrows"
    where = start if hops.text else "the object's colour"
    question = f"Arrows:{arrows}. Start at {where} and follow {hops.k} {plural}. Which colour do you reach?"
    node_style = hops.step_style == "node"
    steps = [f"{b}." if node_style else f"{a}>{b}." for a, b in zip(walk, walk[1:])]
    step_nodes = walk[1:]
    if not hops.text:  # the first step reads the start off the image
        steps.insert(0, f"{start}." if node_style else f"object>{start}.")
        step_nodes.insert(0, start)
    distractors = [c for c in names if c not in (start, answer)]
    rng.shuffle(distractors)
    distractors = distractors[:hops.n_choices - 1]
    choices = distractors[:choice_idx] + [answer] + distractors[choice_idx:]
    shape = rng.choice(SHAPES)  # drawn in both variants, so one seed gives both the same questions
    return question, choices, steps, step_nodes, shape


def _hops_split_records(split, n, seed, first_image_id, image_px, image_dir, hops: Hops):
    """Generate one split of the hops task: write its images (multimodal) and return its records."""
    rng = random.Random(f"hops-v{HOPS_VERSION}-{seed}-{split}")
    records, block = [], []
    for i in range(n):
        if not block:  # exact balance within every block
            block = hops.block()
            rng.shuffle(block)
        start_idx, answer_idx, choice_idx = block.pop()
        question, choices, steps, step_nodes, shape = _hops_example(rng, hops, start_idx, answer_idx, choice_idx)
        answer = choices[choice_idx]
        if hops.text:
            records.append({"question": question, "steps": steps, "answer": answer, "step_nodes": step_nodes})
            continue
        image_id = first_image_id + i
        start = list(HOPS_COLORS)[start_idx]
        _atomic_save_jpeg(render_scene([start], [shape], image_px, palette=HOPS_COLORS),
                          image_dir / f"{image_id:012d}.jpg")
        record = {"split": split, "image_id": image_id, "question_id": f"hops_{split}_{i:06d}",
                  "question": question, "choices": choices}
        if split == "test":
            record["difficult_direct_answer"] = False
        else:
            record.update(correct_choice_idx=choice_idx, direct_answers=[answer] * 10,
                          difficult_direct_answer=False, rationales=[" ".join(steps)], steps=steps,
                          step_nodes=step_nodes)
        records.append(record)
    return records


def _tmp(path):
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_save_jpeg(img, path):
    tmp = _tmp(path)
    # 4:4:4 chroma keeps shape edges the shape's colour; quality 95 keeps colours within a few levels.
    img.save(tmp, format="JPEG", quality=95, subsampling=0)
    os.replace(tmp, path)


def _atomic_write_json(obj, path):
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def builtin_mismatch(out_dir, splits=None, seed=0, image_px=64, hops: Hops | None = None) -> str | None:
    """How the built-in set already in `out_dir` differs from the one these arguments generate ("seed 0 -> 1, ..."),
    or None when there is none there or it is the same."""
    meta_path = Path(out_dir) / _META
    if not meta_path.exists():
        return None
    old = json.loads(meta_path.read_text())
    new = _meta(splits, seed, image_px, hops)
    old, new = ({"task": "shapes"} | m for m in (old, new))  # a shapes meta has no "task" (written before hops)
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return ", ".join(changed) or None


def _meta(splits, seed, image_px, hops: Hops | None = None):
    splits = dict({"train": 2000, "val": 200} if splits is None else splits)
    # Canonical order, so image ids do not depend on the order the caller listed the splits in.
    names = sorted(splits, key=lambda s: (_SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else len(_SPLIT_ORDER), s))
    splits = {s: splits[s] for s in names}
    if hops is None:
        return {"version": VERSION, "seed": seed, "image_px": image_px, "splits": splits}
    meta = {"version": HOPS_VERSION, "task": "hops_text" if hops.text else "hops", "seed": seed,
            "k": hops.k, "nodes": hops.nodes, "step_style": hops.step_style, "splits": splits}
    if not hops.text:
        meta["image_px"] = image_px
    return meta


def builtin_path(out_dir, split, hops: Hops | None = None) -> Path:
    """The json file of `split`: aokvqa_v1p0_{split}.json, or hops_text_{split}.json for the text variant."""
    text = hops is not None and hops.text
    return Path(out_dir) / (f"hops_text_{split}.json" if text else f"aokvqa_v1p0_{split}.json")


def _written(out_dir, meta) -> list[Path]:
    """The files and image folders a generation recorded by `meta` wrote."""
    if meta.get("task") == "hops_text":
        return [out_dir / f"hops_text_{s}.json" for s in meta["splits"]]
    return [p for s in meta["splits"] for p in (out_dir / f"{s}2017", out_dir / f"aokvqa_v1p0_{s}.json")]


def generate_builtin(out_dir, splits=None, seed=0, image_px=64, regenerate=False, hops: Hops | None = None):
    """Write the built-in set (or, with `hops`, the hops task) under `out_dir`; return {split: path of its json}.

    `splits` maps split name to number of questions (one image each); default {"train": 2000, "val": 200}.
    Does nothing when `builtin_meta.json` records the same task, version, seed, sizes and image size and every
    json exists. A set generated there with other settings is an error naming what differs (its files are never
    deleted unasked); with `regenerate=True` it is replaced. Refuses to write into a directory that holds A-OKVQA
    (or hops_text) json files it did not generate.
    """
    out_dir = Path(out_dir)
    splits = dict({"train": 2000, "val": 200} if splits is None else splits)
    if not splits:
        raise ValueError("splits is empty")
    for name, n in splits.items():
        if not (isinstance(name, str) and name.isalnum()):
            raise ValueError(f"split name must be alphanumeric, got {name!r}")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"split {name!r}: size must be an int >= 1, got {n!r}")
    if not (isinstance(image_px, int) and image_px >= 16 and image_px % 2 == 0):
        raise ValueError(f"image_px must be an even int >= 16, got {image_px!r}")
    if hops is not None and not isinstance(hops, Hops):
        raise TypeError(f"hops must be a Hops or None, got {hops!r}")
    meta = _meta(splits, seed, image_px, hops)
    names = list(meta["splits"])
    paths = {s: builtin_path(out_dir, s, hops) for s in names}

    meta_path = out_dir / _META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old == meta and all(p.exists() for p in paths.values()):
            return paths
        if old != meta and not regenerate:
            changed = builtin_mismatch(out_dir, splits, seed, image_px, hops)
            raise FileExistsError(
                f"{out_dir} holds a built-in set generated with other settings ({changed}); not overwriting it. "
                "Point the data paths (train_path, val_path, image_root) to another directory, or set "
                "builtin_regenerate: true (--regenerate) to replace it.")
        # Remove what the previous generation wrote, so no stale image or json outlives it.
        meta_path.unlink()
        for path in _written(out_dir, old):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    elif out_dir.exists():
        foreign = sorted([*out_dir.glob("aokvqa_v1p0_*.json"), *out_dir.glob("hops_text_*.json")])
        if foreign:
            raise FileExistsError(
                f"{out_dir} holds {foreign[0].name} without {_META}: not a built-in set, not overwriting")

    next_id = 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in names:
        image_dir = None
        if hops is None or not hops.text:
            image_dir = out_dir / f"{s}2017"
            image_dir.mkdir(parents=True, exist_ok=True)
        if hops is None:
            records = _split_records(s, splits[s], seed, next_id, image_px, image_dir)
        else:
            records = _hops_split_records(s, splits[s], seed, next_id, image_px, image_dir, hops)
        next_id += splits[s]
        _atomic_write_json(records, paths[s])
    _atomic_write_json(meta, meta_path)  # last: a run cut short leaves no matching meta behind
    return paths


def main(argv=None):
    """CLI: generate the built-in set and print the json path of each split."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/generated/builtin"), help="output directory")
    p.add_argument("--train", type=int, default=2000, help="number of train questions")
    p.add_argument("--val", type=int, default=200, help="number of val questions")
    p.add_argument("--test", type=int, default=0, help="number of test questions (no answers); 0 = no test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-px", type=int, default=64, help="image side in pixels")
    p.add_argument("--regenerate", action="store_true",
                   help="replace a built-in set generated in --out with other settings (else an error)")
    p.add_argument("--task", choices=("shapes", "hops", "hops_text"), default="shapes",
                   help="the shapes set, or the hops task (multimodal, or text in the original Coconut's format)")
    p.add_argument("--hops-k", type=int, default=Hops.k, help="hops: arrows to follow")
    p.add_argument("--hops-nodes", type=int, default=Hops.nodes, help="hops: colours in each map")
    p.add_argument("--hops-step-style", choices=("node", "arrow"), default=Hops.step_style,
                   help='hops: a step is "blue." (node) or "red>blue." (arrow)')
    args = p.parse_args(argv)
    splits = {name: n for name, n in (("train", args.train), ("val", args.val), ("test", args.test)) if n > 0}
    hops = None if args.task == "shapes" else Hops(k=args.hops_k, nodes=args.hops_nodes,
                                                     step_style=args.hops_step_style, text=args.task == "hops_text")
    for split, path in generate_builtin(args.out, splits, seed=args.seed, image_px=args.image_px,
                                        regenerate=args.regenerate, hops=hops).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
