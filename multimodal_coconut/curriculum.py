"""From Samples to the batches `MultimodalCoconut` takes: the curriculum's token layouts, the dataset, the collator
and a length-grouped batch sampler.

    mode = Mode.from_config(cfg)
    stage = stage_for_epoch(epoch, mode, cfg.epochs_per_stage)
    train_set = CoconutDataset(samples, backbone, mode, stage, train=True, max_length=cfg.max_length,
                               seed=cfg.seed, epoch=epoch)
    sampler = LengthGroupedBatchSampler(train_set.lengths, cfg.batch_size_training, shuffle=True, seed=cfg.seed,
                                        rank=rank, world_size=world_size)
    sampler.set_epoch(epoch)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=Collator(backbone), num_workers=2)

Text of one sample (the pieces are tokenised separately, at the same boundaries as the original Coconut):

    <img><IMG_CONTEXT> x (tiles * tokens_per_tile)</img>     image ids, built directly (never tokenised)
    "\n{question}\nChoices: {c0}, {c1}, {c2}, {c3}\n"         the choices line only for multiple choice
    <|start-latent|><|latent|> x (k * c_thought)<|end-latent|>   markers only in coconut / pause mode
    "{step}\n" for each remaining step
    "### {answer}" EOS

Labels are -100 on the image, the question, the markers and the latents. The generation prompt stops after
`<|end-latent|>` (after the question when there are no markers). Stage semantics are the original's
(facebookresearch/coconut dataset.py), see `train_plan` and `prompt_latents`.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass

import torch

from .backbone import IMG_CONTEXT, IMG_END, IMG_START
from .data import DataError, Sample, SkipReport, image_size, open_image, raise_or_skip


# ---------------------------------------------------------------------------------------------------------------
# Mode and stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How samples are laid out: the original Coconut's mode flags and curriculum keys.

    With none of coconut / cot / no_cot set, the layout is Coconut's (markers and latents) and only the model
    differs (the original's "pause as thought" setting).
    """

    coconut: bool = False
    cot: bool = False
    no_cot: bool = False
    no_thoughts: bool = False  # the curriculum removes steps but inserts no latents and no markers
    c_thought: int = 1
    max_latent_stage: int = 1
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    list_choices: bool = True  # put "Choices: ..." in the prompt (multiple choice); false for direct answers
    curriculum: bool = True  # false: every epoch at the last stage (the paper's "w/o curriculum")
    step_targets: bool = False  # training items carry their thought-replaced steps' tokens (thought_supervision)

    def __post_init__(self):
        modes = [k for k in ("coconut", "cot", "no_cot") if getattr(self, k)]
        if len(modes) > 1:
            raise ValueError(f"at most one of coconut, cot, no_cot may be set, got {modes}")
        if self.c_thought < 0 or self.max_latent_stage < 0:
            raise ValueError(f"c_thought and max_latent_stage must be >= 0, got {self.c_thought}, "
                             f"{self.max_latent_stage}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.cot and self.uniform_prob > 0:
            # The original would put latent tokens, without markers, into a plain CoT model (and crash on them).
            raise ValueError("uniform_prob > 0 draws curriculum stages; it cannot be combined with cot")

    @classmethod
    def from_config(cls, cfg) -> Mode:
        return cls(coconut=cfg.coconut, cot=cfg.cot, no_cot=cfg.no_cot, no_thoughts=cfg.no_thoughts,
                   c_thought=cfg.c_thought, max_latent_stage=cfg.max_latent_stage,
                   pad_latent_to_max=cfg.pad_latent_to_max, uniform_prob=cfg.uniform_prob,
                   list_choices=cfg.answer_from == "choice", curriculum=cfg.curriculum,
                   step_targets=getattr(cfg, "thought_supervision", 0.0) > 0)  # a config without the key: off

    @property
    def markers(self) -> bool:
        """Whether `<|start-latent|>` / `<|end-latent|>` are written (the original's `not no_special_marker`)."""
        return not (self.cot or self.no_cot or self.no_thoughts)

    @property
    def thoughts_per_step(self) -> int:
        return 0 if self.no_thoughts else self.c_thought  # the original sets c_thought = 0 for no_thoughts


def stage_for_epoch(epoch: int, mode: Mode, epochs_per_stage: int) -> int:
    """The scheduled curriculum stage: epoch // epochs_per_stage, always 0 for cot and no_cot, and the last stage
    (max_latent_stage + 1: every step replaced) from the first epoch without the curriculum."""
    if mode.cot or mode.no_cot:
        return 0
    return epoch // epochs_per_stage if mode.curriculum else mode.max_latent_stage + 1


def train_plan(stage: int, n_steps: int, mode: Mode) -> tuple[int, int]:
    """(steps removed, latent tokens) of a training sample at `stage` (the original's get_cot_latent_dataset).

    Up to max_latent_stage, stage k removes k steps and inserts k * c_thought latents, even when the sample has
    fewer than k steps. Past it, all steps go and max_latent_stage groups remain (min(n_steps, max_latent_stage)
    without pad_latent_to_max). no_cot removes all steps and inserts nothing.
    """
    if stage > mode.max_latent_stage:
        skip = n_steps
        groups = mode.max_latent_stage if mode.pad_latent_to_max else min(n_steps, mode.max_latent_stage)
    else:
        skip = groups = stage
    if mode.no_cot:
        skip, groups = n_steps, 0
    return min(skip, n_steps), groups * mode.thoughts_per_step


def supervised_steps(stage: int, n_steps: int, mode: Mode) -> int:
    """How many of a training sample's removed steps have a thought group of their own at `stage`: step j (1-based)
    is the one group j replaced, and its last thought (latent j * c_thought - 1, 0-based) learns to write it
    (thought_supervision). Pad groups beyond the sample's steps carry no step, and steps removed past
    max_latent_stage without a group carry no thought."""
    skip, n_latents = train_plan(stage, n_steps, mode)
    return min(skip, n_latents // mode.thoughts_per_step) if mode.thoughts_per_step else 0


def prompt_latents(stage: int, n_steps: int | None, mode: Mode) -> int:
    """Latent tokens in a generation prompt (the original's get_question_latent_dataset).

    min(stage, max_latent_stage) groups, capped by the sample's number of steps unless pad_latent_to_max.
    `n_steps=None` (an unannotated sample, e.g. the test split) is not capped.
    """
    if mode.no_cot:
        return 0
    cap = mode.max_latent_stage
    if not mode.pad_latent_to_max and n_steps is not None:
        cap = min(cap, n_steps)
    return min(cap, stage) * mode.thoughts_per_step


def _thoughts(n: int, mode: Mode, start_id: int, latent_id: int, end_id: int) -> list[int]:
    if not mode.markers:
        assert n == 0, "latent tokens without markers"  # Mode rules this out (no_thoughts has 0 per step)
        return []
    return [start_id] + [latent_id] * n + [end_id]


def train_layout(prefix: list[int], steps: list[list[int]], answer: list[int], stage: int, mode: Mode, *,
                 start_id: int, latent_id: int, end_id: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a training sample: prefix (image + question), thoughts, remaining steps, answer.

    `answer` already ends with EOS. Labels are -100 on the prefix, the markers and the latents.
    """
    skip, n = train_plan(stage, len(steps), mode)
    thoughts = _thoughts(n, mode, start_id, latent_id, end_id)
    rest = list(itertools.chain.from_iterable(steps[skip:])) + answer
    return prefix + thoughts + rest, [-100] * (len(prefix) + len(thoughts)) + rest


def prompt_layout(prefix: list[int], n_steps: int | None, stage: int, mode: Mode, *,
                  start_id: int, latent_id: int, end_id: int) -> list[int]:
    """Generation prompt: prefix, then the thoughts; it ends right after `<|end-latent|>` (or the prefix)."""
    return prefix + _thoughts(prompt_latents(stage, n_steps, mode), mode, start_id, latent_id, end_id)


def draw_stages(n_steps: list[int], stage: int, mode: Mode, seed: int, epoch: int) -> list[int]:
    """The stage each sample trains at: the scheduled one, or with probability uniform_prob one drawn uniformly
    from 0..n_steps (as the original). A pure function of (seed, epoch), so a resumed run draws the same."""
    rng = random.Random(f"coconut-stages:{seed}:{epoch}")  # str seeds hash the same in every process
    return [rng.choice(range(n + 1)) if rng.random() < mode.uniform_prob else stage for n in n_steps]


# ---------------------------------------------------------------------------------------------------------------
# Text and image pieces
# ---------------------------------------------------------------------------------------------------------------


def question_text(sample: Sample, list_choices: bool, with_image: bool) -> str:
    """"\\n{question}\\nChoices: a, b, c, d\\n" (no leading newline without an image; no choices line unless
    list_choices)."""
    text = sample.question.strip()
    if list_choices and sample.choices:
        text += "\nChoices: " + ", ".join(c.strip() for c in sample.choices)
    return ("\n" if with_image else "") + text + "\n"


def _tiling(image_processor) -> dict:
    # The loader stores the config's tiling on the processor; pass it explicitly, since HF's GotOcr2 processor only
    # tiles when asked (crop_to_patches) and has no use_thumbnail switch (it always adds the thumbnail).
    return dict(crop_to_patches=True, min_patches=image_processor.min_patches,
                max_patches=image_processor.max_patches)


def tile_count(width: int, height: int, image_processor) -> int:
    """Tiles InternVL's dynamic tiling makes of a width x height image (thumbnail included), without decoding."""
    n = image_processor.get_number_of_image_patches(height, width, _tiling(image_processor))
    if n > 1 and not getattr(image_processor, "use_thumbnail", True):
        n -= 1
    return n


def image_tiles(image, image_processor) -> torch.Tensor:
    """(tiles, 3, H, W) float tensor of a decoded RGB image; tiles in InternVL's order, thumbnail last."""
    pixel_values = image_processor(images=[image], return_tensors="pt", **_tiling(image_processor))["pixel_values"]
    if pixel_values.shape[0] > 1 and not getattr(image_processor, "use_thumbnail", True):
        pixel_values = pixel_values[:-1]  # the processor always appends the thumbnail last
    return pixel_values


def check_round_trip(encode, image_text: str, question: str, steps: list[str], answer: str | None,
                     pieces: list[int]) -> None:
    """The original's check: the pieces tokenised one by one equal the whole text tokenised at once.

    `encode(text)` tokenises with the tokenizer's own special tokens (BOS); `pieces` are the sample's ids as the
    dataset builds them (one image tile, question, steps, answer without EOS). Raises ValueError when they differ.
    """
    whole = image_text + question + "".join(s + "\n" for s in steps) + ("" if answer is None else "### " + answer)
    expected = encode(whole)
    if expected != pieces:
        raise ValueError(
            "the tokenizer does not split this text at the piece boundaries (image | question | each step | "
            f"answer): tokenising {whole!r} at once gives {expected} but piece by piece gives {pieces}. Coconut "
            "needs the boundaries to hold, or removing a step would change the tokens of its neighbours."
        )


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    idx: int  # position in the `samples` list given to the dataset
    sample: Sample
    n_tiles: int
    question: list[int]
    steps: list[list[int]]
    answer: list[int]  # EOS included; empty for an unannotated sample


class CoconutDataset(torch.utils.data.Dataset):
    """Samples at one curriculum stage, tokenised; images are decoded lazily in __getitem__.

    train=True: the full sequence and its labels (a sample without an answer is an error). train=False: the
    generation prompt. Construction opens every image header (a missing or unreadable image fails here, not
    mid-epoch), tokenises everything, draws the uniform_prob stages from (seed, epoch), and checks max_length.
    `lengths[i]` is the token length of item i. `with_stage` gives the same samples at another stage without
    re-reading anything.
    """

    def __init__(self, samples: list[Sample], backbone, mode: Mode, stage: int, *, train: bool, max_length: int,
                 seed: int, epoch: int, skip_bad_records: bool = False, report: SkipReport | None = None):
        self.mode, self.train, self.max_length = mode, train, max_length
        self.skip_bad_records, self.report = skip_bad_records, report
        tok = backbone.tokenizer
        self.image_processor = backbone.image_processor
        self.tokens_per_tile = backbone.tokens_per_tile
        self.ids = dict(start_id=backbone.start_latent_id, latent_id=backbone.latent_id,
                        end_id=backbone.end_latent_id)
        self.eos_token_id = backbone.eos_token_id
        if backbone.is_multimodal:
            self.image_token_ids = tuple(_token_id(tok, t) for t in (IMG_START, IMG_CONTEXT, IMG_END))
        else:
            self.image_token_ids = None
        bos = tok.bos_token_id
        self.bos = [bos] if bos is not None and tok.encode("a", add_special_tokens=True)[:1] == [bos] else []

        kept: list[tuple[int, Sample, int]] = []
        for idx, sample in enumerate(samples):
            if train and sample.answer is None:
                raise DataError(f"has no answer (split {sample.split!r}): it can be predicted, not trained on",
                                file=sample.source, question_id=sample.question_id, field="answer")
            try:
                kept.append((idx, sample, self._tiles_of(sample)))
            except DataError as e:
                raise_or_skip(e, skip_bad_records, report)

        questions = [question_text(s, mode.list_choices, s.image is not None) for _, s, _ in kept]
        q_ids = _encode(tok, questions)
        step_ids = _encode(tok, [step + "\n" for _, s, _ in kept for step in s.steps])
        a_ids = _encode(tok, ["### " + s.answer for _, s, _ in kept if s.answer is not None])
        steps_iter, answers_iter = iter(step_ids), iter(a_ids)
        self._all = []
        for (idx, sample, n_tiles), q in zip(kept, q_ids):
            steps = [next(steps_iter) for _ in sample.steps]
            answer = next(answers_iter) + [self.eos_token_id] if sample.answer is not None else []
            self._all.append(_Item(idx, sample, n_tiles, q, steps, answer))

        if self._all:  # the original checks its first sample
            it = self._all[0]
            image_text = (IMG_START + IMG_CONTEXT * self.tokens_per_tile + IMG_END) if it.n_tiles else ""
            check_round_trip(lambda text: tok.encode(text, add_special_tokens=True), image_text,
                             questions[0], it.sample.steps, it.sample.answer,
                             self.bos + self._image_ids(1 if it.n_tiles else 0) + it.question + sum(it.steps, [])
                             + it.answer[:-1])
        self._set_stage(stage, seed, epoch)

    def _tiles_of(self, sample: Sample) -> int:
        if sample.image is None:
            return 0
        if self.image_token_ids is None:
            raise ValueError(f"question_id {sample.question_id!r} has an image but the backbone is a text-only "
                             "language model; use an InternVL backbone (or text-only samples)")
        width, height = image_size(sample)
        return tile_count(width, height, self.image_processor)

    def _image_ids(self, n_tiles: int) -> list[int]:
        if not n_tiles:
            return []
        start, context, end = self.image_token_ids
        return [start] + [context] * (n_tiles * self.tokens_per_tile) + [end]

    def _set_stage(self, stage: int, seed: int, epoch: int) -> None:
        self.stage, self.seed, self.epoch = stage, seed, epoch
        stages = (draw_stages([len(it.steps) for it in self._all], stage, self.mode, seed, epoch) if self.train
                  else [stage] * len(self._all))
        self.items, self.stages, self.lengths = [], [], []
        for it, item_stage in zip(self._all, stages):
            image_len = it.n_tiles * self.tokens_per_tile + 2 if it.n_tiles else 0  # <img> ... </img>
            n = len(self.bos) + image_len + len(self._text_layout(it, item_stage)[0])
            if n > self.max_length:
                tiles = f" ({it.n_tiles} image tiles x {self.tokens_per_tile})" if it.n_tiles else ""
                error = DataError(f"the sample is {n} tokens{tiles} at stage {item_stage}, more than "
                                  f"max_length={self.max_length}", file=it.sample.source,
                                  question_id=it.sample.question_id, field="max_length", reason="too long")
                raise_or_skip(error, self.skip_bad_records, self.report)
                continue
            self.items.append(it)
            self.stages.append(item_stage)
            self.lengths.append(n)
        if not self.items:
            raise DataError("no samples to use" + (" (all were skipped as bad records)" if self.skip_bad_records
                                                   else ""))

    def with_stage(self, stage: int, *, seed: int | None = None, epoch: int | None = None) -> CoconutDataset:
        """The same samples at another stage / epoch (new uniform_prob draws), sharing the tokenised pieces."""
        new = copy.copy(self)
        new._set_stage(stage, self.seed if seed is None else seed, self.epoch if epoch is None else epoch)
        return new

    def _text_layout(self, it: _Item, stage: int, prefix: list[int] | None = None):
        prefix = it.question if prefix is None else prefix
        if self.train:
            return train_layout(prefix, it.steps, it.answer, stage, self.mode, **self.ids)
        n_steps = len(it.steps) if it.sample.answer is not None else None  # unannotated: steps unknown
        return prompt_layout(prefix, n_steps, stage, self.mode, **self.ids), None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        prefix = self.bos + self._image_ids(it.n_tiles) + it.question
        input_ids, labels = self._text_layout(it, self.stages[i], prefix)
        assert len(input_ids) == self.lengths[i]
        pixel_values = None
        if it.n_tiles:
            pixel_values = image_tiles(open_image(it.sample), self.image_processor)
            if pixel_values.shape[0] != it.n_tiles:
                raise DataError(f"decoding gave {pixel_values.shape[0]} tiles but the image header predicted "
                                f"{it.n_tiles} (is the file different from when the dataset was built?)",
                                file=it.sample.image_name(), question_id=it.sample.question_id, field="image",
                                reason="unreadable image")
        item = {"idx": it.idx, "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}
        if self.train and self.mode.step_targets:  # thought_supervision: the removed steps, the thought writing each
            n = supervised_steps(self.stages[i], len(it.steps), self.mode)
            item["step_ids"] = it.steps[:n]  # as the curriculum tokenises them ("{step}\n")
            item["step_thoughts"] = [(j + 1) * self.mode.c_thought - 1 for j in range(n)]  # latent index in the row
        return item


GENERATION_MARGIN = 16  # tokens allowed past the longest training target, for a slightly longer generated step


def default_max_new_tokens(dataset: CoconutDataset, stage: int) -> int | None:
    """Tokens to generate at `stage` when the config leaves max_new_tokens unset: the longest target of `dataset`'s
    annotated samples at that stage (remaining steps, `### answer`, EOS: what the model writes after the prompt)
    plus GENERATION_MARGIN, so a stage-0 chain of thought is not cut before its answer. None when no sample has one.
    """
    longest = max((sum(len(step) for step in it.steps[train_plan(stage, len(it.steps), dataset.mode)[0]:])
                   + len(it.answer) for it in dataset._all if it.answer), default=None)
    return None if longest is None else longest + GENERATION_MARGIN


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token, so images cannot be placed in the text")
    return token_id


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


class Collator:
    """Pads a list of dataset items into the batch layout of DESIGN.md §1.

    Rows with latents are left-padded so that their first latent sits in one column (the latent passes then
    compute one column each); rows without latents are not. Then all rows are right-padded to a common length.
    Pads: input pad id, attention 0, position 0, label -100. Position ids count from 0 at each row's first real
    token. pixel_values: the tiles of all rows concatenated in row order, or None. Items with step targets
    (Mode.step_targets) add `step_ids` and `step_columns` (see `_step_targets`). Keeps only token ids, so it
    pickles cheaply into DataLoader workers.
    """

    def __init__(self, backbone):
        self.pad_token_id, self.latent_id = backbone.pad_token_id, backbone.latent_id

    def __call__(self, features: list[dict]) -> dict:
        rows = [f["input_ids"] for f in features]
        first = [r.index(self.latent_id) if self.latent_id in r else None for r in rows]
        anchor = max((c for c in first if c is not None), default=0)
        left = [0 if c is None else anchor - c for c in first]
        B, T = len(rows), max(pad + len(r) for pad, r in zip(left, rows))

        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        with_labels = [f.get("labels") is not None for f in features]
        if any(with_labels) and not all(with_labels):
            raise ValueError("a batch mixes items with and without labels (training and generation items)")
        labels = torch.full((B, T), -100, dtype=torch.long) if all(with_labels) else None
        for i, (pad, r) in enumerate(zip(left, rows)):
            input_ids[i, pad:pad + len(r)] = torch.tensor(r)
            attention_mask[i, pad:pad + len(r)] = 1
            position_ids[i, pad:pad + len(r)] = torch.arange(len(r))
            if labels is not None:
                labels[i, pad:pad + len(r)] = torch.tensor(features[i]["labels"])

        tiles = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        batch = {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,  # (B, T)
            "position_ids": position_ids,  # (B, T)
            "pixel_values": torch.cat(tiles) if tiles else None,  # (total tiles, 3, H, W)
            "idx": torch.tensor([f["idx"] for f in features], dtype=torch.long),  # (B,)
        }
        if labels is not None:
            batch["labels"] = labels  # (B, T)
        with_steps = ["step_ids" in f for f in features]
        if any(with_steps):
            if not all(with_steps):
                raise ValueError("a batch mixes items with and without step targets (thought_supervision)")
            batch.update(self._step_targets(features, [None if c is None else pad + c for pad, c in zip(left, first)]))
        return batch

    @staticmethod
    def _step_targets(features: list[dict], first_latent: list[int | None]) -> dict:
        """thought_supervision: each row's removed steps as (B, S, L) token ids (-100 where there is none), and the
        column of the thought that writes each (B, S) (-1 where there is none). S: most steps of a row, L: the longest
        step."""
        S = max(len(f["step_ids"]) for f in features)
        L = max((len(step) for f in features for step in f["step_ids"]), default=0)
        step_ids = torch.full((len(features), S, L), -100, dtype=torch.long)
        step_columns = torch.full((len(features), S), -1, dtype=torch.long)
        for i, f in enumerate(features):
            if f["step_ids"] and first_latent[i] is None:
                raise ValueError(f"item {f['idx']} has steps for its thoughts to write but no latent tokens")
            for j, (step, thought) in enumerate(zip(f["step_ids"], f["step_thoughts"], strict=True)):
                step_ids[i, j, :len(step)] = torch.tensor(step)
                step_columns[i, j] = first_latent[i] + thought
        return {"step_ids": step_ids, "step_columns": step_columns}  # (B, S, L), (B, S)


# ---------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar token length (image tiles make lengths vary ~10x), split across processes.

    The sampler first forms GLOBAL batches of batch_size * world_size indices, then gives rank r the r-th
    consecutive slice of each. Guarantees:

    * the order is a pure function of (seed, epoch): a resumed run sees the same batches;
    * every rank gets the same number of batches, of the same size, disjoint from the other ranks';
    * the global batches depend on batch_size * world_size only, so world_size=1 with batch B*W yields the same
      global batches, in the same order, as W processes with batch B jointly. The one exception is the last,
      incomplete global batch (drop_last=False, W > 1): it is filled up to a multiple of W by repeating its own
      first indices, so it may hold up to W-1 duplicates. With drop_last=True it is dropped and the equality is
      exact.

    shuffle=True: a seeded permutation is cut into chunks of `mega_batches` global batches; each chunk is sorted by
    length and cut into global batches, whose order is then shuffled, and the batch with the longest sample goes
    first (an out-of-memory shows at step 0). shuffle=False (evaluation): all indices sorted by length.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, mega_batches: int = 50):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.mega_batches = rank, world_size, drop_last, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """All global batches of this epoch, in order, before they are split across ranks."""
        size = self.batch_size * self.world_size
        n = len(self.lengths)
        by_length = lambda i: -self.lengths[i]  # noqa: E731  (longest first; sorted() is stable)
        if self.shuffle:
            rng = random.Random(f"length-grouped:{self.seed}:{self.epoch}")
            order = list(range(n))
            rng.shuffle(order)
            chunk = size * self.mega_batches
            order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=by_length)]
        else:
            order = sorted(range(n), key=by_length)
        batches = [order[s:s + size] for s in range(0, n, size)]
        if batches and len(batches[-1]) < size and self.drop_last:
            batches.pop()
        if self.shuffle and batches:
            rng.shuffle(batches)
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self):
        for batch in self.global_batches():
            if len(batch) % self.world_size:
                short = self.world_size - len(batch) % self.world_size
                batch = batch + [batch[j % len(batch)] for j in range(short)]
            per_rank = len(batch) // self.world_size
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self.lengths)
        size = self.batch_size * self.world_size
        return n // size if self.drop_last else -(-n // size)
