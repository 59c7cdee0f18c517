"""Training and evaluation: the staged Coconut curriculum, checkpoints and the official A-OKVQA metrics.

    python run.py args/demo.yaml [key=value ...]                              # one process, CPU or GPU
    torchrun --nnodes 1 --nproc_per_node 8 run.py args/multimodal_coconut.yaml  # DDP or FSDP2

Read top to bottom: `main` parses the config (errors come before anything heavy), `fit` builds the data and the
model and resumes from the newest complete checkpoint, then each epoch is `train_epoch` -> `evaluate` ->
checkpoint -> a line of metrics.jsonl. Everything a run writes goes to save_path/name/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed, plot
from .backbone import load_backbone
from .config import Config, ConfigError, check_resume_config, save_config
from .curriculum import (CoconutDataset, Collator, LengthGroupedBatchSampler, Mode, default_max_new_tokens,
                         stage_for_epoch)
from .data import SkipReport, load_samples
from .evaluate import gather_generations, score_generations, write_predictions
from .inference import backbone_from, coconut_model, generate_texts, model_info, to_device
from .lora import apply_lora, export_weights


def run(cfg: Config) -> list[dict]:
    """Join the process group torchrun set up (if any), train and evaluate, leave the group."""
    env = distributed.setup(timeout_minutes=cfg.dist_timeout_minutes)
    try:
        return fit(cfg, env)
    finally:
        distributed.teardown()


def log(env, *args):
    if env.master:
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------


def prepare_builtin(cfg: Config, env) -> None:
    """Generate the built-in set where the config expects it, if missing (rank 0; the others wait).

    `builtin_task` hops / hops_text generates the hops task instead (builtin_data.py); its train_path / val_path must
    name the files it writes. hops_text is written in the original Coconut's format, so once it is there this run
    reads and scores it as dataset coconut: cfg.dataset becomes 'coconut', and the run's checkpoints say so too.
    """
    if cfg.dataset != "builtin":
        return
    from .builtin_data import Hops, builtin_mismatch, builtin_path, generate_builtin

    hops = None if cfg.builtin_task == "shapes" else Hops(
        k=cfg.hops_k, nodes=cfg.hops_nodes, step_style=cfg.hops_step_style, text=cfg.builtin_task == "hops_text")
    out = Path(cfg.image_root or Path(cfg.val_path or cfg.train_path).parent)
    splits = {"train": cfg.builtin_train_size, "val": cfg.builtin_val_size}
    if hops is not None:
        for key, split in (("train_path", "train"), ("val_path", "val")):
            path, expected = getattr(cfg, key), builtin_path(out, split, hops)
            if path is not None and Path(path).resolve() != expected.resolve():
                raise ConfigError(f"key '{key}' is {path}, but builtin_task {cfg.builtin_task!r} writes the {split} "
                                  f"split to {expected}", [key])
    if not cfg.builtin_regenerate and builtin_mismatch(out, splits, cfg.builtin_seed, hops=hops):
        # Every rank sees the same files and raises the same error here, so none is left waiting in the barrier.
        generate_builtin(out, splits, seed=cfg.builtin_seed, hops=hops)
    if env.master:
        generate_builtin(out, splits, seed=cfg.builtin_seed, regenerate=cfg.builtin_regenerate, hops=hops)
    distributed.barrier()
    if hops is not None and hops.text:
        cfg.dataset = "coconut"
        log(env, f"builtin_task hops_text: {out} is read and scored as dataset coconut")


def model_source(cfg: Config, latest: Path | None) -> Path | None:
    """The folder the backbone is loaded from when it is not `model_id`: the checkpoint being resumed, else a
    `load_model_path` that is one of our checkpoints or exports (or its weights file). These carry their own
    tokenizer and config, which must be used as they are (a tiny model's tokenizer is trained on its run's texts)."""
    # A LoRA checkpoint holds only the adapters, and one written before checkpoints carried their model files has
    # no tokenizer: the backbone then comes from model_id as when the run started (the weights from the checkpoint).
    if latest is not None and ckpt.holds_full_model(latest) and (latest / ckpt.INFO_FILE).is_file():
        return latest
    path = Path(cfg.load_model_path) if cfg.load_model_path else None
    if path is not None and path.is_file():  # the weights file of one of our checkpoints or exports: its folder
        path = path.parent
    if path is not None and (path / ckpt.INFO_FILE).is_file():
        return path
    return None


def load_weights(model, path: str, env) -> None:
    """Weights from `path` into a model built from `model_id`: a .safetensors file or a torch state dict (the
    original Coconut's checkpoint files). Keys may be the Coconut wrapper's (`base_model.`...), the original
    Coconut wrapper's (`base_causallm.`..., plus `embedding.weight`, its second reference to the input embeddings)
    or the bare backbone's (a stage-0 CoT model exported by the original code), as the original run.py allows.
    """
    state = ckpt.read_model_state_dict(path)
    if any(k.startswith("base_causallm.") for k in state):
        state = {f"base_model.{k.removeprefix('base_causallm.')}": v for k, v in state.items()
                 if k.startswith("base_causallm.")}
    if not any(k.startswith("base_model.") for k in state):
        state = {(k if ckpt.is_wrapper_own(k) else f"base_model.{k}"): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not ckpt.is_wrapper_own(k)]  # a thought projection the file lacks starts fresh
    if unexpected or missing:
        raise ValueError(f"load_model_path={path}: the weights do not fit this model "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    log(env, f"loaded weights from {path}")


def freeze(model, cfg: Config) -> None:
    """requires_grad=False on the towers the config freezes."""
    base = model.base_model
    parts = {}
    if model.kind == "hf_internvl":
        parts = {"vision": base.model.vision_tower, "projector": base.model.multi_modal_projector,
                 "llm": [base.model.language_model, base.lm_head]}
    elif model.kind == "original_internvl":
        parts = {"vision": base.vision_model, "projector": base.mlp1, "llm": base.language_model}
    elif cfg.freeze_vision or cfg.freeze_projector:
        raise ValueError("freeze_vision / freeze_projector need a vision-language backbone")
    for name in ("vision", "projector", "llm"):
        if getattr(cfg, f"freeze_{name}") and name in parts:
            modules = parts[name] if isinstance(parts[name], list) else [parts[name]]
            for module in modules:
                module.requires_grad_(False)


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, keeping the KV cache of the latent passes.

    HF drops the cache under checkpointing because its recompute would append to the cache twice; our per-pass
    cache layers are idempotent (`model._PrefixLayer`), so the layers may keep it.
    """
    model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.decoder_layers:
        layer._can_checkpoint_with_cache = True


def lr_factor(cfg: Config, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warmup, then constant / linear / cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n_micro_batches: int, accumulation: int) -> int:
    """Optimizer steps of an epoch of `n_micro_batches` per process: one per window, the last one maybe partial."""
    return math.ceil(n_micro_batches / accumulation)


def resets_optimizer(cfg: Config, epoch: int) -> bool:
    """Whether epoch `epoch` starts with a fresh optimizer: every stage start, or every epoch as the original does."""
    if not cfg.reset_optimizer or epoch == 0:  # epoch 0 has a fresh one anyway
        return False
    return cfg.reset_optimizer_every == "epoch" or epoch % cfg.epochs_per_stage == 0


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def fit(cfg: Config, env) -> list[dict]:
    """Train (unless only_eval) and evaluate; returns the metrics of every evaluation."""
    run_dir = Path(cfg.save_path) / cfg.name
    latest = None if cfg.only_eval else ckpt.find_latest_checkpoint(run_dir, log=lambda m: log(env, m))
    if latest is not None:  # before this run's config replaces the saved one
        saved_world_size = json.loads((latest / ckpt.PROGRESS_FILE).read_text()).get("world_size", 1)
        check_resume_config(cfg, run_dir / "config.yaml", world_size=env.world_size,
                            saved_world_size=saved_world_size)
    if env.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    prepare_builtin(cfg, env)

    report = SkipReport()
    read = dict(dataset=cfg.dataset, image_root=cfg.image_root, steps_from=cfg.steps_from,
                answer_from=cfg.answer_from, skip_bad_records=cfg.skip_bad_records, report=report)
    debug_cap = 64 if cfg.debug else None
    train_samples = [] if cfg.only_eval else load_samples(path=cfg.train_path, max_samples=debug_cap, **read)
    skipped_before = report.total
    val_samples = load_samples(path=cfg.val_path, max_samples=cfg.max_val_samples or debug_cap, **read) \
        if cfg.val_path else []
    val_unread = report.total - skipped_before  # bad records of the val file: they count as wrong answers
    test_samples = load_samples(path=cfg.test_path, **read) if cfg.test_path else []
    log(env, f"data: {len(train_samples)} train, {len(val_samples)} val, {len(test_samples)} test samples")

    source = model_source(cfg, latest)
    if source is not None:
        backbone = backbone_from(source, cfg)
    else:
        texts = [t for s in train_samples + val_samples for t in (s.question, *s.choices, *s.steps, s.answer or "")]
        backbone = load_backbone(
            cfg.model_id, trust_remote_code=cfg.trust_remote_code, image_size=cfg.image_size,
            min_num_patches=cfg.min_num_patches, max_num_patches=cfg.max_num_patches, use_thumbnail=cfg.use_thumbnail,
            attn_implementation=cfg.attn_implementation, tiny_texts=texts, seed=cfg.seed,
            tiny_language_model=cfg.tiny_language_model,
        )
    model = coconut_model(backbone, cfg, fresh_ok=True)  # a thought projection starts fresh unless the source has one
    if cfg.load_model_path and source is None:
        load_weights(model, cfg.load_model_path, env)
    if source is not None and latest is None:
        log(env, f"loaded the model, its tokenizer and settings from {source}")

    freeze(model, cfg)
    apply_lora(model, cfg)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(env.device)
    wrapped = distributed.wrap_model(model, env, cfg.distributed, cfg.bf16)
    optimizer = make_optimizer(wrapped, cfg)

    mode = Mode.from_config(cfg)
    state = {"epoch": cfg.resume, "global_step": 0, "best_metric": None, "metrics": []}
    if latest is not None:
        progress = ckpt.load_checkpoint(latest, wrapped, optimizer, rank=env.rank)
        state.update(epoch=progress["epoch"], global_step=progress["global_step"],
                     best_metric=progress.get("best_metric"), metrics=progress.get("metrics", []))
        log(env, f"resuming from {latest} (epoch {state['epoch']} done, step {state['global_step']})")
    metrics_file = run_dir / "metrics.jsonl"
    if env.master and latest is not None:  # metrics.jsonl matches the checkpoint we continue from
        _write_metrics(run_dir, state["metrics"])
    elif env.master and metrics_file.exists() and not cfg.only_eval:  # a fresh start keeps the old file aside
        aside = metrics_file.with_name(f"metrics.jsonl.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(metrics_file, aside)
        log(env, f"{metrics_file} had no checkpoint to continue from: moved it to {aside.name}")

    collator = Collator(backbone)
    build = dict(backbone=backbone, mode=mode, max_length=cfg.max_length, seed=cfg.seed,
                 skip_bad_records=cfg.skip_bad_records, report=report)
    train_set = CoconutDataset(train_samples, stage=0, train=True, epoch=0, **build) if train_samples else None
    val_loss_set = CoconutDataset(val_samples, stage=0, train=True, epoch=0, **build) \
        if val_samples and not cfg.only_eval and val_samples[0].answer is not None else None
    val_gen_set = CoconutDataset(val_samples, stage=0, train=False, epoch=0, **build) if val_samples else None
    micro_batches = math.ceil(len(train_set or []) / (cfg.batch_size_training * env.world_size))  # the sampler's
    total_steps = steps_per_epoch(micro_batches, cfg.gradient_accumulation_steps) * cfg.num_epochs
    if latest is None and not cfg.only_eval:  # `resume` epochs count as done: the LR schedule continues from them
        state["global_step"] = steps_per_epoch(micro_batches, cfg.gradient_accumulation_steps) * cfg.resume

    # async_checkpoint: the model and the optimizer are written by two background threads, each with its collectives
    # on a Gloo group of its own (two writes in flight on one group could pair rank 0's model collective with rank
    # 1's optimizer collective and hang).
    checkpoint_groups = None
    if cfg.async_checkpoint and env.world_size > 1:
        checkpoint_groups = tuple(torch.distributed.new_group(backend="gloo") for _ in range(2))
    pending = None  # the checkpoint being written

    def finish():
        """Complete the checkpoint being written, then keep_checkpoints."""
        nonlocal pending
        if pending is not None:
            path, pending = pending.wait(), None
            log(env, f"saved {path}")
            if env.master:
                ckpt.retain(run_dir, cfg.keep_checkpoints, cfg.weights_only_checkpoints, log=lambda m: log(env, m))

    for epoch in [cfg.resume] if cfg.only_eval else range(state["epoch"], cfg.num_epochs):
        stage = stage_for_epoch(epoch, mode, cfg.epochs_per_stage)
        gen_cfg = generation_config(cfg, train_set or val_gen_set, stage) if train_set or val_gen_set else cfg
        t0 = time.time()
        train_loss, tokens_per_s = None, None
        if not cfg.only_eval:
            if resets_optimizer(cfg, epoch):
                optimizer = make_optimizer(wrapped, cfg)
            try:
                train_loss, tokens_per_s = train_epoch(
                    wrapped, model, optimizer, train_set.with_stage(stage, seed=cfg.seed, epoch=epoch), collator,
                    cfg, env, epoch, stage, state, total_steps)
            except FloatingPointError:  # raised on every rank at the same step (the loss is all-reduced)
                finish()  # a checkpoint still being written holds the last good weights: complete it
                raise
        metrics = {"epoch": epoch + 1, "stage": stage, "global_step": state["global_step"],
                   "train_loss": train_loss, "tokens_per_s": tokens_per_s}
        if cfg.thought_supervision > 0:  # the step loss beside the answer loss (train_loss stays the answer's)
            metrics["train_step_loss"] = state.pop("train_step_loss", None)
        last = epoch == cfg.num_epochs - 1 or cfg.only_eval
        if val_gen_set is not None and (cfg.eval_every_epoch or last):
            metrics.update(evaluate(wrapped, model, backbone, gen_cfg, env, epoch, stage, val_samples,
                                    val_gen_set.with_stage(stage, seed=cfg.seed, epoch=epoch),
                                    val_loss_set.with_stage(stage, seed=cfg.seed, epoch=epoch)
                                    if val_loss_set else None,
                                    collator, run_dir, split="val", unread=val_unread))
        metrics = distributed.broadcast_object(metrics)  # only rank 0 scores; every rank takes the same decisions
        metrics["wall_time_s"] = round(time.time() - t0, 2)
        state["metrics"].append(metrics)
        state["epoch"] = epoch + 1
        if cfg.only_eval:
            _append_metrics(run_dir, metrics, env)
            break

        target = metrics.get("mc_accuracy", metrics.get("da_accuracy", metrics.get("accuracy")))
        improved = target is not None and (state["best_metric"] is None or target > state["best_metric"])
        if improved:
            state["best_metric"] = target
        if not cfg.debug and (improved or not cfg.save_only_improve):
            finish()  # async_checkpoint: the previous checkpoint is complete before the next one starts
            info = model_info(gen_cfg, stage, epoch + 1)  # the generation length used, for load_trained
            pending = ckpt.start_checkpoint(
                run_dir, epoch + 1, wrapped, optimizer, global_step=state["global_step"],
                best_metric=state["best_metric"], metrics=state["metrics"], rank=env.rank,
                world_size=env.world_size, barrier=distributed.barrier, log=lambda m: log(env, m),
                model_files=lambda d: ckpt.save_model_files(d, model.base_model, backbone.tokenizer,
                                                            backbone.image_processor, info),
                trainable_only=cfg.lora_r > 0, asynchronous=cfg.async_checkpoint, groups=checkpoint_groups)
            if not cfg.async_checkpoint:
                finish()
        _append_metrics(run_dir, metrics, env)
        log(env, _format_metrics(metrics))
        if env.master:
            _log_step(cfg, state["global_step"], {f"eval/{k}": v for k, v in metrics.items()})

    finish()
    if test_samples:
        stage = stage_for_epoch(max(state["epoch"] - 1, 0), mode, cfg.epochs_per_stage)
        test_set = CoconutDataset(test_samples, stage=stage, train=False, epoch=0, **build)
        evaluate(wrapped, model, backbone, generation_config(cfg, train_set or val_gen_set or test_set, stage), env,
                 state["epoch"] - 1, stage, test_samples, test_set, None, collator, run_dir, split="test")
    if cfg.export_hf and not cfg.only_eval:
        # save_only_improve writes only improving checkpoints, so the newest one is the best.
        saved = ckpt.list_checkpoints(run_dir, log=None) if cfg.save_only_improve else []
        best = saved[-1][1] if saved else None
        weights = export_weights(wrapped, model, best, cfg)  # under FSDP a collective
        if env.master:
            epoch = int(best.name.split("_")[-1]) if best else state["epoch"]
            stage = stage_for_epoch(max(epoch - 1, 0), mode, cfg.epochs_per_stage)
            info = model_info(generation_config(cfg, train_set, stage), stage, epoch)
            weights, own = ckpt.split_wrapper_own(weights)
            out = ckpt.export_hf(model.base_model, backbone.tokenizer, backbone.image_processor, run_dir / "hf_model",
                                 state_dict=weights, overwrite=True, info=info, own=own)
            log(env, f"exported {'the best' if best else 'the final'} model as an HF checkpoint to {out}")
    if report.total:
        log(env, report.summary())
    if env.master and not cfg.only_eval:
        plot.write_curves(run_dir)
    log(env, stage_table(state["metrics"], mode))
    log(env, f"disk used by {run_dir}: {ckpt.human_bytes(ckpt.disk_used(run_dir))}")
    return state["metrics"]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_epoch(wrapped, model, optimizer, dataset, collator, cfg: Config, env, epoch: int, stage: int, state: dict,
                total_steps: int) -> tuple[float, float]:
    """One epoch; returns (mean loss per label token, input tokens per second over all ranks).

    The loss of an optimizer step is the mean over all label tokens of its global batch (all ranks, all
    accumulation micro-batches), so N processes give the same updates as one process with the same global batch.
    With thought_supervision, thought_supervision x the step loss, the mean over all step tokens of the global batch
    in the same way, is added, and the epoch's mean step loss goes to state["train_step_loss"] (None when the epoch
    supervised no step: stage 0).
    """
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size_training, shuffle=True, seed=cfg.seed,
                                        rank=env.rank, world_size=env.world_size)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda")
    wrapped.train()
    fsdp = env.distributed and cfg.distributed == "fsdp"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and env.device.type == "cuda" and not fsdp \
        else nullcontext()
    accum = cfg.gradient_accumulation_steps
    n_windows = steps_per_epoch(len(sampler), accum)
    loss_sum = torch.zeros((), dtype=torch.float64)
    token_count = torch.zeros((), dtype=torch.float64)
    supervise = cfg.thought_supervision > 0  # the step loss (SIM-CoT), logged apart from the answer loss
    step_loss_sum = torch.zeros((), dtype=torch.float64)
    step_token_count = torch.zeros((), dtype=torch.float64)
    seen_tokens, t0 = 0, time.time()
    pbar = tqdm(total=n_windows, desc=f"epoch {epoch + 1}/{cfg.num_epochs} (stage {stage})", disable=not env.master,
                dynamic_ncols=True)
    batches = iter(loader)
    for window in range(n_windows):
        # The last window may be partial (as in the original, which steps on it): its loss is the mean over its own
        # label tokens, like any other window's.
        size = min(accum, len(sampler) - window * accum)
        micro = [to_device(next(batches), env.device) for _ in range(size)]
        n_labels = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in micro]).to(torch.float64)
        global_labels = distributed.all_reduce_sum(n_labels.sum())
        window_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        if supervise:
            n_step_tokens = torch.stack([(b["step_ids"] != -100).sum() for b in micro]).to(torch.float64)
            global_step_tokens = distributed.all_reduce_sum(n_step_tokens.sum())
            window_step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(micro):
            min_passes = model.num_passes(batch["input_ids"]) if fsdp else 0
            if fsdp:
                min_passes = int(distributed.all_reduce_max(min_passes, env.device))
            sync = nullcontext() if i == size - 1 or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            steps = {"step_ids": batch["step_ids"], "step_columns": batch["step_columns"]} if supervise else {}
            with sync, autocast:
                out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
                              batch["pixel_values"], labelled_logits_only=cfg.loss_logits_only,
                              min_passes=min_passes, **steps)
                # DDP / FSDP average gradients over ranks; scale so the result is the global per-token mean.
                token_sum = out.loss * n_labels[i].to(out.loss.device)
                loss = token_sum * env.world_size / global_labels.to(out.loss.device)
                if supervise:  # the same for the step tokens (none at stage 0: a zero-weighted term, see step_loss)
                    step_sum = out.step_loss * n_step_tokens[i].to(out.loss.device)
                    loss = loss + cfg.thought_supervision * step_sum * env.world_size / \
                        global_step_tokens.clamp(min=1).to(out.loss.device)
                    window_step_loss += step_sum.detach().double()
                loss.backward()
            window_loss += token_sum.detach().double()
            seen_tokens += int(batch["attention_mask"].sum())
        window_loss = distributed.all_reduce_sum(window_loss).cpu()
        if supervise:
            window_step_loss = distributed.all_reduce_sum(window_step_loss).cpu()
        if not torch.isfinite(window_loss) or (supervise and not torch.isfinite(window_step_loss)):
            also = f" (the step loss {window_step_loss.item()})" if supervise else ""
            raise FloatingPointError(
                f"the loss is {window_loss.item()}{also} at epoch {epoch + 1}, step {window} of the epoch (global step "
                f"{state['global_step']}); training stopped before updating the weights. The last good checkpoint "
                f"is the newest checkpoint_* in {Path(cfg.save_path) / cfg.name}")
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.grad is not None],
                                           cfg.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, state["global_step"], total_steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["global_step"] += 1
        ckpt.fault_point(f"train_step:{state['global_step']}")
        loss_sum += window_loss
        token_count += global_labels.cpu()
        step_loss = (window_loss / global_labels.cpu()).item()
        values = {"train/loss": step_loss, "train/lr": optimizer.param_groups[0]["lr"]}
        if supervise:
            step_loss_sum += window_step_loss
            step_token_count += global_step_tokens.cpu()
            values["train/step_loss"] = (window_step_loss / global_step_tokens.cpu()).item() \
                if global_step_tokens > 0 else None
        pbar.update(1)
        pbar.set_postfix(loss=f"{step_loss:.4f}")
        if env.master and cfg.log_every and state["global_step"] % cfg.log_every == 0:
            _log_step(cfg, state["global_step"], values)
    pbar.close()
    elapsed = time.time() - t0
    seen = distributed.all_reduce_sum(torch.tensor(float(seen_tokens), device=env.device)).item()
    if supervise:
        state["train_step_loss"] = (step_loss_sum / step_token_count).item() if step_token_count > 0 else None
    return (loss_sum / token_count.clamp(min=1)).item(), round(seen / max(elapsed, 1e-9), 1)


