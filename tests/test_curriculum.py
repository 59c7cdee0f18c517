"""Curriculum layouts (exact tokens and labels per stage and mode), tiles, collator, batch sampler."""

import math
import random
import types

import pytest
import torch

from data_fixtures import write_aokvqa
from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.backbone import IMG_CONTEXT, IMG_END, IMG_START, _image_processor
from multimodal_coconut.baselines import naive_forward
from multimodal_coconut.curriculum import (
    CoconutDataset, Collator, LengthGroupedBatchSampler, Mode, check_round_trip, draw_stages, image_tiles,
    prompt_layout, stage_for_epoch, tile_count, train_layout,
)
from multimodal_coconut.data import DataError, Sample, load_samples, open_image

S, L, E = 900, 901, 902  # start-latent, latent, end-latent
IDS = dict(start_id=S, latent_id=L, end_id=E)
PREFIX, STEPS, ANSWER = [1, 2], [[10, 11], [20], [30, 31]], [40, 0]  # 3 steps; the answer ends with EOS (0)


def layout(stage, steps=STEPS, **mode):
    return train_layout(PREFIX, steps, ANSWER, stage, Mode(**mode), **IDS)


# --- pure layouts -------------------------------------------------------------------------------------------


def test_coconut_train_layouts():
    ids, labels = layout(0, coconut=True, max_latent_stage=3)
    assert ids == [1, 2, S, E, 10, 11, 20, 30, 31, 40, 0]
    assert labels == [-100] * 4 + [10, 11, 20, 30, 31, 40, 0]
    ids, labels = layout(1, coconut=True, c_thought=2, max_latent_stage=3)
    assert ids == [1, 2, S, L, L, E, 20, 30, 31, 40, 0]
    assert labels == [-100] * 6 + [20, 30, 31, 40, 0]
    ids, labels = layout(3, coconut=True, c_thought=2, max_latent_stage=3)
    assert ids == [1, 2, S] + [L] * 6 + [E, 40, 0] and labels == [-100] * 10 + [40, 0]


def test_stage_beyond_a_samples_steps_keeps_stage_latents():
    # stage <= max_latent_stage: k * c_thought latents even when the sample has fewer than k steps (original)
    ids, labels = layout(2, steps=[[10, 11]], coconut=True, c_thought=2, max_latent_stage=3)
    assert ids == [1, 2, S, L, L, L, L, E, 40, 0] and labels == [-100] * 8 + [40, 0]


@pytest.mark.parametrize("pad, n_latent", [(False, 1), (True, 2)])
def test_past_max_latent_stage(pad, n_latent):
    # past max_latent_stage (2): all steps go; max_latent_stage groups, or min(n_steps, max) without padding
    ids, labels = layout(5, steps=[[10, 11]], coconut=True, max_latent_stage=2, pad_latent_to_max=pad)
    assert ids == [1, 2, S] + [L] * n_latent + [E, 40, 0]
    assert labels == [-100] * (4 + n_latent) + [40, 0]
    ids, _ = layout(5, coconut=True, max_latent_stage=2, pad_latent_to_max=pad)  # 3 steps: 2 groups either way
    assert ids == [1, 2, S, L, L, E, 40, 0]


def test_cot_no_cot_no_thoughts_pause_layouts():
    assert layout(0, cot=True) == ([1, 2, 10, 11, 20, 30, 31, 40, 0], [-100] * 2 + [10, 11, 20, 30, 31, 40, 0])
    assert layout(0, no_cot=True) == ([1, 2, 40, 0], [-100, -100, 40, 0])
    assert layout(2, no_cot=True, max_latent_stage=3) == ([1, 2, 40, 0], [-100, -100, 40, 0])
    # no_thoughts: the curriculum removes steps, no latents and no markers
    assert layout(2, coconut=True, no_thoughts=True, c_thought=3, max_latent_stage=3) == (
        [1, 2, 30, 31, 40, 0], [-100, -100, 30, 31, 40, 0])
    # no mode flag ("pause as thought"): coconut's layout
    assert layout(1) == layout(1, coconut=True)


