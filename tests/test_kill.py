"""The kill tier: SIGKILL training at seeded points, resume, and get an uninterrupted run's bits.

Each test trains the tiny model in a forked child process that SIGKILLs itself at one kill point
(tests/killpoints.py: the N-th write, rename, fsync or removal of a phase's files, the N-th UNet
forward, backward or optimizer step), checks that no half-written checkpoint is left where a
resume would trust it, resumes (killing the resume too, for the chained points) until a resume
finishes, and then compares with one uninterrupted run of the same config, made once per
module: final/ byte for byte (every weight with torch.equal), each checkpoint, metrics.jsonl
(one row per step, in order, the same numbers) and the class-image cache.

N is not written down here: a point names a phase, an event kind, an action and a fraction u
(drawn from SEED, one stratum per point of the phase, so the points spread over the run), and
N = ceil(u * C), where C is how many such events the uninterrupted run made. A change in how
many files a checkpoint has moves N but keeps the point in its phase. The test's id shows u;
a failure names the N it used.

Four points run in the default suite (one per phase); the rest are marked slow and run in CI
(`.ci/run`), or are skipped with -m "not slow".
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from killpoints import Instrument, Kill, in_child
from safetensors.torch import load_file

from painting import paint_subject
from dreambooth.config import build_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="kills forked children and reads /proc/self/fd")

SEED = 20251208  # with it, the default tier's four kills land mid-phase
CONFIGS = {
    # Full fine-tuning of the UNet and the text encoder (which stops training after step 3).
    # Checkpoints at steps 2, 4, 6, keeping 2: the third removes the first, and a resume after
    # a kill in final/ has no step left to train.
    "full": ["train.mode=full", "train.train_text_encoder=true", "train.text_encoder_steps=3",
             "train.steps=6", "train.keep_checkpoints=2"],
    # LoRA with a warmup + cosine schedule (its state must come back too). Checkpoints at steps
    # 2 and 4, keeping 1; a resume after a kill in final/ trains step 5 again.
    "lora": ["train.mode=lora", "train.lr=1e-2", "train.lr_scheduler=cosine", "train.warmup_steps=1",
             "train.steps=5", "train.keep_checkpoints=1"],
}


def make_cfg(photos: Path, name: str):
    # 4 class images drawn 3 at a time: a kill can land inside the second, partial group.
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "model.path=tiny",
        "data.resolution=64", "prior.enabled=true", "prior.num_images=4", "prior.steps=2",
        "prior.batch_size=3", "train.checkpoint_every=2", "train.log_every=1", "eval.every=0",
        *CONFIGS[name]])


# ------------------------------------------------------------------ the kill points


@dataclass(frozen=True)
class Spec:
    phase: str
    kind: str
    action: str
    n: int | None = None  # a fixed N (-1: the last); None: N = ceil(u * count)
    u: float | None = None

    def label(self) -> str:
        where = (f"@{round(self.u * 100)}%" if self.n is None
                 else "#last" if self.n == -1 else f"#{self.n}")
        phase = {"step": "mid-step", "metrics": "mid-step-metrics", "checkpoint": "mid-checkpoint",
                 "final": "mid-final", "run": "run-files"}.get(self.phase, self.phase)
        return f"{phase}-{self.action}-{self.kind}{where}"


@dataclass(frozen=True)
class Point:
    config: str
    kills: tuple[Spec, ...]  # the first kills the fresh run, each next one the resume after it
    cli: bool = False  # the last resume runs `dreambooth train --resume` instead of train()
    xfail: str | None = None  # a known product bug (strict: it fails the tier once fixed)

    @property
    def id(self) -> str:
        return f"{self.config}-" + "+then-".join(s.label() for s in self.kills) + ("-cli" if self.cli else "")


def S(phase: str, kind: str, action: str, n: int | None = None) -> Spec:
    return Spec(phase, kind, action, n)


DEFAULT = [
    Point("lora", (S("class-images", "generate", "before"),)),
    Point("lora", (S("step", "forward", "before"),)),
    Point("full", (S("checkpoint", "write", "torn"),)),
    Point("lora", (S("final", "write", "torn"),)),
]
SLOW = [
    # drawing class images: mid-denoising, a PNG cut short, not yet written, just renamed into place
    Point("full", (S("class-images", "generate", "before"),)),
    Point("lora", (S("class-images", "write", "torn"),)),
    Point("lora", (S("class-images", "write", "before"),)),
    Point("lora", (S("class-images", "replace", "after"),)),
    # mid-step: before the forward, before the backward, around the optimizer step
    Point("full", (S("step", "forward", "before"),)),
    Point("full", (S("step", "backward", "before"),)),
    Point("lora", (S("step", "backward", "before"),)),
    Point("full", (S("step", "optimizer", "after"),), cli=True),
    Point("lora", (S("step", "optimizer", "before"),)),
    # a step's metrics row: logged whole, or cut in the middle
    Point("lora", (S("metrics", "write", "after"),)),
    Point("lora", (S("metrics", "write", "torn"),)),
    # mid-checkpoint: files cut short, flushed, renamed into place, the oldest one being removed
    Point("lora", (S("checkpoint", "write", "torn"),)),
    Point("lora", (S("checkpoint", "write", "after"),)),
    Point("lora", (S("checkpoint", "fsync", "before"),)),
    Point("lora", (S("checkpoint", "replace", "before"),)),
    Point("lora", (S("checkpoint", "replace", "after"),)),
    Point("full", (S("checkpoint", "remove", "partial"),)),
    # mid-final/: a weight file cut short, before a file, before its flush, after the rename
    Point("full", (S("final", "write", "torn"),)),
    Point("lora", (S("final", "write", "before"),)),
    Point("full", (S("final", "fsync", "before"),)),
    Point("full", (S("final", "replace", "after", n=-1),)),  # final/ published, report.html not
    # the run's own files: report.html cut short at the end, config.yaml empty at the start
    Point("lora", (S("run", "write", "torn", n=-1),)),
    Point("lora", (S("run", "write", "empty", n=1),)),  # config.yaml is written atomically
    # killed again while resuming
    Point("full", (S("class-images", "write", "before"), S("checkpoint", "write", "torn"),
                   S("final", "write", "torn"))),
    Point("lora", (S("class-images", "generate", "before"), S("step", "forward", "before"),
                   S("final", "replace", "before"))),
    Point("lora", (S("checkpoint", "replace", "after"), S("metrics", "write", "torn", n=1))),
]


def spread(points: list[Point]) -> list[Point]:
    """Give every drawn kill its fraction u: the k-th stratum of its phase (strata shuffled by
    SEED), a seeded place inside it."""
    rng = random.Random(SEED)
    drawn = defaultdict(list)
    for i, p in enumerate(points):
        for j, s in enumerate(p.kills):
            if s.n is None:
                drawn[s.phase].append((i, j))
    us = {}
    for phase in sorted(drawn):
        where = drawn[phase]
        strata = list(range(len(where)))
        rng.shuffle(strata)
        for (i, j), k in zip(where, strata):
            us[i, j] = min(1.0, max(0.01, round((k + rng.random()) / len(where), 2)))
    return [replace(p, kills=tuple(replace(s, u=us.get((i, j))) for j, s in enumerate(p.kills)))
            for i, p in enumerate(points)]


def aligned(point: Point, j: int) -> bool:
    """Whether the run of ``point``'s j-th kill makes the uninterrupted run's events in that
    kill's phase: the first run does; a resume does only in the phases it replays whole: final/
    always, steps, metrics and checkpoints when every kill before it came before any checkpoint."""
    phase, before = point.kills[j].phase, point.kills[:j]
    return (j == 0 or phase == "final"
            or (phase != "class-images" and all(k.phase == "class-images" for k in before)))


def check_chains(points: list[Point]) -> None:
    """A drawn N must be one the run it kills reaches."""
    for p in points:
        for j, s in enumerate(p.kills):
            assert s.n is not None or aligned(p, j), f"{p.id}: kill {j + 1} needs a fixed n"


POINTS = spread(DEFAULT + SLOW)
check_chains(POINTS)
PARAMS = [pytest.param(p, id=p.id, marks=([pytest.mark.slow] if i >= len(DEFAULT) else [])
                       + ([pytest.mark.xfail(reason=p.xfail, strict=True)] if p.xfail else []))
          for i, p in enumerate(POINTS)]


def resolve(spec: Spec, ref: Reference) -> Kill:
    """The Kill of ``spec`` in a run that makes the uninterrupted run's events."""
    c = ref.counts.get((spec.phase, spec.kind), 0)
    if c == 0:
        pytest.fail(f"kill point {spec.label()} cannot be reached: the uninterrupted run made no "
                    f"{spec.kind} event in phase {spec.phase} (events: {ref.counts})")
    n = (c + 1 + spec.n if spec.n < 0 else spec.n) if spec.n is not None else math.ceil(spec.u * c)
    n = min(c, max(1, n))
    where = [w for phase, kind, w in ref.events if (phase, kind) == (spec.phase, spec.kind)][n - 1]
    return Kill(spec.phase, spec.kind, spec.action, n, where)


