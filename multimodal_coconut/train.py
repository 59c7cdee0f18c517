"""Training and evaluation: the staged Coconut curriculum, checkpoints and the official A-OKVQA metrics.

    python run.py args/demo.yaml [key=value ...]                              # one process, CPU or GPU
    torchrun --nnodes 1 --nproc_per_node 8 run.py args/multimodal_coconut.yaml  # DDP or FSDP2

Read top to bottom: `main` parses the config (errors come before anything heavy), `fit` builds the data and the
model and resumes from the newest complete checkpoint, then each epoch is `train_epoch` -> `evaluate` ->
checkpoint -> a line of metrics.jsonl. Everything a run writes goes to save_path/name/.
"""

from __future__ import annotations

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
from . import distributed
from .backbone import load_backbone
from .config import Config, save_config
from .curriculum import CoconutDataset, Collator, LengthGroupedBatchSampler, Mode, stage_for_epoch
from .data import SkipReport, load_samples
from .evaluate import extract_answer, gather_generations, make_predictions, score, write_predictions
from .inference import backbone_from, generate_texts, model_info, to_device
from .lora import apply_lora, export_weights
from .model import MultimodalCoconut


def run(cfg: Config) -> list[dict]:
    """Join the process group torchrun set up (if any), train and evaluate, leave the group."""
    env = distributed.setup()
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
    """Generate the built-in set where the config expects it, if missing (rank 0; the others wait)."""
    if cfg.dataset != "builtin":
        return
    if env.master:
        from .builtin_data import generate_builtin

        out = Path(cfg.image_root or Path(cfg.val_path or cfg.train_path).parent)
        generate_builtin(out, {"train": cfg.builtin_train_size, "val": cfg.builtin_val_size}, seed=cfg.builtin_seed)
    distributed.barrier()


def model_source(cfg: Config, latest: Path | None) -> Path | None:
    """The folder the backbone is loaded from when it is not `model_id`: the checkpoint being resumed, else a
    `load_model_path` that is one of our checkpoints or exports. These carry their own tokenizer and config, which
    must be used as they are (a tiny model's tokenizer, for one, is trained on its run's texts)."""
    if latest is not None and ckpt.holds_full_model(latest):  # a LoRA checkpoint holds only the adapters
        return latest
    path = Path(cfg.load_model_path) if cfg.load_model_path else None
    if path is not None and path.is_dir() and (path / ckpt.INFO_FILE).is_file():
        return path
    return None


