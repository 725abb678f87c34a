"""A scored sweep of inference settings: guidance × steps × scheduler (× LoRA scale).

Every setting draws the same tuning prompts with the same seeds; the evaluator
(``dreambooth.validation``) scores them — DINO/CLIP-T, or the world probes on the world model —
and the settings are ranked by

    score = (fidelity + prompt_fidelity) / 2

(both higher-is-better; on the world model: subject factors matched and background right).
The winner and the run's defaults are then drawn on *held-out* prompts with other seeds, so the
gain is measured on prompts the choice never saw. The winner is saved as
RUN_DIR/sample-settings.json, which `dreambooth sample` uses by default, only if it also beats the
defaults there; otherwise the defaults are saved, with the reason.

Resumable: each setting's images and scores live in RUN_DIR/sweep/<setting>/; a setting whose
scores.json exists is read back instead of drawn again.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import DreamboothError


@dataclass(frozen=True)
class Setting:
    guidance: float
    steps: int
    scheduler: str
    lora_scale: float = 1.0

    @property
    def name(self) -> str:
        return f"g{self.guidance:g}-s{self.steps}-{self.scheduler}-l{self.lora_scale:g}"

    def kwargs(self) -> dict:
        return dict(guidance=self.guidance, steps=self.steps, scheduler=self.scheduler,
                    lora_scale=self.lora_scale)


def grid(guidance, steps, scheduler, lora_scale=(1.0,)) -> list[Setting]:
    """Every combination, in a fixed order."""
    return [Setting(float(g), int(s), sch, float(ls))
            for sch, s, g, ls in itertools.product(scheduler, steps, guidance, lora_scale)]


def score(record: dict) -> float:
    return (record["fidelity"] + record["prompt_fidelity"]) / 2


def rank(results: dict[Setting, dict]) -> list[tuple[Setting, dict]]:
    """Best first: by score, then fewer steps (cheaper), then lower guidance."""
    return sorted(results.items(), key=lambda kv: (-score(kv[1]), kv[0].steps, kv[0].guidance))


def table(ranked: list[tuple[Setting, dict]], extra: tuple[str, ...] = ()) -> str:
    head = "| rank | scheduler | steps | guidance | LoRA scale | score | fidelity | prompt fidelity |"
    head += "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (8 + len(extra))]
    for i, (s, r) in enumerate(ranked, 1):
        lines.append(f"| {i} | {s.scheduler} | {s.steps} | {s.guidance:g} | {s.lora_scale:g} |"
                     + f" {score(r):.4f} | {r['fidelity']:.4f} | {r['prompt_fidelity']:.4f} |"
                     + "".join(f" {r[k]:.4f} |" if isinstance(r.get(k), float) else " – |" for k in extra))
    return "\n".join(lines)


class SweepError(DreamboothError):
    pass


def sweep_plan(cfg, checkpoint: str) -> dict:
    """What a sweep's images and scores depend on besides the setting itself. A sweep folder
    made under another plan cannot be resumed: its images answer a different question."""
    sw, ev = cfg.sweep, cfg.eval
    return {"checkpoint": checkpoint, "prompts": list(sw.prompts), "held_out": list(sw.held_out),
            "num_images": sw.num_images, "held_out_images": sw.held_out_images or sw.num_images,
            "seed": sw.seed, "metrics": ev.metrics, "dino": ev.dino, "clip": ev.clip}


def check_plan(root: Path, plan: dict) -> None:
    """Write ROOT/plan.json, or refuse when ROOT holds a sweep made under another plan."""
    path = root / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in plan.items() if old.get(k) != v]
        if changed:
            raise SweepError(
                f"{root} holds a sweep made with other settings ({'; '.join(changed)}), so its "
                f"images cannot be reused. Sweep with the same settings to resume it, or move "
                f"{root} aside (nothing is deleted for you) to start a new one.")
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1))


def run_sweep(run_dir: str | Path, settings: list[Setting], model, cfg, default: Setting,
              progress: bool = True, checkpoint: str = "final") -> dict:
    """Score every setting on the tuning prompts (reusing finished ones), then the best and the
    default on the held-out prompts; write the table, the grid image and sample-settings.json."""
    from tqdm.auto import tqdm

    run, sw = Path(run_dir), cfg.sweep
    root = run / "sweep"
    plan = sweep_plan(cfg, checkpoint)
    check_plan(root, plan)
    tune = _evaluator(cfg, root, sw.prompts, sw.seed, sw.num_images)
    results, reused = {}, 0
    bar = tqdm(total=len(settings), desc="sweep", unit="setting", disable=not progress)
    for s in settings:
        found = _scores(root, s.name)
        results[s], reused = found or tune(model, s.name, **s.kwargs()), reused + bool(found)
        bar.update(1)
        bar.set_postfix(best=f"{max(score(r) for r in results.values()):.3f}")
    bar.close()
    ranked = rank(results)
    best = ranked[0][0]
    held = _evaluator(cfg, root, sw.held_out, sw.seed + 10_000, plan["held_out_images"])
    check = {label: _scores(root, f"held-out-{s.name}") or held(model, f"held-out-{s.name}", **s.kwargs())
             for label, s in (("best", best), ("default", default))}
    summary = {
        "best": {**best.kwargs(), "score": score(results[best])},
        "default": {**default.kwargs(), "score": score(results[default]) if default in results else None},
        "held_out": {k: {"score": score(v), "fidelity": v["fidelity"],
                         "prompt_fidelity": v["prompt_fidelity"]} for k, v in check.items()},
        "prompts": sw.prompts, "held_out_prompts": sw.held_out, "seeds": sw.num_images,
        "held_out_seeds": plan["held_out_images"], "settings": len(settings), "reused": reused,
        "ranked": [{**s.kwargs(), "score": score(r), "fidelity": r["fidelity"],
                    "prompt_fidelity": r["prompt_fidelity"]} for s, r in ranked],
    }
    return _write_results(run, root, ranked, summary, default, cfg.sweep.seed)


def _evaluator(cfg, root: Path, prompts: list[str], seed: int, n: int):
    """The evaluator of a sweep's prompts and seeds (no class images: settings change only how a
    run is sampled, not the model)."""
    from dreambooth.validation import Evaluator

    c = copy.deepcopy(cfg)
    c.eval.prompts, c.eval.num_images, c.eval.seed, c.eval.class_images = prompts, n, seed, 0
    return Evaluator(c, root)


def _scores(root: Path, name: str) -> dict | None:
    """A finished setting's scores (resume), or None."""
    done = root / "samples" / name / "scores.json"
    return json.loads(done.read_text()) if done.is_file() else None


