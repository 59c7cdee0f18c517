"""One typed config per run: a YAML file plus `key=value` overrides, validated before anything heavy.

    python run.py args/multimodal_coconut.yaml lr=2e-5 debug=true

    cfg = load_config("args/demo.yaml", ["num_epochs=2"])
    save_config(cfg, "runs/demo/config.yaml")

Every key of the original Coconut keeps its name and meaning, so an original config loads once the
multimodal keys it needs are added. Unknown keys, wrong types, contradictory settings and missing files
raise `ConfigError` naming the file (or "command line"), the key and what was expected. This module
imports neither torch nor transformers so that a bad config fails in milliseconds.

`python -m multimodal_coconut.config` prints the key table for the README;
`python -m multimodal_coconut.config CONFIG.yaml [key=value ...]` prints the resolved config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot be run. `keys` are the keys at fault, used to say where they were set."""

    def __init__(self, message: str, keys: Sequence[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


@dataclass
class Config:
    # --- run (original Coconut keys) ---
    project: str = "multimodal-coconut"
    """Project name for wandb."""
    name: str = "run"
    """Run name; everything the run writes goes to save_path/name/."""
    save_path: str = "runs"
    """Folder holding one sub-folder per run."""
    only_eval: bool = False
    """Only evaluate load_model_path (or the base model) on the validation data; no training."""
    seed: int = 0
    """Random seed for data order, model init and the curriculum's uniform_prob draws."""
    resume: int = 0
    """Epochs already done: training starts at epoch `resume` (0 = from scratch), its step count and LR schedule with it. With only_eval it selects the stage."""
    load_model_path: str | None = None
    """Checkpoint whose weights are loaded before training or evaluation (null = start from model_id)."""
    debug: bool = False
    """Small data subset, no wandb, no checkpoints (as in the original)."""

    # --- method (original Coconut keys) ---
    coconut: bool = False
    """Train with the Coconut curriculum: stage k replaces the first k steps with k*c_thought latents. False (with cot
    and no_cot false): the same layout, but a latent is an ordinary learned token, not fed back ("pause as thought")."""
    cot: bool = False
    """Train stage 0 only: plain chain of thought (question, all steps, answer)."""
    no_thoughts: bool = False
    """Coconut ablation: the curriculum removes steps but inserts no latent tokens (needs coconut)."""
    no_cot: bool = False
    """Baseline: train on question -> answer, no steps."""
    c_thought: int = 1
    """Continuous thoughts (latent tokens) per replaced reasoning step."""
    epochs_per_stage: int = 1
    """Epochs spent at each curriculum stage; stage = epoch // epochs_per_stage."""
    curriculum: bool = True
    """False: train at the last stage (all steps replaced, max_latent_stage + 1) from the first epoch ("w/o curriculum")."""
    max_latent_stage: int = 1
    """Largest stage: at most this many steps are replaced by latents."""
    pad_latent_to_max: bool = False
    """A sample with fewer steps than the stage still gets min(stage, max_latent_stage) latent groups (else one per step)."""
    uniform_prob: float = 0.0
    """Probability that a training sample uses a stage drawn uniformly instead of the scheduled one."""
    save_only_improve: bool = False
    """Write a checkpoint only when validation accuracy improves (else every epoch)."""

    # --- options on the thought (research variants; the defaults are the original Coconut) ---
    thought_norm: Literal["none", "embedding", "projection"] = "none"
    """How a last hidden state becomes the next input: as it is (the original), rescaled to the token embeddings' median norm, or through a learned linear map + LayerNorm (CODI), trained with the model and saved with it."""
    thought_supervision: float = 0.0
    """Weight of SIM-CoT's step supervision (0 = off, the original): in training, the model's own decoder and LM head, given only the last thought of each replaced step, write that step (teacher forcing); loss = answer loss + weight x mean step loss, logged as train_step_loss. Nothing changes at inference. With pause as thought (coconut false) the step is written from the last hidden state before its latent, what Coconut would feed there."""

    # --- model ---
    model_id: str = "tiny"
    """'tiny' (random tiny InternVL built locally), 'tiny-text' (its language model alone, text only), a local model directory, or a Hugging Face hub id (any causal LM for text data)."""
    tiny_language_model: str | None = None
    """With model_id 'tiny': a trained text-only model of this project (a run or checkpoint directory, e.g. `tiny-text` after the text hops task's CoT) whose weights and tokenizer become the tiny InternVL's language model, the vision encoder and projector random (by `seed`), as InternVL3 is built around a pretrained Qwen2.5. null = all random. Unused when the run starts from a checkpoint."""
    trust_remote_code: bool = False
    """Allow the model's own code from the hub (needed for the original-format OpenGVLab/InternVL3-* checkpoints)."""
    bf16: bool = False
    """bfloat16 on GPU: autocast (DDP) or bf16 parameters with fp32 gradient reduction (FSDP); ignored on CPU."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained ('sdpa', 'eager', 'flash_attention_2')."""
    freeze_vision: bool = False
    """Do not train the vision encoder."""
    freeze_projector: bool = False
    """Do not train the vision-to-language projector (mlp1 / multi_modal_projector)."""
    freeze_llm: bool = False
    """Do not train the language model (embeddings, decoder layers and LM head)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    # --- data ---
    dataset: Literal["aokvqa", "aokvqa_hf", "builtin", "coconut", "jsonl"] | None = None
    """Data source: official A-OKVQA json + COCO images, the HF parquet export, the generated built-in set, the original Coconut's json (question, steps, answer), or the general jsonl format (README "Your own data"). null = from the data file's name: aokvqa_v1p0_*.json -> aokvqa, *.parquet or a folder -> aokvqa_hf, *.jsonl -> jsonl, any other -> coconut (so the original's configs run unchanged)."""
    train_path: str | None = None
    """Training split (json for aokvqa/builtin, parquet file or folder for aokvqa_hf)."""
    val_path: str | None = None
    """Validation split: validation loss and accuracy every epoch."""
    test_path: str | None = None
    """Optional test split (A-OKVQA's test file has no answers, so only predictions are written)."""
    image_root: str | None = None
    """Image folder: COCO's, holding {split}2017/ (required for dataset aokvqa); builtin writes its images here; jsonl image paths are relative to it (null = the data file's folder)."""
    steps_from: Literal["rationales", "first_rationale_sentences", "none"] = "rationales"
    """How A-OKVQA becomes steps: each of the 3 rationales is one step, the sentences of the first rationale, or no steps."""
    answer_from: Literal["choice", "direct"] = "choice"
    """Training answer: the correct multiple-choice option, or the most common direct answer."""
    max_length: int = 4096
    """Most tokens per sample (image tokens included); a longer sample is an error, or a counted skip with skip_bad_records."""
    skip_bad_records: bool = False
    """Skip (and count) records that are malformed, too long or whose image is missing, instead of stopping."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    max_val_samples: int | None = None
    """Evaluate on the first N validation samples only (null = all)."""
    builtin_train_size: int = 2000
    """Training samples generated for dataset builtin."""
    builtin_val_size: int = 200
    """Validation samples generated for dataset builtin."""
    builtin_seed: int = 0
    """Seed of the built-in set's generator (same seed, same files)."""
    builtin_regenerate: bool = False
    """Replace a built-in set of other settings (seed, sizes, version) where this run's data goes (else an error)."""
    builtin_task: Literal["shapes", "hops", "hops_text"] = "shapes"
    """What dataset builtin generates: 'shapes' (the visual reasoning set), 'hops' (pointer chasing through a map written in each question, from the colour of the object in the image; A-OKVQA format, multiple choice) or 'hops_text' (the same with the start in the text, the original Coconut's {question, steps, answer} format, read and scored as dataset coconut). README "The hops task"."""
    hops_k: int = 3
    """hops: arrows to follow from the start, one step each (1 <= hops_k <= hops_nodes / 2, so that going back round the cycle is never shorter)."""
    hops_nodes: int = 6
    """hops: colours in each question's map, a single cycle through them all (3 to 8)."""
    hops_step_style: Literal["node", "arrow"] = "arrow"
    """hops: a step is written 'blue.' (it opens with what the hop finds) or 'red>blue.' (it restates the known node first, as the map writes the arrow)."""

    # --- images ---
    image_size: int | None = None
    """Side of one image tile in pixels; null = the checkpoint's (InternVL3: 448, tiny: 64). Another value is an error."""
    max_num_patches: int = 12
    """Most tiles per image in dynamic tiling (thumbnail not counted)."""
    min_num_patches: int = 1
    """Fewest tiles per image in dynamic tiling."""
    use_thumbnail: bool = True
    """Add a whole-image thumbnail tile when an image is split into more than one tile."""

    # --- optimisation (AdamW) ---
    batch_size_training: int = 1
    """Training samples per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    num_epochs: int = 1
    """Total epochs, counting the `resume` ones already done."""
    lr: float = 1e-4
    """AdamW learning rate (the seed's spelling `learning_rate` is accepted too)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    reset_optimizer: bool = False
    """Make a fresh optimizer (new AdamW moments) during training, when reset_optimizer_every says."""
    reset_optimizer_every: Literal["stage", "epoch"] = "stage"
    """With reset_optimizer: at the start of every curriculum stage, or of every epoch (the original Coconut's)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup; the original used a constant rate."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (0 or null = no clipping)."""
    loss_logits_only: bool = True
    """Compute the LM head only at labelled positions in training, to save memory (same loss)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How the model is spread over processes under torchrun."""
    dist_timeout_minutes: float = 30.0
    """Under torchrun: joining the process group, or a collective, that has not completed after this long is an error naming the rank (a dead peer then ends the workers, which torchrun --max-restarts restarts, instead of a hang)."""

    # --- evaluation ---
    eval_batch_size: int | None = None
    """Samples per generation batch (null = batch_size_training)."""
    max_new_tokens: int | None = None
    """Most tokens generated per answer (null = the longest training target at the current stage, plus 16)."""
    eval_every_epoch: bool = True
    """Evaluate (validation loss, generation accuracy) after every epoch, else only after the last one."""
    num_examples_to_print: int = 3
    """Validation predictions printed per evaluation."""

    # --- logging and export ---
    tensorboard: bool = False
    """Also log to TensorBoard in save_path/name/."""
    wandb: bool = False
    """Also log to Weights & Biases under `project` (never in debug runs)."""
    log_every: int = 10
    """Log the training loss every N optimizer steps."""
    export_hf: bool = False
    """After training, export the final (or best) model with its tokenizer as a Hugging Face folder."""
    allow_config_change: bool = False
    """Resume a run's checkpoints even though settings other than those safe to change (RESUME_SAFE_KEYS) differ."""

    # --- checkpoints at scale ---
    keep_checkpoints: int = 2
    """Resumable checkpoints kept: the newest N (0 = all) and the best one; older ones are deleted after a new one is complete."""
    weights_only_checkpoints: bool = False
    """Instead of deleting checkpoints beyond keep_checkpoints, keep their model weights (no optimizer state)."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (torch DCP async_save): training waits only while its shards are copied to
    CPU memory, and the checkpoint is completed before the next one starts or the run ends."""

    # --- LoRA (peft) ---
    lora_r: int = 0
    """LoRA rank (0 = off: full fine-tuning). Base weights frozen; adapters, new token rows and unfrozen towers train."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] | None = None
    """Module names (suffixes) that get adapters (null = every linear layer of the language model)."""

    def __post_init__(self) -> None:
        # Coerce here too, so a Config built in Python (or by dataclasses.replace) is as strict as a file.
        hints = _type_hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))

        positive = ["batch_size_training", "gradient_accumulation_steps", "num_epochs",
                    "epochs_per_stage", "image_size", "max_length", "max_new_tokens", "log_every",
                    "builtin_train_size", "builtin_val_size", "eval_batch_size", "max_val_samples"]
        for key in positive:
            value = getattr(self, key)
            _check(value is None or value > 0, [key], f"key '{key}' must be a positive integer, got {value}")
        non_negative = ["c_thought", "max_latent_stage", "resume", "num_workers", "warmup_steps",
                        "num_examples_to_print", "weight_decay", "max_grad_norm", "keep_checkpoints", "lora_r",
                        "lora_alpha", "thought_supervision"]
        for key in non_negative:
            value = getattr(self, key)
            _check(value is None or value >= 0, [key], f"key '{key}' must be >= 0, got {value}")
        _check(self.lr > 0, ["lr"], f"key 'lr' must be > 0, got {self.lr}")
        _check(self.dist_timeout_minutes > 0, ["dist_timeout_minutes"],
               f"key 'dist_timeout_minutes' must be > 0, got {self.dist_timeout_minutes}")
        _check(0.0 <= self.lora_dropout < 1.0, ["lora_dropout"],
               f"key 'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        _check(0.0 <= self.uniform_prob <= 1.0, ["uniform_prob"],
               f"key 'uniform_prob' must be in [0, 1], got {self.uniform_prob}")
        _check(1 <= self.min_num_patches <= self.max_num_patches, ["min_num_patches", "max_num_patches"],
               "keys 'min_num_patches' and 'max_num_patches' need 1 <= min_num_patches <= max_num_patches, "
               f"got {self.min_num_patches} and {self.max_num_patches}")

        modes = [k for k in ("coconut", "cot", "no_cot") if getattr(self, k)]
        _check(len(modes) <= 1, modes, f"at most one of 'coconut', 'cot', 'no_cot' may be true, got {modes}")
        _check(self.thought_norm == "none" or self.coconut, ["thought_norm", "coconut"],
               f"key 'thought_norm: {self.thought_norm}' shapes the continuous thoughts and needs 'coconut: true'")
        _check(self.thought_supervision == 0 or not (self.cot or self.no_cot or self.no_thoughts),
               ["thought_supervision", "cot", "no_cot", "no_thoughts"],
               f"key 'thought_supervision: {self.thought_supervision}' trains the thoughts to write the steps they "
               "replace and needs latent positions: 'coconut: true', or pause as thought (coconut, cot and no_cot "
               "false); not cot, no_cot or no_thoughts")
        _check(not self.no_thoughts or self.coconut, ["no_thoughts", "coconut"],
               "key 'no_thoughts' is an ablation of the curriculum and needs 'coconut: true'")
        _check(self.curriculum or not (self.cot or self.no_cot), ["curriculum", "cot", "no_cot"],
               "key 'curriculum: false' trains at the last latent stage; cot and no_cot have no stages")
        # The original's CoT configs write c_thought: 0 (unused there); a curriculum with latents needs one or more.
        _check(self.c_thought > 0 or self.no_thoughts or self.cot or self.no_cot, ["c_thought"],
               f"key 'c_thought' must be a positive integer (latents per step) unless cot / no_cot / no_thoughts, "
               f"got {self.c_thought}")

        if self.dataset is None:
            self.dataset = infer_dataset(self.train_path or self.val_path or self.test_path)

        # The hops keys are checked whatever the dataset, so that a hops recipe stays valid on a user's own file.
        _check(3 <= self.hops_nodes <= HOPS_MAX_NODES, ["hops_nodes"],
               f"key 'hops_nodes' must be in [3, {HOPS_MAX_NODES}] (the colours there are), got {self.hops_nodes}")
        _check(1 <= self.hops_k <= self.hops_nodes // 2, ["hops_k", "hops_nodes"],
               f"key 'hops_k' must be in [1, hops_nodes // 2 = {self.hops_nodes // 2}], got {self.hops_k}: on a cycle "
               f"of {self.hops_nodes} colours, {self.hops_k} arrows forward end where {self.hops_nodes - self.hops_k} "
               "arrows backward do, a shorter way round")
        if self.dataset == "builtin":
            changed = [k for k in ("hops_k", "hops_nodes", "hops_step_style")
                       if getattr(self, k) != Config.__dataclass_fields__[k].default]
            _check(self.builtin_task != "shapes" or not changed, ["builtin_task", *changed],
                   f"key(s) {', '.join(repr(k) for k in changed)} set, but 'builtin_task' is 'shapes': they apply to "
                   "builtin_task 'hops' or 'hops_text'")
            _check(not (self.builtin_task == "hops" and self.model_id == "tiny-text"), ["builtin_task", "model_id"],
                   "key 'builtin_task: hops' reads the start off an image, and model_id 'tiny-text' is text only: "
                   "use 'builtin_task: hops_text' (or model_id 'tiny')")

        _check(self.tiny_language_model is None or self.model_id == "tiny", ["tiny_language_model", "model_id"],
               f"key 'tiny_language_model' is the language model of model_id 'tiny', but model_id is "
               f"{self.model_id!r}")

        builtin = self.dataset == "builtin"  # the run generates its own files, paths may be left out
        if self.only_eval:
            _check(builtin or self.val_path is not None or self.test_path is not None,
                   ["only_eval", "val_path", "test_path"],
                   "key 'only_eval' needs 'val_path' or 'test_path' (the data to evaluate on)")
        else:
            missing = [k for k in ("train_path", "val_path") if getattr(self, k) is None]
            _check(builtin or not missing, missing,
                   f"training (only_eval: false) needs {' and '.join(repr(k) for k in missing)}")
            _check(self.resume == 0 or self.load_model_path is not None, ["resume", "load_model_path"],
                   f"key 'resume' is {self.resume}: skipping epochs needs 'load_model_path', "
                   "the weights after those epochs")
            _check(not (self.freeze_vision and self.freeze_projector and self.freeze_llm),
                   ["freeze_vision", "freeze_projector", "freeze_llm"],
                   "keys 'freeze_vision', 'freeze_projector' and 'freeze_llm' are all true: nothing to train")
        _check(self.dataset != "aokvqa" or self.image_root is not None, ["image_root", "dataset"],
               "key 'image_root' is required for dataset 'aokvqa' (the COCO folder holding train2017/, val2017/)")

    def to_dict(self) -> dict[str, Any]:
        """Plain {key: value} with YAML-friendly values, in field order."""
        return dataclasses.asdict(self)


HOPS_MAX_NODES = 8  # len(builtin_data.HOPS_COLORS), not imported: this module loads without PIL


def infer_dataset(path: str | None) -> str | None:
    """The dataset a data file's name implies (the `dataset: null` rule); None without a path."""
    if path is None:
        return None
    name = os.path.basename(os.path.normpath(path))
    if re.fullmatch(r"aokvqa_v1p0_\w+\.json", name):
        return "aokvqa"
    if name.endswith(".parquet") or os.path.isdir(path):
        return "aokvqa_hf"
    return "jsonl" if name.endswith(".jsonl") else "coconut"


def _check(ok: bool, keys: Sequence[str], message: str) -> None:
    if not ok:
        raise ConfigError(message, keys)


_FIELD_NAMES = [f.name for f in dataclasses.fields(Config)]
_ALIASES = {"learning_rate": "lr"}  # the seed README's spelling
_NONE_STRINGS = {"None", "none", "null", "Null", "NULL", "~"}  # the original writes "None" for no checkpoint
_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}
_INT_RE = re.compile(r"[+-]?\d+")


_HINTS: dict[str, Any] | None = None


def _type_hints() -> dict[str, Any]:
    # `from __future__ import annotations` leaves the annotations as strings; resolve them once.
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return tp.__name__


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` (from YAML, the command line or Python) as the annotated type, or a ConfigError."""
    fail = ConfigError(f"key '{key}' expects {_type_name(tp)}, got {value!r}", [key])
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip() in _NONE_STRINGS):
            return None
        tp = inner

    if typing.get_origin(tp) is Literal:
        if isinstance(value, str) and value.strip() in typing.get_args(tp):
            return value.strip()
        raise fail
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail
    if tp is int:  # bool is an int subclass: `epochs: true` is a mistake, not 1
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
            return int(value)
        raise fail
    if tp is float:
        # PyYAML reads `1e-5` (no dot) as a string, so strings that parse as numbers are floats too.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail from None
        else:
            raise fail
        if not math.isfinite(number):
            raise ConfigError(f"key '{key}' expects a finite float, got {value!r}", [key])
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"key '{key}' expects str, got {value!r} (quote it in YAML)", [key])
    raise TypeError(f"config.py does not know how to read type {tp!r} of key '{key}'")


def _unknown_key(key: Any, where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), _FIELD_NAMES + list(_ALIASES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _read_section(raw: dict[Any, Any], where: str) -> dict[str, Any]:
    """Check the keys of one source (file or command line), resolve aliases, coerce the values."""
    hints = _type_hints()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name not in hints:
            raise _unknown_key(key, where)
        try:
            value = _coerce(name, value, hints[name])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}", e.keys) from None
        if name in values and values[name] != value:
            raise ConfigError(f"{where}: keys 'lr' and 'learning_rate' are the same setting and were given "
                              f"different values ({values[name]!r} and {value!r})", [name])
        values[name] = value
    return values


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", [str(key)])
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> dict[Any, Any]:
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.keys) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    raw: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: expected key=value, got {item!r}")
        raw[key.strip()] = value.strip()  # a later override of the same key wins, as with most CLIs
    return raw


def check_paths_exist(cfg: Config) -> None:
    """Raise ConfigError for a path key that is set but does not exist.

    Paths are relative to the working directory, as in the original. Data paths of dataset 'builtin'
    are not checked: the run generates those files. model_id is not checked: it may be a hub id.
    """
    keys = ["load_model_path"]
    if cfg.dataset != "builtin":
        keys += ["train_path", "val_path", "test_path", "image_root"]
    for key in keys:
        path = getattr(cfg, key)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"key '{key}': path '{path}' does not exist", [key])
    if cfg.dataset != "builtin" and cfg.image_root is not None and not os.path.isdir(cfg.image_root):
        raise ConfigError(f"key 'image_root': '{cfg.image_root}' is not a directory", ["image_root"])


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = (), check_paths: bool = True
) -> Config:
    """Read a YAML config, apply `key=value` overrides (they win over the file), and validate it all.

    check_paths=False skips the existence checks of check_paths_exist (for configs written for
    another machine). Raises ConfigError naming the file or "command line", the key and what was expected.
    """
    path = os.fspath(path)
    values = _read_section(_read_yaml(path), path)
    cli = _read_section(_parse_overrides(overrides), "command line")
    origin = {key: path for key in values} | {key: "command line" for key in cli}
    values |= cli

    def where(keys: Sequence[str]) -> str:
        # Blame the sources that set the keys at fault; keys left at their default blame the file.
        sources = list(dict.fromkeys(origin[k] for k in keys if k in origin)) or [path]
        return " + ".join(sources)

    try:
        cfg = Config(**values)
        if check_paths:
            check_paths_exist(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where(e.keys)}: {e}", e.keys) from None
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (load_config reads it back to an equal Config)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("# Resolved config of this run, written by multimodal_coconut.config.save_config\n")
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)  # never leave a half-written config beside a checkpoint


# Keys a resumed run may change: where the run lives, how long it trains, evaluation, logging and loading settings.
RESUME_SAFE_KEYS = frozenset({
    "name", "save_path", "resume", "load_model_path", "num_epochs", "only_eval", "num_workers",
    "gradient_checkpointing", "save_only_improve", "eval_batch_size", "max_new_tokens", "eval_every_epoch", "num_examples_to_print",
    "max_val_samples", "test_path", "tensorboard", "wandb", "project", "log_every", "export_hf", "allow_config_change",
    "builtin_regenerate", "distributed", "dist_timeout_minutes", "keep_checkpoints", "weights_only_checkpoints", "async_checkpoint",
})


def check_resume_config(cfg: Config, saved: str | os.PathLike, *, world_size: int = 1,
                        saved_world_size: int = 1) -> None:
    """Refuse to resume a run from its checkpoints when `cfg` differs from the config it was started with (`saved`,
    its config.yaml) in a key outside RESUME_SAFE_KEYS: that would silently continue the old run under other
    settings. `batch_size_training` may change with the number of processes as long as the global batch
    (batch_size_training x processes) stays the same: checkpoints resume on any number of processes. Raises
    ConfigError listing the changed keys; `allow_config_change: true` lets it through."""
    saved = os.fspath(saved)
    if cfg.allow_config_change or not os.path.exists(saved):
        return
    hints = _type_hints()
    old = {f.name: f.default for f in dataclasses.fields(Config)}  # a key the old run did not know had its default
    for key, value in _read_yaml(saved).items():
        name = _ALIASES.get(key, key)
        if name in hints:
            try:
                old[name] = _coerce(name, value, hints[name])
            except ConfigError:
                old[name] = value
    changed = [k for k in _FIELD_NAMES if k not in RESUME_SAFE_KEYS and old[k] != getattr(cfg, k)]
    if "batch_size_training" in changed and \
            old["batch_size_training"] * saved_world_size == cfg.batch_size_training * world_size:
        changed.remove("batch_size_training")
    if changed:
        diff = ", ".join(f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(
            f"{os.path.dirname(saved) or '.'} has checkpoints of a run started with another config ({diff}); "
            "resuming would continue that run under other settings. Restore those values, start a new run (another "
            "name or save_path), or set allow_config_change: true to resume anyway.", changed)


def describe() -> list[dict[str, str]]:
    """One {key, type, default, description} per field, description taken from the docstring under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Config)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    hints = _type_hints()
    return [
        {"key": f.name, "type": _type_name(hints[f.name]), "default": _yaml_scalar(f.default),
         "description": docs.get(f.name, "")}
        for f in dataclasses.fields(Config)
    ]


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def config_table_markdown() -> str:
    """The `| key | type | default | description |` table of all keys, for the README."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for row in describe():
        cells = [f"`{row['key']}`", row["type"], f"`{row['default']}`", row["description"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        try:
            print(yaml.safe_dump(load_config(sys.argv[1], sys.argv[2:]).to_dict(), sort_keys=False), end="")
        except ConfigError as e:
            sys.exit(f"error: {e}")
    else:
        print(config_table_markdown(), end="")
