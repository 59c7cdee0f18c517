"""Builds batches in the collator's layout (DESIGN.md §1) independently of the package's collator."""

import torch

from multimodal_coconut.backbone import IMG_CONTEXT, IMG_END, IMG_START


def row_tokens(bb, question, n_tiles, n_latents, rest="", start_marker=True):
    """Token ids of one sample: image, question, markers + latents, then `rest` (steps / answer)."""
    tok = bb.tokenizer
    ids = []
    if n_tiles:
        ids += tok.convert_tokens_to_ids([IMG_START] + [IMG_CONTEXT] * (n_tiles * bb.tokens_per_tile) + [IMG_END])
    ids += tok.encode(question, add_special_tokens=False)
    if start_marker:
        ids += [bb.start_latent_id] + [bb.latent_id] * n_latents + [bb.end_latent_id]
    ids += tok.encode(rest, add_special_tokens=False) if rest else []
    return ids


def collate(bb, rows, n_prompt=None, right_pad=True):
    """Left-pad so the first latent of every row is in one column, then right-pad. Labels: -100 on pads and on
    the first `n_prompt[i]` tokens of row i."""
    def anchor(ids):
        return ids.index(bb.latent_id) if bb.latent_id in ids else 0
    L = max(anchor(r) for r in rows)
    left = [L - anchor(r) for r in rows]
    T = max(l + len(r) for l, r in zip(left, rows))
    B = len(rows)
    input_ids = torch.full((B, T), bb.pad_token_id)
    mask = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, (l, r) in enumerate(zip(left, rows)):
        n = len(r)
        input_ids[i, l:l + n] = torch.tensor(r)
        mask[i, l:l + n] = 1
        pos[i, l:l + n] = torch.arange(n)
        lab = torch.tensor(r)
        lab[lab == bb.latent_id] = -100
        lab[0] = -100  # nothing predicts a row's first token (the position before it is a pad)
        if n_prompt is not None:
            lab[: n_prompt[i]] = -100
        labels[i, l:l + n] = lab
    if not right_pad:
        assert all(l + len(r) == T for l, r in zip(left, rows))
    return input_ids, mask, labels, pos


def loss_and_grads(model, fn, *args):
    """Run `fn(*args)` (a forward returning .loss), backpropagate; (output, {name: gradient}) with clean grads."""
    model.zero_grad()
    out = fn(*args)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads
