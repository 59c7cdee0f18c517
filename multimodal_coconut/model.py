"""MultimodalCoconut: Coconut's continuous thoughts (arXiv 2412.06769) on an InternVL backbone or any HF causal LM.

At a `<|latent|>` position the input embedding is the last hidden state of the position before it. The collator
lays every row out so that its latents form one block starting in the same column L (DESIGN.md §1), so with n the
largest number of latents in the batch the sequence is computed in n + 1 passes over one growing KV cache:

    pass 0:            columns [0, L)              (image, question, <|start-latent|>)
    pass i, 1<=i<n:    column  L+i-1               (the i-th latent, filled from the hidden state of column L+i-2)
    last pass:         columns [L+n-1, T)          (its first column filled the same way)

The vision encoder runs once per batch, before pass 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .backbone import is_original_internvl


THOUGHT_NORMS = ("none", "embedding", "projection")


class ThoughtProjection(nn.Module):
    """thought_norm 'projection' (CODI's recipe): a learned linear map, then LayerNorm, from the last hidden state to
    the next input embedding. It starts as the identity followed by a LayerNorm whose scale gives outputs of the
    token embeddings' median norm, so the first thoughts are the hidden states at the scale of a token."""

    def __init__(self, hidden_size: int, norm: float):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()
            self.norm.weight.fill_(norm / hidden_size**0.5)  # a LayerNorm output has norm ~ sqrt(C) x its scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, C)
        return self.norm(self.linear(hidden))


@dataclass
class CoconutOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, T, V); or (N, V) at the N labelled positions with labelled_logits_only
    inputs_embeds: torch.Tensor  # (B, T, C) the embeddings actually fed, continuous thoughts included
    step_loss: torch.Tensor | None = None  # thought_supervision: mean cross-entropy over the steps' tokens