def test_prompt_layouts():
    def prompt(stage, n_steps, **mode):
        return prompt_layout(PREFIX, n_steps, stage, Mode(**mode), **IDS)

    assert prompt(0, 3, coconut=True) == [1, 2, S, E]
    assert prompt(2, 3, coconut=True, c_thought=2, max_latent_stage=3) == [1, 2, S, L, L, L, L, E]
    assert prompt(9, 3, coconut=True, max_latent_stage=2) == [1, 2, S, L, L, E]
    assert prompt(2, 1, coconut=True, max_latent_stage=3) == [1, 2, S, L, E]  # capped by the sample's steps
    assert prompt(2, 1, coconut=True, max_latent_stage=3, pad_latent_to_max=True) == [1, 2, S, L, L, E]
    assert prompt(2, None, coconut=True, max_latent_stage=3) == [1, 2, S, L, L, E]  # steps unknown (test split)
    assert prompt(0, 3, cot=True) == prompt(0, 3, no_cot=True) == [1, 2]
    assert prompt(2, 3, coconut=True, no_thoughts=True, max_latent_stage=3) == [1, 2]


def test_stage_for_epoch_and_mode():
    assert [stage_for_epoch(e, Mode(coconut=True), 2) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert stage_for_epoch(7, Mode(cot=True), 1) == stage_for_epoch(7, Mode(no_cot=True), 1) == 0
    cfg = types.SimpleNamespace(coconut=True, cot=False, no_cot=False, no_thoughts=False, c_thought=2,
                                max_latent_stage=3, pad_latent_to_max=True, uniform_prob=0.1, answer_from="direct",
                                curriculum=False)
    assert Mode.from_config(cfg) == Mode(coconut=True, c_thought=2, max_latent_stage=3, pad_latent_to_max=True,
                                         uniform_prob=0.1, list_choices=False, curriculum=False)
    with pytest.raises(ValueError, match="at most one"):
        Mode(coconut=True, cot=True)
    with pytest.raises(ValueError, match="cot"):
        Mode(cot=True, uniform_prob=0.5)


def test_uniform_prob_draws_are_seeded():
    mode = Mode(coconut=True, uniform_prob=0.5, max_latent_stage=3)
    n_steps = [3, 1, 3, 2, 3, 0, 3, 3, 1, 2] * 3
    a = draw_stages(n_steps, 2, mode, seed=7, epoch=4)
    assert a == draw_stages(n_steps, 2, mode, seed=7, epoch=4)
    assert a != draw_stages(n_steps, 2, mode, seed=7, epoch=5)
    assert all(s == 2 or 0 <= s <= n for s, n in zip(a, n_steps))
    assert a[:10] == [2, 0, 2, 2, 1, 0, 1, 1, 2, 2]  # pinned: str-seeded random.Random is stable across runs
    state = random.getstate()
    draw_stages(n_steps, 2, mode, seed=7, epoch=4)
    assert random.getstate() == state  # never the global RNG
    assert draw_stages(n_steps, 2, Mode(coconut=True), seed=7, epoch=4) == [2] * len(n_steps)


def test_round_trip_check_raises_on_a_tokenizer_that_merges_across_pieces():
    def merging_encode(text):  # a "tokenizer" with one token for "\n###"
        return [ord(c) for c in text.replace("\n###", "\x00")]

    pieces = [ord(c) for c in "Q?\n" + "step\n" + "### a"]
    check_round_trip(lambda t: [ord(c) for c in t], "", "Q?\n", ["step"], "a", pieces)
    with pytest.raises(ValueError, match="piece boundaries"):
        check_round_trip(merging_encode, "", "Q?\n", ["step"], "a", pieces)


# --- dataset on the tiny backbone -----------------------------------------------------------------------------


@pytest.fixture
def fixture_samples(tmp_path):
    path, root = write_aokvqa(tmp_path)
    return load_samples("aokvqa", path, image_root=root)


def text(bb, ids):
    return bb.tokenizer.decode(ids)


def test_dataset_layout_text_and_labels(tiny, fixture_samples):
    mode = Mode(coconut=True, c_thought=2, max_latent_stage=3)
    ds = CoconutDataset(fixture_samples, tiny, mode, 1, train=True, max_length=4096, seed=0, epoch=0)
    item = ds[1]  # qB: 130x60 -> 2 tiles + thumbnail
    image = IMG_START + IMG_CONTEXT * (3 * 16) + IMG_END
    question = "\nWhich shape is left of the square?\nChoices: circle, cross, triangle, square\n"
    rest = "A circle is there.\nRound means circle.\n### circle<|endoftext|>"
    assert text(tiny, item["input_ids"]) == image + question + "<|start-latent|>" + "<|latent|>" * 2 + \
        "<|end-latent|>" + rest
    labelled = [t for t in item["labels"] if t != -100]
    assert text(tiny, labelled) == rest
    assert item["labels"][: len(item["labels"]) - len(labelled)] == [-100] * (len(item["input_ids"]) - len(labelled))
    assert item["labels"][-len(labelled):] == item["input_ids"][-len(labelled):]
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(3)]
    assert item["pixel_values"].shape == (3, 3, 64, 64) and item["idx"] == 1

    prompts = CoconutDataset(fixture_samples, tiny, mode, 1, train=False, max_length=4096, seed=0, epoch=0)
    thoughts = "<|start-latent|><|latent|><|latent|><|end-latent|>"
    assert text(tiny, prompts[1]["input_ids"]) == image + question + thoughts
    assert prompts[1]["labels"] is None

    cot = CoconutDataset(fixture_samples, tiny, Mode(cot=True, list_choices=False), 0, train=True, max_length=4096,
                         seed=0, epoch=0)
    assert text(tiny, cot[1]["input_ids"]) == image + "\nWhich shape is left of the square?\n" + \
        "The left shape is round! So it is a circle.\n" + rest
    cot_prompt = CoconutDataset(fixture_samples, tiny, Mode(cot=True), 0, train=False, max_length=4096, seed=0,
                                epoch=0)
    assert text(tiny, cot_prompt[1]["input_ids"]) == image + question


