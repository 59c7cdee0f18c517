"""Pause as thought (coconut: false) against the plain backbone, the thought hook, and the ablations' replacements."""

import torch

from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.analyze import ablation_hook, attention_map, step_key_words
from multimodal_coconut.curriculum import Mode, stage_for_epoch
from test_model import multimodal_batch


def wrap(bb, **kw):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id,
                             **kw).eval()


def test_pause_as_thought_is_the_plain_backbone(tiny):
    model = wrap(tiny, continuous_thoughts=False)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny, latents=(3, 1, 2))
    out = model(input_ids, mask, labels, pos, pixel_values)
    ref = tiny.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values)
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    # Every latent position was fed the <|latent|> token's own embedding: a learned pause, no hidden state.
    fed = out.inputs_embeds[input_ids == tiny.latent_id]  # (6, C)
    assert fed.shape[0] == 6
    assert torch.equal(fed, model.embedding.weight[tiny.latent_id].expand_as(fed))
    assert model.num_passes(input_ids) == 1
    # Coconut on the same weights and batch feeds hidden states, so its logits differ.
    coconut = wrap(tiny)(input_ids, mask, labels, pos, pixel_values)
    assert (coconut.logits[real] - ref.logits[real]).abs().max() > 1e-3
    # Generation takes the same single pass: the prompt's last logits are the backbone's.
    prompt = input_ids[:, : (input_ids == tiny.end_latent_id).int().argmax(1).max() + 1]
    tokens = model.generate(prompt, mask[:, : prompt.shape[1]], pixel_values, max_new_tokens=1,
                            position_ids=pos[:, : prompt.shape[1]])
    ref_prompt = tiny.model(input_ids=prompt, attention_mask=mask[:, : prompt.shape[1]],
                            position_ids=pos[:, : prompt.shape[1]], pixel_values=pixel_values).logits
    last = prompt.shape[1] - 1 - mask[:, : prompt.shape[1]].flip(1).argmax(1)
    assert torch.equal(tokens[:, -1], ref_prompt[torch.arange(3), last].argmax(-1))


def test_without_curriculum_every_epoch_is_the_last_stage():
    mode = Mode(coconut=True, max_latent_stage=3, curriculum=False)
    assert [stage_for_epoch(e, mode, 2) for e in range(4)] == [4, 4, 4, 4]
    assert [stage_for_epoch(e, Mode(coconut=True, max_latent_stage=3), 2) for e in range(4)] == [0, 0, 1, 1]


def test_thought_hook_sees_each_thought_and_its_replacement_is_fed(tiny):
    model = wrap(tiny)
    input_ids, mask, labels, pos, pixel_values = multimodal_batch(tiny, latents=(3, 1, 2))
    intact = model(input_ids, mask, labels, pos, pixel_values)
    seen = []

    def hook(i, t):
        seen.append((i, t.clone()))
        return t
    same = model(input_ids, mask, labels, pos, pixel_values, thought_hook=hook)
    assert [i for i, _ in seen] == [1, 2, 3] and seen[0][1].shape == (3, tiny.model.config.text_config.hidden_size)
    assert torch.equal(same.inputs_embeds, intact.inputs_embeds)
    is_latent = input_ids == tiny.latent_id
    first = is_latent.int().argmax(1)[0]
    torch.testing.assert_close(seen[0][1], intact.inputs_embeds[:, first])  # thought 1 of every row


def _fed_with(model, batch, name, seed=0):
    """(fed thoughts (n, C) in row order, the hidden states the hook was given for them (n, C))."""
    input_ids = batch[0]
    given = {}
    hook = ablation_hook(name, model, seed)

    def spy(i, t):
        given[i] = t.clone()
        return hook(i, t)
    out = model(*batch, thought_hook=spy)
    is_latent = input_ids == model.latent_token_id
    first = int(is_latent.int().argmax(1)[0])
    fed, computed = [], []
    for b in range(input_ids.shape[0]):
        for j in range(int(is_latent[b].sum())):
            fed.append(out.inputs_embeds[b, first + j])
            computed.append(given[j + 1][b])
    return torch.stack(fed), torch.stack(computed), given


def test_ablations_feed_exactly_what_they_are_named(tiny):
    model = wrap(tiny)
    batch = multimodal_batch(tiny, latents=(3, 1, 2))
    n_latents = [3, 1, 2]

    fed, _, _ = _fed_with(model, batch, "zero")
    assert fed.shape == (6, model.embedding.weight.shape[1]) and torch.equal(fed, torch.zeros_like(fed))

    fed, computed, _ = _fed_with(model, batch, "noise")
    torch.testing.assert_close(fed.norm(dim=-1), computed.norm(dim=-1))  # same norm as the thought replaced
    assert (fed - computed).abs().amax(-1).min() > 1e-2  # a different direction
    cos = torch.nn.functional.cosine_similarity(fed, computed, dim=-1)
    assert cos.abs().max() < 0.5
    again, _, _ = _fed_with(model, batch, "noise")  # the same seed gives the same noise
    torch.testing.assert_close(again.norm(dim=-1), fed.norm(dim=-1))

    _, _, given = _fed_with(model, batch, "shuffle")
    fed, _, _ = _fed_with(model, batch, "shuffle")
    row = 0
    for b, n in enumerate(n_latents):  # row b's j-th thought is row b-1's j-th computed thought
        for j in range(n):
            torch.testing.assert_close(fed[row], given[j + 1][(b - 1) % 3])
            row += 1

    fed, _, _ = _fed_with(model, batch, "pause")
    assert torch.equal(fed, model.embedding.weight[tiny.latent_id].expand_as(fed))


def test_step_key_words_and_attention_map_shape():
    assert step_key_words(["The object is a red circle.", "After red comes green.", "After green comes blue."]) == [
        {"red", "circle"}, {"green"}, {"blue"}]
    weights = torch.rand(2, 4, 3 * 16)  # 2 thoughts, 4 layers, 3 tiles of 16 tokens (thumbnail last)
    grid = attention_map(weights, tokens_per_tile=16, n_tiles=3)
    assert grid.shape == (2, 4, 4)
    torch.testing.assert_close(grid[1, 0], weights[1].mean(0)[32:36])  # thumbnail's first row, row-major
