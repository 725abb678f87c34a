"""`dreambooth plan` (dreambooth/plan.py): one training step on fake tensors predicts the peak
tensor memory of the real step, for every family and training mode; advice for a run that does
not fit; `train` refuses such a run before it loads anything."""

import contextlib

import pytest

from dreambooth import plan
from dreambooth.config import build_config
from tests.painting import paint_subject

CASES = [  # (preset, --set items): every family, full and LoRA, and the switches that change memory
    ("tiny", []),
    ("tiny", ["train.mode=lora"]),
    ("tiny", ["train.mode=lora", "train.quantize_base=int8"]),  # torchao's int8 layers (the test extra)
    ("tiny", ["data.resolution=128", "train.batch_size=4"]),  # activations dominate
    ("tiny", ["data.resolution=128", "train.batch_size=4", "train.gradient_checkpointing=true"]),
    ("tiny", ["train.train_text_encoder=true"]),
    ("tiny", ["prior.target=base"]),  # a frozen copy of the UNet
    ("tiny", ["model.path=tiny-sdxl", "train.mode=lora", "train.train_text_encoder=true"]),
    ("tiny", ["model.path=tiny-sd2"]),
    ("tiny-flux1", []),
    ("tiny-flux1", ["train.mode=full", "data.resolution=128"]),
    ("tiny-flux1", ["train.quantize_base=int8", "data.resolution=128"]),
    ("tiny-sd3", []),
    ("tiny-sd3", ["train.mode=full", "train.offload_frozen=true"]),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan") / "photos"
    paint_subject(folder, 3)
    return folder


def config(preset, items, photos):
    return build_config(preset, overrides=["prior.num_images=2", *items], extra={
        "data.images": str(photos), "data.class_noun": "dog", "data.token": "waj"})


@pytest.mark.parametrize("preset,items", CASES, ids=[" ".join([p, *i]) for p, i in CASES])
def test_prediction_is_within_ten_percent_of_the_measured_step(preset, items, photos, tmp_path):
    from dreambooth.train import setup

    cfg = config(preset, items, photos)
    predicted = plan.predict(cfg)
    with contextlib.ExitStack() as held:
        measured = plan.measure(setup(cfg, tmp_path / "run", held, progress=False))
    assert predicted.peak == pytest.approx(measured.peak, rel=0.10), (predicted.parts, measured.parts)
    # the parts that do not depend on kernels are exact
    for part in ("weights", "gradients", "optimizer state"):
        assert predicted.parts[part] == measured.parts[part], part
    assert measured.parts["activations and temporaries"] > 0


def test_switches_lower_the_prediction(photos):
    base = plan.predict(config("tiny", ["data.resolution=128", "train.batch_size=4"], photos))
    ckpt = plan.predict(config("tiny", ["data.resolution=128", "train.batch_size=4",
                                        "train.gradient_checkpointing=true"], photos))
    eight = plan.predict(config("tiny", ["train.optimizer=adamw8bit"], photos))
    full = plan.predict(config("tiny", [], photos))
    assert ckpt.parts["activations and temporaries"] < 0.7 * base.parts["activations and temporaries"]
    assert eight.parts["optimizer state"] == int(full.parts["optimizer state"] * 2 * plan.BNB_BYTES / 8)
    offloaded = plan.predict(config("tiny", ["train.offload_frozen=true"], photos))
    assert "vae (frozen)" in full.parts and "vae (frozen)" not in offloaded.parts
    assert offloaded.peak == full.peak - full.parts["vae (frozen)"] - full.parts["text_encoder (frozen)"]
    # advice derives these two from the estimate before, without another planned step: the same figures
    cfg = config("tiny", [], photos)
    assert plan._derived(full, ["train.optimizer=adamw8bit"], cfg).peak == eight.peak
    assert plan._derived(full, ["train.offload_frozen=true"], cfg).peak == offloaded.peak


def test_advice_for_a_run_that_does_not_fit(photos):
    cfg = config("tiny", ["data.resolution=128", "train.batch_size=2"], photos)
    estimate = plan.predict(cfg)
    budget = estimate.peak + plan.CUDA_OVERHEAD - 1  # one byte short
    rows = plan.advise(cfg, budget, estimate)
    assert rows and plan.fits(rows[-1][2], budget)
    assert rows[0][1] == ["train.batch_size=1", "train.grad_accum=2"]  # the cheapest first
    assert all(b[2].peak <= a[2].peak for a, b in zip(rows, rows[1:]))
    text = plan.report(cfg, estimate, budget, rows)
    assert "does NOT fit" in text and "--set train.batch_size=1" in text
    assert plan.advise(cfg, estimate.peak + plan.CUDA_OVERHEAD) == []  # fits: nothing to change


def test_budget_parsing():
    assert plan.parse_budget("24GB") == 24 * 2**30 == plan.parse_budget("24") == plan.parse_budget("24GiB")
    assert plan.parse_budget(None) is None
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(plan.DreamboothError, match="--gpu"):
            plan.parse_budget(bad)


def test_train_refuses_a_run_that_cannot_fit_before_loading(photos, tmp_path, monkeypatch, capsys):
    from dreambooth import models
    from dreambooth.cli import main

    monkeypatch.setenv("DREAMBOOTH_GPU_MEMORY", "0.5GB")  # under the CUDA context alone
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(plan, "advise", lambda *a, **k: [])  # (test_advice_for_a_run_that_does_not_fit)
    code = main(["train", "--images", str(photos), "--class", "dog", "--preset", "tiny", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the GPU" in err and "does NOT fit in 0.5 GiB" in err
    assert not (tmp_path / "run").exists()


def test_plan_command_for_an_architecture_without_weights(capsys):
    """A real-size SD 1.5 from the shipped configs alone (meta-sized, fake tensors): full
    fine-tuning at 512 px with checkpointing; 8-bit AdamW is the switch that makes it fit 10 GB."""
    from dreambooth.cli import main

    code = main(["plan", "--model", "sd15", "--preset", "sd15-full", "--set", "train.gradient_checkpointing=true",
                 "--set", "train.steps=10", "--gpu", "10GB"])
    out = capsys.readouterr().out
    assert code == 0 and "does NOT fit in 10 GiB" in out and "train.optimizer=adamw8bit" in out
    weights = float(next(line for line in out.splitlines() if line.strip().startswith("weights")).split()[1])
    assert weights == pytest.approx(859_520_964 * 4 / 2**30, rel=1e-3)  # the UNet's parameters, fp32


@pytest.mark.parametrize("name", ["tiny", "tiny-flux1"])
def test_a_model_folder_is_planned_from_its_configs_alone(name, photos, tmp_path):
    """A diffusers folder is planned from its config files (every tensor fake, no weight read),
    full fine-tuning with the distilled prior's frozen copy, and matches the measured step."""
    from dreambooth.tiny import build_tiny
    from dreambooth.train import setup

    build_tiny(name).save(tmp_path / "model")
    preset = "tiny-flux1" if name == "tiny-flux1" else "tiny"
    cfg = config(preset, ["train.mode=full", "prior.target=base", f"model.path={tmp_path / 'model'}"], photos)
    predicted = plan.predict(cfg)
    with contextlib.ExitStack() as held:
        measured = plan.measure(setup(cfg, tmp_path / "run", held, progress=False))
    assert predicted.peak == pytest.approx(measured.peak, rel=0.10), (predicted.parts, measured.parts)
    assert predicted.parts["frozen copy of the denoiser (prior.target: base)"] == \
        measured.parts["frozen copy of the denoiser (prior.target: base)"] > 0


def test_offload_optimizer_moves_the_optimizer_state_to_host_memory(photos):
    """train.offload_optimizer: the GPU's peak is the plan without it less the state torchao moves
    to host memory (the tensors of OFFLOAD_MIN_SIZE values or more); the host holds that state and
    copies of those weights and gradients."""
    from dreambooth.trainable import OFFLOAD_MIN_SIZE

    full = plan.predict(config("tiny", [], photos))
    off = plan.predict(config("tiny", ["train.offload_optimizer=true"], photos))
    moved = off.host["optimizer state"]
    assert 0.9 * full.parts["optimizer state"] < moved < full.parts["optimizer state"]  # small tensors stay
    assert off.peak == full.peak - moved
    assert off.parts["optimizer state"] == full.parts["optimizer state"] - moved
    assert {k: v for k, v in off.parts.items() if k != "optimizer state"} == \
        {k: v for k, v in full.parts.items() if k != "optimizer state"}
    assert off.host["weights and gradients (copies)"] < moved  # fp32: 8 bytes of copies, 8 of state a value
    assert OFFLOAD_MIN_SIZE == 4096  # torchao's CPUOffloadOptimizer default, which make_optimizer passes
    text = plan.report(config("tiny", ["train.offload_optimizer=true"], photos), off, None, [])
    assert "optimizer adamw on the CPU" in text and "in host memory (train.offload_optimizer" in text


def test_paged_8bit_adamw_plans_like_8bit_adamw(photos):
    eight = plan.predict(config("tiny", ["train.optimizer=adamw8bit"], photos))
    paged = plan.predict(config("tiny", ["train.optimizer=paged_adamw8bit"], photos))
    assert paged.parts == eight.parts and paged.peak == eight.peak  # all resident: the worst case


def test_offload_optimizer_is_offered_after_8bit_adamw_where_it_can_run(photos):
    def offered(*items):
        return [i for _, i in plan.switches(config("tiny", list(items), photos))]

    offload = ["train.optimizer=adamw", "train.offload_optimizer=true"]
    plain = offered()
    assert plain.index(offload) == plain.index(["train.optimizer=adamw8bit"]) + 1
    assert offload in offered("train.optimizer=adamw8bit")  # it replaces the 8-bit state
    on = offered("train.offload_optimizer=true")
    assert offload not in on and ["train.optimizer=adamw8bit"] not in on  # refused together
    assert offload not in offered("train.mixed_precision=fp16")
    # advice plans it again: a budget only the offloaded state fits takes it after 8-bit AdamW
    cfg = config("tiny", ["train.gradient_checkpointing=true", "train.mixed_precision=bf16"], photos)
    estimate = plan.predict(cfg)
    off = plan.predict(plan._with(cfg, offload))
    budget = off.peak + plan.CUDA_OVERHEAD
    rows = plan.advise(cfg, budget, estimate)
    assert [r[1] for r in rows[:2]] == [["train.optimizer=adamw8bit"], offload] and rows[1][2].peak == off.peak
