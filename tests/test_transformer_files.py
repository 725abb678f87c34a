"""Single-file FLUX.1 and SD 3.x transformers (dreambooth/transformer_files.py): tiny models of
both kinds written in the original BFL / SAI layouts, detected, read back by diffusers' own
converters to equal weights and outputs; the shipped real-size configs checked on the meta
device (exact parameter counts; the converters map our original names to exactly the model's
keys and shapes). No real weights anywhere."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth import transformer_files as tf
from dreambooth.errors import ModelError
from dreambooth.ldm_keys import LayoutError

# Few, wide heads (CPU attention with many narrow heads is slow); two blocks of each kind so the
# block numbering, the SD3 last (context-pre-only) block and the MMDiT-X blocks are all exercised.
FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 4, 8])
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
           num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=20,
           pos_embed_max_size=8)
TINY = {  # architecture -> (family, config)
    "flux1-dev": ("flux", {**FLUX, "guidance_embeds": True}),
    "flux1-schnell": ("flux", {**FLUX, "guidance_embeds": False}),
    "sd35-medium": ("sd3", {**SD3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}),
    "sd35-large": ("sd3", {**SD3, "qk_norm": "rms_norm"}),
    "sd3-medium": ("sd3", SD3),
}


def tiny(arch, seed=0):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family, config = TINY[arch]
    torch.manual_seed(seed)
    model = (FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel)(**config).eval()
    with torch.no_grad():  # zero-initialised modulations would hide a swapped (shift, scale)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def forward(model):
    """One fixed-input forward pass of a tiny transformer."""
    g = torch.Generator().manual_seed(1)
    c = model.config
    with torch.no_grad():
        if type(model).__name__ == "FluxTransformer2DModel":
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                             indexing="ij"), -1).reshape(-1, 3)
            return model(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                         encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim, generator=g),
                         pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                         timestep=torch.tensor([0.7]), img_ids=ids, txt_ids=torch.zeros(5, 3),
                         guidance=torch.tensor([3.5]) if c.guidance_embeds else None).sample
        return model(hidden_states=torch.randn(1, c.in_channels, 8, 8, generator=g),
                     encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([700.0])).sample


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- tiny models, written and read back


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_transformer_round_trips_through_the_original_layout(arch, tmp_path):
    model = tiny(arch)
    assert tf.architecture_of(model) == arch
    path = tf.save_transformer_file(model, tmp_path / f"{arch}.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    family = TINY[arch][0]
    if family == "flux":  # bare BFL names, as flux1-dev.safetensors
        assert "double_blocks.1.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
        assert ("guidance_in.in_layer.weight" in keys) == (arch == "flux1-dev")
    else:  # SAI names under model.diffusion_model.
        assert all(k.startswith("model.diffusion_model.") for k in keys)
        assert "model.diffusion_model.joint_blocks.2.context_block.attn.qkv.weight" in keys
        assert "model.diffusion_model.joint_blocks.2.context_block.mlp.fc1.weight" not in keys  # pre-only
    assert meta[tf.ARCH_KEY] == arch and meta["modelspec.architecture"] == tf.ARCHITECTURES[arch].modelspec
    assert json.loads(meta[tf.CONFIG_KEY])["_class_name"] == type(model).__name__

    state, _ = tf.read_transformer_state(path)
    assert tf.identify_transformer(state) == arch
    loaded = tf.load_transformer_file(path)  # the config from the file's metadata
    assert type(loaded) is type(model) and not loaded.training
    assert_same_weights(model, loaded)
    assert torch.equal(forward(model), forward(loaded))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_inverse_map_inverts_diffusers_converter_exactly(arch):
    """convert(save(x)) == x for every key and tensor, with diffusers' own converter."""
    model = tiny(arch)
    ours = model.state_dict()
    original = tf.to_original(model)
    back = tf.from_original(original, TINY[arch][0])
    assert back.keys() == ours.keys()
    for k in ours:
        assert torch.equal(back[k], ours[k]), k
    assert len(tf.to_original(model, prefix="")) == len(original)  # nothing dropped or duplicated