# ------------------------------------------------------------------ the uninterrupted runs


@dataclass
class Reference:
    steps: int
    run: Path
    cache: Path
    snapshots: Path  # every checkpoint the run wrote, copied when it appeared
    counts: dict  # (phase, kind) -> how many such events the run made
    events: list  # (phase, kind, path) of each event, in order


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return paint_subject(tmp_path_factory.mktemp("kill-photos"), count=3)[0].parent


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """``reference(name)``: the uninterrupted, instrumented run of config ``name``, made once."""
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            made[name] = uninterrupted(name, photos, tmp_path_factory.mktemp(f"kill-reference-{name}"))
        return made[name]
    return get


def seed_globals() -> None:
    """The same global RNG states in every training process (checkpoints save them)."""
    random.seed(SEED)
    np.random.seed(SEED % 2**32)
    torch.manual_seed(SEED)


def uninterrupted(name: str, photos: Path, root: Path) -> Reference:
    """Run in this process (so imports and first-call costs are paid once, before the forks),
    counting events and copying each complete checkpoint as soon as it appears."""
    from dreambooth.train import train

    run, cache, snapshots = root / "run", root / "cache", root / "snapshots"

    def snapshot():
        for d in sorted((run / "checkpoints").glob("step-*")):
            if (d / "state.json").is_file() and not (snapshots / d.name).exists():
                shutil.copytree(d, snapshots / d.name)

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DREAMBOOTH_CACHE", str(cache))
            seed_globals()
            with Instrument(run, cache, on_event=snapshot) as inst:
                result = train(make_cfg(photos, name), run, progress=False)
            snapshot()
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    steps = make_cfg(photos, name).train.steps
    assert result.step == steps and result.final is not None
    assert [d.name for d in sorted(snapshots.iterdir())] == [f"step-{s:06d}" for s in range(2, steps + 1, 2)]
    return Reference(steps, run, cache, snapshots, dict(inst.counts), list(inst.events))


