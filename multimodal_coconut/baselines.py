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
    """Coconut by full recompute: n + 1 full forwards for n thoughts."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    embeds = model.embed(input_ids, pixel_values)  # (B, T, C)
    is_latent = input_ids == model.latent_token_id
    order = is_latent.long().cumsum(1) - 1  # index of each latent within its row
    for i in range(int(is_latent.sum(1).max())):
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        rows, cols = torch.nonzero(is_latent & (order == i), as_tuple=True)
        embeds = embeds.index_put((rows, cols), hidden.last_hidden_state[rows, cols - 1])  # out of place
    hidden = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
    logits = model.lm_head(hidden.last_hidden_state)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return CoconutOutput(loss=loss, logits=logits, inputs_embeds=embeds)
