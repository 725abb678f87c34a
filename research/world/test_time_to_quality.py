"""The time-to-quality measure (research/world/time_to_quality.py): the target a reference run
sets, which evaluation first meets it, the summary table and the plot from a recorded file."""

from research.world import time_to_quality as T


def _e(step, wall, subject, factor, prompt, prior=0.1, evals=0.0):
    return {"step": step, "wall_seconds": wall, "train_seconds": wall / 2, "eval_seconds": evals,
            "subject_fidelity": subject, "factor_match": factor, "prompt_fidelity": prompt,
            "prior_distance": prior}


def test_target_is_the_reference_end_with_the_prompt_margin():
    ref = [_e(0, 10, 0.0, 0.3, 1.0), _e(800, 500, 0.25, 0.6, 0.9)]
    assert T.target_of(ref, 0.1) == {"subject_fidelity": 0.25, "factor_match": 0.6, "prompt_fidelity": 0.8}


def test_first_reaching_needs_every_number_and_skips_step_zero():
    target = {"subject_fidelity": 0.25, "factor_match": 0.6, "prompt_fidelity": 0.8}
    curve = [_e(0, 10, 0.5, 0.9, 1.0),           # already there at step 0: the base model, not counted
             _e(50, 60, 0.5, 0.9, 0.75),         # prompt fidelity below the margin
             _e(100, 110, 0.25, 0.55, 1.0),      # factor match short
             _e(150, 160, 0.25, 0.6, 0.8),       # meets all three (equal counts)
             _e(200, 210, 0.9, 0.9, 1.0)]
    assert T.first_reaching(curve, target)["step"] == 150
    assert T.first_reaching(curve[:3], target) is None


def test_summary_table_and_plot_from_recorded_runs(tmp_path):
    ref = {"overrides": T.REFERENCE, "class_image_seconds": 100.0, "loadavg_start": [2.0, 2, 2],
           "loadavg_end": [3.0, 3, 3], "wall_seconds": 600, "stopped": "end",
           "curve": [_e(0, 120, 0.0, 0.3, 1.0, 0.0, 10), _e(800, 600, 0.25, 0.6, 0.9, 0.2, 90)]}
    ours = {**ref, "overrides": T.OURS, "stopped": "target",
            "curve": [_e(0, 90, 0.0, 0.3, 1.0, 0.0, 10), _e(50, 150, 0.0, 0.5, 1.0, 0.1, 20),
                      _e(100, 210, 0.5, 0.8, 1.0, 0.1, 30)]}
    ref["target"] = T.target_of(ref["curve"], 0.1)
    results = {"prompt_margin": 0.1, "runs": {"reference/s": ref, "preset/s": ours}}
    rows = T.summary(results, ["s"])
    assert [(r["run"], r["reached"]["reference"]) for r in rows] == [
        ("reference", {"step": 800, "wall": 600, "wall_no_eval": 510}),
        ("preset", {"step": 100, "wall": 210, "wall_no_eval": 180})]
    assert all("preset" not in r["reached"] for r in rows)  # the preset run set no target here
    table = T.markdown(rows)
    assert table.count("\n") == 4 and "| preset | s | 100: 210 (180) | — |" in table
    T.plot(results, ["s"], ["reference", "preset"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
