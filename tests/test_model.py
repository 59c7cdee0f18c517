"""Parity tests of MultimodalCoconut: zero latents = backbone, cached passes = naive recompute, batch = rows."""

import pytest
import torch

from helpers import collate, loss_and_grads, row_tokens
from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.baselines import naive_forward


def wrap(bb):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()


def tiles(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


def multimodal_batch(bb, latents=(3, 1, 2), n_tiles=(2, 1, 0)):
    rows = [
        row_tokens(bb, "What color is the circle?", n_tiles[0], latents[0], "It is left.\nThe square is red.\n### red"),
        row_tokens(bb, "Which shape is blue?", n_tiles[1], latents[1], "### circle"),
        row_tokens(bb, "How many shapes are there on the left side?", n_tiles[2], latents[2], "### 2"),
    ]
    input_ids, mask, labels, pos = collate(bb, rows)
    pixel_values = tiles(sum(n_tiles), 0) if sum(n_tiles) else None
    return input_ids, mask, labels, pos, pixel_values


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


def test_no_latents_equals_backbone_forward(tiny):
    model = wrap(tiny)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny, latents=(0, 0, 0))
    assert pixel_values.shape[0] == 3
    ours = model(input_ids, mask, labels, pos, pixel_values)
    ref = tiny.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values)
    real = mask.bool()
    assert (ours.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    assert torch.isfinite(ours.logits).all()


def test_no_latents_no_images_equals_backbone(tiny):
    model = wrap(tiny)
    input_ids, mask, labels, pos, _ = multimodal_batch(tiny, latents=(0, 0, 0), n_tiles=(0, 0, 0))
    ours = model(input_ids, mask, labels, pos)
    ref = tiny.model(input_ids=input_ids, attention_mask=mask, position_ids=pos)
    assert (ours.logits[mask.bool()] - ref.logits[mask.bool()]).abs().max() <= 1e-4


@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm", "tiny_lm_tied"])
def test_latent_passes_equal_naive_recompute(backbone, request):
    bb = request.getfixturevalue(backbone)
    model = wrap(bb)
    n_tiles = (2, 1, 0) if bb.is_multimodal else (0, 0, 0)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(bb, latents=(3, 1, 2), n_tiles=n_tiles)
    assert (input_ids == bb.latent_id).sum(1).tolist() == [3, 1, 2]

    batch = (input_ids, mask, labels, pos, pixel_values)
    out, ours = loss_and_grads(model, model, *batch)
    ref, theirs = loss_and_grads(model, lambda *a: naive_forward(model, *a), *batch)

    assert torch.isfinite(out.loss) and out.loss.item() > 1.0
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    torch.testing.assert_close(out.inputs_embeds[real], ref.inputs_embeds[real], atol=1e-5, rtol=1e-5)
    assert_same_grads(ours, theirs)
    # The thoughts really are hidden states, not token embeddings: the latent rows differ from <|latent|>'s row.
    latent_row = model.embedding.weight[bb.latent_id]
    fed = out.inputs_embeds[input_ids == bb.latent_id]
    assert (fed - latent_row).abs().amax(-1).min() > 1e-3
    if bb.is_multimodal:
        assert ours["base_model.model.vision_tower.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


def test_labelled_logits_only_gives_same_loss_and_grads(tiny):
    model = wrap(tiny)
    batch = multimodal_batch(tiny)
    full, g_full = loss_and_grads(model, model, *batch)
    part, g_part = loss_and_grads(model, lambda *a: model(*a, labelled_logits_only=True), *batch)
    labels = batch[2]
    assert part.logits.shape == ((labels[:, 1:] != -100).sum().item(), full.logits.shape[-1])
    torch.testing.assert_close(part.loss, full.loss, atol=1e-6, rtol=1e-6)
    assert_same_grads(g_full, g_part)


def test_extra_passes_change_nothing(tiny):
    """`min_passes` (lock-step under FSDP) splits the last pass further; results are unchanged."""
    model = wrap(tiny)
    batch = multimodal_batch(tiny)
    a = model(*batch)
    b = model(*batch, min_passes=9)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    real = batch[1].bool()
    assert (a.logits[real] - b.logits[real]).abs().max() <= 1e-5


def test_batch_equals_rows_one_by_one(tiny):
    model = wrap(tiny)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny)
    batch = model(input_ids, mask, labels, pos, pixel_values)
    tile_of_row = [(0, 2), (2, 3), (3, 3)]
    for i, (t0, t1) in enumerate(tile_of_row):
        real = mask[i].bool()
        ids = input_ids[i, real][None]
        pv = pixel_values[t0:t1] if t1 > t0 else None
        alone = model(ids, torch.ones_like(ids), labels[i, real][None], None, pv)
        assert (alone.logits[0] - batch.logits[i, real]).abs().max() <= 1e-4


def prompts(bb, multimodal=True):
    """Prompts that end right after <|end-latent|>, with different latents and tiles: rows end in different columns."""
    spec = [("What color is the circle?", 2, 3), ("Which shape is blue?", 1, 1), ("How many?", 1, 0)]
    rows = [row_tokens(bb, q, t if multimodal else 0, k) for q, t, k in spec]
    n_tiles = sum(t for _, t, _ in spec) if multimodal else 0
    return rows, (tiles(n_tiles, 1) if n_tiles else None), [t if multimodal else 0 for _, t, _ in spec]


def trim(tokens, eos):
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def separate_new_rows(model, bb):
    """The three new tokens' LM-head rows start as exact copies of one token's row; with tied embeddings (tiny_lm)
    such exact ties in the logits make greedy argmax depend on the kernel's reduction order. Separate them."""
    with torch.no_grad():
        w = model.lm_head.weight
        new = [bb.start_latent_id, bb.end_latent_id, bb.latent_id]
        w[new] += 0.01 * torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))


