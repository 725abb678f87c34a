"""Two processes of batch 1 train like one process of batch 2.

`train()` draws every random choice for global sample k from a generator seeded by (seed, k), and
process `rank` of `world` takes k = (step * world + rank) * b + j. So `accelerate launch` with two
CPU processes (gloo) at train.batch_size=1 sees the same photos, class images, timesteps and noise
as one process at train.batch_size=2, and DDP's gradient average equals the batch-2 mean. The
results are not bit-identical: the float sums run in a different order.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from painting import paint_subject
from dreambooth.config import build_config
from dreambooth.train import train

STEPS = 3
# Adam divides by sqrt(v): with it, 1e-7 rounding differences in a near-zero gradient become
# lr-sized updates (measured with real Adam, lr=1e-3, full mode: max weight diff 2.2e-4 after
# 3 steps). A huge eps makes the update lr/eps * gradient = plain SGD with step 1, so the weight
# difference measures the gradients' difference. weight_decay=0: lr=1e3 would scale it too.
SETS = ["data.class_noun=toy", "data.token=waj", "prior.enabled=true", "prior.num_images=4",
        "prior.steps=2", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}",
        "train.adam_eps=1e3", "train.lr=1e3", "train.weight_decay=0", "train.seed=3"]
# Measured on the 2-core CPU box (torch 2.13.0): max |weight diff| 1.2e-7 (full), 3.0e-8 (LoRA);
# loss diff <= 2.4e-7 (0 at step 1). A run that trains on half the samples (1 process, batch 1)
# differs by 3e-2 (full) / 1.7e-2 (LoRA) in weights and 0.1-0.4 in loss. The bounds sit ~100x
# above the rounding noise and ~1000x below a wrong-data run.
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5
# Why a launch could not start two processes (then the test skips rather than fails).
CANNOT_START = ("address already in use", "eaddrinuse", "distnetworkerror", "failed to bind",
                "rendezvous", "errno 98")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Photos and one class-image cache for every run in this module."""
    root = tmp_path_factory.mktemp("distributed")
    photos = paint_subject(root / "photos", count=3)[0].parent
    return photos, root / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(run_dir, sets, cache, home):
    """`accelerate launch` 2 gloo CPU processes of `python -m dreambooth train`; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DREAMBOOTH_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}  # HF_HOME: no user accelerate config
    flags = [x for s in sets for x in ("--set", s)]
    output = ""
    for _ in range(2):  # a second free port if the first was taken in between
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "dreambooth", "train", "--preset", "tiny", "--out", str(run_dir),
               "--no-progress", *flags]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers it started
            output, _ = proc.communicate()
            pytest.fail(f"2-process training did not finish in 240 s (deadlock?):\n{output[-4000:]}")
        if proc.returncode == 0:
            assert output.count(f"done: step {STEPS}") == 2, output[-4000:]  # both ranks ran
            return output
        if not any(s in output.lower() for s in CANNOT_START):
            pytest.fail(f"2-process training failed (exit {proc.returncode}):\n{output[-4000:]}")
    pytest.skip(f"accelerate could not start 2 processes:\n{output[-1000:]}")


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SDXL_ENCODERS = ["model.path=tiny-sdxl", "train.train_text_encoder=true"]
FLUX = ["model.path=tiny-flux1", "prior.scheduler=euler", "sample.scheduler=euler", "eval.scheduler=euler",
        "sweep.scheduler=[euler]"]


@pytest.mark.parametrize("mode, accum, extra", [("full", 1, []), ("lora", 1, []), ("full", 2, []),
                                                ("full", 1, SDXL_ENCODERS), ("lora", 1, FLUX)],
                         ids=["full", "lora", "full-accumulating", "full-sdxl-text-encoders", "lora-flux1"])
def test_two_processes_of_batch_1_equal_one_of_batch_2(shared, tmp_path, monkeypatch, mode, accum, extra):
    """With accumulation the processes skip the all-reduce (no_sync) on all but the last
    micro-batch of a step; the result must still equal one process. SDXL with its text encoders
    trained has parameters that get no gradient (it conditions on each encoder's penultimate
    layer): DDP must be told, or the second step stops with a reduction error."""
    photos, cache = shared
    sets = [f"data.images={photos}", f"train.mode={mode}", f"train.grad_accum={accum}", *SETS, *extra]
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(cache))
    # The single process runs first and fills the class-image cache, so the two processes only
    # read it (the test is about training, not about two processes generating at once).
    train(build_config("tiny", overrides=[*sets, "train.batch_size=2"]), tmp_path / "one",
          progress=False)
    launch_two_processes(tmp_path / "two", [*sets, "train.batch_size=1"], cache, tmp_path / "hf")

    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys() and one
    if mode == "lora":
        assert all("lora" in k for k in one)
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = distance_from_start(two, mode, "tiny-sdxl" if extra else "tiny")
    assert diff < WEIGHT_TOL, f"max |weight diff| {diff:.3g} (measured ~1e-7)"
    assert moved > 1000 * WEIGHT_TOL, f"training barely moved the weights ({moved:.3g})"

    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(1, STEPS + 1))
    for a, b in zip(m1, m2):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert a[key] == pytest.approx(b[key], abs=LOSS_TOL), (a["step"], key, a[key], b[key])
    assert all(m["prior_loss"] > 0 for m in m2)


def distance_from_start(weights, mode, model="tiny"):
    """How far training moved the weights: from the tiny UNet (full), from zero for LoRA's B
    matrices (peft starts them at zero so that the adapter starts as a no-op)."""
    if mode == "lora":
        return max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k)
    from dreambooth.models import build_tiny

    start = build_tiny(model).unet.state_dict()
    return max((w - start[k.removeprefix("unet.")]).abs().max().item() for k, w in weights.items()
               if k.startswith("unet."))
