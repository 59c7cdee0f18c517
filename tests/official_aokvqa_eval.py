"""Reference for tests: A-OKVQA's official scoring, re-written from `evaluation/eval_predictions.py` of
allenai/aokvqa at commit 42e8c44ff40d13cf272776a3197365f582137772 (the unified-predictions version).

Same steps as upstream: `eval_aokvqa` keys the split by question_id, drops difficult questions only for direct
answer, scores exact string equality (no normalisation), counts a missing prediction as 0 (the script's main passes
strict=False, so neither the coverage nor the valid-choice assertion runs), and returns the mean * 100. The script's
main splits a unified predictions file into its MC and DA parts and skips a setting with no predictions.
(Older upstream versions, and `aokvqa_utils.eval_aokvqa`, dropped difficult questions for *multiple choice* instead;
the fix is in this commit.)
"""


def eval_aokvqa(dataset, preds, multiple_choice=False, strict=True):
    if isinstance(dataset, list):
        dataset = {d["question_id"]: d for d in dataset}
    if multiple_choice is False:
        dataset = {k: v for k, v in dataset.items() if v["difficult_direct_answer"] is False}
    if strict:
        assert set(dataset).issubset(set(preds))
    acc = []
    for q in dataset:
        if q not in preds:
            acc.append(0.0)
            continue
        pred, choices, direct_answers = preds[q], dataset[q]["choices"], dataset[q]["direct_answers"]
        if multiple_choice:
            if strict:
                assert pred in choices, "Prediction must be a valid choice"
            acc.append(float(pred == choices[dataset[q]["correct_choice_idx"]]))
        else:
            num_match = sum([pred == da for da in direct_answers])
            acc.append(min(1.0, num_match / 3.0))
    return sum(acc) / len(acc) * 100


def main_scores(dataset, predictions):
    """What the script's main prints for one predictions file: {"MC": acc, "DA": acc}, a key only if printed."""
    out = {}
    mc = {q: p["multiple_choice"] for q, p in predictions.items() if "multiple_choice" in p}
    if mc != {}:
        out["MC"] = eval_aokvqa(dataset, mc, multiple_choice=True, strict=False)
    da = {q: p["direct_answer"] for q, p in predictions.items() if "direct_answer" in p}
    if da != {}:
        out["DA"] = eval_aokvqa(dataset, da, multiple_choice=False, strict=False)
    return out