_loggers: dict = {}


def _log_step(cfg: Config, step: int, values: dict) -> None:
    """TensorBoard / Weights & Biases, when the config turns them on (rank 0 only)."""
    if cfg.tensorboard:
        if "tb" not in _loggers:
            from torch.utils.tensorboard import SummaryWriter

            _loggers["tb"] = SummaryWriter(str(Path(cfg.save_path) / cfg.name / "tensorboard"))
        for k, v in values.items():
            if isinstance(v, (int, float)):
                _loggers["tb"].add_scalar(k, v, step)
    if cfg.wandb and not cfg.debug:
        if "wandb" not in _loggers:
            import wandb

            _loggers["wandb"] = wandb.init(project=cfg.project, name=cfg.name, config=cfg.to_dict())
        _loggers["wandb"].log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(wrapped, model, backbone, cfg: Config, env, epoch: int, stage: int, samples, gen_set, loss_set,
             collator, run_dir: Path, split: str, unread: int = 0) -> dict:
    """Validation loss, then batched generation -> predictions file -> the dataset's metrics (over all ranks).

    The accuracies are over the whole split, as the official scorer counts them: a question skipped as a bad record
    (`unread` of them were not even read from the file; the others have no generation) scores 0.
    """
    wrapped.eval()
    fsdp = env.distributed and cfg.distributed == "fsdp"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and env.device.type == "cuda" and not fsdp \
        else nullcontext()
    batch_size = cfg.eval_batch_size or cfg.batch_size_training
    results = {}
    if loss_set is not None:
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        sampler = LengthGroupedBatchSampler(loss_set.lengths, batch_size, shuffle=False, seed=cfg.seed,
                                            rank=env.rank, world_size=env.world_size)
        loader = torch.utils.data.DataLoader(loss_set, batch_sampler=sampler, collate_fn=collator,
                                             num_workers=cfg.num_workers)
        for batch in tqdm(loader, desc="val loss", disable=not env.master, dynamic_ncols=True):
            batch = to_device(batch, env.device)
            min_passes = int(distributed.all_reduce_max(model.num_passes(batch["input_ids"]), env.device)) if fsdp else 0
            with autocast:
                out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
                              batch["pixel_values"], labelled_logits_only=True, min_passes=min_passes)
            n = (batch["labels"][:, 1:] != -100).sum()
            total += torch.stack([out.loss.double() * n, n.double()])
        total = distributed.all_reduce_sum(total)
        results["val_loss"] = round((total[0] / total[1].clamp(min=1)).item(), 5)

    sampler = LengthGroupedBatchSampler(gen_set.lengths, batch_size, shuffle=False, seed=cfg.seed, rank=env.rank,
                                        world_size=env.world_size)
    loader = torch.utils.data.DataLoader(gen_set, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg.num_workers)
    generate = model.generate if not fsdp else wrapped.generate  # FSDP registered generate as a forward method
    generated = generate_texts(generate, loader, samples, backbone.tokenizer, max_new_tokens=cfg.max_new_tokens,
                               device=env.device, synced_gpus=fsdp, autocast=autocast, desc=f"generate ({split})",
                               progress=env.master, on_batch=lambda _: ckpt.fault_point(f"generate:{epoch + 1}"))
    if fsdp:  # FSDP2 keeps the root unsharded after a no-grad forward; the optimizer and checkpoints need shards
        wrapped.reshard()
    generated = gather_generations(generated)
    if not env.master:
        return results

    predictions, scores = score_generations(samples, generated, cfg.dataset)
    path = write_predictions(run_dir / f"predictions_{split}_epoch{epoch + 1}.json", predictions)
    for sample in [s for s in samples if s.question_id in generated][: cfg.num_examples_to_print]:
        pred = predictions[sample.question_id]
        print(f"  [{sample.question_id}] {sample.question!r}\n    generated: {generated[sample.question_id]!r}\n"
              f"    prediction: {pred.get('multiple_choice', pred.get('answer'))!r}   answer: {sample.answer!r}")
    results["max_new_tokens"] = cfg.max_new_tokens
    # An output without `###` was cut off (or never learnt the format): its answer is a guess from its last line.
    results["n_no_answer_marker"] = sum("###" not in text for text in generated.values())
    results.update(_whole_split(scores, unread))
    skipped = unread + len(samples) - len(generated)
    if skipped:
        results["n_skipped"] = skipped
        print(f"{split}: {skipped} of {unread + len(samples)} questions were skipped as bad records; they count as "
              "wrong in the accuracies", flush=True)
    print(f"wrote {path}", flush=True)
    return results


