"""Generation against references that do not use the code under test.

* Every decoding step's logits, not only the argmax tokens, equal those of the backbone's own Hugging Face forward
  over the sequence generated so far, computed for each row alone (no padding, no KV cache), with every continuous
  thought fed as the last hidden state of the position before it (Coconut's definition, re-run once per thought).
  The batch mixes left-padded rows of different prefix lengths and different numbers of thoughts, so wrong position
  ids (off by one, off by seven, or taken from the column of a left-padded row) change the logits.
* Under `synced_gpus` (2 gloo processes) both ranks make the same number of decoder calls although their rows
  finish at different steps and hold different numbers of thoughts, and every rank's tokens equal what it generates
  on its own without synchronisation.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import collate, row_tokens
from multimodal_coconut import MultimodalCoconut

MAX_NEW = 8


def wrap(bb):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()


def tiles(n, seed):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) if n else None


# (question, image tiles, thoughts): different prefix lengths -> different left pads; different numbers of thoughts
# -> prompts ending in different columns.
PROMPTS = [("What color is the circle?", 2, 3), ("Which shape is blue?", 1, 1),
           ("How many shapes are there?", 0, 2)]


def prompt_batch(bb):
    spec = [(q, t if bb.is_multimodal else 0, k) for q, t, k in PROMPTS]
    rows = [row_tokens(bb, q, t, k) for q, t, k in spec]
    n_tiles = [t for _, t, _ in spec]
    return rows, n_tiles, tiles(sum(n_tiles), 3)


@torch.no_grad()
def hf_reference_logits(bb, ids, pixel_values, latent_id):
    """Next-token logits (V,) of one unpadded row by the backbone's own HF forward, no cache: run the whole
    sequence, put the last hidden state before the next thought into that thought's input, run it all again."""
    hf = bb.model
    ids = torch.tensor([ids])
    embeds = hf.get_input_embeddings()(ids)  # (1, T, C); image placeholders keep their token embedding
    extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
    latents = (ids[0] == latent_id).nonzero().flatten().tolist()
    for col in latents + [None]:
        out = hf(inputs_embeds=embeds, output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1]  # (1, T, C), after the final norm: it is what the LM head reads
        if col is None:
            # The reference's own consistency: the LM head of that hidden state is the backbone's logits.
            torch.testing.assert_close(hf.get_output_embeddings()(hidden[0, -1]), out.logits[0, -1])
            return out.logits[0, -1].float()
        embeds = embeds.clone()
        embeds[0, col] = hidden[0, col - 1]


@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm"])
def test_every_step_logits_equal_the_backbone_full_forward(backbone, request):
    bb = request.getfixturevalue(backbone)
    model = wrap(bb)
    rows, n_tiles, pixel_values = prompt_batch(bb)
    input_ids, mask, _, pos = collate(bb, rows)
    assert len({int(m.argmax()) for m in mask}) == 3, "every row must have its own left pad"
    assert len({int(m.sum()) for m in mask}) == 3

    step_logits = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: step_logits.append(out.detach().float()))
    try:
        out = model.generate(input_ids, mask, pixel_values, max_new_tokens=MAX_NEW, position_ids=pos)
    finally:
        hook.remove()
    new = out[:, input_ids.shape[1]:]
    assert len(step_logits) == new.shape[1] and step_logits[0].shape == (3, model.lm_head.weight.shape[0])

    starts = [0, *torch.tensor(n_tiles).cumsum(0).tolist()]
    checked = 0
    for i, row in enumerate(rows):
        pv = pixel_values[starts[i]:starts[i + 1]] if n_tiles[i] else None
        for t in range(new.shape[1]):
            ref = hf_reference_logits(bb, row + new[i, :t].tolist(), pv, bb.latent_id)
            torch.testing.assert_close(step_logits[t][i], ref, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"row {i}, decoding step {t}: {m}")
            assert int(new[i, t]) == int(ref.argmax())
            checked += 1
            if int(new[i, t]) == bb.eos_token_id:
                assert set(new[i, t:].tolist()) == {bb.eos_token_id}  # a finished row only holds EOS
                break
    assert checked >= 2 * len(rows)