def test_dataset_stages_with_uniform_prob_and_with_stage(tiny, fixture_samples):
    mode = Mode(coconut=True, uniform_prob=1.0, max_latent_stage=3)
    a = CoconutDataset(fixture_samples * 4, tiny, mode, 3, train=True, max_length=4096, seed=1, epoch=2)
    b = CoconutDataset(fixture_samples * 4, tiny, mode, 3, train=True, max_length=4096, seed=1, epoch=2)
    assert a.stages == b.stages == draw_stages([3] * 12, 3, mode, 1, 2) and len(set(a.stages)) > 1
    assert [a[i]["input_ids"] for i in range(12)] == [b[i]["input_ids"] for i in range(12)]
    for i, stage in enumerate(a.stages):  # each item is laid out at its own drawn stage
        assert a[i]["input_ids"].count(tiny.latent_id) == stage
    c = a.with_stage(3, epoch=3)
    assert c.stages == draw_stages([3] * 12, 3, mode, 1, 3) and a.stages == b.stages


def test_default_max_new_tokens_is_the_longest_target_at_the_stage_plus_a_margin(tiny, fixture_samples):
    from multimodal_coconut.curriculum import GENERATION_MARGIN, default_max_new_tokens

    def n_tokens(text):
        return len(tiny.tokenizer.encode(text, add_special_tokens=False))

    def target(sample, stage):  # what the model writes after the prompt: remaining steps, "### answer", EOS
        return sum(n_tokens(step + "\n") for step in sample.steps[stage:]) + n_tokens("### " + sample.answer) + 1

    mode = Mode(coconut=True, max_latent_stage=3)
    for train in (True, False):  # the same from a training set or a generation set of the same samples
        ds = CoconutDataset(fixture_samples, tiny, mode, 0, train=train, max_length=4096, seed=0, epoch=0)
        for stage in (0, 1, 3):
            assert default_max_new_tokens(ds, stage) == max(target(s, stage) for s in fixture_samples) \
                + GENERATION_MARGIN
    assert max(target(s, 0) for s in fixture_samples) > max(target(s, 3) for s in fixture_samples)