# ------------------------------------------------------------------ comparisons

def files_under(folder: Path, hidden: bool = True) -> dict[str, Path]:
    return {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*"))
            if f.is_file() and (hidden or not any(part.startswith(".") for part in f.relative_to(folder).parts))}


def assert_same_tree(mine: Path, theirs: Path, what: str) -> None:
    """The same files; safetensors files with equal tensors; every file the same bytes."""
    a, b = files_under(mine), files_under(theirs)
    assert sorted(a) == sorted(b), f"{what}: other files than the uninterrupted run's"
    for name in sorted(a, key=lambda n: (not n.endswith(".safetensors"), n)):
        if name.endswith(".safetensors"):
            x, y = load_file(str(a[name])), load_file(str(b[name]))
            assert x.keys() == y.keys(), f"{what}/{name}: other tensors"
            for k in x:
                assert torch.equal(x[k], y[k]), f"{what}/{name}: tensor {k} differs"
        assert a[name].read_bytes() == b[name].read_bytes(), \
            f"{what}/{name}: other bytes"


def check_checkpoints(run: Path, ref: Reference, partial_ok: bool = False) -> None:
    """Every checkpoint with a state.json (complete, for a resume) is the uninterrupted run's
    checkpoint of that step, file for file; state.json may differ only in its clock. With
    ``partial_ok`` (a kill while the oldest was being removed) one older than the newest may
    have lost files, but what it holds is still the same."""
    complete = sorted(d for d in (run / "checkpoints").glob("step-*") if (d / "state.json").is_file())
    for i, d in enumerate(complete):
        snap = ref.snapshots / d.name
        assert snap.is_dir(), f"{d.name}: the uninterrupted run wrote no such checkpoint"
        mine, theirs = files_under(d), files_under(snap)
        if partial_ok and i < len(complete) - 1:
            assert set(mine) <= set(theirs), f"{d.name}: files the uninterrupted run did not write"
        else:
            assert sorted(mine) == sorted(theirs), f"{d.name} is incomplete, yet has a state.json"
        for name, f in mine.items():
            if name == "state.json":
                assert json.loads(f.read_text())["step"] == json.loads(theirs[name].read_text())["step"]
            else:
                assert f.read_bytes() == theirs[name].read_bytes(), f"{d.name}/{name} differs"


