"""Using a trained model: the one loading function under every command that needs one, and the batched answering
that training's evaluation, `predict`, `ask`, `analyze` and the web demo share.

    trained = load_trained("runs/demo")            # a run dir (its newest checkpoint), a checkpoint dir, an HF export
    trained.model, trained.backbone, trained.config, trained.stage
    texts = generate_texts(trained.model.generate, loader, samples, trained.backbone.tokenizer, max_new_tokens=64)

A checkpoint (and an export) carries what using it needs (checkpoint.save_model_files): the weights, the model
config, the tokenizer with Coconut's tokens, the image processor, and coconut.json with the run's config and the
stage it was trained at. Nothing is rebuilt from the data or from `model_id`: the tiny preset's tokenizer, for one,
is trained on the run's texts and would come out different from other texts.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .backbone import Backbone, load_backbone
from .config import Config
from .curriculum import Mode
from .model import MultimodalCoconut


class LoadError(ValueError):
    """A path that is not a usable trained model; the message names it and says why."""


@dataclass
class Trained:
    """A trained model ready to answer: the Coconut model (eval mode), its backbone, the training run's config, and
    the curriculum stage the checkpoint was trained at (how many thoughts it expects), and where it came from."""

    model: MultimodalCoconut
    backbone: Backbone
    config: Config
    stage: int
    path: Path

    @property
    def mode(self) -> Mode:
        return Mode.from_config(self.config)


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding the model: `path` itself (a checkpoint or an exported HF folder) or, for a run
    directory, its newest complete checkpoint. LoadError when there is none or the checkpoint is incomplete."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory (expected a run directory, a checkpoint_N directory or an "
                        "exported Hugging Face folder)")
    if ckpt._TMP.fullmatch(path.name) or ckpt._CKPT.fullmatch(path.name):
        try:
            ckpt._check_complete(path)
        except (FileNotFoundError, ValueError) as e:
            raise LoadError(f"{path}: an incomplete checkpoint ({e})") from None
    elif not (path / "config.json").is_file():
        latest = ckpt.find_latest_checkpoint(path, log=None)
        if latest is None:
            raise LoadError(f"{path}: no complete checkpoint_N in this run directory, and not a model folder "
                            "(no config.json)")
        path = latest
    if not (path / ckpt.INFO_FILE).is_file():
        raise LoadError(f"{path}: not a Multimodal CoCoNuT checkpoint or export (no {ckpt.INFO_FILE}: no record of "
                        "the training config and stage; checkpoints written before this file existed cannot be used "
                        "on their own)")
    return path


def backbone_from(model_dir: str | Path, cfg: Config, device=None) -> Backbone:
    """The backbone saved in `model_dir` (weights, tokenizer with Coconut's tokens, image processor), tiled and
    loaded as `cfg` says. The tokenizer must already hold Coconut's tokens: one that does not belongs to a model
    that was never trained here."""
    from transformers import AutoTokenizer

    from .backbone import LATENT

    vocab = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.trust_remote_code).get_vocab()
    if LATENT not in vocab:
        raise LoadError(f"{model_dir}: its tokenizer has no {LATENT} token, so it is not a Multimodal CoCoNuT model")
    if (Path(model_dir) / ckpt.PROGRESS_FILE).is_file() and not ckpt.holds_full_model(model_dir):
        raise LoadError(f"{model_dir}: a LoRA checkpoint holds only the adapters and new token rows, not the base "
                        "model; use the run's merged export (export_hf: true writes RUN_DIR/hf_model)")
    # A checkpoint's weights are sharded (DCP, model/): read whole here and the model built from config.json.
    state_dict = ckpt.read_model_state_dict(model_dir) if (Path(model_dir) / ckpt.MODEL_DIR).is_dir() else None
    return load_backbone(str(model_dir), trust_remote_code=cfg.trust_remote_code, image_size=cfg.image_size,
                         min_num_patches=cfg.min_num_patches, max_num_patches=cfg.max_num_patches,
                         use_thumbnail=cfg.use_thumbnail, attn_implementation=cfg.attn_implementation, device=device,
                         state_dict=state_dict)


def read_info(model_dir: str | Path) -> tuple[Config, int]:
    """(the training run's config, the stage trained at) from coconut.json."""
    info = json.loads((Path(model_dir) / ckpt.INFO_FILE).read_text())
    known = {f.name for f in dataclasses.fields(Config)}
    # Keys a later version removed are dropped; keys it added take their defaults.
    return Config(**{k: v for k, v in info["config"].items() if k in known}), int(info["stage"])


def load_trained(path: str | Path, *, device: str | torch.device | None = None) -> Trained:
    """Load a trained model from a run directory, a checkpoint directory or an exported HF folder (LoadError with
    the path and the reason when it is none of these)."""
    model_dir = resolve_model_dir(path)
    cfg, stage = read_info(model_dir)
    backbone = backbone_from(model_dir, cfg, device=device)
    model = MultimodalCoconut(backbone.model, backbone.latent_id, backbone.start_latent_id, backbone.end_latent_id,
                              backbone.eos_token_id).eval()
    return Trained(model=model, backbone=backbone, config=cfg, stage=stage, path=model_dir)


def model_info(cfg: Config, stage: int, epoch: int) -> dict:
    """What coconut.json records for a checkpoint or export."""
    return {"config": cfg.to_dict(), "stage": stage, "epoch": epoch}


# ---------------------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def generate_texts(generate: Callable, loader, samples, tokenizer, *, max_new_tokens: int, device,
                   synced_gpus: bool = False, autocast=None, desc: str = "generate", progress: bool = True,
                   on_batch: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """{question_id: generated text} for the batches of `loader` (a CoconutDataset at train=False + Collator).

    `generate` is MultimodalCoconut.generate (or FSDP's registered one); the text is the new tokens decoded without
    special tokens. `on_batch` receives each batch's texts as they come (for resumable prediction files).
    """
    generated = {}
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast or nullcontext():
            tokens = generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                              max_new_tokens=max_new_tokens, position_ids=batch["position_ids"],
                              synced_gpus=synced_gpus)
        new = tokens[:, batch["input_ids"].shape[1]:].cpu()
        texts = {samples[idx].question_id: tokenizer.decode(row.tolist(), skip_special_tokens=True)
                 for idx, row in zip(batch["idx"].tolist(), new)}
        generated.update(texts)
        if on_batch is not None:
            on_batch(texts)
    return generated


# ---------------------------------------------------------------------------------------------------------------
# Thoughts
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def thought_vectors(model: MultimodalCoconut, batch: dict) -> list[torch.Tensor]:
    """The continuous thoughts of each row of a prompt batch: a (n_latents, C) tensor per row, in order.

    Thought j is what the model fed at its j-th `<|latent|>` position: the last hidden state of the position before.
    """
    out = model(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"])
    is_latent = batch["input_ids"] == model.latent_token_id  # (B, T)
    return [out.inputs_embeds[i][is_latent[i]] for i in range(is_latent.shape[0])]


@torch.no_grad()
def decode_thoughts(model: MultimodalCoconut, tokenizer, thoughts: torch.Tensor, k: int = 5) -> list[list[str]]:
    """The top-k tokens of each thought under the LM head (the paper's reading of a thought: a thought is a last
    hidden state, so the head turns it into the distribution over the token it would have written)."""
    if thoughts.shape[0] == 0:
        return []
    logits = model.lm_head(thoughts.to(model.lm_head.weight.dtype))  # (n, V)
    top = logits.topk(k, dim=-1).indices.tolist()
    return [[tokenizer.decode([t]) for t in row] for row in top]


@torch.no_grad()
def thought_attention(model: MultimodalCoconut, batch: dict) -> list[torch.Tensor]:
    """Where each continuous thought looked: per row, a (n_latents, layers, T) tensor of attention weights (mean over
    heads) of the position that computed thought j — the position just before the j-th `<|latent|>`, whose last
    hidden state the thought is — over the batch's T columns (pads get 0).

    The decoder is run once over the embeddings the latent passes fed (equal to the passes, by the parity tests),
    with eager attention, the one implementation that returns the weights.
    """
    out = model(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
                pixel_values=batch["pixel_values"])
    decoder = model.decoder
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation("eager")
    try:
        attentions = decoder(inputs_embeds=out.inputs_embeds, attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], output_attentions=True).attentions
    finally:
        decoder.set_attn_implementation(previous)
    weights = torch.stack([a.float().mean(1) for a in attentions], dim=1)  # (B, layers, T, T)
    is_latent = batch["input_ids"] == model.latent_token_id
    rows = []
    for i in range(is_latent.shape[0]):
        computing = is_latent[i].nonzero().flatten() - 1  # (n_latents,)
        rows.append(weights[i][:, computing].transpose(0, 1))  # (n_latents, layers, T)
    return rows