def test_tile_counts_and_placeholders(tiny, fixture_samples):
    ds = CoconutDataset(fixture_samples, tiny, Mode(coconut=True), 0, train=True, max_length=4096, seed=0, epoch=0)
    for i, tiles in enumerate([1, 3, 5]):  # 64x64; 130x60 -> 2x1 + thumbnail; 128x128 -> 2x2 + thumbnail
        item = ds[i]
        assert item["pixel_values"].shape == (tiles, 3, 64, 64)
        assert item["input_ids"].count(tiny.image_token_id) == tiles * tiny.tokens_per_tile
    # the thumbnail is the last tile: the whole image resized to one tile
    ip = tiny.image_processor
    whole = ip(images=[open_image(fixture_samples[2])], crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ds[2]["pixel_values"][-1], whole[0])

    ip.use_thumbnail = False
    assert [tile_count(w, h, ip) for w, h in [(64, 64), (130, 60), (128, 128)]] == [1, 2, 4]
    assert image_tiles(open_image(fixture_samples[2]), ip).shape[0] == 4
    ip.use_thumbnail, ip.max_patches = True, 1
    assert tile_count(128, 128, ip) == image_tiles(open_image(fixture_samples[2]), ip).shape[0] == 1


def test_internvl3_tiling_counts():
    ip = _image_processor(448)
    ip.min_patches, ip.max_patches, ip.use_thumbnail = 1, 12, True
    assert [tile_count(w, h, ip) for w, h in [(640, 480), (640, 427), (480, 640), (640, 640), (640, 360),
                                                (448, 448)]] == [13, 7, 13, 5, 3, 1]


def test_tile_count_mismatch_at_getitem_is_an_error(tiny, fixture_samples):
    from data_fixtures import jpeg_bytes

    ds = CoconutDataset(fixture_samples, tiny, Mode(coconut=True), 0, train=True, max_length=4096, seed=0, epoch=0)
    with open(fixture_samples[0].image, "wb") as f:  # the file changed after construction
        f.write(jpeg_bytes((128, 128)))
    with pytest.raises(DataError, match=r"000000000101\.jpg: question_id 'qA': field 'image': decoding gave 5 tiles"):
        ds[0]


def test_text_only_samples_and_text_only_backbone(tiny_lm, fixture_samples):
    s = Sample("t1", None, "What is 2 plus 3?", [], None, None, False, ["2 plus 3 is 5."], "5", "train", "x.json", 0)
    ds = CoconutDataset([s], tiny_lm, Mode(coconut=True), 1, train=True, max_length=4096, seed=0, epoch=0)
    assert text(tiny_lm, ds[0]["input_ids"]) == \
        "What is 2 plus 3?\n<|start-latent|><|latent|><|end-latent|>### 5<|endoftext|>"
    assert ds[0]["pixel_values"] is None
    with pytest.raises(ValueError, match="text-only"):
        CoconutDataset(fixture_samples, tiny_lm, Mode(coconut=True), 0, train=True, max_length=4096, seed=0, epoch=0)


# --- collator ---------------------------------------------------------------------------------------------------


