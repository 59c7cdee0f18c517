"""The benchmark's baselines compute what MultimodalCoconut computes; the benchmark runs end to end (no timings)."""

import json

import pytest
import torch

from helpers import collate, loss_and_grads, row_tokens
from multimodal_coconut import MultimodalCoconut
from multimodal_coconut.baselines import naive_forward, original_forward, original_generate


@pytest.fixture(autouse=True)
def one_thread():
    """The baselines run thousands of tiny ops; on a busy machine, more threads make them slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wrap(bb):
    return MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()


def batch(bb, latents=(3, 1, 2)):
    """Three rows with different latent counts (and tiles, when the backbone takes images)."""
    n_tiles = (2, 1, 0) if bb.is_multimodal else (0, 0, 0)
    rows = [
        row_tokens(bb, "What color is the circle?", n_tiles[0], latents[0], "It is left.\nThe square is red.\n### red"),
        row_tokens(bb, "Which shape is blue?", n_tiles[1], latents[1], "### circle"),
        row_tokens(bb, "How many shapes are there on the left side?", n_tiles[2], latents[2], "### 2"),
    ]
    input_ids, mask, labels, pos = collate(bb, rows)
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(sum(n_tiles), 3, 64, 64, generator=g) if sum(n_tiles) else None
    return input_ids, mask, labels, pos, pixel_values


@pytest.mark.parametrize("backbone", ["tiny", "tiny_lm"])
@pytest.mark.parametrize("baseline", [original_forward, naive_forward])
def test_baseline_equals_ours(backbone, baseline, request):
    bb = request.getfixturevalue(backbone)
    model = wrap(bb)
    args = batch(bb)
    assert (args[0] == bb.latent_id).sum(1).tolist() == [3, 1, 2]
    ours, g_ours = loss_and_grads(model, model, *args)
    ref, g_ref = loss_and_grads(model, lambda *a: baseline(model, *a), *args)

    assert torch.isfinite(ours.loss) and ours.loss.item() > 1.0
    torch.testing.assert_close(ref.loss, ours.loss, atol=1e-5, rtol=1e-5)
    real = args[1].bool()
    assert (ref.logits[real] - ours.logits[real]).abs().max() <= 1e-4
    torch.testing.assert_close(ref.inputs_embeds[real], ours.inputs_embeds[real], atol=1e-5, rtol=1e-5)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 10
    for name in g_ours:
        torch.testing.assert_close(g_ref[name], g_ours[name], atol=2e-5, rtol=1e-4, msg=name)
    if bb.is_multimodal:  # the gradient reaches the vision encoder through the thoughts too
        assert g_ref["base_model.model.vision_tower.embeddings.patch_embeddings.projection.weight"].abs().sum() > 0


def test_original_generate_equals_ours(tiny):
    model = wrap(tiny)
    n_tiles, latents = (2, 1, 1), (3, 2, 0)
    questions = ["What color is the circle?", "Which shape is blue?", "How many?"]
    rows = [row_tokens(tiny, q, t, k) for q, t, k in zip(questions, n_tiles, latents)]
    pixel_values = torch.randn(sum(n_tiles), 3, 64, 64, generator=torch.Generator().manual_seed(1))
    input_ids, mask, _, pos = collate(tiny, rows)
    ours = model.generate(input_ids, mask, pixel_values, max_new_tokens=8, position_ids=pos)[:, input_ids.shape[1]:]
    starts = [0, *torch.tensor(n_tiles).cumsum(0).tolist()]
    for i, r in enumerate(rows):
        ids = torch.tensor([r])
        theirs = original_generate(model, ids, pixel_values[starts[i]:starts[i + 1]], max_new_tokens=8)
        assert theirs[0, : len(r)].tolist() == r
        new = ours[i].tolist()
        new = new[: new.index(tiny.eos_token_id)] if tiny.eos_token_id in new else new  # the original drops EOS
        assert theirs[0, len(r):].tolist() == new and len(new) > 0


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    from multimodal_coconut import benchmark

    out = tmp_path / "bench.json"
    benchmark.main(["--preset", "tiny", "--repeats", "1", "--quick", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"machine", "config", "train", "generate", "memory", "scaling"} <= result.keys()
    assert {"cpu", "cores", "torch", "transformers", "device"} <= result["machine"].keys()
    train = result["train"]
    for name in ("plain", "ours", "ours_labelled_only", "original", "naive"):
        assert train[name]["median_s"] > 0, name
    # every variant computed the same loss on the same batch (the plain step has no thoughts, so it differs)
    for name in ("ours_labelled_only", "original", "naive"):
        assert train[name]["loss"] == pytest.approx(train["ours"]["loss"], abs=1e-4), name
    gen = result["generate"]
    assert gen["original_matches_ours"] is True
    for name in ("ours", "hf_generate", "original"):
        assert gen[name]["tokens_per_s"] > 0, name
    for name in ("plain", "ours", "ours_labelled_only"):
        assert result["memory"][name]["peak_bytes"] > 0, name
    assert len(result["scaling"]["rows"]) >= 2
    assert "ours / plain" in capsys.readouterr().out


def test_step_flops_match_torch_flop_counter(tiny):
    """The benchmark's FLOP formula (for MFU), matmul parts, against torch's own count of one plain step."""
    from torch.utils.flop_counter import FlopCounterMode

    from multimodal_coconut import benchmark

    model = wrap(tiny).train()
    b = benchmark.train_batch(tiny, 1, 3, 0, torch.device("cpu"), torch.float32)  # one row: no padding
    step = benchmark.train_steps(tiny, model, b)["plain"]
    with FlopCounterMode(display=False) as counter:
        step()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if str(op).split(".")[1] in ("mm", "addmm", "convolution", "convolution_backward"))
    parts = benchmark.step_flops(tiny, b, logit_positions=b["input_ids"].numel())
    matmuls = parts["total"] - parts["vision_attention"] - parts["lm_attention"]
    assert parts["vision_attention"] > 0 and parts["lm_attention"] > 0
    assert matmuls == pytest.approx(counted, rel=0.01)
