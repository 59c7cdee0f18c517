"""Using a trained model: the one loading function under every command that needs one, and the batched answering
that training's evaluation, `predict`, `ask`, `analyze` and the web demo share.

    trained = load_trained("runs/demo")            # a run dir (its newest checkpoint), a checkpoint dir, an HF export
    trained.model, trained.backbone, trained.config, trained.stage
    texts = generate_texts(trained.model.generate, loader, samples, trained.backbone.tokenizer, max_new_tokens=64)

    sample = question_sample("photo.jpg", "What color is it?", ["red", "blue"])   # a user's question (ask, the demo)
    answered = answer_question(trained, sample)   # .answer, .thoughts (top tokens of each), .batch
    loader = prompt_loader(trained, prompt_set(trained, samples))   # a split, batched as the evaluation (predict)
    overlay_heatmap(image, image_attention_map(thought_attention(trained.model, batch)[0][j].mean(0), ...))

A checkpoint (and an export) carries what using it needs (checkpoint.save_model_files): the weights, the model
config, the tokenizer with Coconut's tokens, the image processor, and coconut.json with the run's config and the
stage it was trained at. Nothing is rebuilt from the data or from `model_id`: the tiny preset's tokenizer, for one,
is trained on the run's texts and would come out different from other texts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import checkpoint as ckpt
from .backbone import Backbone, load_backbone
from .config import Config
from .curriculum import CoconutDataset, Collator, LengthGroupedBatchSampler, Mode
from .data import Sample, SkipReport
from .evaluate import clean_direct_answer, coconut_answer, extract_answer, make_predictions
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
    # A checkpoint's weights are sharded (DCP, model/): read whole here and the model built from config.json. The
    # Coconut wrapper's own weights (the thought projection) ride along in `coconut_weights`.
    state_dict, own = None, {}
    if (Path(model_dir) / ckpt.MODEL_DIR).is_dir():
        state_dict, own = ckpt.split_wrapper_own(ckpt.read_model_state_dict(model_dir))
    elif (Path(model_dir) / ckpt.WRAPPER_OWN_FILE).is_file():  # an HF export
        own = ckpt.load_safetensors(Path(model_dir) / ckpt.WRAPPER_OWN_FILE)
    backbone = load_backbone(str(model_dir), trust_remote_code=cfg.trust_remote_code, image_size=cfg.image_size,
                             min_num_patches=cfg.min_num_patches, max_num_patches=cfg.max_num_patches,
                             use_thumbnail=cfg.use_thumbnail, attn_implementation=cfg.attn_implementation,
                             device=device, state_dict=state_dict)
    backbone.coconut_weights = own
    return backbone


def coconut_model(backbone: Backbone, cfg: Config, *, fresh_ok: bool = False) -> MultimodalCoconut:
    """MultimodalCoconut around `backbone` with the config's options on the thought (coconut, thought_norm), its own
    weights (backbone.coconut_weights) loaded. A learned thought projection with no saved weights is an error unless
    `fresh_ok` (a run that starts one, e.g. from a CoT checkpoint)."""
    model = MultimodalCoconut(backbone.model, backbone.latent_id, backbone.start_latent_id, backbone.end_latent_id,
                              backbone.eos_token_id, continuous_thoughts=cfg.coconut, thought_norm=cfg.thought_norm)
    own = {k: v for k, v in model.state_dict().items() if ckpt.is_wrapper_own(k)}
    if backbone.coconut_weights or (own and not fresh_ok):
        missing, unexpected = sorted(own.keys() - backbone.coconut_weights.keys()), \
            sorted(backbone.coconut_weights.keys() - own.keys())
        if missing or unexpected:
            raise LoadError(f"the saved model's own weights do not fit thought_norm={cfg.thought_norm!r}: missing "
                            f"{missing[:4]}, unexpected {unexpected[:4]}")
        model.load_state_dict(backbone.coconut_weights, strict=False)
    return model


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
    try:
        cfg, stage = read_info(model_dir)
        backbone = backbone_from(model_dir, cfg, device=device)
    except LoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing / corrupt files, a model of another kind
        raise LoadError(f"{model_dir}: cannot load the model ({type(e).__name__}: {' '.join(str(e).split())})") \
            from None
    model = coconut_model(backbone, cfg).eval()
    return Trained(model=model, backbone=backbone, config=cfg, stage=stage, path=model_dir)


def model_info(cfg: Config, stage: int, epoch: int) -> dict:
    """What coconut.json records for a checkpoint or export: the run's config (with the max_new_tokens its evaluation
    used), the stage trained at, the epochs done."""
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


# ---------------------------------------------------------------------------------------------------------------
# Questions from users: the front ends' (ask, predict, the web demo) shared prompt building and answering
# ---------------------------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A user's question or image that cannot be answered; the message names it and says why."""