def generation_config(cfg: Config, sizing_set, stage: int) -> Config:
    """`cfg` with max_new_tokens set: the config's own, else sized from `sizing_set` (the training split when there
    is one) at `stage` (curriculum.default_max_new_tokens)."""
    if cfg.max_new_tokens is not None:
        return cfg
    n = default_max_new_tokens(sizing_set, stage)
    if n is None:
        raise ConfigError("key 'max_new_tokens' is null, which sizes generation from the longest annotated target, "
                          "but no sample to train or evaluate on has an answer; set max_new_tokens", ["max_new_tokens"])
    return dataclasses.replace(cfg, max_new_tokens=n)


def _whole_split(scores: dict, unread: int) -> dict:
    """Scores over the read questions -> over the whole split, where the `unread` ones (bad records) score 0 (their
    difficult_direct_answer unknown, they count in the direct-answer figure too)."""
    if not unread:
        return scores
    out = dict(scores)
    for acc, n in (("mc_accuracy", "n_mc"), ("da_accuracy", "n_da"), ("accuracy", "n_eval"),
                   ("cot_accuracy", "n_eval")):
        if out.get(acc) is not None and scores.get(n):
            out[acc] = out[acc] * scores[n] / (scores[n] + unread)
    for n in ("n_mc", "n_da", "n_eval"):
        if scores.get(n) is not None:
            out[n] = scores[n] + unread
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _write_metrics(run_dir: Path, metrics: list[dict]) -> None:
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, run_dir / "metrics.jsonl")