class _PrefixLayer(DynamicLayer):
    """One layer's KV cache for one pass: the keys of earlier passes (fixed) + this pass's keys.

    `update` returns cat(prefix, new) without growing the prefix, so calling it twice gives the same result. That
    makes the cache safe under activation checkpointing, whose backward recomputes each layer (and so calls `update`
    again); HF's own DynamicCache would append twice, which is why HF turns the cache off when checkpointing.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.prefix = (keys, values)
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self.prefix
        if keys is not None:
            key_states = torch.cat([keys, key_states], dim=-2)
            value_states = torch.cat([values, value_states], dim=-2)
        self.keys, self.values, self.device, self.is_initialized = key_states, value_states, key_states.device, True
        return key_states, value_states


def _next_cache(cache: Cache | None, num_layers: int) -> Cache:
    """A cache for the next pass whose prefix is everything `cache` holds."""
    if cache is None:
        return Cache(layers=[_PrefixLayer() for _ in range(num_layers)])
    return Cache(layers=[_PrefixLayer(layer.keys, layer.values) for layer in cache.layers])


class MultimodalCoconut(nn.Module):
    """Coconut around a Hugging Face InternVL (native or original format) or any causal LM.

    model = MultimodalCoconut(base_model, latent_token_id, start_latent_id, end_latent_id, eos_token_id)
    out = model(input_ids, attention_mask, labels, position_ids, pixel_values=None)  # .loss .logits .inputs_embeds
    tokens = model.generate(input_ids, attention_mask, pixel_values=None, max_new_tokens=16)
    """

    def __init__(self, base_model, latent_token_id, start_latent_id, end_latent_id, eos_token_id, *,
                 continuous_thoughts: bool = True, thought_norm: str = "none"):
        super().__init__()
        self.base_model = base_model
        # False: the original's "pause as thought" (coconut: false) -- a <|latent|> position takes its own token
        # embedding, a learned pause, and the sequence runs in one pass like the plain backbone.
        self.continuous_thoughts = continuous_thoughts
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        config = base_model.config
        if is_original_internvl(config):  # original format (InternVLChatModel), remote code
            self.kind = "original_internvl"
            self.image_token_id = base_model.img_context_token_id
            if self.image_token_id is None:
                raise ValueError("InternVLChatModel.img_context_token_id is not set (the loader sets it)")
        elif getattr(config, "model_type", "") == "internvl":  # transformers' InternVLForConditionalGeneration
            self.kind = "hf_internvl"
            self.image_token_id = config.image_token_id
        else:  # any causal LM, text only
            self.kind = "causal_lm"
            self.image_token_id = None
        vocab = self.embedding.weight.shape[0]
        for name in ("latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise ValueError(f"{name}={value!r} is not a token id of this model (vocabulary size {vocab})")
        self.num_layers = len(self.decoder_layers)
        # How a last hidden state becomes the next input (config thought_norm): as it is (the original), rescaled to
        # the token embeddings' median norm, or through a learned projection + LayerNorm (saved with the model).
        if thought_norm not in THOUGHT_NORMS:
            raise ValueError(f"thought_norm must be one of {THOUGHT_NORMS}, got {thought_norm!r}")
        self.thought_norm = thought_norm
        if thought_norm == "projection":
            weight = self.embedding.weight
            self.thought_projection = ThoughtProjection(weight.shape[1], self.embedding_norm().item()).to(weight)

    def embedding_norm(self) -> torch.Tensor:
        """The median norm of the token embeddings (a constant: no gradient flows into the table through it)."""
        return self.embedding.weight.detach().float().norm(dim=-1).median()

    def make_thought(self, hidden: torch.Tensor, target_norm: torch.Tensor | None = None) -> torch.Tensor:
        """The input embedding fed at a latent position, from the last hidden state of the position before it (B, C).
        `target_norm`: embedding_norm(), computed once per forward by the caller (thought_norm 'embedding')."""
        if self.thought_norm == "embedding":
            norm = target_norm if target_norm is not None else self.embedding_norm()
            return hidden * (norm.to(hidden.dtype) / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        if self.thought_norm == "projection":
            return self.thought_projection(hidden)
        return hidden

    # The parts are looked up, not stored: assigning them as attributes would register every parameter twice.
    @property
    def decoder(self) -> nn.Module:
        """The language model without its head (returns hidden states after the final norm)."""
        if self.kind == "original_internvl":
            return self.base_model.language_model.get_decoder()
        if self.kind == "hf_internvl":
            return self.base_model.model.language_model
        return self.base_model.get_decoder()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's blocks: `layers` (Qwen2, Llama, InternVL's LM), `h` (GPT-2, as in the original Coconut)."""
        decoder = self.decoder
        return decoder.layers if hasattr(decoder, "layers") else decoder.h

    @property
    def lm_head(self) -> nn.Module:
        if self.kind == "original_internvl":
            return self.base_model.language_model.get_output_embeddings()
        return self.base_model.get_output_embeddings()

    @property
    def embedding(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    # -- embeddings -------------------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, tokens_per_tile, C): vision encoder, pixel shuffle and projector."""
        if self.kind == "hf_internvl":
            return self.base_model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return self.base_model.extract_feature(pixel_values)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features written into the image-placeholder positions."""
        embeds = self.embedding(input_ids)  # (B, T, C)
        n_placeholders = 0 if self.image_token_id is None else int((input_ids == self.image_token_id).sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image placeholders but no pixel_values were given")
            return embeds
        if self.image_token_id is None:
            raise ValueError("pixel_values were given but the backbone is a text-only language model")
        features = self.image_features(pixel_values)  # (tiles, tokens_per_tile, C)
        if n_placeholders != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"image placeholders and image features do not match: {n_placeholders} <IMG_CONTEXT> tokens in "
                f"input_ids, but {features.shape[0]} tiles x {features.shape[1]} tokens per tile = "
                f"{features.shape[0] * features.shape[1]} features"
            )
        mask = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, T, 1)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    # -- the latent passes ------------------------------------------------------------------------------------

    def _pass_bounds(self, input_ids: torch.Tensor, min_passes: int = 0) -> tuple[list[int], torch.Tensor]:
        """Column boundaries of the passes, and the number of latents per row (B,); one pass without feedback.

        Extra single-column passes after the latents (up to `min_passes` in all) change nothing numerically; they
        keep processes in lock-step under FSDP, where every rank must call every layer the same number of times.
        """
        B, T = input_ids.shape
        is_latent = input_ids == self.latent_token_id  # (B, T)
        n_latents = is_latent.sum(1)  # (B,)
        n = int(n_latents.max()) if self.continuous_thoughts else 0
        if n == 0:
            cuts = []
        else:
            first = int(torch.where(n_latents > 0, is_latent.int().argmax(1), T).min())
            cols = torch.arange(T, device=input_ids.device)
            expected = (cols >= first) & (cols < first + n_latents[:, None])
            if not torch.equal(is_latent, expected):
                raise ValueError(
                    "latent tokens must form one block per row starting in the same column in every row (the "
                    f"collator's layout); first latent columns per row: {is_latent.int().argmax(1).tolist()}, "
                    f"latents per row: {n_latents.tolist()}"
                )
            if first == 0:
                raise ValueError("a <|latent|> token cannot be the first token: it reads the position before it")
            cuts = list(range(first, first + n))
        start = cuts[-1] + 1 if cuts else 1
        cuts += list(range(start, min(T, start + min_passes - 1 - len(cuts))))
        return [0, *cuts, T], n_latents

    def num_passes(self, input_ids: torch.Tensor) -> int:
        """Decoder calls `forward` makes for this batch (ranks agree on the maximum under FSDP: `min_passes`)."""
        return len(self._pass_bounds(input_ids)[0]) - 1

    def _run(self, embeds, attention_mask, position_ids, bounds, n_latents, cache=None, thought_hook=None):
        """Run the passes; returns (hidden (B, T, C), fed embeddings (B, T, C), cache).

        `thought_hook(i, thoughts) -> thoughts`, if given, replaces the i-th thoughts (i = 1.., (B, C): what is about
        to be fed at the i-th latent column, after thought_norm) before they are fed; rows with fewer than i latents keep
        their own embedding whatever it returns. For analysis (ablations), not training.
        """
        hidden, fed = [], []
        target_norm = self.embedding_norm() if self.thought_norm == "embedding" and len(bounds) > 2 else None
        # One split rather than a slice per pass: the backward of each slice would build a zero (B, T, C) gradient.
        chunks = embeds.split([e - s for s, e in zip(bounds[:-1], bounds[1:])], dim=1)
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            x = chunks[i]  # (B, e-s, C)
            if i > 0:  # column s is the i-th latent of rows that have at least i latents
                fill = (n_latents >= i)[:, None]  # (B, 1)
                thought = self.make_thought(hidden[-1][:, -1], target_norm)  # (B, C)
                if thought_hook is not None:
                    thought = thought_hook(i, thought)
                x = torch.cat([torch.where(fill, thought, x[:, 0]).unsqueeze(1), x[:, 1:]], dim=1)
            cache = _next_cache(cache, self.num_layers)
            h = self.decoder(
                inputs_embeds=x,
                attention_mask=attention_mask[:, :e],
                position_ids=position_ids[:, s:e],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            hidden.append(h)
            fed.append(x)
        return torch.cat(hidden, dim=1), torch.cat(fed, dim=1), cache

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        labelled_logits_only: bool = False,
        min_passes: int = 0,
        thought_hook=None,
        step_ids: torch.Tensor | None = None,
        step_columns: torch.Tensor | None = None,
    ) -> CoconutOutput:
        """Loss (mean shifted cross-entropy over labels != -100), logits and the fed embeddings.

        `labelled_logits_only` applies the LM head only where the loss needs it (training: most positions are image
        and question tokens without labels), returning logits of shape (N, V) for the N labelled positions.
        `step_ids` / `step_columns` (the collator's, with thought_supervision) add `.step_loss` (see `step_loss`),
        computed here so that DDP and FSDP see it as part of the forward.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids, pixel_values)
        bounds, n_latents = self._pass_bounds(input_ids, min_passes)
        hidden, fed, _ = self._run(embeds, attention_mask, position_ids, bounds, n_latents, thought_hook=thought_hook)
        step_loss = None
        if step_ids is not None:
            # Coconut writes a step from the thought fed at its latent column. Pause as thought feeds a learned token
            # there, so it writes the step from what Coconut would feed: the last hidden state of the column before.
            writers = fed if self.continuous_thoughts else F.pad(hidden[:, :-1], (0, 0, 1, 0))
            step_loss = self.step_loss(input_ids, writers, step_ids, step_columns)

        if labels is None:
            return CoconutOutput(loss=None, logits=self.lm_head(hidden), inputs_embeds=fed, step_loss=step_loss)
        targets = labels[:, 1:]  # (B, T-1)
        if labelled_logits_only:
            keep = targets != -100
            logits = self.lm_head(hidden[:, :-1][keep])  # (N, V)
            loss = F.cross_entropy(logits.float(), targets[keep])
        else:
            logits = self.lm_head(hidden)  # (B, T, V)
            # Shift the labels, not the logits: slicing (B, T, V) makes a full copy, and its backward a full zero tensor.
            targets = F.pad(targets, (0, 1), value=-100)  # (B, T)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return CoconutOutput(loss=loss, logits=logits, inputs_embeds=fed, step_loss=step_loss)

    def step_loss(self, input_ids: torch.Tensor, fed: torch.Tensor, step_ids: torch.Tensor,
                  step_columns: torch.Tensor) -> torch.Tensor:
        """SIM-CoT's step supervision (config thought_supervision) with this model's own decoder and LM head.

        Every (row, step) pair with `step_columns[b, s] >= 0` becomes one sequence [thought, step tokens], where the
        thought is exactly the vector at column step_columns[b, s] of `fed` (B, T, C) (the forward's fed embeddings;
        for pause as thought the last hidden states shifted one column right; gradients flowing into it), at
        positions 0..; the loss is the cross-entropy of each step token predicted from
        the positions before it (the thought predicts the first), averaged over all step tokens of the batch.
        `step_ids` (B, S, L): token ids, -100 after a step's end. One decoder call for the whole batch, and one even
        when no pair has a step (a zero-weighted call: under FSDP every rank makes the same number of calls).
        """
        rows, slots = torch.nonzero(step_columns >= 0, as_tuple=True)  # (N,) pairs with a step
        cols = step_columns[rows, slots]
        if not bool((input_ids[rows, cols] == self.latent_token_id).all()):
            raise ValueError(f"step_columns point at columns that hold no <|latent|>: rows {rows.tolist()}, columns "
                             f"{cols.tolist()}, tokens {input_ids[rows, cols].tolist()}")
        targets = step_ids[rows, slots]  # (N, L)
        if targets.shape[0] == 0 or targets.shape[1] == 0:
            h = self.decoder(inputs_embeds=fed[:1, :1], position_ids=step_columns.new_zeros(1, 1),
                             use_cache=False).last_hidden_state  # (1, 1, C)
            return self.lm_head(h[:, 0]).float().sum() * 0.0
        N, L = targets.shape
        # The step's last token is never an input. Ids after a step's end (-100) become 0: right-padding, which no
        # real position attends to under the causal mask, so no attention mask is needed.
        tokens = self.embedding(targets[:, :-1].clamp(min=0))  # (N, L-1, C)
        x = torch.cat([fed[rows, cols].unsqueeze(1), tokens], dim=1)  # (N, L, C)
        positions = torch.arange(L, device=x.device).expand(N, L)
        h = self.decoder(inputs_embeds=x, position_ids=positions, use_cache=False).last_hidden_state  # (N, L, C)
        keep = targets != -100
        return F.cross_entropy(self.lm_head(h[keep]).float(), targets[keep])

    # -- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        *,
        position_ids: torch.Tensor | None = None,
        synced_gpus: bool = False,
        thought_hook=None,
    ) -> torch.Tensor:
        """Greedy decoding after the latent passes, batched with a KV cache; returns (B, prompt + new) token ids.

        Prompts end right after `<|end-latent|>`; rows may end in different columns (pads after a row's last
        token are masked out), so rows with different numbers of latents share a batch. A finished row (EOS) is
        padded with EOS. With `synced_gpus` every process makes the same number of decoder calls (FSDP).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        min_passes = 0
        if synced_gpus:
            min_passes = _all_reduce_max(self.num_passes(input_ids), input_ids.device)
        embeds = self.embed(input_ids, pixel_values)
        bounds, n_latents = self._pass_bounds(input_ids, min_passes)
        hidden, _, cache = self._run(embeds, attention_mask, position_ids, bounds, n_latents, thought_hook=thought_hook)
        for _ in range(min_passes - (len(bounds) - 1)):  # a short prompt cannot be split further: idle calls
            self.decoder(inputs_embeds=embeds[:, :1], attention_mask=attention_mask[:, :1], position_ids=position_ids[:, :1])

        rows = torch.arange(B, device=input_ids.device)
        last = T - 1 - attention_mask.flip(1).long().argmax(1)  # (B,) last real prompt token of each row
        logits = self.lm_head(hidden[rows, last])  # (B, V)
        next_pos = position_ids[rows, last] + 1  # (B,)
        mask = attention_mask
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = torch.where(finished, self.eos_token_id, logits.argmax(-1))  # (B,)
            new_tokens.append(token)
            finished |= token == self.eos_token_id
            done = bool(finished.all())
            if synced_gpus:  # a collective every step, so all ranks stop at the same step
                done = not _any_rank_busy(not done, input_ids.device)
            if done or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            cache = _next_cache(cache, self.num_layers)
            h = self.decoder(
                inputs_embeds=self.embedding(token)[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            logits = self.lm_head(h[:, -1])
            next_pos = next_pos + 1
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _all_reduce_max(value: int, device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _any_rank_busy(busy: bool, device) -> bool:
    """True if this or any other process still has unfinished rows (a collective: every rank must call it)."""
    return _all_reduce_max(int(busy), device) > 0
