"""Backbone loading: `model_id` -> model, tokenizer, image processor and the token ids Coconut needs.

Three kinds of backbone are supported:

* native Hugging Face InternVL checkpoints (`InternVLForConditionalGeneration`, e.g. `OpenGVLab/InternVL3-1B-hf`
  or a local directory in that format), through transformers' own classes;
* original-format InternVL checkpoints (`InternVLChatModel`, remote code, e.g. `OpenGVLab/InternVL3-1B-Pretrained`),
  only when the config sets `trust_remote_code: true`;
* any Hugging Face causal LM (text only), as in the original Coconut.

Three presets need no download: `tiny` (a few-million-parameter InternVL with random weights and a byte-level BPE
tokenizer trained locally, saved as an ordinary HF checkpoint directory and loaded back through `from_pretrained`),
`tiny-text` (its language model alone, a text-only Qwen2, built and loaded the same way; a trained one can become
the tiny InternVL's language model, `build_tiny_on`) and `internvl3-1b-shape`
(the exact shapes of InternVL3-1B with random weights, for benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed
from torch import nn

START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
# InternVL's image markers: `<img>` + tiles x tokens_per_tile x `<IMG_CONTEXT>` + `</img>`.
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VERSION = 2  # bump when the tiny architecture changes, so cached copies are rebuilt
TINY_COMPLETE = "COMPLETE"  # written last into a tiny-model cache entry; an entry without it is incomplete


@dataclass
class Backbone:
    """A loaded backbone and everything the data pipeline and `MultimodalCoconut` need to know about it."""

    model: nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    image_processor: object | None  # transformers image processor (InternVL tiling); None for text-only LMs
    tokens_per_tile: int  # image tokens per 448px (or image_size) tile; 0 for text-only LMs
    image_token_id: int | None
    start_latent_id: int
    end_latent_id: int
    latent_id: int
    eos_token_id: int
    pad_token_id: int
    # Weights of MultimodalCoconut's own modules saved with this backbone by a trained run (the thought projection of
    # thought_norm 'projection'); inference.coconut_model loads them. Empty for a backbone fresh from model_id.
    coconut_weights: dict = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.image_token_id is not None


def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------

_TINY_CORPUS = """
What color is the shape? Which shape is to the right of the red circle? What is below the blue square?
The triangle is at the top left and it is green. The shape to its right is a yellow circle. So the answer is red.
Choices: (A) red (B) green (C) blue (D) yellow. Answer: ### circle square triangle star left right top bottom
above below next to between how many what which where who why when is are was were the a an of in on at to
Question: A person is holding an umbrella because it is raining. The dog sits on the couch near the window.
0 1 2 3 4 5 6 7 8 9 10 one two three four five yes no
"""


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts` (any input is still covered: byte-level has all 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", IMG_START, IMG_END, IMG_CONTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS, *texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _internvl_config(tokenizer, vision: dict, text: dict, image_size: int, patch_size: int, vocab_size: int):
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision_config = InternVLVisionConfig(image_size=image_size, patch_size=patch_size, **vision)
    text_config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False, **text)
    tokens_per_tile = (image_size // patch_size) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def image_processor_class():
    """InternVL's tiling processor as `AutoImageProcessor` picks it: the torchvision one (`GotOcr2ImageProcessor`,
    ~5x the samples/s of the PIL one per DataLoader worker, docs/benchmarks.md) when torchvision is installed, else
    `GotOcr2ImageProcessorPil`. Their tiles agree to 0.04 after normalisation (resampling differs in the last bits of
    a pixel: tests/test_data.py), so a model trained with one may be evaluated with the other."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor


def _image_processor(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, cls=None):
    return (cls or image_processor_class())(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=list(mean),
        image_std=list(std),
    )


