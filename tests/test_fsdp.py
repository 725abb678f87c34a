"""train.shard=fsdp: two processes holding half of the denoiser each train like one process of batch 2.

Launched as the README says, with configs/accelerate/fsdp.yaml, through tests/fsdp_cpu.py: accelerate
1.16 turns FSDP on for accelerator devices only (AcceleratorState sets DistributedType.FSDP in its
MULTI_GPU/NPU/... branch, and drops the plugin on MULTI_CPU), while PyTorch's fully_shard and
accelerate's FSDP2 path run on CPU over gloo; that launcher lifts the one gate and runs the CLI.
The batch split is test_distributed.py's (sample k of a step is the same on any split), so the
sharded run must end at one process's weights up to float rounding. Then: the checkpoint resumes
bit-exactly, it is in the unsharded format (names and numbered optimizer state), and final/ holds
the whole model.
"""

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import CANNOT_START, FLUX, SETS, STEPS, free_port, metrics, shared  # noqa: F401
from dreambooth.checkpoint import load_checkpoint, load_checkpoint_model, step_dir_name
from dreambooth.config import build_config
from dreambooth.errors import ConfigError
from dreambooth.plan import on_gpus, predict
from dreambooth.shard import unit_bytes
from dreambooth.tiny import build_tiny
from dreambooth.train import train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"  # the README's file
# Measured on the 2-core CPU box (torch 2.13.0, accelerate 1.16): max |weight diff| against one
# process at batch 2 after 3 steps 1.2e-7 (tiny UNet) and 6.0e-8 (tiny FLUX.1), as DDP's in
# test_distributed.py; losses within 2e-7 (tiny UNet). The bounds are test_distributed.py's: ~100x
# the rounding, ~1000x below a run on other samples. AdamW's moments: max |diff| 7.4e-7 (UNet) and
# 2.4e-7 (FLUX.1) of their largest value (a parameter whose gradient is rounding noise, such as an
# attention key's bias, differs by 100% of its own size, so each is not compared on its own scale).
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5
STATE_TOL = 1e-5  # AdamW's moments, relative to their largest value
SHARD = ["train.shard=fsdp", "train.batch_size=1", "train.keep_checkpoints=0", "train.checkpoint_every=1"]


