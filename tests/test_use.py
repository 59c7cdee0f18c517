"""Using a trained model: `ask`, `predict` and the web demo answer as the training run's evaluation does, bad input
is one line and exit code 2, the demo answers through its HTTP API and in a real (headless) browser."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from multimodal_coconut import ask, predict
from multimodal_coconut.cli import main
from test_train import DEMO, ROOT, overrides

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from multimodal_coconut.builtin_data import generate_builtin

    out = tmp_path_factory.mktemp("builtin")
    generate_builtin(out, {"train": 16, "val": 8}, seed=0)
    return out


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A 2-epoch run ending at stage 1 (one continuous thought), evaluated once, at the end."""
    save = tmp_path_factory.mktemp("trained")
    assert main([DEMO, *overrides(data_dir, save, num_epochs=2, max_latent_stage=1, max_new_tokens=12,
                                  builtin_train_size=16, builtin_val_size=8, eval_every_epoch=False)]) == 0
    return save / "run"


@pytest.fixture(scope="module")
def val_records(data_dir):
    return json.loads((data_dir / "aokvqa_v1p0_val.json").read_text())


@pytest.fixture(scope="module")
def run_predictions(run):
    return json.loads((run / "predictions_val_epoch2.json").read_text())


def image_of(data_dir, record):
    return str(data_dir / "val2017" / f"{record['image_id']:012d}.jpg")


