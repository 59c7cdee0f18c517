"""Backbone loading: original-format InternVL through remote code, special tokens, presets, the install check.

Original-format InternVL (`InternVLChatModel`, e.g. OpenGVLab/InternVL3-1B-Pretrained) is tested with a small stand-in
of the same shape (tests/internvl_chat_standin/), written to a checkpoint directory with `auto_map` and loaded through
`AutoModel.from_pretrained(trust_remote_code=True)` as the real checkpoint would be.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import collate, loss_and_grads, row_tokens
from multimodal_coconut import MultimodalCoconut, load_backbone
from multimodal_coconut.backbone import (
    END_LATENT, IMAGENET_MEAN, IMAGENET_STD, LATENT, START_LATENT, _tile_size, build_tiny, train_tiny_tokenizer,
)
from multimodal_coconut.baselines import naive_forward

STANDIN = Path(__file__).parent / "internvl_chat_standin"
REPO = Path(__file__).parent.parent


def standin_classes():
    """(InternVLChatConfig, InternVLChatModel) imported from the stand-in's files, to create checkpoints."""
    sys.path.insert(0, str(STANDIN.parent))
    try:
        from internvl_chat_standin.configuration_internvl_chat import InternVLChatConfig
        from internvl_chat_standin.modeling_internvl_chat import InternVLChatModel
    finally:
        sys.path.remove(str(STANDIN.parent))
    return InternVLChatConfig, InternVLChatModel


