"""Your own data: the original Coconut's json (dataset coconut), the general format (dataset jsonl), text-only
language models through run.py (the tiny-text preset), and bad records named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from multimodal_coconut.cli import main
from multimodal_coconut.config import infer_dataset, load_config
from multimodal_coconut.data import DataError, SkipReport, load_samples
from multimodal_coconut.evaluate import coconut_answer, coconut_cot, score_coconut, score_jsonl

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "prosqa"


def original_run_py_rules(question: str, generated: str, answer: str, steps: list[str]) -> tuple[bool, bool]:
    """The original run.py's evaluation, transcribed: it decodes prompt + generation (the prompt of a CoT model is
    `question + "\\n"`), takes the answer after the last '#' and the CoT from the second line up to the first '#'."""
    text_output = question + "\n" + generated
    answer_output = text_output.split("#")[-1].replace(",", "").strip()
    cot_output = ("\n".join(text_output.split("\n")[1:])).split("#")[0].strip()
    return answer_output == answer.replace(",", "").strip(), cot_output == "\n".join(steps)


# --- the original Coconut's rules ---------------------------------------------------------------------------------


GSM = {"question": "Tom has 1,200 apples and buys 34 more. How many now?", "answer": "1,234",
       "steps": ["<<1200+34=1234>>"]}
OUTPUTS = [
    ("<<1200+34=1234>>\n### 1,234", True, True),  # commas removed on both sides
    ("<<1200+34=1234>>\n### 1234", True, True),
    ("<<1200+34=1234>>\n###  1234  ", True, True),  # stripped
    ("<<1200+34=1234>>\n### 1234\nThe answer is 1234", False, True),  # trailing text after the answer: wrong
    ("<<1200+34=1234>>\n### 12 # 1234", True, True),  # the last '#' wins
    ("<<1200+34=1235>>\n### 1234", True, False),  # right answer, wrong chain
    ("<<1200+34=1234>>\n<<1234*1=1234>>\n### 1234", True, False),  # an extra step: no CoT match
    ("### 1234", True, False),  # no written chain (no_cot, or steps replaced by latents)
    ("", False, False),
]


@pytest.mark.parametrize("generated, right, cot", OUTPUTS)
def test_answer_and_cot_match_follow_the_original(generated, right, cot):
    assert coconut_answer(generated).replace(",", "") == coconut_answer(generated)
    sample = {"question_id": "q", **GSM}
    _, metrics = score_coconut([sample], {"q": generated})
    assert (metrics["accuracy"], metrics["cot_accuracy"]) == (100.0 * right, 100.0 * cot)
    assert original_run_py_rules(GSM["question"], generated, GSM["answer"], GSM["steps"]) == (right, cot)


def test_coconut_extraction_and_predictions_file():
    assert coconut_answer("a\n### Tom is a lempus.") == "Tom is a lempus."
    assert coconut_cot("Tom is a terpus.\nEvery terpus is a lempus.\n### Tom is a lempus.") == \
        "Tom is a terpus.\nEvery terpus is a lempus."
    samples = [{"question_id": f"q{i}", **GSM} for i in range(4)]
    predictions, metrics = score_coconut(samples, {"q0": OUTPUTS[0][0], "q1": OUTPUTS[5][0], "q2": OUTPUTS[3][0]})
    assert metrics == {"accuracy": 50.0, "cot_accuracy": 50.0, "n_eval": 4}  # q3 has no output: wrong
    assert predictions["q1"] == {"output": OUTPUTS[5][0], "answer": "1234", "cot": "<<1200+34=1235>>"}


# --- dataset coconut ------------------------------------------------------------------------------------------


def test_coconut_files_load_unchanged():
    samples = load_samples("coconut", FIXTURES / "prosqa_valid.json", image_root=None)
    records = json.loads((FIXTURES / "prosqa_valid.json").read_text())
    assert [s.question_id for s in samples] == [f"prosqa_valid_{i}" for i in range(len(records))]
    for s, r in zip(samples, records):  # extra fields (idx_to_symbol, root, ...) ignored, text kept as it is
        assert (s.question, s.steps, s.answer, s.image, s.choices) == (r["question"], r["steps"], r["answer"], None, [])


def test_original_configs_load_with_only_model_and_paths_changed():
    """args/prosqa_coconut.yaml is the original's config with model_id and paths changed; the original's other
    configs differ from it in values only (gsm_cot: cot, c_thought 0, max_latent_stage 0; *_eval: only_eval)."""
    cfg = load_config(PROSQA)
    assert cfg.dataset == "coconut" and cfg.model_id == "tiny-text" and cfg.image_root is None
    assert (cfg.c_thought, cfg.epochs_per_stage, cfg.max_latent_stage, cfg.num_epochs) == (1, 5, 6, 50)
    assert cfg.load_model_path is None and cfg.lr == 1e-4 and cfg.reset_optimizer and cfg.pad_latent_to_max
    gsm_cot = ["coconut=False", "cot=True", "c_thought=0", "max_latent_stage=0", "epochs_per_stage=1",
               "save_only_improve=True", "reset_optimizer=False", "num_epochs=25"]
    cot = load_config(PROSQA, gsm_cot)
    assert cot.cot and cot.c_thought == 0 and cot.dataset == "coconut"
    assert load_config(PROSQA, ["only_eval=True", "resume=15"]).only_eval
    with pytest.raises(ValueError, match="key 'c_thought' must be a positive integer"):
        load_config(PROSQA, ["c_thought=0"])
    jsonl = load_config(PROSQA, ["train_path=a.jsonl", "val_path=b.jsonl"], check_paths=False)
    assert jsonl.dataset == "jsonl"
    assert load_config(PROSQA, ["dataset=jsonl"]).dataset == "jsonl"  # an explicit dataset wins
    assert [infer_dataset(p) for p in ("d/aokvqa_v1p0_val.json", "d/val-0.parquet", "d/x.jsonl", "d/gsm_test.json")] \
        == ["aokvqa", "aokvqa_hf", "jsonl", "coconut"]


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_bad_coconut_records_are_named_or_counted(tmp_path):
    good = {"question": "Q?", "steps": ["s1"], "answer": "a"}
    bad = [good, {"question": "Q?", "answer": "a"}, {**good, "steps": "s1"}, {**good, "answer": ""}, ["not a dict"],
           {**good, "steps": ["s1", ""]}]
    path = write_json(tmp_path / "gsm_train.json", bad)
    with pytest.raises(DataError) as info:
        load_samples("coconut", path, image_root=None)
    assert str(info.value) == f"{path}: question_id 'gsm_train_1': field 'steps': missing"
    report = SkipReport()
    kept = load_samples("coconut", path, image_root=None, skip_bad_records=True, report=report)
    assert [s.question_id for s in kept] == ["gsm_train_0"]
    assert report.total == 5 and report.counts["missing field"] == 1 and report.counts["empty answer"] == 1
    assert any("gsm_train_4" in e and "not a JSON object" in e for e in report.examples)
    with pytest.raises(DataError, match="expected a JSON list"):
        load_samples("coconut", write_json(tmp_path / "x.json", {"question": "Q"}), image_root=None)


# --- dataset jsonl -----------------------------------------------------------------------------------------------


def write_jsonl_set(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "img" / "red.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "img" / "blue.png")
    rows = [
        {"id": "mc-img", "image": "img/red.png", "question": "What color is the square?",
         "choices": ["red", "blue"], "answer": "red", "steps": ["The square is red."]},
        {"id": "mc-index", "image": "img/blue.png", "question": "What color is the square?",
         "choices": ["red", "blue"], "answer": 1},
        {"id": "open-text", "question": "How many legs has a dog?", "answer": "Four.", "steps": ["A dog has 4 legs."]},
        {"question": "Is the sky blue?", "choices": ["yes", "no"], "answer": "Yes", "extra": 1},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path, rows


def test_jsonl_rows_with_and_without_images_and_choices(tmp_path):
    path, rows = write_jsonl_set(tmp_path)
    samples = load_samples("jsonl", path, image_root=None)
    assert [s.question_id for s in samples] == ["mc-img", "mc-index", "open-text", "train_3"]
    assert samples[0].image == str(tmp_path / "img" / "red.png") and samples[2].image is None
    assert [s.answer for s in samples] == ["red", "blue", "Four.", "yes"]  # index and "Yes" -> the choice's text
    assert [s.correct_choice_idx for s in samples] == [0, 1, None, 0]
    assert samples[0].steps == ["The square is red."] and samples[1].steps == []
    as_list = write_json(tmp_path / "same.json", rows)  # a JSON list reads the same (ids derived from its name)
    assert [s.answer for s in load_samples("jsonl", as_list, image_root=None)] == [s.answer for s in samples]
    elsewhere = load_samples("jsonl", path, image_root="/data/images")
    assert elsewhere[0].image == "/data/images/img/red.png"

    generated = {"mc-img": "The square is red.\n### Red", "mc-index": "### the red one", "open-text": "### 4",
                 "train_3": "### no"}
    predictions, metrics = score_jsonl(samples, generated)
    # Red -> red (normalised); "the red one" -> red (closest choice, wrong); "4" == "Four." after normalisation.
    assert [p["answer"] for p in predictions.values()] == ["red", "red", "4", "no"]
    assert metrics == {"accuracy": 50.0, "n_eval": 4}


def test_bad_jsonl_records_are_named(tmp_path):
    cases = [
        ({"id": "a", "question": "Q", "choices": ["x", "y"], "answer": "z"}, "field 'answer'", "is not one of"),
        ({"id": "a", "question": "Q", "choices": ["x", "y"], "answer": 2}, "field 'answer'", "out of range"),
        ({"id": "a", "question": "Q", "choices": "x, y", "answer": "x"}, "field 'choices'", "non-empty list"),
        ({"id": "a", "answer": "x"}, "field 'question'", "missing"),
        ({"id": "a", "question": "Q", "answer": "x", "steps": [1]}, "field 'steps'", "list of non-empty strings"),
        ({"id": ["a"], "question": "Q"}, "question_id 'rows_0': field 'id'", "string or integer id"),
    ]
    for record, where, what in cases:
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError) as info:
            load_samples("jsonl", path, image_root=None)
        assert str(info.value).startswith(f"{path}: question_id ") and where in str(info.value), str(info.value)
        assert what in str(info.value)
    path.write_text('{"id": "a", "question": "Q"}\n{"id": "a", "question": "R"}\n{"oops"\n')
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        load_samples("jsonl", path, image_root=None)
    path.write_text('{"id": "a", "question": "Q"}\n{"id": "a", "question": "R"}\n')
    report = SkipReport()
    assert len(load_samples("jsonl", path, image_root=None, skip_bad_records=True, report=report)) == 1
    assert report.counts == {"duplicate id": 1} and "question_id 'a': field 'id'" in report.examples[0]


def test_jsonl_missing_image_is_named_or_counted(tmp_path, _tiny):
    from multimodal_coconut.curriculum import CoconutDataset, Mode

    path, _ = write_jsonl_set(tmp_path)
    (tmp_path / "img" / "blue.png").unlink()
    samples = load_samples("jsonl", path, image_root=None)
    build = dict(backbone=_tiny, mode=Mode(coconut=True), stage=0, train=True, max_length=512, seed=0, epoch=0)
    with pytest.raises(DataError) as info:
        CoconutDataset(samples, **build)
    assert str(info.value) == f"{tmp_path / 'img' / 'blue.png'}: question_id 'mc-index': field 'image': image file " \
        "not found"
    unanswered = load_samples("jsonl", write_json(tmp_path / "open.json", [{"id": "open", "question": "Why?"}]),
                              image_root=None)
    for skip in (False, True):  # a training file with unanswered rows is wrong as a whole: never skipped
        with pytest.raises(DataError, match=r"open.json: question_id 'open': field 'answer': has no answer"):
            CoconutDataset(unanswered + samples, **build, skip_bad_records=skip)
    report = SkipReport()
    kept = CoconutDataset(samples, **build, skip_bad_records=True, report=report)
    assert len(kept) == 3 and report.counts == {"missing image": 1}


# --- end to end through run.py -----------------------------------------------------------------------------------


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


FAST = ["num_epochs=2", "epochs_per_stage=1", "max_latent_stage=2", "num_workers=0", "max_new_tokens=8",
        "lr=1e-3", "batch_size_training=8"]


@pytest.fixture(scope="module")
def prosqa_run(tmp_path_factory):
    """The example config (the original's prosqa_coconut.yaml with tiny-text and 16 + 8 hand-written records),
    2 epochs (stages 0 and 1) in this process."""
    save = tmp_path_factory.mktemp("prosqa")
    assert main([str(PROSQA), f"save_path={save}", *FAST]) == 0
    return save / "prosqa-coconut"


def test_prosqa_records_train_and_evaluate_through_run_py(prosqa_run):
    metrics = read_metrics(prosqa_run)
    assert [m["stage"] for m in metrics] == [0, 1] and [m["global_step"] for m in metrics] == [2, 4]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    records = json.loads((FIXTURES / "prosqa_valid.json").read_text())
    for m in metrics:
        predictions = json.loads((prosqa_run / f"predictions_val_epoch{m['epoch']}.json").read_text())
        assert list(predictions) == [f"prosqa_valid_{i}" for i in range(len(records))]
        right = [original_run_py_rules(r["question"], predictions[f"prosqa_valid_{i}"]["output"], r["answer"],
                                       r["steps"]) for i, r in enumerate(records)]
        assert m["accuracy"] == 100 * sum(a for a, _ in right) / len(records)
        assert m["cot_accuracy"] == 100 * sum(c for _, c in right) / len(records)
        assert m["n_eval"] == len(records)


def test_jsonl_with_images_and_text_rows_trains_on_tiny_internvl(tmp_path):
    path, _ = write_jsonl_set(tmp_path)
    args = [str(PROSQA), f"save_path={tmp_path}", "name=jsonl", "model_id=tiny", "image_size=64",
            "max_num_patches=1", "use_thumbnail=false", f"train_path={path}", f"val_path={path}", *FAST,
            "num_epochs=1", "batch_size_training=2"]
    assert main(args) == 0
    [metrics] = read_metrics(tmp_path / "jsonl")
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0 and metrics["val_loss"] > 0
    predictions = json.loads((tmp_path / "jsonl" / "predictions_val_epoch1.json").read_text())
    assert predictions["mc-img"]["answer"] in ("red", "blue") and predictions["train_3"]["answer"] in ("yes", "no")
    assert metrics["accuracy"] is not None and metrics["n_eval"] == 4 and "cot_accuracy" not in metrics


@pytest.mark.slow
def test_text_model_two_processes_equal_one(prosqa_run, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch 4 each = one process with batch 8 (the first epoch of the
    prosqa run), on the text-only tiny-text Qwen2."""
    two = [f"save_path={tmp_path}", *FAST, "num_epochs=1", "batch_size_training=4"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), str(ROOT / "run.py"), str(PROSQA), *two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, [two] = read_metrics(prosqa_run)[0], read_metrics(tmp_path / "prosqa-coconut")
    assert one["global_step"] == two["global_step"] == 2  # 16 samples / global batch 8
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-4, abs=1e-5)
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-4, abs=1e-5)
    assert one["accuracy"] == two["accuracy"] and one["cot_accuracy"] == two["cot_accuracy"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_other_causal_lms_run_the_latent_passes(arch, tmp_path):
    """GPT-2 (the original Coconut's model; its blocks are `h`, not `layers`) and Llama, built tiny and loaded by
    directory: the cached latent passes equal a naive recompute, and generation runs."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from multimodal_coconut import MultimodalCoconut, load_backbone
    from multimodal_coconut.backbone import train_tiny_tokenizer

    tok = train_tiny_tokenizer([])
    torch.manual_seed(0)
    if arch == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    model = MultimodalCoconut(bb.model, bb.latent_id, bb.start_latent_id, bb.end_latent_id, bb.eos_token_id).eval()
    prompt = tok.encode("Is Tom a wumpus?\n") + [bb.start_latent_id, bb.latent_id, bb.latent_id, bb.end_latent_id]
    ids = torch.tensor([prompt + tok.encode("### Tom is a wumpus.") + [bb.eos_token_id]])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        out = model(ids, mask, ids.clone(), pos)
        embeds = model.embedding(ids).clone()
        for p in (i for i, t in enumerate(ids[0].tolist()) if t == bb.latent_id):  # one full recompute per thought
            embeds[:, p] = model.decoder(inputs_embeds=embeds[:, :p], attention_mask=mask[:, :p],
                                         position_ids=pos[:, :p]).last_hidden_state[:, -1]
        naive = model.lm_head(model.decoder(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=pos).last_hidden_state)
        torch.testing.assert_close(out.logits, naive, atol=1e-5, rtol=1e-5)
        tokens = model.generate(ids[:, :len(prompt)], mask[:, :len(prompt)], max_new_tokens=4)
    assert tokens.shape[1] <= len(prompt) + 4 and tokens[0, :len(prompt)].tolist() == prompt


def test_original_coconut_checkpoints_load(tiny_lm, tmp_path):
    """A checkpoint file of the original run.py (torch.save of its Coconut wrapper: `base_causallm.*` and
    `embedding.weight`, no extension) and a bare backbone state dict both load into our wrapper."""
    from types import SimpleNamespace

    from multimodal_coconut import MultimodalCoconut
    from multimodal_coconut.train import load_weights

    model = MultimodalCoconut(tiny_lm.model, tiny_lm.latent_id, tiny_lm.start_latent_id, tiny_lm.end_latent_id,
                              tiny_lm.eos_token_id)
    trained = {k: torch.randn_like(v) for k, v in tiny_lm.model.state_dict().items()}
    original = {f"base_causallm.{k}": v for k, v in trained.items()}
    original["embedding.weight"] = trained["model.embed_tokens.weight"]
    torch.save(original, tmp_path / "checkpoint_6")
    cot = {k: -v for k, v in trained.items()}
    torch.save(cot, tmp_path / "cot.pt")
    env = SimpleNamespace(master=False)
    for path, expected in ((tmp_path / "checkpoint_6", trained), (tmp_path / "cot.pt", cot)):
        load_weights(model, str(path), env)
        for k, v in model.base_model.state_dict().items():
            torch.testing.assert_close(v, expected[k], msg=k)