# --- synced_gpus: 2 processes -----------------------------------------------------------------------------------

# Per rank: prompts with different numbers of thoughts, and after which decoding step each row is forced to EOS
# (None: EOS is suppressed). Rank 0's rows finish after 1 and 3 tokens, rank 1's decode all MAX_NEW tokens.
RANK_PROMPTS = {0: [("Which shape is blue?", 1, 1), ("What color?", 0, 1)],
                1: [("What color is the circle?", 2, 3), ("How many shapes are on the left?", 1, 2)]}
FORCE_EOS = {0: [0, 2], 1: [None, None]}


def _synced_worker(rank, world_size, init_file, out_dir, cache):
    os.environ["MMC_CACHE"] = cache
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from multimodal_coconut import load_backbone

        bb = load_backbone("tiny", image_size=64, max_num_patches=4)
        model = wrap(bb)
        spec = RANK_PROMPTS[rank]
        rows = [row_tokens(bb, q, t, k) for q, t, k in spec]
        input_ids, mask, _, pos = collate(bb, rows)
        pixel_values = tiles(sum(t for _, t, _ in spec), rank)

        step = {"n": 0}

        def force_eos(mod, args, out):
            out = out.clone()
            for i, first in enumerate(FORCE_EOS[rank]):
                if first is None:
                    out[i, bb.eos_token_id] = out[i].min() - 100.0
                elif step["n"] >= first:
                    out[i, bb.eos_token_id] = out[i].max() + 100.0
            step["n"] += 1
            return out

        calls = {"n": 0}
        model.lm_head.register_forward_hook(force_eos)
        model.decoder.register_forward_pre_hook(lambda mod, args, kwargs: calls.__setitem__("n", calls["n"] + 1),
                                                with_kwargs=True)
        synced = model.generate(input_ids, mask, pixel_values, max_new_tokens=MAX_NEW, position_ids=pos,
                                synced_gpus=True)
        synced_calls = calls["n"]
        calls["n"], step["n"] = 0, 0
        alone = model.generate(input_ids, mask, pixel_values, max_new_tokens=MAX_NEW, position_ids=pos)
        result = {"synced_calls": synced_calls, "alone_calls": calls["n"], "eos": bb.eos_token_id,
                  "prompt_len": input_ids.shape[1], "synced": synced.tolist(), "alone": alone.tolist()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def trim(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_synced_gpus_same_decoder_calls_and_all_tokens(tiny, tmp_path):
    mp.spawn(_synced_worker, args=(2, str(tmp_path / "init"), str(tmp_path), os.environ["MMC_CACHE"]), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # Alone, rank 0 (one thought, rows done after steps 0 and 2) calls the decoder far less than rank 1.
    assert r0["alone_calls"] < r1["alone_calls"]
    assert r0["synced_calls"] == r1["synced_calls"] == r1["alone_calls"]
    for r in (r0, r1):
        for synced, alone in zip(r["synced"], r["alone"]):
            assert synced[:r["prompt_len"]] == alone[:r["prompt_len"]]
            assert trim(synced[r["prompt_len"]:], r["eos"]) == trim(alone[r["prompt_len"]:], r["eos"])
    # rank 1 decodes every token; rank 0's rows stop where they were forced to, then only EOS follows.
    eos = r0["eos"]
    assert [len(row) - r1["prompt_len"] for row in r1["synced"]] == [MAX_NEW, MAX_NEW]
    assert all(eos not in row[r1["prompt_len"]:] for row in r1["synced"])
    assert [len(trim(row[r0["prompt_len"]:], eos)) for row in r0["synced"]] == [1, 3]
    assert [len(row) - r0["prompt_len"] for row in r0["synced"]] == [MAX_NEW, MAX_NEW]  # padded with EOS
