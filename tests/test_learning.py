"""A short training run must learn: plain chain of thought (cot=true, stage 0) on the built-in visual reasoning set.

Settings: 320 train / 32 val generated questions (generate_builtin seed 0), batch 16, lr 1e-3, 5 epochs, evaluation
only after the last epoch, max_new_tokens 40, num_workers 0, tiny model, fp32 CPU, 2 torch threads.
Chance on the 4-way multiple choice is 25%; the test asks for > 50% (twice chance).

Measured on a machine shared with other jobs (load 4-8 on 2 cores), through the same main() call as here:
model seed 0 -> 65.6% MC (21/32), final train loss 0.27; seed 1 -> 65.6% MC (21/32), final train loss 0.22 (485 s wall, 465 s CPU, loaded).
Time: 381 s wall, 363 s user+sys CPU for seed 0 on that loaded machine. The per-epoch rate varied 161-897 tokens/s
with the load; at the fastest observed rate (one epoch plus evaluation in 25.6 s) the run is about 110-130 s of wall
time on an idle 2-core machine, i.e. about twice the 60 s target.
Smaller settings measured and rejected: 256 train, lr 3e-3, 4 epochs -> 21.9% (seed 0) and 28.1% (seed 1): no
learning; the colleague's 48-question run did not learn either.

"""

import json

from multimodal_coconut.cli import main
from official_aokvqa_eval import main_scores as official_scores
from test_train import DEMO, read_metrics

TRAIN, VAL = 320, 32


def test_short_cot_run_learns_above_twice_chance(tmp_path):
    from multimodal_coconut.builtin_data import generate_builtin

    data = tmp_path / "builtin"
    generate_builtin(data, {"train": TRAIN, "val": VAL}, seed=0)
    values = dict(save_path=tmp_path / "save", name="run", train_path=data / "aokvqa_v1p0_train.json",
                  val_path=data / "aokvqa_v1p0_val.json", image_root=data, builtin_train_size=TRAIN,
                  builtin_val_size=VAL, coconut=False, cot=True, seed=0, batch_size_training=16, lr=1e-3,
                  num_epochs=5, eval_every_epoch=False, max_new_tokens=40, num_workers=0)
    assert main([DEMO, *[f"{k}={v}" for k, v in values.items()]]) == 0

    run = tmp_path / "save" / "run"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(m["stage"] == 0 for m in metrics)
    final = metrics[-1]
    assert final["n_mc"] == VAL and final["n_no_answer_marker"] == 0
    assert final["mc_accuracy"] > 50.0, final  # chance is 25%

    records = json.loads((data / "aokvqa_v1p0_val.json").read_text())
    predictions = json.loads((run / f"predictions_val_epoch{final['epoch']}.json").read_text())
    official = official_scores(records, predictions)
    assert final["mc_accuracy"] == official["MC"] and final["da_accuracy"] == official["DA"]
