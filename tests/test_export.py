"""Export and single-file import on tiny models: every export is read back by its consumer's own
loader and must draw the run model's image; key maps cover every weight and invert."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.errors import ModelError
from dreambooth.export import ExportError, export_run
from dreambooth.models import build_tiny, load_base_model, load_configured
from dreambooth.single_file import load_single_file, original_state_dict, save_single_file
from dreambooth.train import train
from painting import paint_subject

PROMPT = "a photo of waj toy"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny full run and a tiny LoRA run (alpha != rank, so the LoRA scale is exercised)."""
    root = tmp_path_factory.mktemp("runs")
    photos = paint_subject(root / "photos", count=3)[0].parent
    common = [f"data.images={photos}", "data.class_noun=toy", "data.token=waj", "prior.num_images=2",
              "prior.steps=2", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(root / "cache"))
        train(build_config("tiny", overrides=common), root / "full", progress=False)
        train(build_config("tiny", overrides=common + ["train.mode=lora", "train.lr=1e-2", "lora.rank=4",
                                                       "lora.alpha=8"]), root / "lora", progress=False)
        yield root


def pipe_image(pipe, prompt=PROMPT, steps=3):
    """One fixed-seed image straight from a diffusers pipeline, uint8."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    return np.round(out * 255).astype(np.int16)


def run_image(run_dir, checkpoint="final", scale=1.0):
    from dreambooth.checkpoint import load_checkpoint_model
    from dreambooth.lora import scale_lora

    model, _, _ = load_checkpoint_model(run_dir, checkpoint)
    scale_lora(model, scale)
    return pipe_image(model.pipeline())


def consumer_image(fmt, out, base_folder):
    """The exported model as its consumer loads it, with diffusers' own entry points."""
    from diffusers import StableDiffusionPipeline

    if fmt in ("diffusers", "merged"):
        return pipe_image(StableDiffusionPipeline.from_pretrained(out, local_files_only=True))
    if fmt == "single-file":
        return pipe_image(StableDiffusionPipeline.from_single_file(
            str(out), config=str(base_folder), local_files_only=True, torch_dtype=torch.float32))
    pipe = StableDiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    pipe.load_lora_weights(str(out))
    return pipe_image(pipe)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """The tiny base model as a diffusers folder (its configs are what a single file needs)."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    build_tiny().save(folder)
    return folder


# ---------------------------------------------------------------- each format, read back


@pytest.mark.parametrize("run, fmt, dtype, limit", [
    ("full", "diffusers", "fp32", 0),
    ("full", "single-file", "fp32", 0),
    ("full", "single-file", "fp16", 3),
    ("lora", "lora-diffusers", "fp32", 0),  # the same math: exact
    ("lora", "lora-kohya", "fp32", 0),
    ("lora", "lora-kohya", "fp16", 3),
    ("lora", "merged", "fp32", 1),  # W + s·BA rounded once: at most one level
    ("lora", "single-file", "bf16", 6),
])
def test_export_reloads_to_the_same_image(runs, base_folder, tmp_path, run, fmt, dtype, limit):
    suffix = ".safetensors" if fmt in ("single-file", "lora-kohya") else ""
    out = tmp_path / f"export{suffix}"
    result = export_run(runs / run, fmt, out, dtype=dtype, log=lambda _: None)
    info = json.loads((out.with_suffix(".export.json") if suffix else out / "export.json").read_text())
    assert info["verified"] and info["max_pixel_diff"] <= limit, info
    assert info["format"] == fmt and info["dtype"] == dtype and info["checkpoint"] == "final"
    assert info["tolerance"] == {"fp32": 2, "fp16": 8, "bf16": 32}[dtype] and result.path == out
    # independently: diffusers' own loaders draw the run model's image
    diff = np.abs(consumer_image(fmt, out, base_folder) - run_image(runs / run)).max()
    assert diff <= limit, diff


def test_exported_weights_have_the_asked_dtype_and_layout(runs, tmp_path):
    export_run(runs / "full", "single-file", tmp_path / "m.safetensors", dtype="fp16", log=lambda _: None)
    state = load_file(str(tmp_path / "m.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    # a checkpoint keeps the trained alpha (final/ folds alpha / r into the up weights instead)
    export_run(runs / "lora", "lora-kohya", tmp_path / "k.safetensors", dtype="fp16", checkpoint="step-4",
               log=lambda _: None)
    kohya = load_file(str(tmp_path / "k.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{name}.lora_down.weight"].dtype == torch.float16
    assert kohya[f"{name}.alpha"].item() == 8.0 and kohya[f"{name}.lora_down.weight"].shape[0] == 4


def test_checkpoint_and_scale(runs, base_folder, tmp_path):
    """--checkpoint step-N exports that step; --scale 0 fuses nothing: the base weights exactly;
    a LoRA file at --scale 0.5 draws what the run draws at half strength."""
    result = export_run(runs / "full", "single-file", dtype="fp32", checkpoint="step-2", log=lambda _: None)
    assert result.path == runs / "full" / "export" / "step-000002-single-file-fp32.safetensors"
    assert result.info["verified"] and result.info["checkpoint"] == "step-000002"
    export_run(runs / "lora", "merged", tmp_path / "m0", scale=0.0, log=lambda _: None)
    merged, base = load_base_model(str(tmp_path / "m0")), build_tiny()
    for k, v in base.unet.state_dict().items():
        assert torch.equal(merged.unet.state_dict()[k], v), k
    half = tmp_path / "half.safetensors"
    export_run(runs / "lora", "lora-kohya", half, scale=0.5, log=lambda _: None)
    alpha = load_file(str(half))["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert alpha == 2.0  # final/'s effective alpha (= rank 4, alpha / r folded in) at half strength
    at_half = run_image(runs / "lora", scale=0.5)
    assert np.abs(consumer_image("lora-kohya", half, base_folder) - at_half).max() == 0
    assert np.abs(run_image(runs / "lora") - at_half).max() > 2  # half strength is visibly different


def test_lora_final_keeps_alpha(runs):
    """final/ of a LoRA run with alpha != rank is the trained model (its last checkpoint)."""
    from dreambooth.checkpoint import load_checkpoint_model
    from dreambooth.lora import collect_lora

    final = collect_lora(load_checkpoint_model(runs / "lora", "final")[0])
    last = collect_lora(load_checkpoint_model(runs / "lora", "step-4")[0])
    assert final.keys() == last.keys()
    for k, layer in last.items():
        assert layer.alpha == 8.0 and torch.equal(final[k].down, layer.down)
        assert torch.allclose(final[k].up * final[k].alpha / 4, layer.up * 2.0, rtol=0, atol=1e-7)


def test_verification_catches_a_wrong_export(runs, tmp_path, monkeypatch):
    """A writer that loses half the LoRA's strength must fail, and export.json must say so."""
    from dreambooth import export
    from dreambooth.lora import scale_lora

    real = export.WRITERS["lora-kohya"]

    def half_strength(model, out, dtype):
        scale_lora(model, 0.5)
        real(model, out, dtype)

    monkeypatch.setitem(export.WRITERS, "lora-kohya", half_strength)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ExportError, match=r"verification failed.*levels.*over the tolerance 2"):
        export_run(runs / "lora", "lora-kohya", out, log=lambda _: None)
    info = json.loads(out.with_suffix(".export.json").read_text())
    assert not info["verified"] and info["max_pixel_diff"] > 2


