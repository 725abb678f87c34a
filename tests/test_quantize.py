"""train.quantize_base (dreambooth/quantize.py): LoRA on a base whose linear weights are stored in
int8 (torchao, on this CPU) trains, resumes bit-exactly, and exports LoRA files with the same keys
as an unquantized run, which load into a plain diffusers pipeline; the plan counts the stored
bytes. nf4 (bitsandbytes) is checked where bitsandbytes is installed."""

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import plan
from dreambooth.config import build_config
from dreambooth.errors import ConfigError, DreamboothError
from dreambooth.quantize import Int8Linear, frozen_linears, stored_bytes
from dreambooth.train import setup, train
from painting import paint_subject

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return paint_subject(tmp_path_factory.mktemp("photos"), count=3)[0].parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


def make_cfg(photos, *sets, preset="tiny"):
    return build_config(preset, overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
        "prior.steps=2", "train.mode=lora", "train.lr=1e-2", "train.steps=4", "train.checkpoint_every=2",
        "train.keep_checkpoints=5", *sets])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def session(cfg, run_dir):
    with contextlib.ExitStack() as held:
        return setup(cfg, run_dir, held, progress=False)


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux1"])
def test_int8_base_trains_like_the_full_precision_base(photos, tmp_path, preset):
    """Every linear weight of the denoiser is stored as int8 with one scale per row, the adapters
    stay float32 and are the only trained tensors, and the losses follow the unquantized run's
    to within the rounding of the weights (the same seeds draw the same samples)."""
    from torchao.quantization import Int8Tensor

    cfg = make_cfg(photos, "train.quantize_base=int8", "train.steps=6", preset=preset)
    s = session(cfg, tmp_path / "look")
    denoiser = s.family.denoiser(s.model)
    bases = [m.weight for m in denoiser.modules() if isinstance(m, Int8Linear)]
    assert not frozen_linears(denoiser)  # every linear layer converted
    assert len(bases) > 20 and all(isinstance(w, Int8Tensor) and w.qdata.dtype == torch.int8 for w in bases)
    assert all(w.scale.shape == (w.shape[0], 1) and not w.requires_grad for w in bases)
    trained = s.trainable.weights()
    assert trained and all("lora_" in k and t.dtype == torch.float32 for k, t in trained.items())

    train(cfg, tmp_path / "int8", progress=False)
    train(make_cfg(photos, "train.steps=6", preset=preset), tmp_path / "plain", progress=False)
    int8, plain = losses(tmp_path / "int8"), losses(tmp_path / "plain")
    assert all(torch.isfinite(torch.tensor(int8)))
    assert int8 == pytest.approx(plain, rel=2e-3) and int8 != plain  # close, and not the same run


def subject_loss(model, photos):
    """The noise-prediction loss on the subject's photos and prompt at fixed noise and timesteps."""
    from dreambooth.data import read_photos, square_crop, to_tensor
    from dreambooth.models import encode_latents, encode_prompts

    pixels = torch.stack([to_tensor(square_crop(p.image, 64)) for p in read_photos(photos, 64).photos])
    x0 = encode_latents(model, pixels)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        cond = encode_prompts(model, ["a photo of waj toy"] * len(x0))
        total = 0.0
        for t in (100, 300, 500, 700):
            noise, ts = torch.randn(x0.shape, generator=g), torch.full((len(x0),), t)
            pred = model.unet(model.scheduler.add_noise(x0, noise, ts), ts, **cond).sample
            total += torch.mean((pred - noise) ** 2).item()
    return total / 4


def test_int8_lora_learns_the_subject(photos, tmp_path):
    """30 steps of LoRA (rank 4, attention only) on the int8 base lower the loss on the subject's photos, read with the
    LoRA on the full-precision base (as sample, eval and the exports use it)."""
    from dreambooth.checkpoint import load_run_model
    from dreambooth.models import build_tiny

    before = subject_loss(build_tiny(), photos)
    train(make_cfg(photos, "train.quantize_base=int8", "train.steps=30", "train.checkpoint_every=100",
                   "prior.enabled=false", "train.lr=3e-2"), tmp_path / "run", progress=False)
    after = subject_loss(load_run_model(tmp_path / "run")[0], photos)
    assert after < 0.95 * before, (before, after)  # measured: 1.168 -> 1.068