def standin_config(vocab_size, **llm):
    """InternVLChatConfig fields as in InternVL3-1B's config.json, with 64px tiles and tiny widths by default."""
    vision = dict(architectures=["InternVisionModel"], image_size=64, patch_size=8, hidden_size=64,
                  num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, qkv_bias=True,
                  qk_normalization=False, norm_type="layer_norm", initializer_factor=0.1, use_flash_attn=False)
    language = dict(architectures=["Qwen2ForCausalLM"], vocab_size=vocab_size, tie_word_embeddings=False,
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    language.update(llm)
    return dict(vision_config=vision, llm_config=language, force_image_size=64, downsample_ratio=0.5,
                ps_version="v2", select_layer=-1, template="internvl2_5", dynamic_image_size=True,
                use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12)


def write_standin(out_dir, seed=0):
    """A checkpoint directory in the original InternVL format: config.json with architectures and auto_map as the
    hub checkpoints ship them, the model code beside it, random weights (save_pretrained) and the tiny tokenizer."""
    config_class, model_class = standin_classes()
    tokenizer = train_tiny_tokenizer([])
    config = config_class(**standin_config(len(tokenizer)))
    config.architectures = ["InternVLChatModel"]
    torch.manual_seed(seed)
    model_class(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_json = json.loads((Path(out_dir) / "config.json").read_text())
    config_json["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                               "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                               "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    (Path(out_dir) / "config.json").write_text(json.dumps(config_json, indent=2))
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        shutil.copy(STANDIN / name, Path(out_dir) / name)
    return Path(out_dir)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("internvl_chat"))


@pytest.fixture(scope="module")
def standin(standin_dir):
    return load_backbone(str(standin_dir), trust_remote_code=True, max_num_patches=4)


def wrap(bb):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()


def batch(bb, latents=(3, 1, 2), n_tiles=(2, 1, 0)):
    """Rows with different tile and latent counts, in the collator's layout; tiles of 64px.

    Labels start after `<|end-latent|>`, as in training: the first token of a left-padded row has no label (its
    logit would come from a pad position, whose hidden state is arbitrary under eager attention)."""
    rows = [row_tokens(bb, "What color is the circle?", n_tiles[0], latents[0], "It is left.\n### red"),
            row_tokens(bb, "Which shape is blue?", n_tiles[1], latents[1], "### circle"),
            row_tokens(bb, "How many shapes are there?", n_tiles[2], latents[2], "### 2")]
    input_ids, mask, labels, pos = collate(bb, rows, n_prompt=[r.index(bb.end_latent_id) + 1 for r in rows])
    pixel_values = torch.randn(sum(n_tiles), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return input_ids, mask, labels, pos, pixel_values


def new_rows(bb):
    """(input embedding rows, LM-head rows) of the three Coconut tokens."""
    lm = bb.model.language_model if hasattr(bb.model, "img_context_token_id") else bb.model
    ids = [bb.start_latent_id, bb.end_latent_id, bb.latent_id]
    return lm.get_input_embeddings().weight[ids], lm.get_output_embeddings().weight[ids]


# -- original-format InternVL (remote code) ---------------------------------------------------------------------


def test_original_format_loads_through_remote_code(standin):
    model = standin.model
    assert type(model).__name__ == "InternVLChatModel"
    assert type(model).__module__.startswith("transformers_modules.")  # the checkpoint's copy, via auto_map
    assert standin.is_multimodal and standin.tokens_per_tile == model.num_image_token == 16
    assert model.img_context_token_id == standin.image_token_id
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    assert rows == len(standin.tokenizer) == model.config.llm_config.vocab_size
    assert model.language_model.get_output_embeddings().weight.shape[0] == rows
    proc = standin.image_processor
    assert proc.size == {"height": 64, "width": 64} and (proc.min_patches, proc.max_patches) == (1, 4)
    assert tuple(proc.image_mean) == IMAGENET_MEAN and tuple(proc.image_std) == IMAGENET_STD
    assert model.extract_feature(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 64)


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # the original calls it without use_reentrant
def test_original_format_trains_with_its_vision_checkpointing(standin):
    """In training mode the original vision encoder recomputes its layers in backward: same loss and gradients."""
    model = wrap(standin)
    batch_ = batch(standin)
    results = []
    for training in (False, True):
        model.train(training)
        results.append(loss_and_grads(model, model, *batch_)[1])
    model.eval()
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert results[1]["base_model.vision_model.encoder.layers.0.attn.qkv.weight"].abs().sum() > 0


# The original's forward passes `past_key_values`, which transformers 5.24 deprecates (we never call that forward).
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_original_format_no_latents_equals_its_own_forward(standin):
    model = wrap(standin)
    input_ids, mask, labels, pos, pixel_values = batch(standin, latents=(0, 0, 0))
    ours = model(input_ids, mask, labels, pos, pixel_values)
    flags = torch.ones(pixel_values.shape[0], 1, dtype=torch.long)
    ref = standin.model(pixel_values, input_ids, mask, position_ids=pos, image_flags=flags)
    real = mask.bool()
    assert torch.isfinite(ours.logits).all() and (ours.logits[real] - ref.logits[real]).abs().max() <= 1e-4


def test_original_format_latent_passes_equal_naive_recompute(standin):
    model = wrap(standin)
    input_ids, mask, labels, pos, pixel_values = batch(standin)
    args = (input_ids, mask, labels, pos, pixel_values)
    out, ours = loss_and_grads(model, model, *args)
    ref, theirs = loss_and_grads(model, lambda *a: naive_forward(model, *a), *args)

    assert torch.isfinite(out.loss) and out.loss.item() > 1.0
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() <= 1e-4
    assert ours.keys() == theirs.keys() and len(ours) > 20
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-5, rtol=1e-4, msg=name)
    for name in ("base_model.vision_model.embeddings.patch_embedding.weight", "base_model.mlp1.1.weight"):
        assert ours[name].abs().sum() > 0, name  # gradients reach the vision encoder and the projector


@pytest.mark.parametrize("attn", [None, "eager"])
def test_original_format_uses_the_configured_attention(standin_dir, attn):
    """The remote code's __init__ sets eager attention without flash-attn (what from_pretrained was asked is ignored);
    the loader passes the setting through: sdpa by default."""
    kwargs = {} if attn is None else {"attn_implementation": attn}
    model = load_backbone(str(standin_dir), trust_remote_code=True, **kwargs).model
    expected = attn or "sdpa"
    assert model.language_model.config._attn_implementation == expected
    assert model.config.llm_config._attn_implementation == expected
    assert model.language_model.model.layers[0].self_attn.config._attn_implementation == expected


def test_original_format_refused_without_trust_remote_code(standin_dir, monkeypatch):
    import transformers

    def no_auto_config(*args, **kwargs):
        raise AssertionError("the loader must decide from config.json before transformers' AutoConfig")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_auto_config)
    with pytest.raises(ValueError, match=r"original-format InternVL.*`trust_remote_code: true`"):
        load_backbone(str(standin_dir))


def test_image_size_must_match_the_checkpoint_tile(standin_dir):
    with pytest.raises(ValueError, match=r"image_size=448 but .* 64px tiles; set image_size: 64"):
        load_backbone("tiny", image_size=448)
    with pytest.raises(ValueError, match=r"image_size=32 but .* 64px tiles"):
        load_backbone(str(standin_dir), trust_remote_code=True, image_size=32)


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_backbone(str(tmp_path / "missing"))


def test_tile_size_from_config_json():
    assert _tile_size({"model_type": "internvl", "vision_config": {"image_size": [64, 64]}}) == 64
    assert _tile_size({"model_type": "internvl", "vision_config": {"image_size": 448}}) == 448
    original = {"architectures": ["InternVLChatModel"], "vision_config": {"image_size": [448, 448]}}
    assert _tile_size({**original, "force_image_size": None}) == 448
    assert _tile_size({**original, "force_image_size": 224}) == 224
    with pytest.raises(ValueError, match=r"\[448, 224\].*square"):
        _tile_size({"model_type": "internvl", "vision_config": {"image_size": [448, 224]}})


# -- special tokens -------------------------------------------------------------------------------------------


def test_latent_tokens_added_in_fixed_order_from_an_existing_row(tiny, tiny_lm, tiny_lm_tied):
    for bb in (tiny, tiny_lm, tiny_lm_tied):
        vocab = bb.tokenizer.get_vocab()
        n = len(bb.tokenizer)
        assert [vocab[t] for t in (START_LATENT, END_LATENT, LATENT)] == [n - 3, n - 2, n - 1]
        assert (bb.start_latent_id, bb.end_latent_id, bb.latent_id) == (n - 3, n - 2, n - 1)
        init = bb.tokenizer.encode("<<", add_special_tokens=False)[0]
        emb, head = new_rows(bb)
        assert torch.equal(emb, bb.model.get_input_embeddings().weight[init].expand(3, -1))
        assert torch.equal(head, bb.model.get_output_embeddings().weight[init].expand(3, -1))
    # InternVL3 does not tie the LM head to the input embeddings; the config's vocabulary follows the resize
    model = tiny.model
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert model.config.text_config.vocab_size == len(tiny.tokenizer) == model.lm_head.weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == len(tiny.tokenizer)


@pytest.mark.parametrize("kind", ["tiny", "standin"])
def test_special_tokens_stable_across_save_and_load(kind, request, tmp_path):
    """Trained rows of the new tokens survive save -> load_backbone (not re-initialised), under the same ids."""
    bb = request.getfixturevalue(kind)
    if kind == "standin":
        bb = load_backbone(str(request.getfixturevalue("standin_dir")), trust_remote_code=True)  # a copy to train
    lm = bb.model.language_model if kind == "standin" else bb.model
    ids = [bb.start_latent_id, bb.end_latent_id, bb.latent_id]
    with torch.no_grad():  # "train" the new rows
        for emb in (lm.get_input_embeddings(), lm.get_output_embeddings()):
            emb.weight[ids] = torch.randn(3, emb.weight.shape[1])
    trained = new_rows(bb)
    bb.model.save_pretrained(tmp_path)
    bb.tokenizer.save_pretrained(tmp_path)
    bb.image_processor.save_pretrained(tmp_path)

    again = load_backbone(str(tmp_path), trust_remote_code=kind == "standin")
    assert (again.start_latent_id, again.end_latent_id, again.latent_id, again.image_token_id, again.eos_token_id) \
        == (bb.start_latent_id, bb.end_latent_id, bb.latent_id, bb.image_token_id, bb.eos_token_id)
    assert len(again.tokenizer) == len(bb.tokenizer)
    for before, after in zip(trained, new_rows(again)):
        assert torch.equal(before, after)
    before, after = bb.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = again.model.config.llm_config if kind == "standin" else again.model.config.text_config
    assert config.vocab_size == len(again.tokenizer)


def test_plain_causal_lm_loads_as_text_only(tiny_lm):
    assert not tiny_lm.is_multimodal
    assert (tiny_lm.image_processor, tiny_lm.tokens_per_tile, tiny_lm.image_token_id) == (None, 0, None)
    assert tiny_lm.model.config.vocab_size == len(tiny_lm.tokenizer)


# -- presets --------------------------------------------------------------------------------------------------


def test_tiny_is_deterministic_by_seed_and_round_trips(tmp_path):
    from transformers import InternVLForConditionalGeneration

    texts = ["What is to the left of the red square?"]
    a, b, c = (build_tiny(tmp_path / name, texts, seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb, sc = (InternVLForConditionalGeneration.from_pretrained(p).state_dict() for p in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    n = sum(v.numel() for v in sa.values())
    assert 2_000_000 < n < 5_000_000, n  # "a few million"

    model = InternVLForConditionalGeneration.from_pretrained(a)
    model.save_pretrained(tmp_path / "again")
    sd = InternVLForConditionalGeneration.from_pretrained(tmp_path / "again").state_dict()
    assert sd.keys() == sa.keys() and all(torch.equal(sd[k], sa[k]) for k in sa)


def test_an_incomplete_tiny_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    """A cache entry without its COMPLETE marker (an interrupted build, or one where a non-zero rank of a process
    group renamed its half into place: tokenizer files, no weights) is treated as absent, never "not a checkpoint"."""
    from multimodal_coconut.backbone import tiny_dir

    monkeypatch.setenv("MMC_CACHE", str(tmp_path))
    path = tiny_dir()
    for name in ("config.json", "model.safetensors", "COMPLETE"):
        (path / name).unlink(missing_ok=True)
    assert load_backbone("tiny").tokens_per_tile == 16
    assert tiny_dir() == path and (path / "COMPLETE").is_file()


def test_internvl3_1b_shape_has_internvl3_1b_parameter_count():
    bb = load_backbone("internvl3-1b-shape", device="meta")
    model = bb.model
    assert bb.tokens_per_tile == 256 and bb.image_processor.size == {"height": 448, "width": 448}

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # InternViT-300M-448px: 24 layers of width 1024 (qkv with bias, MLP 4096, 2 LayerNorms, 2 layer scales), patch
    # 14 conv, CLS token and 1025 position embeddings; no final norm.
    d, f = 1024, 4096
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d + 2 * d
    vision = 24 * layer + (3 * 14 * 14 * d + d) + d + 1025 * d
    projector = 2 * 4 * d + (4 * d * 896 + 896) + (896 * 896 + 896)  # mlp1: LayerNorm(4096), 4096->896, 896->896
    # Qwen2.5-0.5B: width 896, 24 layers, 14 query / 2 KV heads of 64, MLP 4864, vocabulary 151674 (InternVL3's)
    h, kv, m, V = 896, 128, 4864, 151674
    qwen_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * m + 2 * h
    language = V * h + 24 * qwen_layer + h
    assert count(model.model.vision_tower) == vision == 304_012_288
    assert count(model.model.multi_modal_projector) == projector
    assert count(model.model.language_model) == language
    assert count(model.lm_head) == V * h  # untied
    assert count(model) == vision + projector + language + V * h == 938_193_024  # InternVL3-1B: 0.94 B


def test_internvl3_1b_shape_matches_the_original_format_architecture():
    """The same shapes built as the original InternVLChatModel (InternViT + mlp1 + Qwen2): same parameter count."""
    config_class, model_class = standin_classes()
    fields = standin_config(151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2)
    fields["vision_config"].update(image_size=448, patch_size=14, hidden_size=1024, num_attention_heads=16,
                                   intermediate_size=4096, num_hidden_layers=24)
    fields["force_image_size"] = 448
    with torch.device("meta"):
        original = model_class(config_class(**fields))
    assert original.num_image_token == 256
    assert sum(p.numel() for p in original.parameters()) == 938_193_024


# -- the installation check -----------------------------------------------------------------------------------


def test_infrastructure_script_passes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: tests may run beside others on few cores
    env.pop("MMC_CACHE", None)  # the script builds its model in its own temporary cache
    result = subprocess.run([sys.executable, str(REPO / "test_infrastructure.py"), "--device", "cpu"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[-1].startswith("OK: "), result.stdout
    assert any(line.startswith("torch ") for line in lines) and any("transformers" in line for line in lines)
