"""The experiment runner (--quick: every row and file, finished runs reused), analyze on one of its checkpoints
(intact = the run's own evaluation; decoding and attention shapes) and the curves every run draws."""

import json
from pathlib import Path

import pytest

from multimodal_coconut import analyze, experiments, plot

pytestmark = pytest.mark.slow  # the table trains 7 runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["builtin_train_size=16", "builtin_val_size=4", "batch_size_training=4"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    assert experiments.main(["--out", str(out), "--quick", "--config", str(ROOT / "args/demo.yaml"),
                             "--jobs", "2", "--set", *TINY]) == 0
    return out


def test_quick_table_has_every_row_and_file(table, capsys):
    results = json.loads((table / "results.json").read_text())
    assert list(results["rows"]) == [k for k, _, _ in experiments.ROWS]
    for key, row in results["rows"].items():
        assert row["seeds"] == [0]
        assert 0 <= row["mc_accuracy"] <= 100 and row["train_s"] > 0 and row["inference_s"] > 0
        run = results["runs"][key]["0"]
        # The runner's own answering of the final checkpoint equals the run's last evaluation.
        assert run["mc_accuracy"] == run["train_mc_accuracy"]
        # --quick: 1 epoch of CoT warm-up, then every row but No-CoT resumes at epoch 2 from its checkpoint;
        # No-CoT trains both epochs from the backbone
        assert [m["epoch"] for m in run["curve"]] == ([1, 2] if key == "no_cot" else [2])
        cfg = (table / "runs" / f"{key}_seed0" / "config.yaml").read_text()
        warm = table / "runs" / "cot_warmup_seed0" / "checkpoint_1"
        assert (f"load_model_path: {warm}" in cfg and "resume: 1" in cfg) == (key != "no_cot")
    rows = results["rows"]
    assert rows["no_cot"]["thoughts"] == rows["cot"]["thoughts"] == rows["no_thought"]["thoughts"] == 0
    assert rows["coconut"]["thoughts"] == rows["pause"]["thoughts"] == 1  # stage 1: one thought per question
    assert rows["no_curriculum"]["thoughts"] >= 1  # the last stage from the first epoch
    assert [m["stage"] for m in results["runs"]["no_curriculum"]["0"]["curve"]] == [2]
    assert results["cot_warmup"] == 1 and "starts from 1 epochs of CoT" in results["setting"]
    for name in ("results.md", "results.png"):
        assert (table / name).stat().st_size > 0
    md = (table / "results.md").read_text()
    assert all(name in md for _, name, _ in experiments.ROWS)
    # every run drew its curves at the end of training
    assert all((table / "runs" / f"{k}_seed0" / "curves.png").exists() for k, _, _ in experiments.ROWS)
    # configs: pause as thought is coconut false with no other mode, w/o curriculum is curriculum false
    pause_cfg = (table / "runs/pause_seed0/config.yaml").read_text()
    assert "coconut: false" in pause_cfg and "cot: false" in pause_cfg and "no_cot: false" in pause_cfg

    capsys.readouterr()
    logs = {k: (table / "runs" / f"{k}_seed0" / "train.log").stat().st_mtime for k, _, _ in experiments.ROWS}
    assert experiments.main(["--out", str(table), "--quick", "--config", str(ROOT / "args/demo.yaml"),
                             "--set", *TINY]) == 0
    assert "6 runs, 6 already finished" in capsys.readouterr().out
    assert logs == {k: (table / "runs" / f"{k}_seed0" / "train.log").stat().st_mtime for k, _, _ in experiments.ROWS}


def test_analyze_intact_equals_the_evaluation_and_shapes(table, tmp_path):
    run = table / "runs" / "coconut_seed0"
    result = analyze.analyze(run, table / "data" / "aokvqa_v1p0_val.json", tmp_path / "analysis")
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert set(result["ablations"]) == {"intact", "zero", "noise", "shuffle", "pause"}
    assert result["ablations"]["intact"]["mc_accuracy"] == last["mc_accuracy"]
    assert result["ablations"]["intact"]["da_accuracy"] == last["da_accuracy"]
    # The table's "thoughts shuffled" column is analyze's shuffle ablation, on the rows that feed thoughts only.
    results = json.loads((table / "results.json").read_text())
    assert results["runs"]["coconut"]["0"]["shuffled"] == result["ablations"]["shuffle"]["mc_accuracy"]
    assert results["rows"]["coconut"]["shuffled"] == result["ablations"]["shuffle"]["mc_accuracy"]
    assert results["runs"]["no_curriculum"]["0"]["shuffled"] is not None
    assert all(results["rows"][k]["shuffled"] is None for k in ("no_cot", "cot", "no_thought", "pause"))
    assert "MC acc. (%), thoughts shuffled" in (table / "results.md").read_text()
    assert result["n_samples"] == 4 and result["thoughts_per_question"] == 1

    decoding = result["decoding"]
    assert len(decoding["questions"]) == 4
    for q in decoding["questions"]:
        assert len(q["thoughts"]) == 1 and len(q["thoughts"][0]["top_k"]) == 5
    assert decoding["n_thoughts_with_key_word"] == 4 and 0 <= decoding["key_word_share"] <= 1
    assert 0 <= decoding["key_word_share_other_question"] <= 1  # the test's chance level

    layers = 2  # the tiny preset's language model
    share = result["attention"]["image_share"]
    assert len(share) == 1 and len(share[0]) >= layers and all(0 <= v <= 1 for v in share[0])
    grid = result["attention"]["example"]["map"]
    assert len(grid) == 1 and len(grid[0]) == len(grid[0][0])  # (n_thoughts, side, side)
    assert result["norms"]["thought_mean"] > 0
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["ablations"] == result["ablations"]
    for name in ("analysis.md", "ablations.png", "norms.png", "attention_layers.png", "attention_image.png"):
        assert (tmp_path / "analysis" / name).stat().st_size > 0


def test_plot_command_writes_curves(table, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((table / "runs/coconut_seed0/metrics.jsonl").read_text())
    assert plot.main([str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0
    assert plot.main([str(tmp_path / "missing")]) == 1
