"""Score DreamBooth on the world model with the probes (generation + reading + metrics): the
benchmarks' scorer, with more detail than the package's evaluator (``dreambooth.validation``, whose
world set is the same subject fidelity, prompt fidelity and prior distance): diversity, per-factor
matches, the base model's accuracy, the VAE ceiling, subject guidance.

For a subject taught with identifier TOKEN and class noun SHAPE:
  subject fidelity   fraction of "a photo of TOKEN SHAPE <context>" images whose shape, color,
                     pattern and mark are the subject's
  prompt fidelity    fraction of those whose background is the one the prompt asked for
  prior distance     total variation between the factor distributions that the class prompt
                     "a photo of a SHAPE" draws before and after fine-tuning (per factor, mean)
  diversity          pose spread and background entropy of the subject prompt "a photo of TOKEN SHAPE"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dreambooth.models import BaseModel
from dreambooth.world.render import BACKGROUND_PHRASES, BACKGROUNDS, Subject


def solver(model: BaseModel) -> str:
    """The sampler of every score: DPM-Solver++ for the UNet, flow matching's Euler for FLUX.1."""
    from dreambooth.base_model import FLOW_KINDS

    return "euler" if model.kind in FLOW_KINDS else "dpmpp"


def subject_prompts(token: str, shape: str) -> list[tuple[str, str | None]]:
    """(prompt, background asked for): the plain subject prompt and one per background."""
    plain = [(f"a photo of {token} {shape}", None)]
    return plain + [(f"a photo of {token} {shape} {BACKGROUND_PHRASES[b]}", b) for b in BACKGROUNDS]


def class_samples(model: BaseModel, shape: str, n: int, probe, steps: int = 25,
                  guidance: float = 5.0, seed: int = 10_000, batch: int = 32,
                  progress: Callable[[int], None] | None = None) -> tuple[list, list]:
    """(readings, images) of the class prompt "a photo of a SHAPE" for seeds seed..seed+n-1.
    The same seeds before and after fine-tuning pair the samples: an unchanged model reads the
    same, so the distance measures the change rather than sampling noise."""
    from dreambooth.sample import generate

    images = generate(model, [f"a photo of a {shape}"] * n, [seed + i for i in range(n)],
                      steps=steps, guidance=guidance, batch_size=batch, progress=progress, scheduler=solver(model))
    return probe.read(images), images


@dataclass
class SubjectScores:
    """What the subject prompts' images read: fidelity, prompt fidelity, diversity."""
    subject_fidelity: float
    prompt_fidelity: float
    diversity: dict[str, float]
    factor_match: dict[str, float] = field(default_factory=dict)  # per identity factor
    images: list = field(default_factory=list, repr=False)  # (prompt, seed, PIL image)

    def summary(self) -> dict:
        return {"subject_fidelity": round(self.subject_fidelity, 4),
                "prompt_fidelity": round(self.prompt_fidelity, 4),
                "diversity": {k: round(v, 4) for k, v in self.diversity.items()},
                "factor_match": {k: round(v, 4) for k, v in self.factor_match.items()}}


@dataclass
class WorldScores(SubjectScores):
    """The subject's scores and the class prompt's drift."""
    prior_distance: dict[str, float] = field(default_factory=dict)
    class_images: list = field(default_factory=list, repr=False)  # class prompt, after tuning
    class_readings: list = field(default_factory=list, repr=False)  # their probe readings

    def summary(self) -> dict:
        return {**super().summary(),
                "prior_distance": {k: round(v, 4) for k, v in self.prior_distance.items()}}


def generate(model, prompts, seeds, *, subject_guidance: float = 0.0, subject_below: int = 400,
             token: str = "", class_noun: str = "", **kw) -> list:
    """``dreambooth.sample.generate``, or with subject guidance h > 0 research/subject_guidance's."""
    if subject_guidance:
        from research.subject_guidance.guidance import generate_guided

        return generate_guided(model, prompts, seeds, subject_guidance=subject_guidance,
                               subject_below=subject_below, token=token, class_noun=class_noun, **kw)
    from dreambooth.sample import generate as plain

    return plain(model, prompts, seeds, scheduler=solver(model), **kw)


def subject_scores(tuned: BaseModel, subject: Subject, token: str, *, seeds: int = 4, steps: int = 25, guidance: float = 5.0, probe=None,
                   subject_guidance: float = 0.0, subject_below: int = 400,
                   progress: Callable[[int], None] | None = None) -> SubjectScores:
    """Sample the subject prompts (``seeds`` seeds each, subject guidance when asked) and read them: subject fidelity, prompt fidelity, diversity
    of the plain prompt. ``progress`` is called with the number of images drawn after each batch."""
    from dreambooth.world.probe import load_probe
    from research.world.metrics import diversity, factor_match, prompt_fidelity, subject_fidelity

    probe = probe or load_probe()
    pairs = [(p, bg, s) for p, bg in subject_prompts(token, subject.shape) for s in range(seeds)]
    images = generate(tuned, [p for p, _, _ in pairs], [s for _, _, s in pairs], steps=steps,
                      guidance=guidance, batch_size=32, subject_guidance=subject_guidance, subject_below=subject_below, token=token,
                      class_noun=subject.shape, progress=progress)
    readings = probe.read(images)
    in_context = [(r, bg) for r, (_, bg, _) in zip(readings, pairs) if bg is not None]
    return SubjectScores(
        subject_fidelity=subject_fidelity(readings, subject),
        prompt_fidelity=prompt_fidelity([r for r, _ in in_context], [b for _, b in in_context]),
        diversity=diversity([r for r, (_, bg, _) in zip(readings, pairs) if bg is None]),
        factor_match=factor_match(readings, subject),
        images=[(p, s, im) for (p, _, s), im in zip(pairs, images)])


