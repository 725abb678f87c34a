"""Which evaluated step to keep, and when to stop: pure functions of the evaluation history.

Each evaluation is a record with ``step``, ``fidelity`` (how much the images look like the
subject: DINO, or the world probe's factor match) and ``prompt_fidelity`` (how well they follow
the prompt: CLIP-T, or the world probe's background match). Step 0 is the base model.

The rule (``select_best``):
  1. the reference is the highest prompt fidelity of any evaluation, step 0 included;
  2. candidates are the evaluations after step 0 whose prompt fidelity is at least
     ``floor`` × the reference (the prompt is still followed: no language drift);
  3. among them the highest fidelity wins; ties go to the higher prompt fidelity, then to the
     earlier step (fewer steps, less drift). When none passes, the step with the highest
     prompt fidelity is kept (the least drift).

Early stop (``should_stop``): the last ``patience`` evaluations each lowered prompt fidelity
while fidelity rose by less than ``flat`` over the same span: training now trades the prompt
for nothing, the paper's overfitting / language-drift signature.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    step: int
    fidelity: float
    prompt_fidelity: float
    reference: float  # the best prompt fidelity seen
    floor: float  # the prompt fidelity a candidate needed
    candidates: int  # how many choosable evaluations passed the floor
    why: str


def select_best(history: list[dict], floor: float = 0.9, allowed: set[int] | None = None
                ) -> Choice | None:
    """The evaluation to keep (see the module docstring); None when nothing after step 0 was
    evaluated. ``allowed``: the steps that may be chosen (those whose weights still exist);
    every evaluation still counts for the reference."""
    evaluated = [h for h in history if h["step"] > 0]
    after = [h for h in evaluated if allowed is None or h["step"] in allowed]
    if not after:
        return None
    reference = max(h["prompt_fidelity"] for h in history)
    need = floor * reference if reference > 0 else reference
    passing = [h for h in after if h["prompt_fidelity"] >= need - 1e-12]
    n_passing = sum(h["prompt_fidelity"] >= need - 1e-12 for h in evaluated)
    last = max(after, key=lambda h: h["step"])
    if passing:
        best = max(passing, key=lambda h: (h["fidelity"], h["prompt_fidelity"], -h["step"]))
        why = (f"highest fidelity ({best['fidelity']:.4f}) among the {n_passing} of {len(evaluated)} "
               f"evaluations whose prompt fidelity is at least {floor:g} x {reference:.4f} = {need:.4f}")
        if len(passing) < n_passing:
            why += f" (of those, the {len(passing)} whose checkpoints were kept)"
    else:  # every step drifted below the floor: keep the one that drifted least
        best = max(after, key=lambda h: (h["prompt_fidelity"], h["fidelity"], -h["step"]))
        why = (f"no evaluation kept prompt fidelity above {floor:g} x {reference:.4f} = {need:.4f}; "
               f"step {best['step']} drifted least ({best['prompt_fidelity']:.4f})")
    if best["step"] != last["step"]:
        why += (f"; the last step ({last['step']}) had fidelity {last['fidelity']:.4f} and prompt "
                f"fidelity {last['prompt_fidelity']:.4f}")
    return Choice(step=best["step"], fidelity=best["fidelity"],
                  prompt_fidelity=best["prompt_fidelity"], reference=reference, floor=need,
                  candidates=len(passing), why=why)


def should_stop(history: list[dict], patience: int, flat: float = 0.02) -> bool:
    """True when the last ``patience`` evaluations each lowered prompt fidelity and fidelity
    gained less than ``flat`` across them (needs patience + 1 evaluations)."""
    if patience <= 0 or len(history) < patience + 1:
        return False
    window = sorted(history, key=lambda h: h["step"])[-(patience + 1):]
    falling = all(b["prompt_fidelity"] < a["prompt_fidelity"] for a, b in zip(window, window[1:]))
    gained = max(h["fidelity"] for h in window[1:]) - window[0]["fidelity"]
    return falling and gained < flat
