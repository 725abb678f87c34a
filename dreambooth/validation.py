"""Evaluate a model the way training does: fixed validation prompts and seeds, images kept,
scores from the metric sets the run's ``eval`` config asks for.

    evaluator = Evaluator(cfg, run_dir)
    record = evaluator(model, "step-000200")   # -> RUN_DIR/samples/step-000200/{*.png, grid.png, scores.json}

Two metric sets, each turned into the same two numbers that best-checkpoint selection reads
(``dreambooth.selection``):

- clip (the paper's): DINO, CLIP-I, CLIP-T, PRES, DIV from ``dreambooth.evaluate`` with the
  encoders in ``eval.dino`` / ``eval.clip``. fidelity = dino, prompt_fidelity = clip_t.
- world (the shipped world model): the probe reads each image's factors
  (``dreambooth.world.probe.world_scores``): subject_fidelity, factor_match, prompt_fidelity,
  prior_distance (the class prompt now against the base model, same seeds). The subject's
  factors are what the probe reads on the real photos (majority vote). fidelity = factor_match.
  On the world model the world set drives selection even when DINO/CLIP run beside it.

`dreambooth demo`, `eval`, `sweep` and `bench` score with this one evaluator.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dreambooth.config import Config
from dreambooth.errors import ConfigError
from dreambooth.prompts import fill_prompt
from dreambooth.runlog import evaluations, read_metrics

BASE_READINGS = "world-base-class-readings.json"  # the base model's class readings, for prior_distance


def is_world(cfg: Config) -> bool:
    """Whether the run's base model is one of the shipped world models (UNet or FLUX.1)."""
    from dreambooth.models import WORLD_MODELS

    path = cfg.model.path
    return path in WORLD_MODELS or any(Path(path).resolve() == f.resolve() for f in WORLD_MODELS.values())


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
        raise ConfigError("eval.metrics=world needs model.path=world or world-flux (the probes read world scenes)")
    return ["world"] + (["clip"] if have_encoders else [])


def background_of(prompt: str) -> str | None:
    """The world background a prompt names ("... on the beach" -> "beach"), or None."""
    from dreambooth.world.render import BACKGROUND_PHRASES

    return next((bg for bg, phrase in BACKGROUND_PHRASES.items() if prompt.endswith(phrase)), None)


class Evaluator:
    """Generates the validation images with a model and scores them; see the module docstring.
    ``encoders``: DINO and CLIP already loaded (``evaluate.Encoders``), e.g. shared by a bench."""

    def __init__(self, cfg: Config, run_dir: str | Path, real_images: list | None = None,
                 encoders=None):
        from dreambooth.data import read_photos

        self.cfg, self.run_dir, self.encoders = cfg, Path(run_dir), encoders
        self.sets = metric_sets(cfg)
        e, d = cfg.eval, cfg.data
        self.prompts = [fill_prompt(p, d.token, d.class_noun) for p in e.prompts]
        self.seeds = [e.seed + i for i in range(e.num_images)]
        self.class_prompt = fill_prompt(d.class_prompt, d.token, d.class_noun)
        self.class_seeds = [e.seed + 10_000 + i for i in range(e.class_images)]
        if real_images is None:
            real_images = [p.image for p in read_photos(d.images, d.resolution).photos]
        self.real = real_images
        self._probe = self._subject = None

    def settings(self, **override) -> dict:
        """What ``generate`` draws the validation images with: the eval config's, overridden."""
        e = self.cfg.eval
        return {"steps": e.steps, "guidance": e.guidance, "scheduler": e.scheduler,
                "resolution": self.cfg.data.resolution, "batch_size": max(1, self.cfg.prior.batch_size),
                **override}

    def __call__(self, model, name: str, step: int | None = None, progress=None, **settings) -> dict:
        """Generate, save under samples/NAME/, score; return the record for metrics.jsonl.
        ``settings`` (steps, guidance, scheduler, lora_scale) override the eval config's;
        ``progress`` is called with the number of images drawn after each batch."""
        from dreambooth.sample import draw

        started = time.perf_counter()
        kw = self.settings(progress=progress, **settings)
        jobs = [(p, s) for p in self.prompts for s in self.seeds]
        folder, n = self.run_dir / "samples" / name, len(jobs)
        images = draw(model, folder, jobs, [(self.class_prompt, s) for s in self.class_seeds], cell=96, **kw)
        generated = {p: images[i * len(self.seeds):(i + 1) * len(self.seeds)] for i, p in enumerate(self.prompts)}
        scores: dict = {}
        if "world" in self.sets:
            scores.update(self._world_scores(images[:n], images[n:], name, kw))
        if "clip" in self.sets:
            scores.update(self._clip_scores(generated, images[n:]))
        world = "world" in self.sets
        scores["fidelity"] = scores["factor_match"] if world else scores["dino"]
        if not world or scores["prompt_fidelity"] is None:  # no prompt named a world background
            scores["prompt_fidelity"] = scores.get("clip_t", 0.0)
        record = {"step": step, "kind": "eval", "name": name, **{
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()},
            "eval_seconds": round(time.perf_counter() - started, 2)}
        (folder / "scores.json").write_text(json.dumps(record, indent=1))
        return record

    def _clip_scores(self, generated: dict, class_images: list) -> dict:
        from dreambooth.evaluate import Encoders, score_images

        if self.encoders is None:
            self.encoders = Encoders.load(self.cfg.eval.dino, self.cfg.eval.clip)
        return score_images(generated, self.real, self.cfg.data.token, self.encoders.dino,
                            self.encoders.clip, class_generated=class_images or None)

    def _world_scores(self, images: list, class_images: list, name: str, settings: dict) -> dict:
        from dreambooth.world.probe import load_probe, subject_of, world_scores

        if self._probe is None:
            self._probe = load_probe()
            self._subject = subject_of(self._probe.read(self.real))
        backgrounds = [background_of(p) for p in self.prompts for _ in self.seeds]
        now = base = None
        if class_images:
            now = self._probe.read(class_images)
            base_file = self.run_dir / BASE_READINGS
            if not base_file.is_file():  # step 0 is the base model; otherwise draw from it now
                base_file.parent.mkdir(parents=True, exist_ok=True)
                base_file.write_text(json.dumps(now if name == "step-000000" else self._base_readings(settings)))
            base = json.loads(base_file.read_text())
        return world_scores(self._probe.read(images), backgrounds, self._subject, now, base)

    def _base_readings(self, settings: dict) -> list[dict]:
        from dreambooth.models import load_configured
        from dreambooth.sample import generate

        images = generate(load_configured(self.cfg), [self.class_prompt] * len(self.class_seeds),
                          self.class_seeds, **self.settings(progress=settings["progress"]))
        return self._probe.read(images)


def eval_history(metrics_path: Path) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl, in step order."""
    return evaluations(read_metrics(metrics_path))