def score_world(tuned: BaseModel, subject: Subject, token: str, *, base: BaseModel | None = None,
                base_readings: list[dict] | None = None, seeds: int = 4, n_class: int = 200,
                steps: int = 25, guidance: float = 5.0, probe=None, subject_guidance: float = 0.0, subject_below: int = 400,
                progress: Callable[[int], None] | None = None) -> WorldScores:
    """Generate and score; the base model's class readings may be passed in to reuse them.
    ``subject_guidance`` (``generate``'s) acts on the subject prompts only: the class prompt holds no
    identifier, so its samples are the same with or without it.
    ``progress`` is called with the number of images drawn after each batch: seeds x 7 subject
    images, n_class class images of the tuned model, and n_class of the base unless passed in."""
    from dreambooth.world.probe import load_probe
    from research.world.metrics import tv_report

    probe = probe or load_probe()
    s = subject_scores(tuned, subject, token, seeds=seeds, steps=steps,
                       guidance=guidance, probe=probe, subject_guidance=subject_guidance,
                       subject_below=subject_below, progress=progress)
    if base_readings is None:
        base_readings, _ = class_samples(base, subject.shape, n_class, probe, steps, guidance,
                                         progress=progress)
    after, after_images = class_samples(tuned, subject.shape, n_class, probe, steps, guidance,
                                        progress=progress)
    return WorldScores(**vars(s), prior_distance=tv_report(after, base_readings),  # over probe.DISTRIBUTION
                       class_images=after_images, class_readings=after)


def base_accuracy(model: BaseModel, n: int = 200, seed: int = 7, steps: int = 25,
                  guidance: float = 5.0, probe=None, marks: bool = False) -> dict[str, float]:
    """How often the model draws what a full caption asks for: per factor (shape, color,
    background, pattern) the fraction of images whose probe reading matches the caption, and
    "all" for every factor at once. Captions name every factor (no held-out combination).

    ``marks=True`` also gives each scene a mark drawn uniformly from "none" and the four marks,
    named in its caption ("... with a cross ..."), and adds "mark" (the named mark drawn, as a
    fraction of the captions that name one), "unasked_mark" (any mark drawn where none is named)
    and their counts: how well the base model knows marks by name."""
    import random

    from dreambooth.sample import generate
    from dreambooth.world.probe import DISTRIBUTION, load_probe
    from dreambooth.world.render import MARKS, caption, is_held_out, random_scene

    probe = probe or load_probe()
    rng = random.Random(f"{'mark' if marks else 'base'}-accuracy:{seed}")
    scenes = []
    while len(scenes) < n:
        scene = random_scene(rng, mark=rng.choice(MARKS) if marks else "none")
        if not is_held_out(scene):
            scenes.append(scene)
    images = generate(model, [caption(s) for s in scenes], [seed + i for i in range(n)],
                      steps=steps, guidance=guidance, batch_size=32, scheduler=solver(model))
    readings = probe.read(images)
    factors = DISTRIBUTION
    out = {f: sum(r[f] == getattr(s, f) for r, s in zip(readings, scenes)) / n for f in factors}
    out["all"] = sum(all(r[f] == getattr(s, f) for f in factors) for r, s in zip(readings, scenes)) / n
    if marks:
        named = [(r, s) for r, s in zip(readings, scenes) if s.mark != "none"]
        unnamed = [r for r, s in zip(readings, scenes) if s.mark == "none"]
        out["named"], out["named_right"] = len(named), sum(r["mark"] == s.mark for r, s in named)
        out["unnamed"], out["unasked"] = len(unnamed), sum(r["mark"] != "none" for r in unnamed)
        out["mark"] = out["named_right"] / max(1, out["named"])
        out["unasked_mark"] = out["unasked"] / max(1, out["unnamed"])
    return out


def vae_ceiling(model: BaseModel, subject: Subject, n: int = 20, probe=None) -> float:
    """Subject fidelity of the subject's own photos after a VAE round trip (encode, decode):
    no generated image can show what the VAE cannot reconstruct, so this bounds subject fidelity."""
    import torch
    from PIL import Image

    from dreambooth.data import to_tensor
    from dreambooth.models import encode_latents
    from dreambooth.world.probe import load_probe
    from research.world.metrics import subject_fidelity

    probe = probe or load_probe()
    photos = [im for im, _ in subject.photos(n, seed=1)]
    with torch.no_grad():
        z = encode_latents(model, torch.stack([to_tensor(im) for im in photos]))
        x = model.vae.decode(z / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    images = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
              for im in x]
    return subject_fidelity(probe.read(images), subject)