def question_sample(image: str | Path | None, question: str, choices: list[str] | tuple = (),
                    question_id: str = "question") -> Sample:
    """A Sample for one user question about an image file (the image is decoded here, so an unreadable one fails
    before any model work). InputError for an empty question, an empty choice, a missing image, a directory or a
    file that is not an image."""
    if not question or not question.strip():
        raise InputError("the question is empty")
    choices = [str(c).strip() for c in choices or ()]  # as the prompt writes them (curriculum.question_text)
    if any(not c for c in choices):
        raise InputError(f"an empty choice in {choices!r}")
    if image is not None:
        image = Path(image)
        if not image.exists():
            raise InputError(f"{image}: image file not found")
        if image.is_dir():
            raise InputError(f"{image}: is a directory, not an image file")
        try:
            with Image.open(image) as img:
                img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{image}: not a readable image ({' '.join(str(e).split())})") from None
    return Sample(question_id=question_id, image=None if image is None else str(image), question=question.strip(),
                  choices=choices, correct_choice_idx=None, direct_answers=None, difficult_direct_answer=False,
                  steps=[], answer=None, split="test", source="")


def needs_image(trained: Trained) -> bool:
    """Whether every question to this model comes with an image: a vision-language model trained on A-OKVQA or the
    built-in set with images (shapes, hops), whose questions all have one. A text-only model takes none; a model
    trained on the jsonl format (where a row may have no image) takes either, as does a vision-language model trained
    on text alone (the original Coconut's format, dataset coconut, or the built-in hops_text)."""
    cfg = trained.config
    text_only = cfg.dataset in ("coconut", "jsonl") or (cfg.dataset == "builtin" and cfg.builtin_task == "hops_text")
    return trained.backbone.is_multimodal and not text_only


def check_images(trained: Trained, samples: list[Sample]) -> None:
    """InputError naming the model (and, among several questions, the first misfit) when `samples` have images the
    model cannot take (a text-only model) or lack images it needs (`needs_image`)."""
    cfg = trained.config
    if not trained.backbone.is_multimodal:
        misfit = next((s for s in samples if s.image is not None), None)
        problem = f"a text-only language model ({cfg.model_id}), which cannot take an image"
    elif needs_image(trained):
        misfit = next((s for s in samples if s.image is None), None)
        problem = (f"a vision-language model trained on dataset {cfg.dataset!r}, whose questions all have an image; "
                   "give an image with the question")
    else:
        return
    if misfit is not None:
        which = "" if len(samples) == 1 else f" (question {misfit.question_id!r} of {len(samples)})"
        raise InputError(f"{trained.path}: {problem}{which}")


def prompt_set(trained: Trained, samples: list[Sample], stage: int | None = None) -> CoconutDataset:
    """The generation prompts of `samples` at `stage` (default: the checkpoint's), built by the dataset training's
    evaluation uses, so the layout (image tokens, question, choices line, markers and thoughts) is the same.
    InputError when the questions' images do not fit the model (`check_images`)."""
    cfg = trained.config
    check_images(trained, samples)
    return CoconutDataset(samples, trained.backbone, trained.mode, trained.stage if stage is None else stage,
                          train=False, max_length=cfg.max_length, seed=cfg.seed, epoch=0,
                          skip_bad_records=cfg.skip_bad_records, report=SkipReport())