def launch_sharded(run_dir, sets, cache, home, resume=False):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` of 2 CPU processes; their output."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DREAMBOOTH_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(home), "PYTHONPATH": str(ROOT / "tests")}
    args = ["--resume", str(run_dir)] if resume else ["--preset", "tiny", "--out", str(run_dir),
                                                       *[x for s in sets for x in ("--set", s)]]
    output = ""
    for _ in range(2):  # a second free port if the first was taken in between
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "--num_processes", "2", "--main_process_port", str(free_port()),
               str(ROOT / "tests" / "fsdp_cpu.py"), "train", "--no-progress", *args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"sharded training did not finish in 240 s (deadlock?):\n{output[-4000:]}")
        if proc.returncode == 0:
            assert output.count(f"done: step {STEPS}") == 2, output[-4000:]
            return output
        if not any(s in output.lower() for s in CANNOT_START):
            pytest.fail(f"sharded training failed (exit {proc.returncode}):\n{output[-4000:]}")
    pytest.skip(f"accelerate could not start 2 processes:\n{output[-1000:]}")


def checkpoint(run_dir, step=STEPS):
    return run_dir / "checkpoints" / step_dir_name(step)


@pytest.mark.parametrize("extra", [[], FLUX], ids=["tiny-unet", "tiny-flux1"])
def test_two_sharded_processes_equal_one_of_batch_2_and_resume(shared, tmp_path, monkeypatch, extra):
    photos, cache = shared
    sets = [f"data.images={photos}", "train.mode=full", *SETS, *extra]
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(cache))
    train(build_config("tiny", overrides=[*sets, "train.batch_size=2"]), tmp_path / "one", progress=False)
    out = launch_sharded(tmp_path / "two", [*sets, *SHARD], cache, tmp_path / "hf")

    units, held, total = map(int, re.search(r"in (\d+) FSDP units .* holds (\d+) of its (\d+) weights", out).groups())
    assert total / 2 <= held < 0.6 * total, out[-2000:]  # sharded: half, and a little for uneven rows
    model = build_tiny("tiny-flux1" if extra else "tiny")
    assert units == len(unit_bytes(model.unet if model.unet is not None else model.transformer))  # the plan's units

    one, two = (load_file(str(checkpoint(tmp_path / r) / "trainable.safetensors")) for r in ("one", "two"))
    assert one.keys() == two.keys() and one  # the unsharded names, so exports work as usual
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"max |weight diff| sharded vs one process: {diff:.3g}")
    assert diff < WEIGHT_TOL, f"max |weight diff| {diff:.3g} (measured ~1e-7)"
    denoiser = "transformer" if extra else "unet"
    start = getattr(build_tiny("tiny-flux1" if extra else "tiny"), denoiser).state_dict()
    moved = max((w - start[k.removeprefix(f"{denoiser}.")]).abs().max().item() for k, w in two.items())
    assert moved > 1000 * WEIGHT_TOL, f"training barely moved the weights ({moved:.3g})"
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOL), (a, b)

    # the optimizer state in the unsharded format: Optimizer.state_dict's numbering, same tensors
    s1, s2 = (load_checkpoint(checkpoint(tmp_path / r))["optimizer"] for r in ("one", "two"))
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for key in ("exp_avg", "exp_avg_sq"):
        scale = max(state[key].abs().max().item() for state in s1["state"].values())
        diff = max((state[key] - s2["state"][i][key]).abs().max().item() for i, state in s1["state"].items())
        print(f"optimizer {key}: max |diff| / max |value| {diff / scale:.3g}")
        assert diff < STATE_TOL * scale, (key, diff, scale)

    # final/ holds the whole denoiser (gathered), equal to the last checkpoint
    final = {**load_file(str(next((tmp_path / "two" / "final" / denoiser).glob("*.safetensors"))))}
    assert all(torch.equal(final[k.removeprefix(f"{denoiser}.")], w) for k, w in two.items())

    # an unsharded process loads the checkpoint as any (sample/export --checkpoint step-N)
    loaded, _, _ = load_checkpoint_model(tmp_path / "two", step_dir_name(STEPS))
    state = getattr(loaded, denoiser).state_dict()
    assert all(torch.equal(state[k.removeprefix(f"{denoiser}.")], w) for k, w in two.items())

    # resume from step 2 on two sharded processes: step 3 is taken again, bit-exactly
    run = tmp_path / "two"
    shutil.move(checkpoint(run), tmp_path / "step-3")
    shutil.rmtree(run / "final")
    launch_sharded(run, [], cache, tmp_path / "hf", resume=True)
    again = load_file(str(checkpoint(run) / "trainable.safetensors"))
    assert all(torch.equal(again[k], two[k]) for k in two)
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("item", ["train.mode=lora", "train.train_text_encoder=true", "eval.every=5",
                                  "prior.null_space=0.5"])
def test_sharding_refuses_what_it_cannot_shard(item):
    with pytest.raises(ConfigError, match="train.shard=fsdp"):
        build_config("tiny", overrides=["train.shard=fsdp", item])


def test_one_process_with_shard_on_trains_unsharded(shared, tmp_path, monkeypatch, capsys):
    """One process has nothing to shard: the run is an ordinary one (the same weights)."""
    photos, cache = shared
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(cache))
    sets = [f"data.images={photos}", *SETS, "train.steps=1", "train.checkpoint_every=1"]
    train(build_config("tiny", overrides=[*sets, "train.shard=fsdp"]), tmp_path / "a", progress=False)
    assert "nothing to shard" in capsys.readouterr().out
    train(build_config("tiny", overrides=sets), tmp_path / "b", progress=False)
    a, b = (load_file(str(checkpoint(tmp_path / r, 1) / "trainable.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_cpu_processes_without_the_gate_lifted_are_refused():
    """Without tests/fsdp_cpu.py, accelerate would run CPU processes as DDP: `check` says so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dreambooth import shard

    acc = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(Exception, match="shards on GPUs"):
        shard.check(acc, build_config("tiny", overrides=["train.shard=fsdp"]))
    shard.check(acc, build_config("tiny"))  # train.shard=none: DDP, as asked


def test_the_readme_launches_with_the_tested_accelerate_config():
    readme = (ROOT / "README.md").read_text()
    assert "--config_file configs/accelerate/fsdp.yaml" in readme and "train.shard=fsdp" in readme


def test_the_plan_splits_the_sharded_parts_over_the_gpus():
    """`dreambooth plan --gpus N`: one GPU is the unsharded step; on two, the denoiser's weights,
    gradients and AdamW state halve, activations and the frozen modules stay, and the root unit
    plus two blocks and one block's gradient are whole at once."""
    cfg = build_config("tiny", overrides=["train.shard=fsdp"])
    one = predict(cfg)
    assert on_gpus(one, cfg, 1).parts == one.parts
    two = on_gpus(one, cfg, 2).parts
    model = build_tiny("tiny")
    units = unit_bytes(model.unet)
    denoiser = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    assert sum(units) == denoiser == one.parts["gradients"]  # every weight in one unit
    assert two["weights"] == one.parts["weights"] - denoiser // 2
    assert (two["gradients"], two["optimizer state"]) == (denoiser // 2, one.parts["optimizer state"] // 2)
    assert {k: v for k, v in two.items() if k not in ("weights", "gradients", "optimizer state",
                                                      "gathered blocks (FSDP)")} == \
        {k: v for k, v in one.parts.items() if k not in ("weights", "gradients", "optimizer state")}
    assert two["gathered blocks (FSDP)"] == units[0] + sum(sorted(units[1:])[-2:]) + max(units)
    assert on_gpus(one, build_config("tiny"), 2).parts == one.parts  # train.shard=none: DDP holds it all