# ---------------------------------------------------------------- the CLI


def test_cli_refuses_lora_formats_for_a_full_run(runs, tmp_path, capsys):
    assert main(["export", str(runs / "full"), "--format", "lora-kohya", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "full fine-tune" in err and "no LoRA adapters" in err and "--format diffusers" in err
    assert main(["export", str(runs / "full"), "--format", "onnx"]) == 2
    assert "unknown --format 'onnx'" in capsys.readouterr().err
    assert main(["export", str(runs / "lora"), "--format", "lora-kohya", "--out", str(tmp_path / "k")]) == 2
    assert "ending in .safetensors" in capsys.readouterr().err


def test_cli_exports_and_reports_the_difference(runs, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["export", str(runs / "lora"), "--format", "lora-diffusers", "--out", str(out),
                 "--prompt", "a {token} {class} in the snow"]) == 0
    text = capsys.readouterr().out
    assert "verified: max pixel difference 0 (tolerance 2)" in text and "waj toy in the snow" in text
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert main(["export", str(runs / "lora"), "--format", "lora-diffusers", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------- kohya names


def lora_model(name):
    """A tiny model with LoRA on the UNet and every text encoder (random up weights)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = build_tiny(name)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for encoder in (model.text_encoder, model.text_encoder_2):
        if encoder is not None:  # peft directly: transformers' add_adapter wants a newer peft
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                    encoder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in (model.unet, model.text_encoder, model.text_encoder_2):
            for n, p in (part.named_parameters() if part is not None else []):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name, te_prefixes", [("tiny", {"lora_te"}),
                                                ("tiny-sdxl", {"lora_te1", "lora_te2"})])
def test_kohya_map_covers_every_lora_module_and_inverts(name, te_prefixes, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dreambooth.kohya import from_kohya, kohya_names, to_kohya
    from dreambooth.lora import collect_lora

    model = lora_model(name)
    layers = collect_lora(model)
    wrapped = {f"{c}.{p}" for c in ("unet", "text_encoder", "text_encoder_2") if getattr(model, c) is not None
               for p, m in getattr(model, c).named_modules() if isinstance(m, BaseTunerLayer)}
    names = kohya_names(layers, model.kind)
    assert set(names) == set(layers) == wrapped  # no module dropped
    assert len(set(names.values())) == len(names)  # no two share a name
    assert names["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = sorted(n for n in names.values() if not n.startswith("lora_unet_"))
    assert {n.split("_text_model_")[0] for n in te} == te_prefixes
    assert f"{min(te_prefixes)}_text_model_encoder_layers_0_self_attn_q_proj" in te
    state = to_kohya(layers, model.kind)
    back = from_kohya(state, layers, model.kind)
    assert back.keys() == layers.keys()
    for k, layer in layers.items():
        assert torch.equal(back[k].down, layer.down) and torch.equal(back[k].up, layer.up)
        assert back[k].alpha == layer.alpha == 8.0
    # and diffusers' own kohya converter puts every layer back where it came from
    save_file(state, str(tmp_path / "k.safetensors"))
    fresh = build_tiny(name)
    fresh.pipeline().load_lora_weights(str(tmp_path / "k.safetensors"))
    loaded = collect_lora(fresh)
    assert loaded.keys() == layers.keys()
    for k, layer in layers.items():
        assert torch.equal(loaded[k].down, layer.down)
        assert torch.allclose(loaded[k].up * loaded[k].alpha / 4, layer.up * layer.alpha / 4, atol=0)


def test_merge_folds_every_adapter_into_its_weight():
    """SDXL with LoRA on the UNet and both text encoders: W + alpha/r * B A, adapters gone."""
    from dreambooth.lora import collect_lora, has_lora, merge_lora

    model, base = lora_model("tiny-sdxl"), build_tiny("tiny-sdxl")
    layers, before = collect_lora(model), pipe_image(model.pipeline())
    merge_lora(model)
    assert not has_lora(model)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert getattr(model, part).state_dict().keys() == getattr(base, part).state_dict().keys(), part
    for key in ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj"):
        part, _, path = key.partition(".")
        layer = layers[key]
        delta = layer.alpha / layer.rank * layer.up @ layer.down
        expected = getattr(base, part).get_submodule(path).weight + delta
        assert torch.allclose(getattr(model, part).get_submodule(path).weight, expected, rtol=0, atol=1e-6)
    assert np.abs(pipe_image(model.pipeline()) - before).max() <= 1


def test_kohya_names_refuse_collisions():
    from dreambooth.kohya import kohya_names

    with pytest.raises(ValueError, match="both become"):
        kohya_names(["unet.a_b.c", "unet.a.b_c"], "sd1")


# ---------------------------------------------------------------- single-file layout


@pytest.mark.parametrize("name, encoders", [
    ("tiny", ["cond_stage_model.transformer.text_model."]),
    ("tiny-sd2", ["cond_stage_model.model."]),
    ("tiny-sdxl", ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."]),
])
def test_single_file_round_trip(name, encoders, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = build_tiny(name)
    model.save(tmp_path / "configs")
    path = save_single_file(model, tmp_path / "m.safetensors")
    state = load_file(str(path))
    prefixes = ["model.diffusion_model.", "first_stage_model.", *encoders]
    extra = {"v_pred"} if model.prediction_type == "v_prediction" else set()
    assert {k for k in state if not k.startswith(tuple(prefixes))} == extra
    assert all(any(k.startswith(p) for k in state) for p in prefixes)
    loaded = load_single_file(path, config=tmp_path / "configs")
    assert loaded.kind == model.kind and loaded.prediction_type == model.prediction_type
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(model, part) is None:
            continue
        ours, theirs = getattr(model, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (part, k)
    if name != "tiny-sdxl":  # and diffusers' pipeline loader, used directly, reads the same weights
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "configs"),
                                                        local_files_only=True)
        for k, v in model.text_encoder.state_dict().items():
            assert torch.equal(pipe.text_encoder.state_dict()[k], v), k


@pytest.mark.parametrize("arch, kind, diffusers_type, unet_params", [
    ("sd15", "sd1", "v1", 859_520_964), ("sd21", "sd2", "v2", 865_910_724),
    ("sdxl", "sdxl", "xl_base", 2_567_463_684)])
def test_shipped_configs_are_the_real_architectures(arch, kind, diffusers_type, unet_params):
    """The shipped configs build the released models' shapes (on the meta device, no weights),
    and the original-layout names of those shapes are what diffusers' loader reads back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint, infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.ldm_keys import TEXT_ENCODERS, detect_kind, to_original
    from dreambooth.single_file import config_folder

    folder = config_folder(kind)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        encoders = {n: classes[n](CLIPTextConfig.from_pretrained(folder / n)) for n in TEXT_ENCODERS[kind]}
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    parts = {"unet": (unet.state_dict(), unet.config), "vae": (vae.state_dict(), vae.config)}
    parts.update({n: (e.state_dict(), e.config.to_dict()) for n, e in encoders.items()})
    state = to_original(parts, kind)
    assert infer_diffusers_model_type(state) == diffusers_type and detect_kind(state) == kind
    assert convert_ldm_unet_checkpoint(state, unet.config).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(state, vae.config).keys() == vae.state_dict().keys()
    if kind != "sd1":
        big = encoders["text_encoder_2" if kind == "sdxl" else "text_encoder"]
        prefix = TEXT_ENCODERS[kind]["text_encoder_2" if kind == "sdxl" else "text_encoder"][1]
        back = convert_open_clip_checkpoint(big, state, prefix=prefix)
        assert {k.removeprefix("text_model.") for k in back} == \
            {k.removeprefix("text_model.") for k in big.state_dict()}


# ---------------------------------------------------------------- import through --model


@pytest.fixture
def tiny_as_shipped(tmp_path, monkeypatch):
    """The tiny model's configs stand in for the shipped real-size ones (which its weights don't fit)."""
    from dreambooth import single_file

    shipped = tmp_path / "shipped"
    for name, arch in (("tiny", "sd15"), ("tiny-sd2", "sd21")):
        build_tiny(name).save(shipped / arch)
    monkeypatch.setattr(single_file, "SHIPPED", shipped)
    return shipped


def test_model_path_takes_a_single_file(tiny_as_shipped, tmp_path):
    model = build_tiny("tiny-sd2")
    path = save_single_file(model, tmp_path / "sd2.safetensors")
    loaded = load_base_model(str(path))
    assert loaded.kind == "sd2" and loaded.prediction_type == "v_prediction"
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight)
    assert loaded.tokenizer.pad_token == "!"  # SD 2.x pads with "!"; built from the vendored vocab
    other = save_single_file(build_tiny(seed=3), tmp_path / "other.safetensors")
    assert loaded.identity() != load_base_model(str(other)).identity()  # keys the class-image cache
    assert load_base_model(str(path), prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ModelError, match="looks like sd2, but the config says model.kind=sdxl"):
        load_base_model(str(path), kind="sdxl")


def test_pickle_checkpoints_need_trust(tiny_as_shipped, tmp_path):
    model = build_tiny()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": original_state_dict(model), "global_step": 1}, path)
    with pytest.raises(ModelError, match=r"pickle checkpoint.*arbitrary code.*\.safetensors.*--trust-pickle"):
        load_base_model(str(path))
    cfg = build_config("tiny", overrides=[f"model.path={path}"])
    loaded = load_configured(cfg, trust_pickle=True)
    for k, v in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k


def test_unusable_files_say_why(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        load_base_model(str(tmp_path / "junk.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint.*LoRA"):
        load_base_model(str(tmp_path / "lora.safetensors"))
    tiny = save_single_file(build_tiny(), tmp_path / "tiny.safetensors")  # the real SD 1.5 configs
    with pytest.raises(ModelError, match=r"sd1 weights that do not fit the configs in .*single-file/sd15"):
        load_base_model(str(tiny))
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_base_model(str(tmp_path / "missing.safetensors"))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, but not a checkpoint"):
        load_base_model(str(tmp_path / "model.onnx"))