def _append_metrics(run_dir: Path, metrics: dict, env) -> None:
    if env.master:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _format_metrics(m: dict) -> str:
    parts = [f"epoch {m['epoch']} (stage {m['stage']})"]
    for key in ("train_loss", "train_step_loss", "val_loss", "mc_accuracy", "da_accuracy", "accuracy", "cot_accuracy",
                "tokens_per_s", "wall_time_s"):
        if m.get(key) is not None:
            parts.append(f"{key} {m[key]:.4g}" if isinstance(m[key], float) else f"{key} {m[key]}")
    return " | ".join(parts)


def stage_table(metrics: list[dict], mode: Mode) -> str:
    """Accuracy at the end of each stage; stage 0 is plain chain of thought (the CoT-only figure)."""
    last = {}
    for m in metrics:
        last[m["stage"]] = m
    if not last:
        return ""
    # A-OKVQA's two accuracies, or the own-data ones (accuracy; the original Coconut's CoT match for coconut).
    own = any("accuracy" in m for m in metrics)
    keys = ("accuracy", "cot_accuracy") if own else ("mc_accuracy", "da_accuracy")
    heads = "acc. | CoT match" if own else "MC acc. | DA acc."
    rows = [f"| stage | what the model writes | after epoch | val loss | {heads} |", "|---|---|---|---|---|---|"]
    for stage, m in sorted(last.items()):
        if mode.no_cot:
            what = "answer only"
        elif mode.cot or stage == 0:
            what = "CoT (all steps)"
        else:
            what = f"{stage} step(s) as latents" if stage <= mode.max_latent_stage else "all steps as latents"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"| {stage} | {what} | {m['epoch']} | {fmt(m.get('val_loss'))} | {fmt(m.get(keys[0]))} "
                    f"| {fmt(m.get(keys[1]))} |")
    return "\n".join(rows)
