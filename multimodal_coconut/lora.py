"""LoRA on the language model (peft), as LLaMA-Factory, ms-swift and InternVL's own scripts fine-tune VLMs.

    apply_lora(model, cfg)                      # after `freeze`, before DDP / FSDP2 wrapping; a no-op when lora_r = 0
    merged = merge_lora(state_dict, cfg, new_token_ids(model))   # full backbone-keyed weights -> the plain backbone's, adapters merged

The adapters are injected into the backbone in place (`peft.inject_adapter_in_model`, no PeftModel wrapper), so
`MultimodalCoconut` keeps finding its decoder, embedding and head, and its cached latent passes run through the
adapters like any other layer. What trains:

- `lora_A` / `lora_B` of every targeted linear layer of the language model (default: all of them);
- the rows of Coconut's three new tokens in the input embedding and the LM head, through peft's TrainableTokens
  (`trainable_token_indices`): a (3, hidden) parameter per matrix holding those rows, swapped in at forward time,
  so AdamW's moments and weight decay touch only those rows, not the 150k-row matrices. With a tied head (one
  matrix for both) only the embedding is wrapped, and the head follows it;
- the vision encoder and projector, unless freeze_vision / freeze_projector (LoRA freezes only the LLM's base).

Checkpoints save only parameters that train (`ignore_frozen_params`), the frozen base comes from model_id /
load_model_path as at the start of the run.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config

ADAPTER = "default"


def _linear_targets(model, cfg: Config) -> list[str]:
    """Full names (in the backbone) of the language model's linear layers that get adapters."""
    base, decoder = model.base_model, model.decoder
    prefix = next(name for name, m in base.named_modules() if m is decoder)
    names = [f"{prefix}.{name}" for name, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    if cfg.lora_target_modules:
        names = [n for n in names if n.rsplit(".", 1)[-1] in set(cfg.lora_target_modules)]
    if not names:
        raise ValueError(f"lora_target_modules={cfg.lora_target_modules}: no linear layer of the language model has "
                         "one of these names")
    return names


def apply_lora(model, cfg: Config) -> None:
    """Inject LoRA adapters into `model.base_model` (a MultimodalCoconut) when cfg.lora_r > 0."""
    if cfg.lora_r <= 0:
        return
    from peft import LoraConfig, inject_adapter_in_model

    base = model.base_model
    new_tokens = new_token_ids(model)
    embedding, head = model.embedding, model.lm_head
    names = {m: n for n, m in base.named_modules()}
    token_modules = {names[embedding]: new_tokens}
    if head.weight is not embedding.weight:
        token_modules[names[head]] = new_tokens
    llm = {id(p) for p in model.decoder.parameters()} | {id(p) for p in head.parameters()}
    trained_before = {id(p) for p in base.parameters() if p.requires_grad and id(p) not in llm}
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=_linear_targets(model, cfg), trainable_token_indices=token_modules)
    inject_adapter_in_model(config, base)  # freezes everything but the adapters
    for p in base.parameters():  # the towers LoRA does not cover train as the freeze_* keys say
        if id(p) in trained_before:
            p.requires_grad_(True)


def new_token_ids(model) -> list[int]:
    """Coconut's three tokens, whose embedding and head rows train under LoRA."""
    return sorted({model.latent_token_id, model.start_latent_id, model.end_latent_id})


def merge_lora(state_dict: dict[str, torch.Tensor], cfg: Config, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The full (gathered) backbone state dict of a LoRA model as the plain backbone's: W + (alpha / r) B A for every
    adapted layer, the trained rows of `token_ids` (`new_token_ids`) written into their matrices, peft's names
    removed."""
    if cfg.lora_r <= 0:
        return dict(state_dict)
    scale = cfg.lora_alpha / cfg.lora_r
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key or ".trainable_tokens_delta." in key:
            continue
        if ".token_adapter.base_layer." in key:
            module = key.split(".token_adapter.base_layer.")[0]
            rows = state_dict[f"{module}.token_adapter.trainable_tokens_delta.{ADAPTER}"]
            weight = value.clone()
            weight[token_ids] = rows.to(weight.dtype)
            out[f"{module}.{key.rsplit('.', 1)[-1]}"] = weight
        elif ".base_layer." in key:
            module, param = key.rsplit(".base_layer.", 1)
            if param == "weight" and f"{module}.lora_A.{ADAPTER}.weight" in state_dict:
                a = state_dict[f"{module}.lora_A.{ADAPTER}.weight"].float()
                b = state_dict[f"{module}.lora_B.{ADAPTER}.weight"].float()
                value = (value.float() + scale * (b @ a)).to(value.dtype)
            out[f"{module}.{param}"] = value
        else:
            out[key] = value
    return out


def export_weights(wrapped, model, best, cfg: Config) -> dict[str, torch.Tensor]:
    """The plain backbone's full weights for export_hf, on rank 0 ({} elsewhere; under FSDP2 a collective): the
    checkpoint `best` (save_only_improve) or the model as it is, with a LoRA run's adapters merged."""
    from . import checkpoint as ckpt

    if best is not None and cfg.lora_r <= 0:
        return ckpt.backbone_keys(ckpt.read_model_state_dict(best))
    if best is not None:  # a LoRA checkpoint holds the adapters only: load them over the base, then gather
        ckpt.load_checkpoint(best, wrapped, restore_rng=False, log=None)
    weights = ckpt.backbone_keys(ckpt.full_model_state_dict(wrapped))
    return merge_lora(weights, cfg, new_token_ids(model)) if weights else weights
