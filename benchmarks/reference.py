"""Our `dreambooth train` beside diffusers' own DreamBooth script, on one tiny model folder.

    OMP_NUM_THREADS=1 python benchmarks/reference.py --reference PATH/train_dreambooth.py \
        [--rounds 3] [--heads 8,1] [--model FOLDER] [--short 10] [--long 210]

The reference is diffusers' examples/dreambooth/train_dreambooth.py, taken from a diffusers
checkout (run without --reference for the commands that extract it); it is not part of this
repository. It runs unchanged through benchmarks/reference_shim/run_reference.py, which gives it a
four-transform stand-in for torchvision (not installable beside this CPU torch).

Both tools train the same diffusers folder (``--model``, or the project's ``tiny`` model saved with
``save_pretrained``, once per ``--heads``: attention heads in each UNet attention layer) on the
same three 64 px photos: batch 1, lr 5e-6 constant, AdamW, gradient clipping 1.0, full precision,
one thread. Every run is a whole process (start, imports, loading, work, saving the result);
wall seconds and the process's CPU seconds (user + system, from wait4) are taken, and the
machine's load average is logged before each run. Each round runs every scenario for both tools
in turn (who goes first alternates between rounds), so a ratio compares runs made side by side.

    per step         (run of --long steps - run of --short steps) / (long - short), no prior
    class images     the fresh run - the same run again with the class images already made:
                     each tool's default sampler (ours: prior.steps 25, DPM-Solver++; the
                     reference: its pipeline's 50 steps of the folder's scheduler), and ours
                     at 50 steps as well
    fresh run        prior preservation, 10 class images generated, 50 training steps

The table gives min / median / max over the rounds, and the ratio ours / reference pair by pair.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "benchmarks" / "reference_shim" / "run_reference.py"
TOKEN, CLASS = "sks", "toy"
CLASS_IMAGES, FRESH_STEPS = 10, 50
EXTRACT = """\
--reference PATH/train_dreambooth.py is needed: diffusers' examples/dreambooth/train_dreambooth.py.
Take it from a diffusers checkout at the release matching the installed diffusers, e.g.:

    git clone --filter=blob:none --no-checkout https://github.com/huggingface/diffusers
    git -C diffusers show v0.40.0:examples/dreambooth/train_dreambooth.py > train_dreambooth.py