# The tiny preset's vision encoder (64px tiles, 8px patches), shared by build_tiny and build_tiny_on.
_TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def build_tiny(out_dir: str | os.PathLike, texts: Iterable[str] = (), seed: int = 0) -> Path:
    """Write a tiny random-weight InternVL checkpoint directory (model, tokenizer, image processor) to `out_dir`.

    64px tiles, 8px patches -> 16 image tokens per tile; 2.1M (vocabulary ~470 tokens, the built-in data) to 2.3M
    (1024 tokens) parameters, sized so that forward + backward of 16 samples x 80 tokens with one tile each takes
    ~0.2 s on one CPU core. Deterministic by `seed` and `texts`.
    The directory is written under a temporary name and renamed, so a crash never leaves a half-built model.
    """
    from transformers import InternVLForConditionalGeneration

    _quiet_transformers()
    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer(texts)
    config = _internvl_config(
        tokenizer,
        vision=_TINY_VISION,
        text=dict(
            hidden_size=160,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        image_size=64,
        patch_size=8,
        vocab_size=len(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return _save_preset(out_dir, model, tokenizer, _image_processor(64))


def build_tiny_on(out_dir: str | os.PathLike, language_model: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny InternVL around a trained text-only model: the `tiny` preset's vision encoder and projector with
    random weights (seeded by `seed`), and as its language model the weights and tokenizer (Coconut's tokens
    included) of `language_model`, a model trained by this project (a run, checkpoint or exported directory, read
    through `inference.load_trained`), e.g. `tiny-text` after the text hops task's CoT. A VLM built as InternVL3 is:
    a vision side around a pretrained LM. On a question without an image it computes what the text model does."""
    from transformers import InternVLForConditionalGeneration

    from .inference import load_trained

    _quiet_transformers()
    text = load_trained(language_model, device="cpu")
    lm, tokenizer = text.backbone.model, text.backbone.tokenizer
    if text.backbone.is_multimodal or lm.config.model_type != "qwen2":
        raise ValueError(f"tiny_language_model {language_model}: a {lm.config.model_type} model "
                         f"({type(lm).__name__}); the tiny InternVL's language model is a text-only Qwen2, e.g. a "
                         "model trained from model_id 'tiny-text'")
    if text.backbone.coconut_weights:
        raise ValueError(f"tiny_language_model {language_model}: it was trained with thought_norm "
                         f"{text.config.thought_norm!r}, whose learned weights belong to its Coconut wrapper, not to "
                         "its language model; use a model trained with thought_norm 'none' (e.g. its CoT stage)")
    c = lm.config
    config = _internvl_config(
        tokenizer,
        vision=_TINY_VISION,
        text=dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                  rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters),
        image_size=64,
        patch_size=8,
        vocab_size=lm.get_input_embeddings().weight.shape[0],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())  # strict: every weight, every shape
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return _save_preset(Path(out_dir), model, tokenizer, _image_processor(64))


def _fingerprint(path: str | os.PathLike) -> str:
    """A digest of the content of every file under the model directory `path` resolves to (a run directory: its
    newest complete checkpoint), so that a cache entry built from it is rebuilt when it changes."""
    from .inference import resolve_model_dir

    model_dir = resolve_model_dir(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        if f.parent.name == "optimizer" or f.name.startswith("rng_"):
            continue  # training state, not the model
        digest.update(str(f.relative_to(model_dir)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _save_preset(out_dir: Path, model, tokenizer, image_processor=None) -> Path:
    """Write a preset's HF directory under a temporary name, TINY_COMPLETE last, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    model.save_pretrained(tmp)
    for part in (tokenizer, image_processor):
        if part is not None:
            part.save_pretrained(tmp)
    missing = [name for name in ("config.json", "model.safetensors") if not (tmp / name).is_file()]
    if missing:  # save_pretrained writes only on rank 0 of a torch.distributed process group
        shutil.rmtree(tmp)
        raise RuntimeError(f"building the tiny model in {out_dir}: save_pretrained wrote no {', '.join(missing)} "
                           "(under torch.distributed only rank 0 writes; build it there)")
    (tmp / TINY_COMPLETE).write_text("")  # last: a directory without it is an interrupted build
    try:
        tmp.rename(out_dir)
    except OSError:  # another process built it first: theirs is identical (same seed and texts)
        shutil.rmtree(tmp)
    return out_dir


def tiny_dir(texts: Iterable[str] = (), seed: int = 0, cache_dir: str | os.PathLike | None = None,
             preset: str = "tiny", language_model: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the cached checkpoint of the `tiny` (or `tiny-text`) preset for these texts and seed;
    with `language_model`, the tiny InternVL around that trained text model (`build_tiny_on`; texts unused).

    Under a torch.distributed process group every rank must call it: rank 0 builds (transformers saves only there),
    the others wait in a barrier. Concurrent processes without a group (several runs on one machine) take turns
    through a file lock. An entry without TINY_COMPLETE (an interrupted or an older build) is rebuilt.
    """
    texts = list(texts)
    if language_model is not None:
        if preset != "tiny":
            raise ValueError(f"a language model for the tiny preset is given, but the preset is {preset!r}")
        key = [TINY_VERSION, "on", seed, _fingerprint(language_model)]

        def build(out_dir, texts, seed):
            return build_tiny_on(out_dir, language_model, seed)
    else:
        key = [TINY_VERSION, seed, texts] if preset == "tiny" else [TINY_VERSION, "text", seed, texts]
        build = build_tiny if preset == "tiny" else build_tiny_text
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir or os.environ.get("MMC_CACHE", Path.home() / ".cache" / "multimodal_coconut"))
    path = cache_dir / f"{preset}-{digest}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            _build_tiny_once(path, build, texts, seed)
        torch.distributed.barrier()  # on every rank, whatever the cache holds, so that the ranks stay in step
        if not (path / TINY_COMPLETE).is_file():
            raise RuntimeError(f"rank 0 built the tiny model in {path} but rank {torch.distributed.get_rank()} does "
                               "not see it: the model cache (MMC_CACHE) must be on a file system all ranks share")
    elif not (path / TINY_COMPLETE).is_file():
        _build_tiny_once(path, build, texts, seed)
    return path


def build_tiny_text(out_dir: str | os.PathLike, texts: Iterable[str] = (), seed: int = 0) -> Path:
    """Write the `tiny-text` checkpoint: the tiny preset's language model alone (a Qwen2ForCausalLM, 2.0M parameters
    with a 536-token vocabulary, 2.1M with 1024) and its locally trained tokenizer, as an ordinary HF directory.

    Text only, as the original Coconut's GPT-2, for tests and demos of the text datasets. Deterministic by `seed`
    and `texts`; written under a temporary name and renamed, like `build_tiny`.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _quiet_transformers()
    out_dir = Path(out_dir)
    tokenizer = train_tiny_tokenizer(texts)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=160, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return _save_preset(out_dir, model, tokenizer)


def _build_tiny_once(path: Path, build, texts: list[str], seed: int) -> None:
    """build(path, texts, seed) under an exclusive lock on `path`.lock, unless a complete build is there."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (path / TINY_COMPLETE).is_file():
            return
        if path.exists():  # incomplete: treated as absent
            shutil.rmtree(path)
        build(path, texts, seed)


def internvl3_1b_shape(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight model with the exact shapes of InternVL3-1B (InternViT-300M at 448px + Qwen2.5-0.5B).

    938,193,024 parameters: vision 304.0M, projector 4.5M, language model 493.8M + untied LM head 135.9M. Pass
    `device="meta"` to get the shapes without allocating memory. The tokenizer is the tiny one (the vocabulary size
    is InternVL3's, 151674, so every id of the tiny tokenizer is valid).
    """
    from transformers import InternVLForConditionalGeneration

    tokenizer = train_tiny_tokenizer([])
    config = _internvl_config(
        tokenizer,
        # InternViT-300M-448px: qkv_bias=true, layer scale, no final norm (use_mean_pooling makes it an Identity).
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    attention_bias=True),
        text=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
        ),
        image_size=448,
        patch_size=14,
        vocab_size=151674,
    )
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).to(dtype)
    return model, tokenizer, _image_processor(448)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def is_original_internvl(config) -> bool:
    """True for an original-format InternVL config (InternVLChatModel): a config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else functools.partial(getattr, config)
    return "InternVLChatModel" in (get("architectures", None) or []) or get("model_type", "") == "internvl_chat"


def _config_json(path: str) -> dict:
    """The checkpoint's config.json (local directory or hub id), read before transformers builds any config class."""
    from transformers.utils import cached_file

    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    if local.is_dir() or path.startswith((os.sep, ".", "~")):
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json there)")
    return json.loads(Path(cached_file(path, "config.json")).read_text())