def _write_results(run: Path, root: Path, ranked: list, summary: dict, default: Setting, seed: int) -> dict:
    """results.md/json and grid.png in RUN_DIR/sweep/; sample-settings.json in the run: the pick
    when it also wins on the held-out prompts (near the top, the ranking on a few tuning prompts
    is often sampling noise, and the run's defaults are then the safer bet), else the defaults."""
    from dreambooth.data import contact_sheet, load_photo

    best = ranked[0][0]
    firsts = [load_photo(root / "samples" / s.name / f"p00-seed{seed}.png").image for s, _ in ranked]
    labels = [f"#{i} {s.scheduler} {s.steps} st g{s.guidance:g}" + (f" l{s.lora_scale:g}" if s.lora_scale != 1 else "")
              + f" {score(r):.2f}" for i, (s, r) in enumerate(ranked, 1)]
    contact_sheet(firsts, labels, cell=96).save(root / "grid.png")
    extra = tuple(k for k in ("subject_fidelity", "dino", "clip_t") if isinstance(ranked[0][1].get(k), float))
    md = table(ranked, extra)
    (root / "results.md").write_text(md + "\n")
    held_best, held_default = summary["held_out"]["best"]["score"], summary["held_out"]["default"]["score"]
    adopted = best if held_best >= held_default else default
    summary["adopted"] = {**adopted.kwargs(), "pick_confirmed": adopted == best}
    (root / "results.json").write_text(json.dumps(summary, indent=1))
    (run / "sample-settings.json").write_text(json.dumps({
        **adopted.kwargs(), "chosen_by": "dreambooth sweep",
        "why": ("the sweep's pick, confirmed on held-out prompts" if adopted == best else
                "the run's defaults: the sweep's pick did not beat them on held-out prompts"),
        "pick": best.kwargs(), "tuning_score": summary["best"]["score"],
        "held_out_score": held_best, "default_held_out_score": held_default}, indent=1))
    summary["table"] = md
    return summary
