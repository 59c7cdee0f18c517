"""LoRA (peft) on the language model: cached latent passes = naive recompute, merged export = LoRA model, checkpoints
hold only what trains."""

import copy

import torch

from helpers import loss_and_grads
from multimodal_coconut.baselines import naive_forward
from multimodal_coconut.checkpoint import (disk_used, export_hf, full_model_state_dict, load_checkpoint,
                                           save_checkpoint)
from multimodal_coconut.config import Config
from multimodal_coconut.lora import apply_lora, merge_lora, new_token_ids
from test_model import multimodal_batch, wrap

CFG = Config(dataset="builtin", lora_r=4, lora_alpha=8)


def lora_model(bb, cfg=CFG, seed=0):
    model = wrap(bb)
    apply_lora(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # peft starts B at 0 (a no-op adapter); give every adapter and token row a real value
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_lora_trains_adapters_token_rows_and_unfrozen_towers(tiny):
    frozen = wrap(copy.deepcopy(tiny))
    model = lora_model(tiny)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    deltas = [n for n in trainable if "trainable_tokens_delta" in n]
    assert len(deltas) == 2  # input embedding and (untied) LM head: 3 rows each
    assert all(dict(model.named_parameters())[n].shape[0] == 3 for n in deltas)
    llm_base = [n for n in trainable if "language_model" in n and "lora_" not in n and "tokens_delta" not in n]
    assert llm_base == []  # the language model's own weights are frozen
    assert any("vision_tower" in n for n in trainable)  # the vision tower trains unless freeze_vision

    from multimodal_coconut.train import freeze

    freeze(frozen, Config(dataset="builtin", freeze_vision=True, freeze_projector=True))
    apply_lora(frozen, CFG)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "vision_tower" in n or "projector" in n)


def test_lora_latent_passes_equal_naive_recompute(tiny):
    model = lora_model(tiny)
    batch = multimodal_batch(tiny, latents=(3, 1, 2))
    out, ours = loss_and_grads(model, model, *batch)
    ref, theirs = loss_and_grads(model, lambda *a: naive_forward(model, *a), *batch)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() == trainable  # every trainable parameter gets a gradient
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-5, rtol=1e-4, msg=name)
    assert any(ours[n].abs().sum() > 0 for n in ours if "lora_A" in n)
    assert any(ours[n].abs().sum() > 0 for n in ours if "trainable_tokens_delta" in n)


def test_merged_export_gives_the_lora_models_logits(tiny, tmp_path):
    from transformers import InternVLForConditionalGeneration

    model = lora_model(tiny)
    batch = multimodal_batch(tiny, latents=(0, 0, 0))
    merged = merge_lora(full_model_state_dict(model.base_model), CFG, new_token_ids(model))
    assert not any("lora_" in k or "token_adapter" in k or "base_layer" in k for k in merged)
    out = export_hf(model.base_model, tiny.tokenizer, tiny.image_processor, tmp_path / "hf", state_dict=merged)
    plain = InternVLForConditionalGeneration.from_pretrained(out).eval()  # plain HF, no peft
    input_ids, mask, _, pos, pixel_values = batch
    with torch.no_grad():
        ours = model(*batch).logits
        theirs = plain(input_ids=input_ids, attention_mask=mask, position_ids=pos, pixel_values=pixel_values).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    # and with continuous thoughts, through the Coconut wrapper around the plain merged backbone
    batch = multimodal_batch(tiny, latents=(3, 1, 2))
    tiny.model = plain
    with torch.no_grad():
        ours, theirs = model(*batch).logits, wrap(tiny)(*batch).logits
    assert (ours[batch[1].bool()] - theirs[batch[1].bool()]).abs().max() <= 1e-4


def test_lora_checkpoint_holds_only_what_trains(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    model = lora_model(tiny)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(*multimodal_batch(tiny)).loss.backward()
    opt.step()
    lora_ckpt = save_checkpoint(tmp_path / "lora", 1, model, opt, trainable_only=True, log=None)
    full_ckpt = save_checkpoint(tmp_path / "full", 1, model, opt, log=None)
    lora_bytes, full_bytes = disk_used(lora_ckpt / "model"), disk_used(full_ckpt / "model")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert lora_bytes < 0.5 * full_bytes, (lora_bytes, full_bytes)
    print(f"LoRA checkpoint model/: {lora_bytes} B vs full {full_bytes} B ({lora_bytes / full_bytes:.1%}); "
          f"trainable {trainable} of {total} parameters")

    # It resumes: a fresh LoRA model over the same base gets the trained adapters back.
    again = lora_model(base, seed=5)
    load_checkpoint(lora_ckpt, again, restore_rng=False, log=None)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
