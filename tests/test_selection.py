"""Best-checkpoint selection and early stop: exact answers on hand-made metric histories."""

import pytest

from dreambooth.selection import select_best, should_stop


def h(step, fidelity, prompt_fidelity):
    return {"step": step, "fidelity": fidelity, "prompt_fidelity": prompt_fidelity}


# Fidelity rises then saturates; prompt fidelity holds, then drifts away (overfitting).
HISTORY = [h(0, 0.10, 0.80), h(100, 0.40, 0.79), h(200, 0.60, 0.76), h(300, 0.70, 0.74),
           h(400, 0.72, 0.70), h(500, 0.73, 0.60)]


def test_highest_fidelity_above_the_prompt_floor():
    choice = select_best(HISTORY, floor=0.9)
    # floor = 0.9 x 0.80 = 0.72: steps 100-300 pass; 400 (0.70) and 500 (0.60) drifted.
    assert choice.step == 300
    assert choice.reference == 0.80
    assert choice.floor == pytest.approx(0.72)
    assert choice.candidates == 3
    assert "last step (500)" in choice.why


def test_a_looser_floor_lets_later_steps_in():
    assert select_best(HISTORY, floor=0.85).step == 400  # 0.68 floor: 400 passes, 500 does not
    assert select_best(HISTORY, floor=0.0).step == 500


def test_ties_go_to_higher_prompt_fidelity_then_earlier_step():
    hist = [h(0, 0, 1.0), h(10, 0.5, 0.95), h(20, 0.5, 0.97), h(30, 0.5, 0.97)]
    assert select_best(hist).step == 20


def test_step_zero_is_the_base_model_and_never_chosen():
    assert select_best([h(0, 0.9, 0.9)]) is None

    drifted = select_best([h(0, 0.9, 0.9), h(5, 0.3, 0.1), h(10, 0.2, 0.2)], floor=0.9)
    assert drifted.step == 10 and drifted.candidates == 0  # none passes: the least drift
    assert "drifted least" in drifted.why


def test_only_allowed_steps_are_chosen_but_all_set_the_reference():
    choice = select_best(HISTORY, floor=0.9, allowed={100, 200, 500})
    assert choice.step == 200 and choice.reference == 0.80


def test_early_stop_needs_falling_prompt_fidelity_and_flat_fidelity():
    assert not should_stop(HISTORY[:3], patience=2)  # fidelity still rising fast
    # 300 -> 400 -> 500: prompt fidelity falls twice; fidelity gains 0.03 over those steps.
    assert not should_stop(HISTORY, patience=2, flat=0.02)
    assert should_stop(HISTORY, patience=2, flat=0.05)
    flat_tail = [h(0, 0.5, 0.9), h(1, 0.505, 0.85), h(2, 0.51, 0.80)]
    assert should_stop(flat_tail, patience=2, flat=0.02)
    assert not should_stop(flat_tail, patience=3)  # not enough evaluations yet
    assert not should_stop(flat_tail, patience=0)  # off
    recovering = [h(0, 0.5, 0.9), h(1, 0.5, 0.85), h(2, 0.5, 0.86)]
    assert not should_stop(recovering, patience=2)
