"""Evaluate a model the way training does: fixed validation prompts and seeds, images kept,
scores from the metric sets the run's ``eval`` config asks for.

    evaluator = Evaluator(cfg, run_dir)
    record = evaluator(model, "step-000200")   # -> RUN_DIR/samples/step-000200/{*.png, grid.png, scores.json}

Two metric sets, each turned into the same two numbers that best-checkpoint selection reads
(``dreambooth.selection``):

- clip (the paper's): DINO, CLIP-I, CLIP-T, PRES, DIV from ``dreambooth.evaluate`` with the
  encoders in ``eval.dino`` / ``eval.clip``. fidelity = DINO, prompt_fidelity = CLIP-T.
- world (the shipped world model): the probe reads each image's factors. world_match = mean
  fraction of the subject's shape/color/pattern/mark found; world_subject = fraction with all
  four; world_prompt = fraction whose background is the one the prompt names; world_prior =
  mean total variation between the class prompt's factor distribution now and at step 0 (same
  seeds; 0 = unchanged). The subject's factors are what the probe reads on the real photos
  (majority vote). fidelity = world_match, prompt_fidelity = world_prompt.
  On the world model the world set drives selection even when DINO/CLIP run beside it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dreambooth.config import Config
from dreambooth.errors import ConfigError
from dreambooth.prompts import fill_prompt
from dreambooth.runlog import evaluations, read_metrics

BASE_READINGS = "world-base-class-readings.json"  # step 0's class readings, for world_prior


def is_world(cfg: Config) -> bool:
    from dreambooth.models import WORLD_MODEL

    path = cfg.model.path
    return path == "world" or Path(path).resolve() == WORLD_MODEL.resolve()


def metric_sets(cfg: Config) -> list[str]:
    """Which sets ``cfg.eval.metrics`` selects here, or a ConfigError saying what is missing."""
    e = cfg.eval
    have_encoders = bool(e.dino) and bool(e.clip)
    if e.metrics == "clip" or (e.metrics == "auto" and not is_world(cfg)):
        if not have_encoders:
            raise ConfigError(
                "evaluation needs the DINO and CLIP encoders: set eval.dino and eval.clip to local "
                "folders of facebook/dino-vits16 and openai/clip-vit-base-patch32 (nothing is "
                "downloaded: fetch them once elsewhere with `huggingface-cli download REPO "
                "--local-dir DIR`), or 'tiny' for random encoders (a pipeline check, not a "
                "measurement); or turn evaluation off with eval.every=0")
        return ["clip"]
    if e.metrics == "world" and not is_world(cfg):
        raise ConfigError("eval.metrics=world needs model.path=world (the probes read world scenes)")
    return ["world"] + (["clip"] if have_encoders else [])


def fill(prompt: str, cfg: Config) -> str:
    return fill_prompt(prompt, cfg.data.token, cfg.data.class_noun)


class Evaluator:
    """Generates the validation images with a model and scores them; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: str | Path, real_images: list | None = None):
        from dreambooth.data import read_photos

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.sets = metric_sets(cfg)
        e = cfg.eval
        self.prompts = [fill(p, cfg) for p in e.prompts]
        self.seeds = [e.seed + i for i in range(e.num_images)]
        self.class_prompt = fill(cfg.data.class_prompt, cfg)
        self.class_seeds = [e.seed + 10_000 + i for i in range(e.class_images)]
        if real_images is None:
            real_images = [p.image for p in read_photos(cfg.data.images, cfg.data.resolution).photos]
        self.real = real_images
        self._encoders = self._probe = self._subject = None

    # -------------------------------------------------------------- metric sets

    def _clip_scores(self, generated: dict, class_images: list) -> dict:
        from dreambooth.evaluate import load_clip, load_dino, score_images

        if self._encoders is None:
            self._encoders = (load_dino(self.cfg.eval.dino), load_clip(self.cfg.eval.clip))
        dino, clip = self._encoders
        return score_images(generated, self.real, self.cfg.data.token, dino, clip,
                            class_generated=class_images or None)

    def _world_scores(self, generated: dict, class_images: list, name: str) -> dict:
        from dreambooth.world.probe import IDENTITY, load_probe, tv_report
        from dreambooth.world.render import BACKGROUND_PHRASES

        if self._probe is None:
            self._probe = load_probe()
            real = self._probe.read(self.real)
            self._subject = {k: Counter(r[k] for r in real).most_common(1)[0][0] for k in IDENTITY}
        subject, out = self._subject, {}
        readings = {p: self._probe.read(ims) for p, ims in generated.items()}
        flat = [r for rs in readings.values() for r in rs]
        out["world_match"] = sum(sum(r[k] == subject[k] for k in IDENTITY) / len(IDENTITY)
                                 for r in flat) / len(flat)
        out["world_subject"] = sum(all(r[k] == subject[k] for k in IDENTITY) for r in flat) / len(flat)
        asked = [(r, bg) for p, rs in readings.items() for r in rs
                 for bg, phrase in BACKGROUND_PHRASES.items() if p.endswith(phrase)]
        out["world_prompt"] = (sum(r["background"] == bg for r, bg in asked) / len(asked)
                               if asked else None)
        if class_images:
            now = self._probe.read(class_images)
            base_file = self.run_dir / BASE_READINGS
            base_file.parent.mkdir(parents=True, exist_ok=True)
            if not base_file.is_file():  # step 0 is the base model; otherwise draw from it now
                base = now if name == "step-000000" else self._probe.read(self._generate(
                    self._base_model(), [self.class_prompt] * len(self.class_seeds), self.class_seeds))
                base_file.write_text(json.dumps(base))
            base = json.loads(base_file.read_text())
            out["world_prior"] = tv_report(now, base)["mean"]
        out["world_subject_factors"] = "-".join(subject[k] for k in IDENTITY)
        return out

    def _base_model(self):
        from dreambooth.models import load_configured

        return load_configured(self.cfg.model)

    # -------------------------------------------------------------- generation

    def _generate(self, model, prompts: list[str], seeds: list[int], settings: dict | None = None) -> list:
        from dreambooth.sample import generate

        e, d = self.cfg.eval, self.cfg.data
        kw = {"steps": e.steps, "guidance": e.guidance, "scheduler": e.scheduler,
              "subject_guidance": e.subject_guidance, "subject_below": e.subject_guidance_below,
              **(settings or {})}
        return generate(model, prompts, seeds, resolution=d.resolution, token=d.token,
                        class_noun=d.class_noun, batch_size=max(1, self.cfg.prior.batch_size), **kw)

    def __call__(self, model, name: str, step: int | None = None, **settings) -> dict:
        """Generate, save under samples/NAME/, score; return the record for metrics.jsonl.
        ``settings`` (steps, guidance, scheduler, lora_scale, subject_guidance, subject_below)
        override the eval config's."""
        import time

        from dreambooth.data import contact_sheet

        started = time.perf_counter()
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        images = self._generate(model, [p for p, _ in pairs], [s for _, s in pairs], settings)
        class_images = (self._generate(model, [self.class_prompt] * len(self.class_seeds),
                                       self.class_seeds, settings) if self.class_seeds else [])
        generated: dict[str, list] = {p: [] for p in self.prompts}
        for (p, _), im in zip(pairs, images):
            generated[p].append(im)

        scores: dict = {}
        if "world" in self.sets:
            scores.update(self._world_scores(generated, class_images, name))
        if "clip" in self.sets:
            scores.update(self._clip_scores(generated, class_images))
        if "world" in self.sets:
            scores["fidelity"], scores["prompt_fidelity"] = scores["world_match"], scores["world_prompt"]
            if scores["prompt_fidelity"] is None:  # no prompt named a background
                scores["prompt_fidelity"] = scores.get("clip_t", 0.0)
        else:
            scores["fidelity"], scores["prompt_fidelity"] = scores["dino"], scores["clip_t"]

        folder = self.run_dir / "samples" / name
        folder.mkdir(parents=True, exist_ok=True)
        labels = []
        for i, ((p, s), im) in enumerate(zip(pairs, images)):
            im.save(folder / f"p{self.prompts.index(p):02d}-seed{s}.png")
            labels.append(f"{p} ({s})")
        for s, im in zip(self.class_seeds, class_images):
            im.save(folder / f"class-seed{s}.png")
            labels.append(f"{self.class_prompt} ({s})")
        contact_sheet(images + class_images, labels, cell=96).save(folder / "grid.png")
        record = {"step": step, "kind": "eval", "name": name, **{
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()},
            "eval_seconds": round(time.perf_counter() - started, 2)}
        (folder / "scores.json").write_text(json.dumps(record, indent=1))
        return record


def eval_history(metrics_path: Path) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl, in step order."""
    return evaluations(read_metrics(metrics_path))