def prompt_loader(trained: Trained, dataset: CoconutDataset, batch_size: int | None = None, num_workers: int = 0):
    """Batches as training's evaluation makes them: length-grouped, unshuffled, the collator's layout."""
    cfg = trained.config
    sampler = LengthGroupedBatchSampler(dataset.lengths, batch_size or cfg.eval_batch_size or cfg.batch_size_training,
                                        shuffle=False, seed=cfg.seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(trained.backbone),
                                       num_workers=num_workers)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(trained: Trained) -> torch.device:
    return next(trained.model.parameters()).device


def autocast_for(trained: Trained):
    """bf16 autocast where training's evaluation used it (a bf16 run on a GPU), else None."""
    device = model_device(trained)
    return torch.autocast("cuda", dtype=torch.bfloat16) if trained.config.bf16 and device.type == "cuda" else None


@dataclass
class Answered:
    """One answered question: the generated text, the answer as the run's evaluation reads it (the chosen choice
    when there are choices, mapped as the evaluation maps it; else the text after `###`; dataset coconut: the
    original Coconut's rule, `evaluate.coconut_answer`), the stage prompted at and the top tokens of each thought.
    `multiple_choice` and `direct_answer` are A-OKVQA's prediction fields (None for dataset coconut). `batch` is the
    prompt batch (for `thought_attention`)."""

    question: str
    generated: str
    answer: str
    direct_answer: str | None
    multiple_choice: str | None
    stage: int
    thoughts: list[list[str]]
    batch: dict

    def to_json(self) -> dict:
        return {"answer": self.answer, "n_thoughts": len(self.thoughts),
                "thoughts": [{"top_tokens": t} for t in self.thoughts], "stage": self.stage,
                "multiple_choice": self.multiple_choice, "direct_answer": self.direct_answer,
                "generated": self.generated, "question": self.question}


@torch.no_grad()
def answer_question(trained: Trained, sample: Sample, *, stage: int | None = None, top_k: int = 5) -> Answered:
    """Answer one question (a `question_sample`) with the continuous thoughts of `stage` (default: the
    checkpoint's), decoding each thought's top-k tokens. The same prompt, generation and answer mapping as
    training's evaluation. InputError for an image the model cannot take or one it needs (`check_images`), and for
    choices to a model trained on the original Coconut's format (it has none: nothing to map an answer to)."""
    if sample.choices and trained.config.dataset == "coconut":
        raise InputError(f"{trained.path}: trained on dataset 'coconut' (the original Coconut's question, steps, "
                         "answer), whose questions have no choices; ask without choices")
    dataset = prompt_set(trained, [sample], stage)
    batch = to_device(Collator(trained.backbone)([dataset[0]]), model_device(trained))
    tok = trained.backbone.tokenizer
    text = generate_texts(trained.model.generate, [batch], [sample], tok, max_new_tokens=trained.config.max_new_tokens,
                          device=model_device(trained), autocast=autocast_for(trained), progress=False)
    text = text[sample.question_id]
    thoughts = decode_thoughts(trained.model, tok, thought_vectors(trained.model, batch)[0], k=top_k)
    if trained.config.dataset == "coconut":
        return Answered(question=sample.question, generated=text, answer=coconut_answer(text), direct_answer=None,
                        multiple_choice=None, stage=dataset.stage, thoughts=thoughts, batch=batch)
    raw = extract_answer(text)
    mc = make_predictions([sample], {sample.question_id: text})[sample.question_id]["multiple_choice"] \
        if sample.choices else None
    return Answered(question=sample.question, generated=text, answer=mc if mc is not None else raw,
                    direct_answer=clean_direct_answer(raw), multiple_choice=mc, stage=dataset.stage,
                    thoughts=thoughts, batch=batch)


# ---------------------------------------------------------------------------------------------------------------
# Attention over the image
# ---------------------------------------------------------------------------------------------------------------


def tile_grid(width: int, height: int, image_processor, n_tiles: int) -> tuple[int, int]:
    """(columns, rows) of InternVL's tiling of a width x height image into `n_tiles` tiles (thumbnail included):
    the processor's own choice of canvas. Tiles are in row-major order, the thumbnail (if any) last."""
    if n_tiles == 1:
        return 1, 1
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    side = image_processor.size["height"] if isinstance(image_processor.size, dict) else image_processor.size.height
    cols, rows = get_optimal_tiled_canvas((height, width), (side, side), image_processor.min_patches,
                                          image_processor.max_patches)
    if cols * rows not in (n_tiles, n_tiles - 1):
        raise ValueError(f"{n_tiles} tiles do not fit the {cols} x {rows} canvas the processor picks for a "
                         f"{width} x {height} image")
    return cols, rows