def load_weights(model, path: str, env) -> None:
    """Weights from `path` into a model built from `model_id`: a .safetensors file or a torch state dict (the
    original Coconut's checkpoint files). Keys may be the Coconut wrapper's (`base_model.`...) or the bare
    backbone's (a stage-0 CoT model exported by the original code), as the original run.py allows.
    """
    state = ckpt.read_model_state_dict(path)
    if not any(k.startswith("base_model.") for k in state):
        state = {f"base_model.{k}": v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
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
    for layer in model.decoder.layers:
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


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def fit(cfg: Config, env) -> list[dict]:
    """Train (unless only_eval) and evaluate; returns the metrics of every evaluation."""
    run_dir = Path(cfg.save_path) / cfg.name
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
    val_samples = load_samples(path=cfg.val_path, max_samples=cfg.max_val_samples or debug_cap, **read) \
        if cfg.val_path else []
    test_samples = load_samples(path=cfg.test_path, **read) if cfg.test_path else []
    log(env, f"data: {len(train_samples)} train, {len(val_samples)} val, {len(test_samples)} test samples")

    latest = None if cfg.only_eval else ckpt.find_latest_checkpoint(run_dir, log=lambda m: log(env, m))
    source = model_source(cfg, latest)
    if source is not None:
        backbone = backbone_from(source, cfg)
    else:
        texts = [t for s in train_samples + val_samples for t in (s.question, *s.choices, *s.steps, s.answer or "")]
        backbone = load_backbone(
            cfg.model_id, trust_remote_code=cfg.trust_remote_code, image_size=cfg.image_size,
            min_num_patches=cfg.min_num_patches, max_num_patches=cfg.max_num_patches, use_thumbnail=cfg.use_thumbnail,
            attn_implementation=cfg.attn_implementation, tiny_texts=texts, seed=cfg.seed,
        )
    model = MultimodalCoconut(backbone.model, backbone.latent_id, backbone.start_latent_id,
                              backbone.end_latent_id, backbone.eos_token_id)
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
    steps_per_epoch = math.ceil(len(train_set or []) / (cfg.batch_size_training * env.world_size)) \
        // cfg.gradient_accumulation_steps if train_set else 0
    total_steps = steps_per_epoch * cfg.num_epochs

    for epoch in [cfg.resume] if cfg.only_eval else range(state["epoch"], cfg.num_epochs):
        stage = stage_for_epoch(epoch, mode, cfg.epochs_per_stage)
        t0 = time.time()
        train_loss, tokens_per_s = None, None
        if not cfg.only_eval:
            if cfg.reset_optimizer and epoch % cfg.epochs_per_stage == 0 and epoch > 0:
                optimizer = make_optimizer(wrapped, cfg)  # a new stage starts with fresh Adam moments
            train_loss, tokens_per_s = train_epoch(
                wrapped, model, optimizer, train_set.with_stage(stage, seed=cfg.seed, epoch=epoch), collator,
                cfg, env, epoch, stage, state, total_steps)
        metrics = {"epoch": epoch + 1, "stage": stage, "global_step": state["global_step"],
                   "train_loss": train_loss, "tokens_per_s": tokens_per_s}
        last = epoch == cfg.num_epochs - 1 or cfg.only_eval
        if val_gen_set is not None and (cfg.eval_every_epoch or last):
            metrics.update(evaluate(wrapped, model, backbone, cfg, env, epoch, stage, val_samples,
                                    val_gen_set.with_stage(stage, seed=cfg.seed, epoch=epoch),
                                    val_loss_set.with_stage(stage, seed=cfg.seed, epoch=epoch)
                                    if val_loss_set else None,
                                    collator, run_dir, split="val"))
        metrics = distributed.broadcast_object(metrics)  # only rank 0 scores; every rank takes the same decisions
        metrics["wall_time_s"] = round(time.time() - t0, 2)
        state["metrics"].append(metrics)
        state["epoch"] = epoch + 1
        if cfg.only_eval:
            _append_metrics(run_dir, metrics, env)
            break

        target = metrics.get("mc_accuracy", metrics.get("da_accuracy"))
        improved = target is not None and (state["best_metric"] is None or target > state["best_metric"])
        if improved:
            state["best_metric"] = target
        if not cfg.debug and (improved or not cfg.save_only_improve):
            info = model_info(cfg, stage, epoch + 1)
            path = ckpt.save_checkpoint(
                run_dir, epoch + 1, wrapped, optimizer, global_step=state["global_step"],
                best_metric=state["best_metric"], metrics=state["metrics"], rank=env.rank,
                world_size=env.world_size, barrier=distributed.barrier, log=lambda m: log(env, m),
                model_files=lambda d: ckpt.save_model_files(d, model.base_model, backbone.tokenizer,
                                                            backbone.image_processor, info),
                trainable_only=cfg.lora_r > 0)
            log(env, f"saved {path}")
            if env.master:
                ckpt.retain(run_dir, cfg.keep_checkpoints, cfg.weights_only_checkpoints, log=lambda m: log(env, m))
        _append_metrics(run_dir, metrics, env)
        log(env, _format_metrics(metrics))
        if env.master:
            _log_step(cfg, state["global_step"], {f"eval/{k}": v for k, v in metrics.items()})

    if test_samples:
        stage = stage_for_epoch(max(state["epoch"] - 1, 0), mode, cfg.epochs_per_stage)
        test_set = CoconutDataset(test_samples, stage=stage, train=False, epoch=0, **build)
        evaluate(wrapped, model, backbone, cfg, env, state["epoch"] - 1, stage, test_samples, test_set, None,
                 collator, run_dir, split="test")
    if cfg.export_hf and not cfg.only_eval:
        # save_only_improve writes only improving checkpoints, so the newest one is the best.
        saved = ckpt.list_checkpoints(run_dir, log=None) if cfg.save_only_improve else []
        best = saved[-1][1] if saved else None
        weights = export_weights(wrapped, model, best, cfg)  # under FSDP a collective
        if env.master:
            epoch = int(best.name.split("_")[-1]) if best else state["epoch"]
            info = model_info(cfg, stage_for_epoch(max(epoch - 1, 0), mode, cfg.epochs_per_stage), epoch)
            out = ckpt.export_hf(model.base_model, backbone.tokenizer, backbone.image_processor, run_dir / "hf_model",
                                 state_dict=weights, overwrite=True, info=info)
            log(env, f"exported {'the best' if best else 'the final'} model as an HF checkpoint to {out}")
    if report.total:
        log(env, report.summary())
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
    n_windows = len(sampler) // accum  # the few micro-batches past the last full window are dropped
    loss_sum = torch.zeros((), dtype=torch.float64)
    token_count = torch.zeros((), dtype=torch.float64)
    seen_tokens, t0 = 0, time.time()
    pbar = tqdm(total=n_windows, desc=f"epoch {epoch + 1}/{cfg.num_epochs} (stage {stage})", disable=not env.master,
                dynamic_ncols=True)
    batches = iter(loader)
    for window in range(n_windows):
        micro = [to_device(next(batches), env.device) for _ in range(accum)]
        n_labels = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in micro]).to(torch.float64)
        global_labels = distributed.all_reduce_sum(n_labels.sum())
        window_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(micro):
            min_passes = model.num_passes(batch["input_ids"]) if fsdp else 0
            if fsdp:
                min_passes = int(distributed.all_reduce_max(min_passes, env.device))
            sync = nullcontext() if i == accum - 1 or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync, autocast:
                out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"],
                              batch["pixel_values"], labelled_logits_only=cfg.loss_logits_only,
                              min_passes=min_passes)
                # DDP / FSDP average gradients over ranks; scale so the result is the global per-token mean.
                token_sum = out.loss * n_labels[i].to(out.loss.device)
                (token_sum * env.world_size / global_labels.to(out.loss.device)).backward()
            window_loss += token_sum.detach().double()
            seen_tokens += int(batch["attention_mask"].sum())
        window_loss = distributed.all_reduce_sum(window_loss).cpu()
        if not torch.isfinite(window_loss):
            raise FloatingPointError(
                f"the loss is {window_loss.item()} at epoch {epoch + 1}, step {window} of the epoch (global step "
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
        pbar.update(1)
        pbar.set_postfix(loss=f"{step_loss:.4f}")
        if env.master and cfg.log_every and state["global_step"] % cfg.log_every == 0:
            _log_step(cfg, state["global_step"], {"train/loss": step_loss, "train/lr": optimizer.param_groups[0]["lr"]})
    pbar.close()
    elapsed = time.time() - t0
    seen = distributed.all_reduce_sum(torch.tensor(float(seen_tokens), device=env.device)).item()
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
             collator, run_dir: Path, split: str) -> dict:
    """Validation loss, then batched generation -> predictions file -> official A-OKVQA metrics (over all ranks)."""
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
                               progress=env.master)
    if fsdp:  # FSDP2 keeps the root unsharded after a no-grad forward; the optimizer and checkpoints need shards
        wrapped.reshard()
    generated = gather_generations(generated)
    if not env.master:
        return results

    answers = {qid: extract_answer(text) for qid, text in generated.items()}
    predictions = make_predictions(samples, answers)
    path = write_predictions(run_dir / f"predictions_{split}_epoch{epoch + 1}.json", predictions)
    for sample in samples[: cfg.num_examples_to_print]:
        print(f"  [{sample.question_id}] {sample.question!r}\n    generated: {generated[sample.question_id]!r}\n"
              f"    prediction: {predictions[sample.question_id]['multiple_choice']!r}   answer: {sample.answer!r}")
    if samples and samples[0].correct_choice_idx is not None:
        results.update(score([_record(s) for s in samples], predictions))
    print(f"wrote {path}", flush=True)
    return results


def _record(sample) -> dict:
    """The A-OKVQA record fields the official scorer reads."""
    return {"question_id": sample.question_id, "choices": sample.choices,
            "correct_choice_idx": sample.correct_choice_idx, "direct_answers": sample.direct_answers,
            "difficult_direct_answer": sample.difficult_direct_answer}


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
    for key in ("train_loss", "val_loss", "mc_accuracy", "da_accuracy", "tokens_per_s", "wall_time_s"):
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
    rows = ["| stage | what the model writes | after epoch | val loss | MC acc. | DA acc. |", "|---|---|---|---|---|---|"]
    for stage, m in sorted(last.items()):
        if mode.cot or stage == 0:
            what = "CoT (all steps)"
        elif mode.no_cot:
            what = "answer only"
        else:
            what = f"{stage} step(s) as latents" if stage <= mode.max_latent_stage else "all steps as latents"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(f"| {stage} | {what} | {m['epoch']} | {fmt(m.get('val_loss'))} | {fmt(m.get('mc_accuracy'))} "
                    f"| {fmt(m.get('da_accuracy'))} |")
    return "\n".join(rows)
