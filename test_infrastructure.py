"""Installation check, to run right after installing:

    python test_infrastructure.py                # the first accelerator found (CUDA, then MPS), else the CPU
    python test_infrastructure.py --device cpu

Prints the versions and devices, builds the tiny model through the normal loader (in a temporary cache; nothing is
downloaded), checks that a forward pass with images and continuous thoughts equals the naive recompute (one full
forward per thought) and that batched generation equals generating each row alone. The last line is the verdict:
`OK: ...` (exit 0) or `FAILED: <what>` (exit 1). About 10 s on a laptop CPU.
"""

import argparse
import os
import platform
import sys
import tempfile
import traceback


class CheckFailed(Exception):
    pass


def report_environment():
    import PIL
    import tokenizers
    import torch
    import transformers

    import multimodal_coconut

    print(f"python {platform.python_version()} ({platform.platform()})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, pillow {PIL.__version__}")
    print(f"multimodal_coconut {multimodal_coconut.__version__} ({os.path.dirname(multimodal_coconut.__file__)})")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"CUDA devices: {n}")
    for i in range(n):
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    print(f"MPS available: {torch.backends.mps.is_available()}")
    print(f"CPU threads: {torch.get_num_threads()}")


def pick_device(requested):
    import torch

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def layout(bb, rows, n_prompt):
    """Left-pad so every row's first latent is in the same column, right-pad to one length (the collator's layout);
    labels only after each row's prompt."""
    import torch

    anchor = [r.index(bb.latent_id) for r in rows]
    left = [max(anchor) - a for a in anchor]
    T = max(l + len(r) for l, r in zip(left, rows))
    ids = torch.full((len(rows), T), bb.pad_token_id)
    mask, pos, labels = torch.zeros_like(ids), torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (l, r) in enumerate(zip(left, rows)):
        ids[i, l:l + len(r)] = torch.tensor(r)
        mask[i, l:l + len(r)] = 1
        pos[i, l:l + len(r)] = torch.arange(len(r))
        labels[i, l + n_prompt[i]:l + len(r)] = torch.tensor(r[n_prompt[i]:])
    return ids, mask, labels, pos


def check(device):
    import torch
    from PIL import Image, ImageDraw

    from multimodal_coconut import MultimodalCoconut, load_backbone
    from multimodal_coconut.backbone import IMG_CONTEXT, IMG_END, IMG_START, tiny_dir
    from multimodal_coconut.baselines import naive_forward

    with tempfile.TemporaryDirectory() as cache:  # build and save the tiny model, then load it with from_pretrained
        bb = load_backbone(str(tiny_dir(cache_dir=cache)), max_num_patches=4)
    torch.manual_seed(0)
    with torch.no_grad():  # the three new tokens start as copies of one row: separate them (no exact ties in argmax)
        head = bb.model.get_output_embeddings().weight
        head[[bb.start_latent_id, bb.end_latent_id, bb.latent_id]] += 0.01 * torch.randn(3, head.shape[1])
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id)
    model = model.to(device).eval()

    images = []
    for size, color in (((128, 64), "red"), ((64, 64), "blue")):
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=color)
        images.append(image)
    proc = bb.image_processor
    tiles = [proc(images=[im], return_tensors="pt", crop_to_patches=True, min_patches=proc.min_patches,
                  max_patches=proc.max_patches)["pixel_values"] for im in images]
    pixel_values = torch.cat(tiles).to(device)  # (3 + 1 tiles, 3, 64, 64): a 2-tile image with thumbnail, 1 tile

    tok = bb.tokenizer
    samples = [("What color is the circle?", 3, "The circle is red.\n### red"),
               ("What shape is blue?", 1, "### circle")]
    prompts, rows = [], []
    for t, (question, n_latents, rest) in zip(tiles, samples):
        prompt = tok.convert_tokens_to_ids([IMG_START] + [IMG_CONTEXT] * (len(t) * bb.tokens_per_tile) + [IMG_END])
        prompt += tok.encode(question, add_special_tokens=False)
        prompt += [bb.start_latent_id] + [bb.latent_id] * n_latents + [bb.end_latent_id]
        prompts.append(prompt)
        rows.append(prompt + tok.encode(rest, add_special_tokens=False) + [bb.eos_token_id])

    step = "forward pass with images and continuous thoughts"
    ids, mask, labels, pos = (x.to(device) for x in layout(bb, rows, [len(p) for p in prompts]))
    out = model(ids, mask, labels, pos, pixel_values)
    ref = naive_forward(model, ids, mask, labels, pos, pixel_values)
    real = mask.bool()
    diff = (out.logits[real] - ref.logits[real]).abs().max().item()
    if not (torch.isfinite(out.loss) and diff <= 1e-4 and abs(out.loss.item() - ref.loss.item()) <= 1e-4):
        raise CheckFailed(f"{step}: cached latent passes differ from the naive recompute (max |logit difference| "
                          f"{diff:.2e}, loss {out.loss.item():.6f} vs {ref.loss.item():.6f})")
    out.loss.backward()
    vision_grad = bb.model.model.vision_tower.embeddings.patch_embeddings.projection.weight.grad
    if vision_grad is None or not vision_grad.abs().sum() > 0:
        raise CheckFailed(f"{step}: no gradient reached the vision encoder")

    step = "batched generation"
    ids, mask, _, pos = (x.to(device) for x in layout(bb, prompts, [0, 0]))
    batched = model.generate(ids, mask, pixel_values, max_new_tokens=8, position_ids=pos)[:, ids.shape[1]:]
    for i, (prompt, t) in enumerate(zip(prompts, tiles)):
        one = torch.tensor([prompt], device=device)
        alone = model.generate(one, torch.ones_like(one), t.to(device), max_new_tokens=8)[0, len(prompt):]
        if batched[i].tolist() != alone.tolist():
            raise CheckFailed(f"{step}: row {i} gives {batched[i].tolist()} in the batch but {alone.tolist()} alone")

    n_params = sum(p.numel() for p in bb.model.parameters())
    return (f"{n_params / 1e6:.1f}M-parameter tiny InternVL on {device}: a forward pass with {len(pixel_values)} image "
            f"tiles and continuous thoughts equals the naive recompute (max |logit difference| {diff:.1e}); "
            f"batched generation equals row-by-row generation")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the first accelerator found, else cpu)")
    args = parser.parse_args(argv)
    step = "importing torch, transformers and multimodal_coconut"
    try:
        report_environment()
        step = "choosing the device"
        device = pick_device(args.device)
        step = f"building the tiny model and running it on {device}"
        verdict = check(device)
    except CheckFailed as e:
        print(f"FAILED: {e}")
        return 1
    except Exception as e:  # report any error as the verdict, with the traceback above it
        traceback.print_exc(file=sys.stdout)
        print(f"FAILED: {step}: {type(e).__name__}: {e}")
        return 1
    print(f"OK: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