def test_ask_answers_as_the_training_run_evaluated(run, data_dir, val_records, run_predictions, capsys):
    for record in val_records[:2]:
        args = [str(run), "--image", image_of(data_dir, record), "--question", record["question"], "--choices",
                *record["choices"], "--json"]
        assert ask.main(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["answer"] == run_predictions[record["question_id"]]["multiple_choice"]
        assert out["answer"] in record["choices"]
        assert out["n_thoughts"] == len(out["thoughts"]) == 1 and out["stage"] == 1
        assert len(out["thoughts"][0]["top_tokens"]) == 5
    # Plain text, and more thoughts than the checkpoint's stage on request (capped at max_latent_stage = 1).
    record = val_records[0]
    assert ask.main([str(run / "checkpoint_2"), "--image", image_of(data_dir, record), "--question",
                     record["question"], "--thoughts", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("answer: ") and "continuous thoughts: 0 (stage 0" in text


def test_predict_equals_the_runs_predictions_and_scores_them(run, data_dir, run_predictions, tmp_path, capsys):
    out = tmp_path / "predictions.json"
    assert predict.main([str(run), "--data", str(data_dir / "aokvqa_v1p0_val.json"), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == run_predictions
    assert list(json.loads(out.read_text())) == list(run_predictions)  # the split's order
    printed = capsys.readouterr().out.strip().splitlines()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads(printed[-1])["mc_accuracy"] == metrics["mc_accuracy"]


def test_predict_a_test_format_split_without_answers(run, data_dir, val_records, run_predictions, tmp_path, capsys):
    """A-OKVQA's test split layout: no answers, images under test2017/ of --image-root; every question is written
    (and, the thoughts being the same, answered as the validation run answered it)."""
    keep = ("image_id", "question_id", "question", "choices", "difficult_direct_answer")
    test = tmp_path / "aokvqa_v1p0_test.json"
    test.write_text(json.dumps([{k: r[k] for k in keep} for r in val_records]))
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "test2017").symlink_to(data_dir / "val2017")
    out = tmp_path / "predictions_test.json"
    assert predict.main([str(run), "--data", str(test), "--image-root", str(tmp_path / "coco"), "--out",
                         str(out)]) == 0
    written = json.loads(out.read_text())
    assert list(written) == [r["question_id"] for r in val_records]
    assert written == run_predictions
    assert "mc_accuracy" not in capsys.readouterr().out


def test_predict_resumes_and_keeps_what_is_written(run, data_dir, run_predictions, tmp_path, monkeypatch, capsys):
    out = tmp_path / "predictions.json"
    args = [str(run), "--data", str(data_dir / "aokvqa_v1p0_val.json"), "--out", str(out), "--batch-size", "2"]
    writes = []
    real_write = predict.write_json_atomic

    def write_then_die(path, obj):
        real_write(path, obj)
        writes.append(len(obj))
        if len(writes) == 2:
            raise KeyboardInterrupt  # killed after its second batch

    monkeypatch.setattr(predict, "write_json_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        predict.main(args)
    partial = json.loads(out.read_text())
    assert writes == [2, 4] and len(partial) == 4
    # An answer already in the file is kept as it is, not recomputed.
    first = next(iter(partial))
    partial[first] = {"multiple_choice": "kept", "direct_answer": "kept"}
    out.write_text(json.dumps(partial))
    monkeypatch.setattr(predict, "write_json_atomic", real_write)
    assert predict.main(args) == 0
    assert "4 of 8 questions already answered" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {**run_predictions, first: partial[first]}
    assert not list(tmp_path.glob(".*.tmp"))


def bad_inputs(run, image, tmp_path):
    """(ask arguments, what the one-line error must say) for each kind of bad input."""
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    incomplete = tmp_path / "checkpoint_2"
    shutil.copytree(run / "checkpoint_2", incomplete)
    (incomplete / "COMPLETE").unlink()
    no_weights = tmp_path / "exported"
    shutil.copytree(run / "checkpoint_2", no_weights)
    shutil.rmtree(no_weights / "model")  # the sharded weights
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    (other_model / "config.json").write_text("{}")
    q = ["--question", "What is it?"]
    return [
        ([str(run), "--image", str(tmp_path / "missing.jpg"), *q], "missing.jpg: image file not found"),
        ([str(run), "--image", str(not_an_image), *q], "notes.jpg: not a readable image"),
        ([str(run), "--image", str(tmp_path), *q], "is a directory, not an image file"),
        ([str(run), "--image", image, "--question", "  "], "the question is empty"),
        ([str(run), *q], "trained on dataset 'builtin', whose questions all have an image; give an image"),
        ([str(incomplete), "--image", image, *q], "checkpoint_2: an incomplete checkpoint"),
        ([str(no_weights), "--image", image, *q], "exported: cannot load the model"),
        ([str(other_model), "--image", image, *q], "other_model: not a Multimodal CoCoNuT checkpoint"),
        ([str(tmp_path / "nowhere"), "--image", image, *q], "nowhere: no such file or directory"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(run, data_dir, val_records, tmp_path, capsys):
    for args, message in bad_inputs(run, image_of(data_dir, val_records[0]), tmp_path):
        assert ask.main(args) == 2, args
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and message in captured.err, (message, captured.err)
        assert captured.err.count("\n") == 1, captured.err
    val = str(data_dir / "aokvqa_v1p0_val.json")
    for args, message in [([str(run), "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p.json")],
                           "nope.json: data file not found"),
                          ([str(run), "--data", val, "--out", str(tmp_path)], "--out is a directory")]:
        assert predict.main(args) == 2
        assert message in capsys.readouterr().err
    other_split = tmp_path / "other.json"
    other_split.write_text(json.dumps({"q1": {"multiple_choice": "a", "direct_answer": "a"}}))
    assert predict.main([str(run), "--data", val, "--out", str(other_split)]) == 2
    assert "not in --data" in capsys.readouterr().err
    assert json.loads(other_split.read_text()) == {"q1": {"multiple_choice": "a", "direct_answer": "a"}}
    # The real command line: no traceback.
    proc = subprocess.run([sys.executable, "-m", "multimodal_coconut.ask", str(run), "--image",
                           str(tmp_path / "missing.jpg"), "--question", "What?"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jpg'}: image file not found"]


# ---------------------------------------------------------------------------------------------------------------
# The web demo
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run):
    pytest.importorskip("gradio")
    from multimodal_coconut.app import build, serve
    from multimodal_coconut.inference import load_trained

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build(load_trained(run))
    serve(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_app_answers_through_its_http_api(server, data_dir, val_records, run_predictions):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    record = val_records[0]
    answer, thoughts, heatmap, message, selector = client.predict(
        handle_file(image_of(data_dir, record)), record["question"], ", ".join(record["choices"]), 1,
        "mean over layers", api_name="/ask")
    assert answer == run_predictions[record["question_id"]]["multiple_choice"]
    assert thoughts.count("<li>") == 1 and "thought 1:" in thoughts
    assert "1 continuous thought(s), stage 1" in message
    from PIL import Image

    with Image.open(heatmap) as img:
        assert img.size == (320, 320)  # the 64 px square image, enlarged for display
    # Bad input shows on the page, and the server keeps answering.
    answer, _, heatmap, message, _ = client.predict(
        handle_file(image_of(data_dir, record)), "   ", "", 1, "mean over layers", api_name="/ask")
    assert answer == "" and heatmap is None and "the question is empty" in message
    answer = client.predict(handle_file(image_of(data_dir, record)), record["question"],
                            ", ".join(record["choices"]), 1, "layer 0", api_name="/ask")[0]
    assert answer == run_predictions[record["question_id"]]["multiple_choice"]


def chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name) and shutil.which("chromedriver"):
            return shutil.which(name)
    return None


@pytest.mark.skipif(chromium() is None, reason="Chromium and chromedriver are not installed (CI installs them)")
@pytest.mark.slow
def test_browser_uploads_an_image_asks_and_sees_answer_and_thoughts(server, data_dir, val_records,
                                                                     run_predictions):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='chromium_')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0]
        record = val_records[0]
        upload.send_keys(image_of(data_dir, record))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(record["question"])
        driver.find_element(By.CSS_SELECTOR, "#choices textarea").send_keys(", ".join(record["choices"]))
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
        assert answer == run_predictions[record["question_id"]]["multiple_choice"]
        thoughts = driver.find_element(By.CSS_SELECTOR, "#thoughts").text
        assert "thought 1:" in thoughts
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#heatmap img"))
        # An empty question: the error is on the page, and the page still works.
        box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE, " ")  # typed, so the page sees the change (clear() fires no input event)
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: "the question is empty" in d.find_element(By.CSS_SELECTOR, "#message").text)
    finally:
        driver.quit()


def test_attention_map_follows_the_tile_grid(tiny):
    """A weight on one image token lands in its tile of InternVL's grid (row-major tiles, thumbnail left out), at
    its place inside the tile; the overlay has the image's size."""
    from PIL import Image

    from multimodal_coconut.curriculum import tile_count
    from multimodal_coconut.inference import image_attention_map, overlay_heatmap, tile_grid

    width, height = 128, 64  # two 64 px tiles side by side, plus the thumbnail
    n_tiles = tile_count(width, height, tiny.image_processor)
    assert tile_grid(width, height, tiny.image_processor, n_tiles) == (2, 1) and n_tiles == 3
    per_tile = tiny.tokens_per_tile  # 16: a 4 x 4 grid per tile
    input_ids = torch.tensor([5] * 3 + [tiny.image_token_id] * (n_tiles * per_tile) + [7] * 2)
    weights = torch.zeros(len(input_ids))
    weights[3 + per_tile + 6] = 1.0  # tile 1 (the right one), token 6 = row 1, column 2
    heat = image_attention_map(weights, input_ids, tiny, width, height)
    assert heat.shape == (4, 8)
    assert heat.nonzero().tolist() == [[1, 4 + 2]]
    image = Image.new("RGB", (width, height), "gray")
    assert overlay_heatmap(image, heat).size == (width, height)