def test_resume_gives_identical_lora_weights(photos, tmp_path):
    """The quantized base is rebuilt from the model when the run resumes: the same int8 weights, so
    the split run ends on the same LoRA weights and losses as the straight one."""
    sets = ["train.quantize_base=int8", "train.lr_scheduler=cosine", "train.warmup_steps=1", "prior.target=base"]
    train(make_cfg(photos, *sets), tmp_path / "straight", progress=False)
    first = train(make_cfg(photos, *sets), tmp_path / "split", progress=False, stop_after=2)
    assert first.final is None and first.step == 2
    assert train(None, tmp_path / "split", resume=True, progress=False).step == 4
    a = load_file(str(tmp_path / "straight/checkpoints/step-000004/trainable.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-000004/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert "quantize_base: int8" in (tmp_path / "split/config.yaml").read_text()  # what resume re-applies


def test_exports_have_the_unquantized_keys_and_reload_into_a_plain_pipeline(photos, tmp_path):
    """final/ and the kohya export of an int8 run name the same tensors as an unquantized run's;
    final/ loads into a plain float32 diffusers pipeline and changes what it draws. A fused export
    merges the adapters into the base weights at full precision (every command but training reads
    the base model as it is on disk), and verifies."""
    from dreambooth.checkpoint import load_run_model
    from dreambooth.export import export_run
    from dreambooth.models import build_tiny

    train(make_cfg(photos, "train.quantize_base=int8", "train.lr=5e-2"), tmp_path / "int8", progress=False)
    train(make_cfg(photos, "train.lr=5e-2"), tmp_path / "plain", progress=False)
    lora = load_file(str(tmp_path / "int8/final/pytorch_lora_weights.safetensors"))
    assert lora.keys() == load_file(str(tmp_path / "plain/final/pytorch_lora_weights.safetensors")).keys()
    kohya = {}
    for name in ("int8", "plain"):
        export_run(tmp_path / name, "lora-kohya", tmp_path / f"{name}.safetensors", log=lambda _: None)
        kohya[name] = load_file(str(tmp_path / f"{name}.safetensors")).keys()
    assert kohya["int8"] == kohya["plain"]

    pipe = build_tiny().pipeline()
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return torch.from_numpy(pipe("a photo of waj toy", num_inference_steps=2, height=64, width=64,
                                     output_type="np", generator=torch.Generator().manual_seed(0)).images)

    before = draw()
    pipe.load_lora_weights(str(tmp_path / "int8/final"))
    assert not torch.allclose(before, draw())

    model, _ = load_run_model(tmp_path / "int8")
    assert not any(type(p).__name__ == "Int8Tensor" for p in model.unet.parameters())
    merged = export_run(tmp_path / "int8", "merged", tmp_path / "merged", log=lambda _: None)
    assert merged.info["verified"], merged.info
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = build_tiny().unet.get_submodule(path).weight
    down, up = lora[f"unet.{path}.lora.down.weight"], lora[f"unet.{path}.lora.up.weight"]
    fused = load_file(str(tmp_path / "merged/unet/diffusion_pytorch_model.safetensors"))[f"{path}.weight"]
    assert torch.allclose(fused, base + up @ down, atol=1e-6)  # the float32 base, not its int8 copy


def test_settings_that_cannot_quantize_are_refused(photos, tmp_path, monkeypatch):
    import dreambooth.quantize as quantize

    with pytest.raises(ConfigError, match="train.quantize_base=int8 .* set train.mode=lora"):
        make_cfg(photos, "train.mode=full", "train.quantize_base=int8")
    with pytest.raises(ConfigError, match="must be one of none, int8, nf4"):
        make_cfg(photos, "train.quantize_base=int4")
    if not torch.cuda.is_available():
        with pytest.raises(DreamboothError, match="nf4 needs a CUDA GPU .* use train.quantize_base=int8"):
            train(make_cfg(photos, "train.quantize_base=nf4"), tmp_path / "nf4", progress=False)
        assert not (tmp_path / "nf4/config.yaml").exists()
    monkeypatch.setattr(quantize, "_has", lambda package: package != "torchao")
    with pytest.raises(DreamboothError, match=r"int8 needs torchao: pip install 'dreambooth\[quantize\]'"):
        train(make_cfg(photos, "train.quantize_base=int8"), tmp_path / "int8", progress=False)


def test_the_plan_counts_the_stored_bytes(photos, tmp_path):
    """The measured int8 step keeps each linear weight at its stored bytes (int8 and a scale per
    row), and its activations hold no full-precision copy of them: at most one dequantized layer
    more than the unquantized step's (a plain F.linear on torchao's weight saves every layer's)."""
    items = ["data.resolution=128"]
    s = session(make_cfg(photos, *items, preset="tiny-flux1"), tmp_path / "plain")
    linears = [m.weight for m in frozen_linears(s.family.denoiser(s.model)).values()]  # float32, as loaded
    plain = plan.measure(s)
    int8 = plan.measure(session(make_cfg(photos, *items, "train.quantize_base=int8", preset="tiny-flux1"),
                                tmp_path / "int8"))
    saved = sum(w.numel() * 4 - stored_bytes(*w.shape, "int8", 4) for w in linears)
    assert int8.parts["weights"] == plain.parts["weights"] - saved
    largest = max(w.numel() * 4 for w in linears)
    assert int8.parts["activations and temporaries"] <= plain.parts["activations and temporaries"] + largest
    # nf4 is planned from the layers' shapes (bitsandbytes runs neither on fake tensors nor on CPU here)
    cfg = make_cfg(photos, *items, preset="tiny-flux1")
    full, nf4 = plan.predict(cfg), plan.predict(make_cfg(photos, *items, "train.quantize_base=nf4", preset="tiny-flux1"))
    assert full.parts["weights"] - nf4.parts["weights"] == sum(
        w.numel() * 4 - stored_bytes(*w.shape, "nf4", 4) for w in linears)
    assert nf4.settings["quantize_base"] == "nf4"


def test_int8_layers_compute_in_the_autocast_dtype(photos):
    """Under bf16 autocast (a GPU run, as the plan plans it) an int8 layer takes and gives bf16, as
    the layer it replaces does (torchao computes in its input's dtype: a float32 input would double
    every activation after it); so the planned step's activations are the unquantized step's."""
    from dreambooth.quantize import quantize_base

    layer = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16).requires_grad_(False)
    assert quantize_base(layer, "int8") == 1
    x = torch.randn(2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    items = ["train.mixed_precision=bf16", "data.resolution=128"]
    none = plan.predict(make_cfg(photos, *items, preset="tiny-flux1"))
    int8 = plan.predict(make_cfg(photos, *items, "train.quantize_base=int8", preset="tiny-flux1"))
    assert int8.parts["activations and temporaries"] <= none.parts["activations and temporaries"]
    assert int8.parts["weights"] < 0.6 * none.parts["weights"]


def test_advice_offers_the_quantized_base_after_offloading_and_before_a_lower_resolution(photos):
    names = [items[0].split("=")[0] for _, items in plan.switches(make_cfg(photos, "data.resolution=512", "lora.rank=8"))]
    assert names.index("train.offload_frozen") < names.index("train.quantize_base") < names.index("data.resolution")
    assert names.index("train.quantize_base") < names.index("lora.rank")
    full = [items for _, items in plan.switches(make_cfg(photos, "train.mode=full"))]
    assert not any(i[0].startswith("train.quantize_base") for i in full)
    cfg = make_cfg(photos, "train.quantize_base=int8")
    assert "frozen base in int8" in plan.report(cfg, plan.predict(cfg), None, []).splitlines()[0]


def test_nf4_stores_4_bit_weights_and_the_plan_counts_them(photos, tmp_path, monkeypatch):
    """Where bitsandbytes is installed: its 4-bit layers also run on a CPU (bitsandbytes >= 0.46), so
    past the CUDA check the nf4 path trains here, and the weights it keeps are the bytes the plan
    computes from the layers' shapes."""
    bnb = pytest.importorskip("bitsandbytes")
    import dreambooth.train as tr

    monkeypatch.setattr(tr, "check_available", lambda mode, cuda: None)
    cfg = make_cfg(photos, "train.quantize_base=nf4", preset="tiny-flux1")
    s = session(cfg, tmp_path / "look")
    layers = list(frozen_linears(s.family.denoiser(s.model)).values())
    assert not layers  # all converted
    quantized = [m for m in s.family.denoiser(s.model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) > 20 and all(m.weight.dtype == torch.uint8 for m in quantized)
    assert plan.measure(s).parts["weights"] == plan.predict(cfg).parts["weights"]
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final.is_dir() and all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))


def test_two_processes_train_an_int8_base_like_one(photos, tmp_path, monkeypatch):
    """DDP over a quantized base (accelerate launch, two gloo CPU processes of batch 1): DDP leaves
    the int8 weights alone (it cannot broadcast them; each process converts the same ones) and the
    LoRA weights equal one process's at batch 2, as for any run (tests/test_distributed.py)."""
    from test_distributed import SETS, WEIGHT_TOL, final_weights, launch_two_processes

    sets = [f"data.images={photos}", "train.mode=lora", "train.quantize_base=int8", *SETS]
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    train(build_config("tiny", overrides=[*sets, "train.batch_size=2"]), tmp_path / "one", progress=False)
    launch_two_processes(tmp_path / "two", [*sets, "train.batch_size=1"], tmp_path / "cache", tmp_path / "hf")
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys() and all("lora" in k for k in one)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < WEIGHT_TOL
    assert max(w.abs().max().item() for k, w in two.items() if "lora_B" in k) > 1000 * WEIGHT_TOL