def check_after_kill(run: Path, cache: Path, ref: Reference, kill: Kill) -> None:
    """What a kill may leave under the names that readers trust: only whole things. Complete
    checkpoints (state.json) are the uninterrupted run's; final/, if there, is whole; every
    class image (and latents file) under its own name is the uninterrupted run's."""
    check_checkpoints(run, ref, partial_ok=kill.kind == "remove")
    if (run / "final").exists():
        assert_same_tree(run / "final", ref.run / "final", "final/ after the kill")
    theirs = files_under(ref.cache, hidden=False)
    for name, f in files_under(cache, hidden=False).items():
        assert name in theirs and f.read_bytes() == theirs[name].read_bytes(), f"class-image cache: {name}"


def training_rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]  # a torn row left behind fails here
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "kind" not in r]


# ------------------------------------------------------------------ the tests


def kill_and_resume(point: Point, photos: Path, ref: Reference, tmp_path: Path) -> tuple[Path, Path]:
    """Run ``point``'s kills one after the other (the first in a fresh run, each next one in the
    resume after it), checking what each kill left, then resume until done; (run, cache)."""
    from dreambooth.cli import main
    from dreambooth.train import train

    kills = [resolve(s, ref) for s in point.kills]
    kills = [k if aligned(point, j) else replace(k, where="") for j, k in enumerate(kills)]
    run, cache = tmp_path / "run", tmp_path / "cache"
    if point.kills[0].phase != "class-images":
        shutil.copytree(ref.cache, cache)  # the images are drawn already: the kill is elsewhere

    done: list[str] = []
    for i, kill in enumerate([*kills, None]):
        def go(kill=kill, first=not (run / "config.yaml").is_file()):
            os.environ["DREAMBOOTH_CACHE"] = str(cache)
            seed_globals()
            if kill is not None:
                Instrument(run, cache, kill).install()
            if first:  # or killed before config.yaml was in place: the user runs the command again
                train(make_cfg(photos, point.config), run, progress=False)
            elif point.cli and kill is None:
                assert main(["train", "--resume", str(run), "--no-progress"]) == 0
            else:
                train(None, run, resume=True, progress=False)

        outcome = in_child(go, tmp_path / f"child-{i}.err")
        if kill is None:
            assert outcome.code == 0, f"resume after [{'; '.join(done)}] failed: {outcome}"
            break
        assert outcome.killed, f"kill at {kill} never came ({'resume' if i else 'run'} {outcome})"
        done.append(str(kill))
        check_after_kill(run, cache, ref, kill)
    return run, cache


@pytest.mark.parametrize("point", PARAMS)
def test_killed_run_resumes_bit_exactly(point: Point, photos, reference, tmp_path):
    ref = reference(point.config)
    run, cache = kill_and_resume(point, photos, ref, tmp_path)
    assert_same_tree(run / "final", ref.run / "final", "final")
    assert training_rows(run) == training_rows(ref.run), "metrics.jsonl"
    assert [r["step"] for r in training_rows(run)] == list(range(1, ref.steps + 1))
    check_checkpoints(run, ref)
    assert_same_tree(cache, ref.cache, "class-image cache")
    leftovers = [p.relative_to(tmp_path).as_posix() for p in [*run.rglob("*"), *cache.rglob("*")]
                 if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files of the killed run(s) are still there: {leftovers}"


@pytest.mark.slow
def test_resumed_final_tokenizer_json_is_byte_identical(photos, reference, tmp_path):
    point = Point("full", (Spec("final", "replace", "after", n=-1),))
    run, _ = kill_and_resume(point, photos, reference("full"), tmp_path)
    assert_same_tree(run / "final", reference("full").run / "final", "final")
