"""Samples/s and tiles/s of the training pipeline's image path, per DataLoader worker (one process, one thread):
rates are per CPU-second of the worker process (time.process_time), so that a loaded machine
does not understate them; decode a COCO-sized JPEG (640x480) and tile it as InternVL3 does (12 tiles of 448 px + a thumbnail), with the image
processor used without torchvision (`GotOcr2ImageProcessorPil`) and, when torchvision is installed, the one
training then uses (`GotOcr2ImageProcessor`, torchvision), whose tiles are compared with the PIL ones.

    nice python scripts/data_pipeline_bench.py [--images 24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image


def coco_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like 640x480 JPEGs (smooth colour fields + texture noise, quality 90: ~100-200 KB, as COCO's)."""
    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:480, 0:640] / 480.0
    for _ in range(n):
        base = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(1, 6))
                         for _ in range(3)], -1)
        img = (base * 90 + 128 + rng.normal(0, 18, (480, 640, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure(processor, jpegs: list[bytes], repeat: int) -> tuple[float, float, torch.Tensor]:
    from multimodal_coconut.curriculum import image_tiles

    tiles = image_tiles(Image.open(io.BytesIO(jpegs[0])).convert("RGB"), processor)  # warm-up
    n_tiles, t0 = 0, time.process_time()
    for _ in range(repeat):
        for data in jpegs:
            n_tiles += image_tiles(Image.open(io.BytesIO(data)).convert("RGB"), processor).shape[0]
    seconds = time.process_time() - t0  # CPU time: what one uncontended worker process would take
    return repeat * len(jpegs) / seconds, n_tiles / seconds, tiles


def main() -> None:
    from multimodal_coconut.backbone import _image_processor

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    a = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker
    jpegs = coco_like_jpegs(a.images)
    print(f"{a.images} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB")
    decode_t0 = time.process_time()
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB")
    decode = a.images / (time.process_time() - decode_t0)
    rows = []
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    pil = _image_processor(448, cls=GotOcr2ImageProcessorPil)
    sps, tps, pil_tiles = measure(pil, jpegs, a.repeat)
    rows.append(("GotOcr2ImageProcessorPil (used without torchvision)", sps, tps, pil_tiles.shape[0]))
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"torchvision variant not measured: {e}")
    else:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor

        fast = _image_processor(448, cls=GotOcr2ImageProcessor)
        sps, tps, fast_tiles = measure(fast, jpegs, a.repeat)
        rows.append(("GotOcr2ImageProcessor (torchvision; used when installed)", sps, tps, fast_tiles.shape[0]))
        print(f"torchvision vs PIL tiles: max abs diff {(fast_tiles - pil_tiles).abs().max().item():.4f}")
    print(f"JPEG decode alone: {decode:.1f} images/s\n")
    print("| image processor | samples/s per worker | tiles/s per worker | tiles per image |\n|---|---|---|---|")
    for name, sps, tps, n in rows:
        print(f"| {name} | {sps:.1f} | {tps:.0f} | {n} |")


if __name__ == "__main__":
    main()