def test_collator_alignment_positions_and_tiles(tiny, fixture_samples):
    mode = Mode(coconut=True, max_latent_stage=3)
    items = [CoconutDataset(fixture_samples, tiny, mode, stage, train=True, max_length=4096, seed=0, epoch=0)[i]
             for stage, i in [(1, 2), (2, 0), (0, 1)]]  # 5 tiles + 1 latent, 1 tile + 2 latents, 3 tiles + 0
    items.append(CoconutDataset(fixture_samples, tiny, Mode(cot=True), 0, train=True, max_length=4096, seed=0,
                                epoch=0)[1])  # no latents at all
    batch = Collator(tiny)(items)
    ids, mask, pos, labels = batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["labels"]
    first = [it["input_ids"].index(tiny.latent_id) for it in items[:2]]  # rows 0, 1 have latents; 2, 3 do not
    expected_left = [0, first[0] - first[1], 0, 0]
    assert expected_left[1] >= 4 * 16  # row 1 has 4 tiles fewer than row 0
    assert ids.shape == (4, max(p + len(it["input_ids"]) for p, it in zip(expected_left, items)))
    assert ids[0].tolist().index(tiny.latent_id) == ids[1].tolist().index(tiny.latent_id) == first[0]
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        left = int((mask[i].cumsum(0) == 0).sum())
        assert left == expected_left[i]  # only latent rows are left-padded
        assert ids[i, left:left + n].tolist() == it["input_ids"] and mask[i].sum() == n
        assert pos[i, left:left + n].tolist() == list(range(n)) and pos[i, ~mask[i].bool()].eq(0).all()
        assert labels[i, left:left + n].tolist() == it["labels"] and labels[i, ~mask[i].bool()].eq(-100).all()
        assert ids[i, ~mask[i].bool()].eq(tiny.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == 5 + 1 + 3 + 3
    torch.testing.assert_close(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
    assert int((ids == tiny.image_token_id).sum()) == batch["pixel_values"].shape[0] * tiny.tokens_per_tile
    assert batch["idx"].tolist() == [2, 0, 1, 1]

    prompts = CoconutDataset(fixture_samples, tiny, mode, 2, train=False, max_length=4096, seed=0, epoch=0)
    pbatch = Collator(tiny)([prompts[i] for i in range(3)])
    assert "labels" not in pbatch and pbatch["pixel_values"].shape[0] == 9
    with pytest.raises(ValueError, match="mixes"):
        Collator(tiny)([items[0], prompts[0]])


def test_collated_batch_runs_the_model_and_matches_naive(tiny, fixture_samples):
    model = MultimodalCoconut(tiny.model, tiny.latent_id, tiny.start_latent_id, tiny.end_latent_id,
                              tiny.eos_token_id).eval()
    mode = Mode(coconut=True, c_thought=2, max_latent_stage=3)
    items = [CoconutDataset(fixture_samples, tiny, mode, stage, train=True, max_length=4096, seed=0, epoch=0)[i]
             for stage, i in [(1, 0), (2, 1), (3, 2)]]
    batch = Collator(tiny)(items)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"], batch["pixel_values"])
    with torch.no_grad():
        ours, ref = model(*args), naive_forward(model, *args)
    assert torch.isfinite(ours.loss) and ours.loss.item() > 1.0
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5

    prompts = CoconutDataset(fixture_samples, tiny, mode, 2, train=False, max_length=4096, seed=0, epoch=0)
    pbatch = Collator(tiny)([prompts[i] for i in range(3)])
    tokens = model.generate(pbatch["input_ids"], pbatch["attention_mask"], pbatch["pixel_values"],
                            max_new_tokens=3, position_ids=pbatch["position_ids"])
    assert tokens.shape[0] == 3 and tokens.shape[1] <= pbatch["input_ids"].shape[1] + 3


# --- sampler ------------------------------------------------------------------------------------------------------


def test_sampler_deterministic_disjoint_and_equal_to_one_process():
    lengths = [random.Random(i).randint(10, 500) for i in range(103)]
    one = LengthGroupedBatchSampler(lengths, 8, shuffle=True, seed=3)
    one.set_epoch(2)
    batches = list(one)
    again = LengthGroupedBatchSampler(lengths, 8, shuffle=True, seed=3)
    again.set_epoch(2)
    assert list(again) == batches and len(one) == len(batches) == 13
    one.set_epoch(3)
    assert list(one) != batches
    assert sorted(i for b in batches for i in b) == list(range(103))  # every sample once per epoch
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first

    for drop_last in (False, True):
        single = LengthGroupedBatchSampler(lengths, 8, shuffle=True, seed=3, drop_last=drop_last)
        ranks = [LengthGroupedBatchSampler(lengths, 4, shuffle=True, seed=3, rank=r, world_size=2,
                                           drop_last=drop_last) for r in range(2)]
        for s in [single, *ranks]:
            s.set_epoch(2)
        per_rank = [list(r) for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(single)
        for b, (r0, r1) in zip(single, zip(*per_rank)):
            assert len(r0) == len(r1)
            if len(b) == 8:
                assert r0 + r1 == b and not set(r0) & set(r1)
            else:  # the last, short global batch (7 of 103): filled up to a multiple of 2 by repeating its first
                assert r0 + r1 == b + b[:1]
        if drop_last:
            assert len(single) == 12 and all(len(b) == 8 for b in single)


def test_sampler_without_shuffle_sorts_by_length():
    lengths = [5, 50, 7, 49, 6, 48]
    assert list(LengthGroupedBatchSampler(lengths, 2, shuffle=False, seed=0)) == [[1, 3], [5, 2], [4, 0]]


def _padding_fraction(rows, batches):
    """rows: (length, first latent column or None); padding as the collator lays the batch out."""
    real = total = 0
    for b in batches:
        anchor = max((rows[i][1] for i in b if rows[i][1] is not None), default=0)
        width = max((anchor - rows[i][1] if rows[i][1] is not None else 0) + rows[i][0] for i in b)
        real += sum(rows[i][0] for i in b)
        total += width * len(b)
    return 1 - real / total


def test_length_grouping_cuts_padding_on_coco_like_images():
    """A-OKVQA-like: COCO aspect ratios -> 1-13 InternVL3 tiles of 256 tokens (max 12 + thumbnail), batch 8."""
    ip = _image_processor(448)
    ip.min_patches, ip.max_patches, ip.use_thumbnail = 1, 12, True
    rng = random.Random(0)

    def coco_size():
        r = rng.random()
        for p, size in [(.45, (640, 480)), (.65, (640, 427)), (.77, (480, 640)), (.82, (427, 640)), (.87, (640, 640))]:
            if r < p:
                return size
        ar = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        return (640, round(640 / ar)) if ar >= 1 else (round(640 * ar), 640)

    n = 2000
    tiles = [tile_count(*coco_size(), ip) for _ in range(n)]
    assert min(tiles) == 1 and max(tiles) == 13
    prefix = [2 + 256 * t + rng.randint(25, 60) for t in tiles]  # image + question and choices
    rest = [rng.randint(40, 110) for _ in range(n)]  # remaining steps + answer
    for latents in (None, 1):  # stage 0 (no alignment) and stage 1 (first latents aligned)
        rows = [(p + r, None) if latents is None else (p + 2 + latents + r, p + 1) for p, r in zip(prefix, rest)]
        grouped = _padding_fraction(rows, LengthGroupedBatchSampler([r[0] for r in rows], 8, shuffle=True, seed=0))
        perm = list(range(n))
        random.Random(1).shuffle(perm)
        shuffled = _padding_fraction(rows, [perm[i:i + 8] for i in range(0, n, 8)])
        assert grouped < 0.03 and shuffled > 0.15, (grouped, shuffled)