def swap_rows(model, a, b):
    """Swap two LM-head rows: EOS then wins exactly where `token` did, so rows stop early."""
    with torch.no_grad():
        w = model.lm_head.weight
        w[[a, b]] = w[[b, a]]


@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm"])
def test_batched_generate_equals_each_row_alone(backbone, request):
    bb = request.getfixturevalue(backbone)
    model = wrap(bb)
    rows, pixel_values, n_tiles = prompts(bb, bb.is_multimodal)
    input_ids, mask, _, pos = collate(bb, rows)
    separate_new_rows(model, bb)
    plain = model.generate(input_ids, mask, pixel_values, max_new_tokens=12, position_ids=pos)
    for token in plain[0, input_ids.shape[1]:].unique():  # the first swap that stops some rows early, not all
        swap_rows(model, bb.eos_token_id, int(token))
        out = model.generate(input_ids, mask, pixel_values, max_new_tokens=12, position_ids=pos)
        ends = [trim(r, bb.eos_token_id) for r in out[:, input_ids.shape[1]:]]
        if min(map(len, ends)) < 12 and max(map(len, ends)) > 1:
            break
        swap_rows(model, bb.eos_token_id, int(token))
    assert out.shape[0] == 3 and torch.equal(out[:, : input_ids.shape[1]], input_ids)
    new = out[:, input_ids.shape[1]:]
    starts = [0, *torch.tensor(n_tiles).cumsum(0).tolist()]
    lengths = []
    for i, r in enumerate(rows):
        ids = torch.tensor([r])
        pv = pixel_values[starts[i]:starts[i + 1]] if pixel_values is not None and n_tiles[i] else None
        alone = model.generate(ids, torch.ones_like(ids), pv, max_new_tokens=12)[0, len(r):]
        assert trim(new[i], bb.eos_token_id) == trim(alone, bb.eos_token_id)
        # after EOS a row only holds EOS
        t = new[i].tolist()
        if bb.eos_token_id in t:
            assert set(t[t.index(bb.eos_token_id):]) == {bb.eos_token_id}
        lengths.append(len(trim(new[i], bb.eos_token_id)))
    assert min(lengths) < 12, f"no row stopped at EOS: {lengths}"


def test_generate_equals_naive_greedy(tiny):
    """KV-cached decoding after the latent passes = greedy decoding by full recompute."""
    model = wrap(tiny)
    rows, pixel_values, _ = prompts(tiny)
    ids = torch.tensor([rows[0]])
    pv = pixel_values[:2]
    ours = model.generate(ids, torch.ones_like(ids), pv, max_new_tokens=6)
    seq = ids
    for _ in range(6):
        logits = naive_forward(model, seq, torch.ones_like(seq), pixel_values=pv).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert ours[0, : seq.shape[1]].tolist() == seq[0].tolist()


def test_errors_say_what_is_wrong(tiny):
    model = wrap(tiny)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny)
    with pytest.raises(ValueError, match=r"48 <IMG_CONTEXT> tokens.*2 tiles x 16 tokens per tile = 32"):
        model(input_ids, mask, labels, pos, pixel_values[:2])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids, mask, labels, pos, None)
    with pytest.raises(ValueError, match="non-empty"):
        model(input_ids[:0], mask[:0], labels[:0], pos[:0])
    vocab = model.embedding.weight.shape[0]
    with pytest.raises(ValueError, match=rf"latent_token_id={vocab} is not a token id .*{vocab}"):
        MultimodalCoconut(tiny.model, vocab, tiny.start_latent_id, tiny.end_latent_id, tiny.eos_token_id)
    shifted = input_ids.clone()
    shifted[0] = torch.roll(shifted[0], 1)
    with pytest.raises(ValueError, match="same column"):
        model(shifted, mask, labels, pos, pixel_values)


def test_text_only_backbone_rejects_pixels(tiny_lm):
    model = wrap(tiny_lm)
    ids = torch.tensor([row_tokens(tiny_lm, "hi", 0, 1, "### a")])
    with pytest.raises(ValueError, match="text-only"):
        model(ids, torch.ones_like(ids), pixel_values=tiles(1, 0))


def test_state_dict_holds_each_parameter_once(tiny):
    model = wrap(tiny)
    keys = list(model.state_dict())
    assert keys and all(k.startswith("base_model.") for k in keys)
    assert len(keys) == len(tiny.model.state_dict())
