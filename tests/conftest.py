import copy
import os
import tempfile

import pytest
import torch

# Built models are cached per test session, never in the user's cache.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote code (the original-format InternVL stand-in) is copied into HF's module cache: keep it out of ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf_modules_"))
torch.set_num_threads(2)


# --- slow tests: multi-process (torchrun) and whole-pipeline runs, minutes on 2 cores --------------------------------
# `pytest` runs the rest (about 5 minutes); `pytest --runslow` (scripts/test.sh, CI) runs everything.


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true",
                     help="also run the tests marked slow (torchrun pairs, the experiment table, the browser)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process or whole-pipeline run; skipped without --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (scripts/test.sh and CI do)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    os.environ["MMC_CACHE"] = str(tmp_path_factory.mktemp("mmc_cache"))


@pytest.fixture(scope="session")
def _tiny():
    from multimodal_coconut import load_backbone

    return load_backbone("tiny", image_size=64, max_num_patches=4)


@pytest.fixture
def tiny(_tiny):
    """A fresh copy of the tiny InternVL backbone (tests may train it)."""
    return copy.deepcopy(_tiny)


def _build_lm(path, tied):
    """A plain text-only causal LM (Qwen2) saved as an HF directory and loaded through the loader."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from multimodal_coconut import load_backbone
    from multimodal_coconut.backbone import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer([])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_backbone(str(path))


@pytest.fixture(scope="session")
def _tiny_lm(tmp_path_factory):
    return _build_lm(tmp_path_factory.mktemp("tiny_lm"), tied=False)


@pytest.fixture
def tiny_lm(_tiny_lm):
    return copy.deepcopy(_tiny_lm)


@pytest.fixture(scope="session")
def _tiny_lm_tied(tmp_path_factory):
    return _build_lm(tmp_path_factory.mktemp("tiny_lm_tied"), tied=True)


@pytest.fixture
def tiny_lm_tied(_tiny_lm_tied):
    """Tied input embeddings and LM head, as GPT-2 in the original Coconut."""
    return copy.deepcopy(_tiny_lm_tied)