def image_attention_map(weights: torch.Tensor, input_ids: torch.Tensor, backbone: Backbone, width: int,
                        height: int) -> torch.Tensor:
    """A (rows * s, cols * s) map of one thought's attention over the image, s = sqrt(tokens per tile).

    `weights` is one row of `thought_attention` for one thought, reduced over layers: (T,); `input_ids` the row's
    ids (T,). The image tokens are taken per tile (InternVL's pixel shuffle keeps the patches row-major) and laid
    out on the tile grid; the thumbnail tile is left out (it covers the whole image at a coarser scale)."""
    image_weights = weights[input_ids == backbone.image_token_id].float()  # (tiles * tokens_per_tile,)
    side = math.isqrt(backbone.tokens_per_tile)
    n_tiles = image_weights.numel() // backbone.tokens_per_tile
    if n_tiles == 0 or side * side != backbone.tokens_per_tile:
        raise ValueError("no image tokens to draw (a text-only question, or tiles that are not square)")
    cols, rows = tile_grid(width, height, backbone.image_processor, n_tiles)
    tiles = image_weights.view(n_tiles, side, side)[: cols * rows]  # (tiles, s, s)
    return tiles.view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)


# A perceptual colour scale (dark blue -> red -> yellow), interpolated; enough for a heatmap without matplotlib.
_HEAT = np.array([[0, 0, 64], [60, 20, 140], [190, 40, 100], [245, 120, 30], [255, 230, 80]], dtype=np.float32)


def overlay_heatmap(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """`image` with `heat` (any 2-D map, scaled to its own min..max) drawn over it, smoothly resized."""
    h = heat.float().cpu().numpy()
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    pos = h * (len(_HEAT) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT) - 2)
    frac = (pos - lo)[..., None]
    rgb = (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).astype(np.uint8)
    colour = Image.fromarray(rgb, "RGB").resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), colour, alpha)




# ---------------------------------------------------------------------------------------------------------------
# Scoring a trained model (experiments, analyze): training's evaluation, run on a loaded checkpoint
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_trained(trained: Trained, samples, *, device="cpu", thought_hook: Callable | None = None,
                     progress: bool = False) -> dict:
    """Answer `samples` with the checkpoint and score them with the official metrics, as training's evaluation does.

    Returns {"mc_accuracy", "da_accuracy", "n_mc", "n_da", "written_tokens" (mean new tokens per question before
    EOS), "thoughts" (mean <|latent|> positions per question), "inference_s", "generated": {qid: text}}.
    `thought_hook(i, thoughts) -> thoughts` replaces the fed thoughts (MultimodalCoconut._run), for ablations.
    """
    import time

    from .evaluate import score_generations

    model, eos = trained.model, trained.backbone.eos_token_id
    written, thoughts = [], []

    def generate(input_ids, *args, **kwargs):
        tokens = model.generate(input_ids, *args, thought_hook=thought_hook, **kwargs)
        new = tokens[:, input_ids.shape[1]:]  # (B, new)
        is_eos = new == eos
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])  # tokens before the first EOS
        written.extend(ends.tolist())
        thoughts.extend((input_ids == model.latent_token_id).sum(1).tolist())
        return tokens

    t0 = time.time()
    texts = generate_texts(generate, prompt_loader(trained, prompt_set(trained, samples)), samples,
                           trained.backbone.tokenizer, max_new_tokens=trained.config.max_new_tokens, device=device,
                           progress=progress)
    elapsed = time.time() - t0
    result = {"mc_accuracy": None, "da_accuracy": None}
    result.update(score_generations(samples, texts, trained.config.dataset)[1])
    result.update(written_tokens=sum(written) / max(len(written), 1), thoughts=sum(thoughts) / max(len(thoughts), 1),
                  inference_s=round(elapsed, 2), generated=texts,
                  answers={q: extract_answer(t) for q, t in texts.items()})
    return result
