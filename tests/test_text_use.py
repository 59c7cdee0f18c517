"""Using a text-only checkpoint (tiny-text trained on the original Coconut's format): `ask` and `predict` answer as
the run's evaluation did, an image is refused (exit code 2), the web demo has no image input, and the experiment
table reports the format's own accuracies, with its CoT warm-up handed to the other rows."""

import json
import os
from pathlib import Path

import pytest

from multimodal_coconut import ask, experiments, predict
from multimodal_coconut.cli import main
from multimodal_coconut.config import Config

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
PROSQA = ROOT / "args" / "prosqa_coconut.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "prosqa"
NAMES = ["Tom", "Sally", "Max", "Rex", "Polly", "Alex", "Fae", "Sam"]
KINDS = ["wumpus", "rompus", "zumpus", "impus"]


def qa_records() -> list[dict]:
    """16 two-step questions in the original Coconut's format; 3 in 4 answers are "Yes", so a model that has learnt
    to answer "Yes" scores 75%."""
    records = []
    for i in range(16):
        name, a, b = NAMES[i % 8], KINDS[i % 4], KINDS[(i // 4) % 4]
        records.append({"question": f"{name} is a {a}. Every {a} is a {b}. Is {name} a {b}?",
                        "steps": [f"{name} is a {a}.", f"Every {a} is a {b}."], "answer": "Yes" if i % 4 else "No"})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.json"
    path.write_text(json.dumps(qa_records()))
    return path


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """args/prosqa_coconut.yaml on the 16 questions (validated on the same file), 5 epochs, one per stage up to
    max_latent_stage 2: the last checkpoint is at stage 4 (2 thoughts, every step a thought), evaluated once."""
    save = tmp_path_factory.mktemp("text_run")
    assert main([str(PROSQA), f"save_path={save}", "name=qa", f"train_path={data}", f"val_path={data}",
                 "num_epochs=5", "epochs_per_stage=1", "max_latent_stage=2", "num_workers=0", "max_new_tokens=8",
                 "lr=3e-3", "batch_size_training=4", "eval_every_epoch=false", "weights_only_checkpoints=true"]) == 0
    return save / "qa"


@pytest.fixture(scope="module")
def run_predictions(run):
    return json.loads((run / "predictions_val_epoch5.json").read_text())


@pytest.fixture(scope="module")
def run_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_ask_a_text_model_without_image_answers_as_its_run_evaluated(run, run_predictions, capsys):
    records = qa_records()
    for i in (0, 1):  # a "No" and a "Yes" question
        assert ask.main([str(run), "--question", records[i]["question"], "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        expected = run_predictions[f"qa_{i}"]
        assert out["generated"] == expected["output"] and out["answer"] == expected["answer"]
        assert out["n_thoughts"] == len(out["thoughts"]) == 2 and out["stage"] == 4
        assert out["multiple_choice"] is None and out["direct_answer"] is None
    assert ask.main([str(run), "--question", records[0]["question"], "--thoughts", "0"]) == 0
    assert "continuous thoughts: 0 (stage 0" in capsys.readouterr().out


def test_an_image_for_a_text_model_is_exit_code_2(run, tmp_path, capsys):
    from PIL import Image

    from multimodal_coconut.builtin_data import generate_builtin

    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "red").save(image)
    question = qa_records()[0]["question"]
    for args, message in [
        (["--image", str(image), "--question", question], "a text-only language model (tiny-text), which cannot "
                                                          "take an image"),
        (["--question", question, "--choices", "Yes", "No"], "whose questions have no choices"),
    ]:
        assert ask.main([str(run), *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
        assert captured.err.count("\n") == 1, captured.err
    # a split with images (the built-in set's A-OKVQA files) to predict with the text model: the same, named
    generate_builtin(tmp_path / "builtin", {"val": 2}, seed=0)
    assert predict.main([str(run), "--data", str(tmp_path / "builtin" / "aokvqa_v1p0_val.json"), "--out",
                         str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "which cannot take an image (question '" in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def test_predict_a_coconut_file_equals_the_runs_predictions_and_metrics(run, data, run_predictions, run_metrics,
                                                                        tmp_path, capsys):
    out = tmp_path / "predictions.json"
    assert predict.main([str(run), "--data", str(data), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == run_predictions and list(written) == list(run_predictions)  # {output, answer, cot}, in order
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == {k: run_metrics[k] for k in ("accuracy", "cot_accuracy", "n_eval")}
    assert metrics["accuracy"] == 75.0 and metrics["n_eval"] == 16  # the run learnt to answer "Yes" (3 in 4)
    # resumable: the answers already in the file are kept, the rest answered
    kept = dict(list(run_predictions.items())[:3])
    kept["qa_0"] = {"output": "### kept", "answer": "kept", "cot": ""}
    out.write_text(json.dumps(kept))
    assert predict.main([str(run), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    assert "3 of 16 questions already answered" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {**run_predictions, "qa_0": kept["qa_0"]}


def test_predict_a_text_jsonl_file(run, run_predictions, run_metrics, tmp_path, capsys):
    """The same questions in the general jsonl format (read as jsonl by its extension): the same generations, the
    format's predictions {output, answer} and its accuracy."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": r["question"], "answer": r["answer"]}) + "\n"
                            for i, r in enumerate(qa_records())))
    out = tmp_path / "predictions.json"
    assert predict.main([str(run), "--data", str(data), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == {f"q{i}": {"output": run_predictions[f"qa_{i}"]["output"],
                                 "answer": run_predictions[f"qa_{i}"]["answer"]} for i in range(16)}
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == {"accuracy": run_metrics["accuracy"], "n_eval": 16}


def test_app_of_a_text_model_has_no_image_input_and_answers(run, run_predictions):
    pytest.importorskip("gradio")
    from multimodal_coconut.app import MEAN, build
    from multimodal_coconut.inference import load_trained

    demo = build(load_trained(run))
    visible = {b.elem_id: b.visible for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert visible["image"] is False and visible["heatmap"] is False
    assert visible["choices"] is False  # the original Coconut's questions have no choices
    assert visible["question"] is True and visible["answer"] is True and visible["thoughts"] is True
    ask_fn = next(f for f in demo.fns.values() if f.api_name == "ask").fn  # what the page's button and /ask call
    answer, thoughts, heat, message, _, state = ask_fn(None, qa_records()[0]["question"], "", 4, MEAN)
    assert answer == run_predictions["qa_0"]["answer"] and heat is None and state is None
    assert thoughts.count("<li>") == 2 and "2 continuous thought(s), stage 4" in message
    assert "error" not in message


@pytest.mark.slow  # three runs of tiny-text in child processes
def test_experiment_table_on_a_coconut_config_reports_its_accuracies(tmp_path):
    """No-CoT (from the backbone), Coconut and Coconut with both options on the thought (from the CoT warm-up's text
    checkpoint: a fresh thought projection)."""
    out = tmp_path / "table"
    args = ["--out", str(out), "--quick", "--config", str(PROSQA), "--cot-warmup", "1", "--jobs", "2",
            "--rows", "no_cot", "coconut", "coconut_norm_step",
            "--set", f"train_path={FIXTURES / 'prosqa_train.json'}", f"val_path={FIXTURES / 'prosqa_valid.json'}"]
    assert experiments.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "coconut" and list(results["metrics"]) == ["accuracy", "cot_accuracy"]
    assert list(results["rows"]) == ["no_cot", "coconut", "coconut_norm_step"]
    options = (out / "runs" / "coconut_norm_step_seed0" / "config.yaml").read_text()
    assert "thought_norm: projection" in options and "thought_supervision: 1.0" in options
    step_losses = [json.loads(line).get("train_step_loss") for line in
                   (out / "runs" / "coconut_norm_step_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert step_losses and all(loss > 0 for loss in step_losses)  # stage 1: one step written from its thought
    warm = out / "runs" / "cot_warmup_seed0" / "checkpoint_1"
    for key, row in results["rows"].items():
        assert 0 <= row["accuracy"] <= 100 and 0 <= row["cot_accuracy"] <= 100 and row["inference_s"] > 0
        assert "mc_accuracy" not in row
        run = results["runs"][key]["0"]
        # the runner's own answering of the final checkpoint (a text checkpoint, loaded) equals the run's evaluation
        assert run["accuracy"] == run["train_accuracy"] and run["cot_accuracy"] == run["train_cot_accuracy"]
        assert all(m["accuracy"] is not None for m in run["curve"])
        # every row but No-CoT starts from the CoT warm-up's checkpoint, at epoch 2
        cfg = (out / "runs" / f"{key}_seed0" / "config.yaml").read_text()
        assert (f"load_model_path: {warm}" in cfg and "resume: 1" in cfg) == (key != "no_cot"), key
        assert [m["epoch"] for m in run["curve"]] == ([1, 2] if key == "no_cot" else [2])
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "| acc. (%) | CoT match (%) |" in header and "MC acc." not in header
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            accuracy, cot = line.split(" | ")[2:4]
            assert "±" in accuracy and "±" in cot, line  # numbers, not "-"
    assert (out / "results.png").stat().st_size > 0


def test_only_models_trained_on_images_need_one():
    """needs_image: a vision-language model trained on A-OKVQA or the built-in set with images needs one per question;
    trained on text alone (dataset coconut, the built-in hops_text) or on jsonl it takes either; a text LM none."""
    from types import SimpleNamespace

    from multimodal_coconut.inference import Trained, needs_image

    def model(multimodal, **cfg):
        config = Config(**cfg, train_path="t.json", val_path="v.json")
        return Trained(model=None, backbone=SimpleNamespace(is_multimodal=multimodal), config=config, stage=0,
                       path=Path("m"))

    assert needs_image(model(True, dataset="builtin"))
    assert needs_image(model(True, dataset="builtin", builtin_task="hops"))
    assert needs_image(model(True, dataset="aokvqa", image_root="coco"))
    assert not needs_image(model(True, dataset="builtin", builtin_task="hops_text"))
    assert not needs_image(model(True, dataset="coconut"))
    assert not needs_image(model(True, dataset="jsonl"))
    assert not needs_image(model(False, dataset="coconut"))