(its check_min_version must not exceed the installed diffusers; main's names the next, unreleased one)."""


@dataclass
class Runs:
    """wall and CPU seconds of one (tool, scenario) per round."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def build_folder(folder: Path, heads: int) -> Path:
    """The project's ``tiny`` model (SD 1.x layout) with ``heads`` attention heads per UNet
    attention layer, saved as a diffusers folder."""
    import dataclasses

    import torch
    from diffusers import UNet2DConditionModel

    from dreambooth.tiny import build_tiny

    model = build_tiny("tiny")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**model.unet.config, "attention_head_dim": heads})
    dataclasses.replace(model, unet=unet).save(folder)
    return folder


def ours(model: Path, photos: Path, out: Path, steps: int, prior: bool, sampler_steps: int | None) -> list[str]:
    sets = ["data.resolution=64", f"train.steps={steps}", f"train.checkpoint_every={steps + 1}"]
    sets += [f"prior.num_images={CLASS_IMAGES}"] if prior else ["prior.enabled=false"]
    if sampler_steps:
        sets.append(f"prior.steps={sampler_steps}")
    return [sys.executable, "-m", "dreambooth", "train", "--model", str(model), "--images", str(photos),
            "--class", CLASS, "--token", TOKEN, "--out", str(out)] + [a for s in sets for a in ("--set", s)]


def reference(script: Path, model: Path, photos: Path, out: Path, steps: int, prior: bool,
              class_dir: Path) -> list[str]:
    args = [sys.executable, str(LAUNCHER), str(script), "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(photos), "--instance_prompt", f"a photo of {TOKEN} {CLASS}",
            "--output_dir", str(out), "--resolution", "64", "--center_crop", "--train_batch_size", "1",
            "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--max_train_steps", str(steps), "--checkpointing_steps", str(steps + 1), "--seed", "0",
            "--mixed_precision", "no"]
    if prior:
        args += ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt",
                 f"a photo of a {CLASS}", "--num_class_images", str(CLASS_IMAGES)]
    return args


def timed(cmd: list[str], log: Path, env: dict) -> tuple[float, float, float]:
    """(wall, CPU seconds, load average before) of one whole process; its output goes to ``log``."""
    load = os.getloadavg()[0]
    with open(log, "w") as f:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\nfailed with exit code {proc.returncode}; its output, {log}, ends:\n"
                 + "\n".join(log.read_text().splitlines()[-25:]))
    return wall, usage.ru_utime + usage.ru_stime, load


def one_round(work: Path, script: Path, model: Path, photos: Path, short: int, long: int,
              order: tuple[str, str], results: dict, loads: list) -> None:
    """Every scenario once for both tools, one after the other in ``order``."""
    for name, steps, prior in (("short", short, False), ("long", long, False), ("fresh", FRESH_STEPS, True),
                               ("cached", FRESH_STEPS, True), ("fresh-50", FRESH_STEPS, True)):
        for tool in order:
            if name == "fresh-50" and tool == "reference":  # its default is 50 steps already
                continue
            run = Path(tempfile.mkdtemp(prefix=f"{tool}-{name}-", dir=work))
            keep = work / f"{tool}-classes"  # the fresh run's class images, for the cached run
            if name in ("fresh", "fresh-50"):
                shutil.rmtree(keep, ignore_errors=True)
            env = {**os.environ, "DREAMBOOTH_CACHE": str(keep)}
            if tool == "ours":
                cmd = ours(model, photos, run / "out", steps, prior, 50 if name == "fresh-50" else None)
            else:
                cmd = reference(script, model, photos, run / "out", steps, prior, keep)
            wall, cpu, load = timed(cmd, run / "log.txt", env)
            results.setdefault((tool, name), Runs()).wall.append(wall)
            results[(tool, name)].cpu.append(cpu)
            loads.append(load)
            print(f"  {tool:9} {name:8} wall {wall:6.2f} s  cpu {cpu:6.2f} s  (load before {load:.2f})", flush=True)
            shutil.rmtree(run)


def figures(results: dict, short: int, long: int) -> list[tuple[str, list[float], list[float]]]:
    """(figure, ours per round, reference per round) for the table: each in wall and CPU seconds."""
    def per_step(tool, kind):
        r = results[(tool, "long")], results[(tool, "short")]
        return [(a - b) / (long - short) for a, b in zip(getattr(r[0], kind), getattr(r[1], kind))]

    def minus(tool, a, b, kind):
        return [x - y for x, y in zip(getattr(results[(tool, a)], kind), getattr(results[(tool, b)], kind))]

    rows = []
    for kind, unit in (("wall", "wall"), ("cpu", "CPU")):
        rows += [
            (f"s per step, {unit}", per_step("ours", kind), per_step("reference", kind)),
            (f"{CLASS_IMAGES} class images, {unit}, defaults (25 vs 50 steps)", minus("ours", "fresh", "cached", kind),
             minus("reference", "fresh", "cached", kind)),
            (f"{CLASS_IMAGES} class images, {unit}, both 50 steps", minus("ours", "fresh-50", "cached", kind),
             minus("reference", "fresh", "cached", kind)),
            (f"fresh run ({CLASS_IMAGES} class images + {FRESH_STEPS} steps), {unit}",
             getattr(results[("ours", "fresh")], kind), getattr(results[("reference", "fresh")], kind)),
            (f"run of {short} steps, no prior (start-up), {unit}", getattr(results[("ours", "short")], kind),
             getattr(results[("reference", "short")], kind)),
        ]
    return rows


def spread(xs: list[float], digits: int) -> str:
    return " / ".join(f"{x:.{digits}f}" for x in (min(xs), statistics.median(xs), max(xs)))


def table(rows: list[tuple[int | str, str, list[float], list[float]]]) -> str:
    lines = ["| heads | figure | ours (min / median / max) | reference (min / median / max) | ours / reference |",
             "| ---: | --- | --- | --- | --- |"]
    for heads, name, o, r in rows:
        digits = 4 if "per step" in name else 2
        lines.append(f"| {heads} | {name} | {spread(o, digits)} | {spread(r, digits)} | "
                     f"{spread([a / b for a, b in zip(o, r)], 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--model", type=Path, help="a diffusers SD 1.x folder (default: the tiny model, built)")
    parser.add_argument("--heads", default="8,1", help="attention heads of the built tiny model, one folder "
                        "each (default 8,1: eight narrow heads, one wide head); ignored with --model")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every run (default 3)")
    parser.add_argument("--short", type=int, default=10, help="training steps of the short run (default 10)")
    parser.add_argument("--long", type=int, default=210, help="training steps of the long run (default 210)")
    args = parser.parse_args()
    if args.reference is None or not args.reference.is_file():
        sys.exit(EXTRACT)
    import diffusers
    import torch

    from dreambooth.world.render import held_out_subjects

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs; reference {args.reference.resolve()}")
    rows, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = held_out_subjects()[7].save_photos(work / "photos", 3)[0].parent  # the demo's subject
        variants = [("-", args.model)] if args.model else [
            (h, build_folder(work / f"tiny-{h}-heads", h)) for h in map(int, args.heads.split(","))]
        for heads, model in variants:
            results: dict = {}
            for r in range(args.rounds):
                print(f"model {model.name}, round {r + 1} of {args.rounds}", flush=True)
                order = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
                one_round(work, args.reference, model, photos, args.short, args.long, order, results, loads)
            rows += [(heads, *f) for f in figures(results, args.short, args.long)]
    print(f"\nload average before the runs: {spread(loads, 2)} (min / median / max)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