def _square(size, what: str) -> int:
    """A tile or patch size given as an int or as (height, width), as an int; InternVL tiles are square."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{what} is {list(size)}, but InternVL tiles are square")
        size = size[0]
    return int(size)


def _tile_size(config: dict) -> int:
    """The vision encoder's tile size in pixels, from a native or original-format InternVL config.json."""
    vision = config.get("vision_config") or {}
    if is_original_internvl(config):
        return _square(config.get("force_image_size") or vision["image_size"], "the checkpoint's tile size")
    return _square(vision.get("image_size", 448), "the checkpoint's tile size")  # 448: InternVLVisionConfig default


def _ensure_post_init(model_class) -> None:
    """Make `model_class.__init__` end with `post_init()` when the class's own code does not call it.

    InternVL's remote code was written for transformers 4.x and never calls `post_init()`; transformers 5 relies on
    what it sets up, so `from_pretrained` fails ("no attribute 'all_tied_weights_keys'") without it.
    """
    if "_coconut_post_init" in model_class.__dict__:
        return
    init = model_class.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    model_class.__init__ = __init__
    model_class._coconut_post_init = True


def _load_original_internvl(path: str, dtype: torch.dtype, attn_implementation: str | None,
                            state_dict: dict | None = None):
    """InternVLChatModel with the checkpoint's own code, through `AutoModel.from_pretrained(trust_remote_code=True)`
    (built from the config alone when `state_dict`, a sharded checkpoint's weights, is given).

    Its `__init__` picks the language model's attention itself, from its `use_flash_attn` argument: flash-attn when
    asked and installed, else eager, whatever `attn_implementation` from_pretrained was given; eager keeps O(T^2)
    attention probabilities (13 tiles x 256 tokens x batch 8 do not fit a GPU). So flash is asked for through
    `use_flash_attn`, and the language model is then switched to `attn_implementation` (sdpa by default) the way
    transformers switches it at run time. The vision encoder (InternViT) has flash or naive attention only.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if reference is None:
        raise ValueError(f"{path}: config.json has no auto_map entry for AutoModel, so its model code cannot be found")
    model_class = get_class_from_dynamic_module(reference, path)  # the class AutoModel resolves (cached module)
    _ensure_post_init(model_class)
    flash = attn_implementation == "flash_attention_2"
    if state_dict is not None:
        model = from_state_dict(model_class, config, state_dict, dtype=dtype, use_flash_attn=flash)
    else:
        model = AutoModel.from_pretrained(path, config=config, trust_remote_code=True, dtype=dtype,
                                          use_flash_attn=flash)
    if attn_implementation:
        model.language_model.set_attn_implementation(attn_implementation)  # an error if flash-attn is missing
    return model


def load_backbone(
    model_id: str,
    *,
    trust_remote_code: bool = False,
    image_size: int | None = None,
    min_num_patches: int = 1,
    max_num_patches: int = 12,
    use_thumbnail: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    tiny_texts: Iterable[str] = (),
    seed: int = 0,
    tiny_language_model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Backbone:
    """Load a backbone by `model_id` (a preset name, a local directory or a hub id) and add Coconut's tokens.

    `image_size` defaults to the checkpoint's tile size (any other value is an error: the vision encoder fixes it);
    tiling follows InternVL's dynamic preprocessing (`min_num_patches`..`max_num_patches` tiles, plus a thumbnail when
    `use_thumbnail` and more than one tile). Original-format InternVL checkpoints run their own Python code and are
    loaded only with `trust_remote_code=True`. `device` is where the model is put; the `internvl3-1b-shape` preset is
    built there directly (`"meta"` gives its shapes without allocating memory). `state_dict`: the weights, when the
    directory holds none of its own (a sharded checkpoint: the model is built from its config.json).
    """
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    if model_id == "internvl3-1b-shape":
        _check_image_size(image_size, 448)
        model, tokenizer, image_processor = internvl3_1b_shape(dtype, device or "cpu")
        return _finish(model, tokenizer, image_processor, "hf_internvl", min_num_patches, max_num_patches,
                       use_thumbnail)
    presets = ("tiny", "tiny-text")
    if tiny_language_model is not None and model_id != "tiny":
        raise ValueError(f"tiny_language_model is the language model of the 'tiny' preset, but model_id is "
                         f"{model_id!r}")
    path = str(tiny_dir(tiny_texts, seed, preset=model_id, language_model=tiny_language_model)) \
        if model_id in presets else model_id

    # Decide from config.json itself: transformers' own config classes would already refuse remote code, less clearly.
    config = _config_json(path)
    kwargs = dict(dtype=dtype)
    if state_dict is not None:
        from transformers import AutoConfig

        kwargs.update(state_dict=state_dict, config=AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code and is_original_internvl(config)))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if is_original_internvl(config):
        if not trust_remote_code:
            raise ValueError(
                f"{model_id} is an original-format InternVL checkpoint (InternVLChatModel), which runs the "
                "checkpoint's own Python code. Set `trust_remote_code: true` in the config to allow it, or use "
                "the native Hugging Face conversion (e.g. OpenGVLab/InternVL3-1B-hf)."
            )
        tile = _tile_size(config)
        _check_image_size(image_size, tile)
        model = _load_original_internvl(path, dtype, attn_implementation, state_dict)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        image_processor = _image_processor(tile)  # the original's own preprocessing: ImageNet mean/std, square tiles
        kind = "original_internvl"
    elif config.get("model_type") == "internvl":
        from transformers import InternVLForConditionalGeneration

        tile = _tile_size(config)
        _check_image_size(image_size, tile)
        model = InternVLForConditionalGeneration.from_pretrained(path, **kwargs) if state_dict is None \
            else from_state_dict(InternVLForConditionalGeneration, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        if image_processor.size["height"] != tile or image_processor.size["width"] != tile:
            raise ValueError(f"{model_id}: the image processor makes {image_processor.size} tiles but the vision "
                             f"encoder takes {tile}px tiles; the checkpoint is inconsistent")
        kind = "hf_internvl"
    else:
        if state_dict is None:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        else:  # the Auto class resolves remote code from a path, and a sharded checkpoint's weights have none
            with torch.device("meta"):
                model_class = type(AutoModelForCausalLM.from_config(kwargs["config"],
                                                                   trust_remote_code=trust_remote_code))
            model = from_state_dict(model_class, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        image_processor = None
        kind = "causal_lm"
    if device is not None:
        model = model.to(device)
    return _finish(model, tokenizer, image_processor, kind, min_num_patches, max_num_patches, use_thumbnail)


def from_state_dict(model_class, config, state_dict: dict[str, torch.Tensor], **kwargs) -> nn.Module:
    """`model_class` built from `config` with the weights of `state_dict` (a sharded checkpoint's, read whole), through
    `from_pretrained` (so tied weights and dtype are handled as for a directory). Every weight of the model must be
    in `state_dict` and nothing else: a mismatch is an error naming the keys, never a randomly initialised layer."""
    model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True,
                                              **kwargs)
    wrong = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(wrong.values()):
        raise ValueError(f"the checkpoint's weights do not fit {model_class.__name__}: " + "; ".join(
            f"{k.replace('_', ' ')} {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in wrong.items() if v))
    return model


def _check_image_size(image_size: int | None, tile: int) -> None:
    if image_size is not None and image_size != tile:
        raise ValueError(
            f"image_size={image_size} but the checkpoint's vision encoder takes {tile}px tiles; "
            f"set image_size: {tile} (InternVL tiles are fixed by the vision encoder)"
        )


def _finish(model, tokenizer, image_processor, kind, min_num_patches, max_num_patches, use_thumbnail):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    start_id, end_id, latent_id = add_latent_tokens(model, tokenizer)
    if kind == "causal_lm":
        tokens_per_tile, image_token_id = 0, None
    else:
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMG_CONTEXT} token, so images cannot be placed in the text")
        if kind == "original_internvl":
            model.img_context_token_id = image_token_id
            tokens_per_tile = int(model.num_image_token)
        else:
            vc = model.config.vision_config
            grid = _square(vc.image_size, "image_size") // _square(vc.patch_size, "patch_size")
            tokens_per_tile = int(grid * grid * model.config.downsample_ratio**2)
        image_processor.min_patches, image_processor.max_patches = min_num_patches, max_num_patches
        image_processor.use_thumbnail = use_thumbnail
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        tokens_per_tile=tokens_per_tile,
        image_token_id=image_token_id,
        start_latent_id=start_id,
        end_latent_id=end_id,
        latent_id=latent_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _language_model(model: nn.Module) -> nn.Module:
    """The causal LM that owns the input embeddings and LM head (the model itself for text-only LMs)."""
    if is_original_internvl(model.config):
        return model.language_model
    return model


def add_latent_tokens(model: nn.Module, tokenizer) -> tuple[int, int, int]:
    """Add `<|start-latent|>`, `<|end-latent|>`, `<|latent|>` (in this order) and resize the embeddings.

    New rows of the input embeddings and of the (untied) LM head start as copies of an existing token's rows, as in
    the original Coconut. A tokenizer that already has the tokens (a saved Coconut checkpoint) is left as it is, so
    loading never re-initialises trained rows.
    """
    new = [t for t in (START_LATENT, END_LATENT, LATENT) if t not in tokenizer.get_vocab()]
    if new and len(new) != 3:
        raise ValueError(f"the tokenizer has only some of Coconut's tokens (missing {new}); it is inconsistent")
    lm = _language_model(model)
    if new:
        init_id = tokenizer.encode("<<", add_special_tokens=False)[0]
        tokenizer.add_tokens(new, special_tokens=True)
        if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in (START_LATENT, END_LATENT, LATENT))
    if new:
        with torch.no_grad():
            for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
                emb.weight[list(ids)] = emb.weight[init_id].clone()  # a tied head just gets the rows twice
    if lm is not model:  # the outer config of an original-format InternVL keeps its own copy of the vocab size
        model.config.llm_config.vocab_size = lm.config.vocab_size
    return ids