def test_flux_converter_width_quirk():
    """diffusers splits FLUX's single-block linear1 at a hard-coded width of 3072; tf.flux_converter
    runs the same code at the file's width (and is diffusers' function itself at 3072)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as diffusers_fn

    assert tf.flux_converter(3072) is diffusers_fn
    original = tf.to_original(tiny("flux1-schnell"))
    if 3072 in diffusers_fn.__code__.co_consts:  # still hard-coded in this diffusers
        with pytest.raises(RuntimeError, match="split"):
            diffusers_fn(dict(original))
    assert tf.flux_converter(32)(dict(original)).keys() == tiny("flux1-schnell").state_dict().keys()


def test_diffusers_from_single_file_reads_our_sd3_file(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = tiny("sd35-medium")
    path = tf.save_transformer_file(model, tmp_path / "m.safetensors")
    model.save_config(tmp_path / "configs" / "transformer")
    theirs = SD3Transformer2DModel.from_single_file(str(path), config=str(tmp_path / "configs"),
                                                    subfolder="transformer", local_files_only=True)
    assert_same_weights(model, theirs)


def test_whole_pipeline_file_and_config_dir(tmp_path):
    """A ComfyUI / SAI all-in-one file: only model.diffusion_model.* is read; config_dir takes a
    pipeline folder or a transformer folder; a cast file reads back cast."""
    model = tiny("flux1-dev")
    state = tf.to_original(model, prefix="model.diffusion_model.")
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    state["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "all.safetensors"))
    assert tf.detect_transformer(state) == "flux1-dev"
    model.save_config(tmp_path / "pipe" / "transformer")
    assert_same_weights(model, tf.load_transformer_file(tmp_path / "all.safetensors", tmp_path / "pipe"))
    loaded = tf.load_transformer_file(tmp_path / "all.safetensors", tmp_path / "pipe" / "transformer",
                                      dtype=torch.bfloat16)
    assert loaded.x_embedder.weight.dtype == torch.bfloat16

    for dtype in (torch.float16, torch.float8_e4m3fn):  # fp8 as the "-fp8" FLUX files (not scaled)
        cast = tf.save_transformer_file(model, tmp_path / f"{dtype}.safetensors", dtype)
        loaded = tf.load_transformer_file(cast)
        assert loaded.x_embedder.weight.dtype == torch.float32
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v.to(dtype).float()), (dtype, k)


def test_sd3_medium_30_needs_a_config(tmp_path):
    model = tiny("sd3-medium")
    state = tf.to_original(model)
    with pytest.raises(LayoutError, match=r"Stable Diffusion 3 Medium \(3.0\).*config_dir"):
        tf.detect_transformer(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(ModelError, match=r"3 Medium \(3.0\).*no config is shipped"):
        tf.load_transformer_file(tmp_path / "sd3.safetensors")
    model.save_config(tmp_path / "cfg")
    assert_same_weights(model, tf.load_transformer_file(tmp_path / "sd3.safetensors", tmp_path / "cfg"))


def test_files_that_are_not_base_transformers_say_what_they_are(tmp_path):
    from diffusers import FluxTransformer2DModel

    def detect(state):
        with pytest.raises(LayoutError) as e:
            tf.detect_transformer(state)
        return str(e.value)

    z = torch.zeros(1)
    assert "LoRA" in detect({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": z})
    assert "UNet" in detect({"model.diffusion_model.input_blocks.0.0.weight": z})
    assert "diffusers names" in detect(tiny("flux1-dev").state_dict())
    assert "diffusers names" in detect(tiny("sd35-large").state_dict())
    assert "not a FLUX.1 or SD3" in detect({"encoder.conv_in.weight": z})
    assert "quantised" in detect({**tf.to_original(tiny("flux1-dev")), "scaled_fp8": z})
    fill = FluxTransformer2DModel(**{**FLUX, "in_channels": 384, "out_channels": 4, "guidance_embeds": True})
    assert "Fill" in detect(tf.to_original(fill))
    flux2 = {**tf.to_original(tiny("flux1-dev")), "double_stream_modulation_img.lin.weight": z}
    assert "FLUX.2" in detect(flux2)
    mixed = tf.to_original(tiny("sd35-large"))  # MMDiT-X blocks at SD 3.5 Large's width: no such model
    mixed["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2432, 16, 2, 2)
    mixed["model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"] = z
    assert "unknown variant" in detect(mixed)

    # A real-size architecture's names with tiny shapes: the shipped config does not fit.
    save_file({k: v.contiguous() for k, v in tf.to_original(tiny("sd35-large")).items()},
              str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelError, match=r"do not fit .*single-file/sd35-large.*pass config_dir"):
        tf.load_transformer_file(tmp_path / "t.safetensors")
    extra = {**tf.to_original(tiny("flux1-dev")), "double_blocks.0.img_attn.extra.weight": z}
    save_file(extra, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelError, match="double_blocks.0.img_attn.extra.weight' has no place"):
        tf.load_transformer_file(tmp_path / "x.safetensors", config_dir=None)
    torch.save(tf.to_original(tiny("flux1-dev")), tmp_path / "m.ckpt")
    with pytest.raises(ModelError, match="pickle checkpoint.*--trust-pickle"):
        tf.load_transformer_file(tmp_path / "m.ckpt")
    with pytest.raises(ModelError, match="not found"):
        tf.load_transformer_file(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- shipped real-size configs, on meta


@pytest.mark.parametrize("arch, diffusers_type, params, keys", [
    ("flux1-dev", "flux-dev", 11_901_408_320, 780),
    ("flux1-schnell", "flux-schnell", 11_891_178_560, 776),
    ("sd35-medium", "sd35_medium", 2_243_171_520, 665),  # + the 384x384x1536 position table (a buffer)
    ("sd35-large", "sd35_large", 8_056_627_520, 923)])
def test_shipped_transformer_configs_are_the_real_architectures(arch, diffusers_type, params, keys):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    cls_name = tf.CLASS_NAMES[tf.ARCHITECTURES[arch].family]
    import diffusers

    cls = getattr(diffusers, cls_name)
    folder = tf.shipped_folder(arch)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder / "transformer"))
    assert sum(p.numel() for p in model.parameters()) == params
    assert tf.architecture_of(model) == arch
    original = tf.to_original(model)  # shapes only: every tensor is on the meta device
    assert len(original) == keys
    assert tf.detect_transformer(original) == arch
    assert infer_diffusers_model_type(original) == diffusers_type
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = tf.from_original(original, tf.ARCHITECTURES[arch].family)  # diffusers' own converter
    assert {k: v.shape for k, v in converted.items()} == expected  # nothing missing, nothing unexpected


@pytest.mark.parametrize("arch", ["flux1-dev", "flux1-schnell", "sd35-medium", "sd35-large"])
def test_shipped_pipeline_configs(arch):
    """VAE, text encoders and scheduler of each shipped folder: the released sizes (on meta)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from dreambooth.ldm_keys import vae_to_original

    folder = tf.shipped_folder(arch)
    index = json.loads((folder / "model_index.json").read_text())
    sizes = {"CLIPTextModel": 123_060_480, "T5EncoderModel": 4_762_310_656}
    with_projection = {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840}  # CLIP-L, CLIP-G
    with torch.device("meta"):
        for name, entry in index.items():
            if name.startswith("_") or entry[0] is None:
                continue
            library, cls_name = entry
            cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
            if not name.startswith("text_encoder"):
                assert (folder / name).is_dir() or name.startswith("tokenizer"), name
                continue
            model = cls(cls.config_class.from_pretrained(folder / name))
            n = sum(p.numel() for p in model.parameters())
            assert n == (with_projection[name] if cls_name == "CLIPTextModelWithProjection" else sizes[cls_name])
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683 and vae.config.latent_channels == 16
    back = convert_ldm_vae_checkpoint(vae_to_original(vae.state_dict(), vae.config), vae.config)
    assert back.keys() == vae.state_dict().keys()  # the VAE part of an SAI / ComfyUI file maps exactly
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert (scheduler.config.shift, scheduler.config.use_dynamic_shifting) == \
        {"flux1-dev": (3.0, True), "flux1-schnell": (1.0, False)}.get(arch, (3.0, False))
    assert (vae.config.scaling_factor, vae.config.shift_factor) == \
        ((0.3611, 0.1159) if arch.startswith("flux") else (1.5305, 0.0609))
