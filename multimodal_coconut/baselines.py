"""Reference implementations of the latent passes, for parity tests and the benchmark.

`naive_forward` re-runs the whole sequence through the backbone once per thought, without a cache, and places
thoughts wherever the latents are (no layout assumption): the definition that `MultimodalCoconut.forward` must equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CoconutOutput, MultimodalCoconut


def naive_forward(model: MultimodalCoconut, input_ids, attention_mask, labels=None, position_ids=None,
                  pixel_values=None) -> CoconutOutput:
    """Coconut by full recompute: n + 1 full forwards for n thoughts (each thought made by the model's thought_norm)."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    embeds = model.embed(input_ids, pixel_values)  # (B, T, C)
    is_latent = input_ids == model.latent_token_id
    order = is_latent.long().cumsum(1) - 1  # index of each latent within its row
    for i in range(int(is_latent.sum(1).max())):
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        rows, cols = torch.nonzero(is_latent & (order == i), as_tuple=True)
        thoughts = model.make_thought(hidden.last_hidden_state[rows, cols - 1])
        embeds = embeds.index_put((rows, cols), thoughts)  # out of place
    hidden = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
    logits = model.lm_head(hidden.last_hidden_state)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return CoconutOutput(loss=loss, logits=logits, inputs_embeds=embeds)


# -- the original Coconut algorithm (facebookresearch/coconut, coconut.py), ported to the current Cache API ----------
#
# Kept deliberately close to the original so the benchmark measures *its* costs: the language model with its LM head
# runs once per pass (logits of every position, every pass), the embeddings are rebuilt after every pass from a Python
# list of one 1-D tensor per position (whose backward builds one dense (B, T, C) gradient per position), and the
# KV cache returned by one pass is sliced back to the pass's start column before the next. The only additions are
# the image features, written in once by `model.embed` as in `MultimodalCoconut`.


def _lm(model: MultimodalCoconut, inputs_embeds, attention_mask=None, position_ids=None, cache=None):
    """The original's `base_causallm(...)` call: decoder + LM head at every position -> (logits, hidden, cache)."""
    out = model.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True)
    return model.lm_head(out.last_hidden_state), out.last_hidden_state, out.cache


def _slice_cache(cache, end: int):
    """The original's "extract kv cache to reuse": keep the first `end` columns of every layer."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :end, :], layer.values[:, :, :end, :]
    return cache


def original_forward(model: MultimodalCoconut, input_ids, attention_mask, labels, position_ids,
                     pixel_values=None) -> CoconutOutput:
    """`Coconut.forward` of the original repository: one pass per thought, Python rebuild of the embeddings."""
    logits = []
    latent_indices = (input_ids == model.latent_token_id).nonzero()  # (num_latent_tokens_in_the_batch, 2)
    latent_lists = [[idx[1].item() for idx in latent_indices if idx[0] == i] for i in range(input_ids.shape[0])]
    max_n_latents = max(len(l) for l in latent_lists)
    next_compute_range = (0, input_ids.shape[1])
    inputs_embeds = model.embed(input_ids, pixel_values)
    if max_n_latents > 0:
        next_compute_range = (0, latent_indices[:, 1].min().item())  # before the earliest latent token
    kv_cache = None

    for pass_idx in range(max_n_latents):
        s, e = next_compute_range
        if kv_cache is None:
            pass_logits, hidden_states, kv_cache = _lm(model, inputs_embeds[:, s:e], attention_mask[:, s:e],
                                                       position_ids[:, s:e])
            hidden_states_offset = 0
        else:
            pass_logits, hidden_states, kv_cache = _lm(model, inputs_embeds[:, s:e], attention_mask[:, :e],
                                                       position_ids[:, s:e], _slice_cache(kv_cache, s))
            hidden_states_offset = s  # the cached columns [0, s) are not in this pass's hidden states
        logits.append(pass_logits)
        next_compute_range = (e, input_ids.shape[1] if pass_idx + 1 >= max_n_latents else e + 1)

        filling_indices = [(i, lst[pass_idx]) for i, lst in enumerate(latent_lists) if len(lst) > pass_idx]
        # to avoid in-place operations: a list of lists of 1-d tensors, some replaced by continuous thoughts
        tensor_list = [[inputs_embeds[b, pos, :] for pos in range(inputs_embeds.shape[1])]
                       for b in range(inputs_embeds.shape[0])]
        for batch_idx, token_idx in filling_indices:
            tensor_list[batch_idx][token_idx] = hidden_states[batch_idx, token_idx - 1 - hidden_states_offset, :]
        inputs_embeds = torch.stack([torch.stack(tensor_list[b]) for b in range(inputs_embeds.shape[0])])

    s, e = next_compute_range
    pass_logits, _, _ = _lm(model, inputs_embeds[:, s:e], attention_mask[:, :e], position_ids[:, s:e],
                            _slice_cache(kv_cache, s) if kv_cache is not None else None)
    logits.append(pass_logits)
    logits = torch.cat(logits, dim=-2)
    loss = None
    if labels is not None:
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)).float(), shift_labels.view(-1))
    return CoconutOutput(loss=loss, logits=logits, inputs_embeds=inputs_embeds)


@torch.no_grad()
def original_generate(model: MultimodalCoconut, input_ids, pixel_values=None, max_new_tokens=16) -> torch.Tensor:
    """`Coconut.generate` of the original repository: batch 1, no KV cache — every new token re-runs the language
    model (and its LM head) over the whole sequence. Returns (1, prompt + new) ids, EOS not included."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"the original algorithm generates one question at a time, got {input_ids.shape[0]} rows")
    tokens = input_ids[0].tolist()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    outputs = original_forward(model, input_ids, torch.ones_like(input_ids), input_ids.clone(), positions,
                               pixel_values)  # labels: a placeholder, as in the original
    next_token = int(outputs.logits[0, -1].argmax())
    if next_token == model.eos_token_id:  # (the original appends the first token unconditionally)
        return torch.tensor([tokens])
    tokens.append(next_token)
    new_inputs_embeds = torch.cat([outputs.inputs_embeds, model.embedding(input_ids.new_tensor([[next_token]]))], 1)
    for _ in range(max_new_tokens - 1):
        logits, _, _ = _lm(model, new_inputs_embeds)  # no mask, no positions: one unpadded row
        next_token = int(logits[0, -1].argmax())
        if next_token == model.eos_token_id:
            break
        tokens.append(next_token)
        new_inputs_embeds = torch.cat([new_inputs_embeds, model.embedding(input_ids.new_tensor([[next_token]]))], 1)
    return torch.tensor([tokens])
