"""Checkpoints: exact resume (weights, optimizer, scheduler, RNG), crash safety, shared tensors, two ranks, export."""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from multimodal_coconut.checkpoint import (COMPLETE, export_hf, find_latest_checkpoint, full_model_state_dict,
                                           list_checkpoints, load_checkpoint, load_safetensors, prune_checkpoints,
                                           read_model_state_dict, save_checkpoint, save_safetensors)


# transformers and the model are imported inside the helpers, so the spawned ranks of the two-rank test start fast.


def tied_lm(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def coconut(seed=0):
    """MultimodalCoconut registers the decoder, embedding and head a second time: shared tensors everywhere."""
    from multimodal_coconut import MultimodalCoconut

    return MultimodalCoconut(tied_lm(seed), 60, 61, 62, 2)


def setup(seed=0):
    model = coconut(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, n):
    """n steps on random data drawn from every RNG the trainer uses; returns losses and the draws."""
    out = []
    for _ in range(n):
        ids = torch.randint(3, 60, (2, 8))
        out += [random.random(), float(np.random.rand())]
        loss = model(ids, torch.ones_like(ids), ids, torch.arange(8).expand(2, 8)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_resumes_exactly(tmp_path):
    model, opt, sched = setup(0)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    train_steps(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, global_step=2, best_metric=50.0, config_hash="abc",
                           metrics=[{"epoch": 1, "mc_accuracy": 50.0}], extra={"stage": 0})
    assert path == tmp_path / "checkpoint_1"
    assert sorted(os.listdir(path)) == [COMPLETE, "model", "optimizer", "progress.json", "rng_rank0.pt",
                                        "scheduler.pt"]
    assert sorted(os.listdir(path / "model")) == [".metadata", "__0_0.distcp"]  # DCP, one process: one shard file
    assert os.listdir(tmp_path) == ["checkpoint_1"]  # the tmp dir was renamed
    expected_state = state(model)
    expected = train_steps(model, opt, sched, 3)
    expected_after = state(model)

    model2, opt2, sched2 = setup(seed=5)  # different weights, fresh optimizer and scheduler, RNG elsewhere
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    progress = load_checkpoint(find_latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert progress["epoch"] == 1 and progress["global_step"] == 2 and progress["best_metric"] == 50.0
    assert progress["config_hash"] == "abc" and progress["stage"] == 0 and progress["metrics"][0]["epoch"] == 1
    for k, v in state(model2).items():
        assert torch.equal(v, expected_state[k]), k
    assert model2.base_model.lm_head.weight is model2.base_model.model.embed_tokens.weight  # still tied
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert train_steps(model2, opt2, sched2, 3) == expected  # losses and RNG draws continue identically
    for k, v in state(model2).items():
        assert torch.equal(v, expected_after[k]), k


def test_optimizer_before_first_step(tmp_path):
    model, opt, sched = setup(0)
    save_checkpoint(tmp_path, 0, model, opt, sched, log=None)
    model2, opt2, sched2 = setup(0)
    load_checkpoint(tmp_path / "checkpoint_0", model2, opt2, sched2)
    torch.manual_seed(3)
    a = train_steps(model, opt, sched, 2)
    torch.manual_seed(3)
    assert train_steps(model2, opt2, sched2, 2)[2::3] == a[2::3]


def test_an_asynchronous_checkpoint_is_complete_only_after_its_background_writes(tmp_path, monkeypatch):
    """async_checkpoint: the shards are written in the background; until wait() the checkpoint is a .tmp- directory,
    and wait() marks it COMPLETE only once the slow writes have finished (COMPLETE lists their files)."""
    import threading
    import time
    from concurrent.futures import Future

    from multimodal_coconut import checkpoint as ckpt

    written, may_write = [], threading.Event()
    real_save = ckpt._dcp_save

    def slow_async_save(state, path, distributed, asynchronous=False, group=None):
        assert asynchronous
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}  # as DCP's CPU copy
        future = Future()

        def write():  # not before the test calls wait(), then slowly
            may_write.wait()
            time.sleep(0.5)
            real_save(state, path, distributed)
            written.append(path.name)
            future.set_result(None)
        threading.Thread(target=write).start()
        return future

    monkeypatch.setattr(ckpt, "_dcp_save", slow_async_save)
    model, opt, sched = setup(0)
    train_steps(model, opt, sched, 1)
    expected = state(model)
    pending = ckpt.start_checkpoint(tmp_path, 1, model, opt, sched, asynchronous=True, log=None)
    assert written == [] and not (tmp_path / "checkpoint_1").exists()
    assert find_latest_checkpoint(tmp_path, log=None) is None  # nothing resumes from a checkpoint in flight
    train_steps(model, opt, sched, 1)  # training goes on and changes the weights meanwhile
    may_write.set()
    assert pending.wait() == tmp_path / "checkpoint_1"
    assert sorted(written) == ["model", "optimizer"]  # wait() returned only once both writes were done
    files = json.loads((tmp_path / "checkpoint_1" / COMPLETE).read_text())["files"]
    assert "model/__0_0.distcp" in files and "optimizer/__0_0.distcp" in files
    model2, opt2, sched2 = setup(seed=5)
    load_checkpoint(tmp_path / "checkpoint_1", model2, opt2, sched2)
    for k, v in state(model2).items():
        assert torch.equal(v, expected[k]), k


def test_interrupted_writes_are_ignored_and_kept(tmp_path):
    model = coconut()
    save_checkpoint(tmp_path, 1, model, global_step=10, log=None)
    shutil.copytree(tmp_path / "checkpoint_1", tmp_path / "checkpoint_2")
    os.remove(tmp_path / "checkpoint_2" / COMPLETE)  # died before the marker (not our own write order, but possible)
    shutil.copytree(tmp_path / "checkpoint_2", tmp_path / "checkpoint_3.tmp-step30")  # died before the rename
    messages = []
    assert find_latest_checkpoint(tmp_path, log=messages.append) == tmp_path / "checkpoint_1"
    assert any("checkpoint_2" in m for m in messages) and any("checkpoint_3.tmp-step30" in m for m in messages)
    assert (tmp_path / "checkpoint_2").exists() and (tmp_path / "checkpoint_3.tmp-step30").exists()
    with pytest.raises(FileNotFoundError, match=COMPLETE):
        load_checkpoint(tmp_path / "checkpoint_2", model)

    # writing epoch 3 again replaces the stale tmp dir of the same write; epoch 1 again keeps the old one aside
    save_checkpoint(tmp_path, 3, model, global_step=30, log=messages.append)
    assert not (tmp_path / "checkpoint_3.tmp-step30").exists() and find_latest_checkpoint(tmp_path, log=None).name \
        == "checkpoint_3"
    save_checkpoint(tmp_path, 1, model, global_step=10, log=None)
    assert len(list(tmp_path.glob("checkpoint_1.replaced-*"))) == 1
    assert [e for e, _ in list_checkpoints(tmp_path, log=None)] == [1, 3]

    # a file cut short after COMPLETE was written is caught on load
    with open(tmp_path / "checkpoint_3" / "model" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="model/__0_0.distcp"):
        load_checkpoint(tmp_path / "checkpoint_3", model)


def test_prune_never_deletes_the_newest(tmp_path):
    model = coconut()
    for epoch in (1, 2, 3):  # the module, or a state dict the caller gathered
        save_checkpoint(tmp_path, epoch, model if epoch < 3 else full_model_state_dict(model), global_step=epoch,
                        log=None)
    assert prune_checkpoints(tmp_path, keep=[tmp_path / "checkpoint_2"], log=None) == [tmp_path / "checkpoint_1"]
    assert prune_checkpoints(tmp_path, keep=[], log=None) == [tmp_path / "checkpoint_2"]
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3]
    load_checkpoint(tmp_path / "checkpoint_3", coconut(seed=1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.alias = self.emb  # the same module under a second name
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.register_buffer("row", self.table[1])  # a partial view of another buffer


def test_shared_tensors(tmp_path):
    m = Tied()
    sd = m.state_dict()
    save_safetensors(sd, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert loaded["head.weight"] is loaded["emb.weight"]  # stored once
    m2 = Tied()
    m2.load_state_dict(loaded)
    assert m2.head.weight is m2.emb.weight and torch.equal(m2.emb.weight, m.emb.weight)
    # read_model_state_dict: checkpoint dir, safetensors file, or an original Coconut torch.save file
    save_checkpoint(tmp_path / "run", 1, m, log=None)
    torch.save(sd, tmp_path / "checkpoint_orig")
    for source in (tmp_path / "run" / "checkpoint_1", tmp_path / "m.safetensors", tmp_path / "checkpoint_orig"):
        assert torch.equal(read_model_state_dict(source)["head.weight"], m.emb.weight)


def test_export_hf(tmp_path):
    from transformers import Qwen2ForCausalLM

    from multimodal_coconut.backbone import train_tiny_tokenizer

    model, tokenizer = tied_lm(), train_tiny_tokenizer([], vocab_size=300)
    out = export_hf(model, tokenizer, None, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    loaded = Qwen2ForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert (out / "tokenizer_config.json").exists()
    with pytest.raises(FileExistsError):
        export_hf(model, tokenizer, None, out)
    export_hf(tied_lm(seed=1), None, None, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"] and not (out / "tokenizer_config.json").exists()


class TinyLM(nn.Module):
    """A tied-embedding LM in plain torch: FSDP2 shards its layers."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def _two_rank_worker(rank, world_size, init_file, save_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))

        def sharded(seed):
            model = TinyLM(seed)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(model, opt):
            model(torch.randint(0, 64, (2, 8))).backward()  # the same data on both ranks: same seed
            opt.step()
            opt.zero_grad()

        model, opt = sharded(0)
        torch.manual_seed(7)
        step(model, opt)
        torch.manual_seed(100 + rank)  # each rank its own stream, which the checkpoint must keep apart
        path = save_checkpoint(save_dir, 1, model, opt, global_step=1, rank=rank, world_size=world_size, log=None)
        after = torch.rand(3)
        full = full_model_state_dict(model)
        step(model, opt)
        expected = full_model_state_dict(model)

        model2, opt2 = sharded(1)
        load_checkpoint(path, model2, opt2, rank=rank)
        assert torch.equal(torch.rand(3), after)
        step(model2, opt2)  # same weights and Adam moments: the same update
        got = full_model_state_dict(model2)
        if rank == 0:
            assert got.keys() == expected.keys() and "head.weight" in got
            for k in expected:
                assert torch.equal(got[k], expected[k]), k
            assert sorted(os.listdir(path / "model")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank
            saved = read_model_state_dict(path)  # the shards read back whole, in this process
            assert all(torch.equal(saved[k], full[k]) for k in full)
            plain = TinyLM(3)
            plain.load_state_dict(saved)  # an FSDP checkpoint loads into a plain model
            assert plain.head.weight is plain.emb.weight
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_fsdp2(tmp_path):
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run")), nprocs=2)
    path = tmp_path / "run" / "checkpoint_1"
    files = json.loads((path / COMPLETE).read_text())["files"]
    assert {"rng_rank0.pt", "rng_rank1.pt", "model/.metadata", "model/__1_0.distcp", "optimizer/.metadata",
            "progress.json"} <= files.keys()
    assert os.listdir(tmp_path / "run") == ["checkpoint_1"]
    assert json.loads((path / "progress.json").read_text())["world_size"] == 2


def test_config_hash():
    from multimodal_coconut.checkpoint import config_hash

    cfg = {"lr": 1e-5, "c_thought": 2, "num_epochs": 40, "resume": 0, "load_model_path": None}
    assert config_hash(cfg) == config_hash(dict(cfg, num_epochs=99, resume=3))  # may change on resume
    assert config_hash(cfg) != config_hash(dict(cfg, lr=2e-5))
