"""FLUX.1 and SD3 LoRA files: diffusers/peft names for ``load_lora_weights`` and the
original-layout (kohya / ComfyUI / Forge) names, with the fused q, k, v math.

The models are tiny random FluxTransformer2DModel / SD3Transformer2DModel (two wide heads) with
peft LoRA adapters on the targets of the real recipes; the pipelines around them are built from
tiny components in-process (VAE with 16 latent channels, CLIP and T5 text encoders, a T5
tokenizer from a small vocabulary). ComfyUI itself cannot run in CI: the names it maps are
written out below from its source (comfy/lora.py ``model_lora_keys_unet``, comfy/utils.py
``flux_to_diffusers`` / ``mmdit_to_diffusers``, the module names of comfy/ldm/flux/layers.py and
comfy/ldm/modules/diffusionmodules/mmdit.py at ComfyUI 3cd7b32); docs/export.md records the run
of ComfyUI's own loader on these files.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth import lora
from dreambooth.kohya import from_kohya, to_kohya
from dreambooth.lora import LoraLayer
from dreambooth.lora import diffusers_lora_layers
from dreambooth.lora_names import fuse_lora, original_path, read_diffusers_transformer_lora, split_lora

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
MODULATION = ["norm1.linear", "norm1_context.linear"]
HIDDEN = 32  # two heads of 16


def transformer_lora(layers):
    """The transformer's part of the diffusers-format LoRA, as final/ and the export write it."""
    return diffusers_lora_layers(layers)["transformer"]


def anywhere(names):
    """A peft target regex: modules whose path ends with one of ``names``."""
    return rf".*\.({'|'.join(re.escape(n) for n in names)})"


FLUX_TARGETS = anywhere(ATTENTION + FEED_FORWARD + MODULATION) + \
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out|norm\.linear)"  # not the final proj_out
FLUX_DOUBLE_TARGETS = rf"transformer_blocks\.\d+\.(attn\.({'|'.join(re.escape(n) for n in ATTENTION)})|" \
    rf"{'|'.join(re.escape(n) for n in FEED_FORWARD + MODULATION)})"
SD3_TARGETS = anywhere(ATTENTION + FEED_FORWARD + MODULATION)


# ---------------------------------------------------------------- tiny models


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=HIDDEN,
                                 pooled_projection_dim=64, out_channels=16, pos_embed_max_size=8,
                                 dual_attention_layers=(0,))  # SD3.5's second attention in block 0


def with_lora(transformer, targets: str, r=4, alpha=8, seed=1):
    """peft adapters on the modules whose path matches ``targets`` (a regex), with random up
    weights (a trained LoRA, not a zero one)."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return transformer


def collect(transformer) -> dict[str, LoraLayer]:
    """lora.collect_lora on an object whose only part is ``transformer``."""
    components = lora.COMPONENTS if "transformer" in lora.COMPONENTS else (*lora.COMPONENTS, "transformer")
    with mock.patch.object(lora, "COMPONENTS", components):
        return lora.collect_lora(SimpleNamespace(transformer=transformer))


def t5_tokenizer():
    """A T5 tokenizer (Unigram) from a small vocabulary, offline."""
    from transformers import T5TokenizerFast

    words = "a photo of dog cat on the beach snow in".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -3.0) for w in words] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=16)


def tiny_pipeline(transformer):
    """A FluxPipeline or StableDiffusion3Pipeline around ``transformer``, from tiny parts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dreambooth.tokenizer import clip_tokenizer

    torch.manual_seed(2)

    def clip(cls, pad_id=49407):
        return cls(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=1,
                                  num_hidden_layers=1, max_position_embeddings=77, projection_dim=32,
                                  bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id))

    tokenizer_5 = t5_tokenizer()

    def t5(width):
        return T5EncoderModel(T5Config(vocab_size=len(tokenizer_5), d_model=width, d_ff=64, num_layers=1,
                                       num_heads=2, d_kv=16))

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                        norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    common = dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                  tokenizer=clip_tokenizer())
    if type(transformer).__name__.startswith("Flux"):
        pipe = FluxPipeline(**common, text_encoder=clip(CLIPTextModel), text_encoder_2=t5(32), tokenizer_2=tokenizer_5)
    else:  # SD3: two CLIPs (pooled 32 + 32) and T5 as wide as both CLIPs' hidden states
        pipe = StableDiffusion3Pipeline(**common, text_encoder=clip(CLIPTextModelWithProjection),
                                        text_encoder_2=clip(CLIPTextModelWithProjection, pad_id=0),
                                        tokenizer_2=clip_tokenizer(pad_token="!"), text_encoder_3=t5(64),
                                        tokenizer_3=tokenizer_5)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # built, not loaded: T5 would still be in training mode (dropout)
    return pipe


def latents(pipe):
    """Two denoising steps at 16 px: the transformer's output decides every value."""
    with torch.no_grad():
        return pipe("a photo of dog on the beach", height=16, width=16, num_inference_steps=2,
                    guidance_scale=1.0, max_sequence_length=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def reloaded_latents(pipe, expected):
    """``latents(pipe)`` of a pipeline with a loaded LoRA, checked against ``expected``: within
    float32 rounding as loaded (tensors read from a safetensors buffer need not be 64-byte
    aligned, and oneDNN then sums a matmul in another order: up to ~5e-7 measured), and bit for
    bit once the LoRA weights sit in fresh, aligned memory."""
    assert torch.allclose(latents(pipe), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_" in name:
                p.data = p.data.clone()
    assert torch.equal(latents(pipe), expected)


def same_lora(a: dict[str, LoraLayer], b: dict[str, LoraLayer]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].down, b[key].down), key
        assert torch.equal(a[key].up, b[key].up), key
        assert a[key].alpha == b[key].alpha, key


def delta(layer: LoraLayer):
    return layer.alpha / layer.rank * layer.up @ layer.down


def file_delta(state, name):
    """The weight change of kohya layer ``name`` in ``state``."""
    return delta(LoraLayer(state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"],
                           state[f"{name}.alpha"].item()))


def peft_delta(model, block, members):
    """peft's own weight changes of ``members`` of ``block``, stacked by rows."""
    return torch.cat([model.get_submodule(f"{block}.{m}").get_delta_weight("default") for m in members])


# ---------------------------------------------------------------- the fused-layer math


def random_lora(g, rank, rows, width=8, alpha=None, dtype=torch.float64):
    return LoraLayer(down=torch.randn(rank, width, generator=g, dtype=dtype),
                     up=torch.randn(rows, rank, generator=g, dtype=dtype), alpha=float(alpha or rank))


def test_fused_qkv_lora_is_the_stacked_member_loras():
    """q, k, v LoRAs (rank r, alpha a) -> one LoRA on the fused Linear: down stacked, up
    block-diagonal, rank 3r and alpha 3a, and the fused delta is the members' deltas stacked."""
    g = torch.Generator().manual_seed(0)
    parts = [random_lora(g, 4, 8, alpha=8) for _ in range(3)]
    fused = fuse_lora(parts, [8, 8, 8])
    assert fused.rank == 12 and fused.alpha == 24.0 and fused.alpha / fused.rank == 8 / 4
    assert torch.equal(fused.down, torch.cat([p.down for p in parts]))
    for j, p in enumerate(parts):
        for k in range(3):
            block = fused.up[8 * j:8 * (j + 1), 4 * k:4 * (k + 1)]
            assert torch.equal(block, p.up) if j == k else not block.any()
    assert torch.allclose(delta(fused), torch.cat([delta(p) for p in parts]), rtol=0, atol=1e-12)
    # the layer's output: W_qkv x + LoRA == [W_q x + LoRA_q; W_k x + ...]
    weights, x = [torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(3)], \
        torch.randn(5, 8, generator=g, dtype=torch.float64)
    fused_out = x @ torch.cat(weights).T + fused.alpha / fused.rank * (x @ fused.down.T) @ fused.up.T
    parts_out = torch.cat([x @ w.T + p.alpha / p.rank * (x @ p.down.T) @ p.up.T for w, p in zip(weights, parts)], 1)
    assert torch.allclose(fused_out, parts_out, rtol=0, atol=1e-12)
    # and back, bit for bit
    same_lora(dict(enumerate(split_lora(fused, [8, 8, 8]))), dict(enumerate(parts)))


def test_fused_linear1_with_an_absent_member_and_unequal_strengths():
    """FLUX's single-block linear1 = q, k, v and the MLP in-projection: without a LoRA on
    proj_mlp its block is zero (rank stays 4 x r for the splitters); members with another rank
    or alpha / r are padded and scaled so the delta is still exact."""
    g = torch.Generator().manual_seed(1)
    q, k, v = random_lora(g, 4, 8, alpha=8), random_lora(g, 4, 8, alpha=8), random_lora(g, 4, 8, alpha=8)
    fused = fuse_lora([q, k, v, None], [8, 8, 8, 32])
    assert fused.rank == 16 and fused.alpha == 32.0 and fused.up.shape == (56, 16)
    assert not fused.down[12:].any() and not fused.up[24:].any()
    expected = torch.cat([delta(q), delta(k), delta(v), torch.zeros(32, 8, dtype=torch.float64)])
    assert torch.allclose(delta(fused), expected, rtol=0, atol=1e-12)
    back = split_lora(fused, [8, 8, 8, 32])
    assert back[3] is None
    same_lora(dict(enumerate(back[:3])), {0: q, 1: k, 2: v})

    q2, v2 = random_lora(g, 2, 8, alpha=1), random_lora(g, 4, 8, alpha=16)  # scales 0.5 and 4
    fused = fuse_lora([q2, None, v2], [8, 8, 8])
    assert fused.rank == 12
    expected = torch.cat([delta(q2), torch.zeros(8, 8, dtype=torch.float64), delta(v2)])
    assert torch.allclose(delta(fused), expected, rtol=0, atol=1e-12)
    back = split_lora(fused, [8, 8, 8])
    assert back[1] is None
    for original, got in ((q2, back[0]), (v2, back[2])):
        assert torch.allclose(delta(got), delta(original), rtol=0, atol=1e-12)


def test_a_lora_trained_on_the_fused_layer_splits_exactly_at_full_rank():
    g = torch.Generator().manual_seed(2)
    dense = random_lora(g, 6, 24, alpha=3)  # not block-diagonal
    parts = split_lora(dense, [8, 8, 8])
    assert all(p.rank == 6 and p.alpha == 3 for p in parts)
    assert torch.allclose(torch.cat([delta(p) for p in parts]), delta(dense), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- what ComfyUI maps (from its source)


def comfy_flux_modules(depth, single):
    """ComfyUI's FLUX.1 weights that take a LoRA (``diffusion_model.<this>.weight``): comfy/ldm/flux."""
    double = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
              "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]
    return ({f"double_blocks.{i}.{m}" for i in range(depth) for m in double}
            | {f"single_blocks.{i}.{m}" for i in range(single) for m in ("linear1", "linear2", "modulation.lin")}
            | {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
               "vector_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"})


def comfy_sd3_modules(depth, dual=()):
    """ComfyUI's SD3 MMDiT weights that take a LoRA: comfy/ldm/modules/diffusionmodules/mmdit.py
    (the last context block is pre-only: no attn.proj, no mlp; SD3.5's ``dual`` blocks have
    x_block.attn2)."""
    out = {f"joint_blocks.{i}.x_block.attn2.{m}" for i in dual for m in ("qkv", "proj")}
    out |= {"context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
           "final_layer.linear", "final_layer.adaLN_modulation.1"}
    for i in range(depth):
        for part in ("x_block", "context_block"):
            out |= {f"joint_blocks.{i}.{part}.attn.qkv", f"joint_blocks.{i}.{part}.adaLN_modulation.1"}
            if part == "x_block" or i < depth - 1:
                out |= {f"joint_blocks.{i}.{part}.{m}" for m in ("attn.proj", "mlp.fc1", "mlp.fc2")}
    return out


# comfy/utils.py flux_to_diffusers / mmdit_to_diffusers: the diffusers paths ComfyUI maps, per block
COMFY_FLUX_DIFFUSERS_DOUBLE = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                               "attn.add_v_proj", "attn.to_out.0", "norm1.linear", "norm1_context.linear",
                               "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                               "ff_context.net.2"}
COMFY_FLUX_DIFFUSERS_SINGLE = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"}
COMFY_SD3_DIFFUSERS_BLOCK = COMFY_FLUX_DIFFUSERS_DOUBLE | {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}


def comfy_maps_diffusers_key(kind, key):
    """Would ComfyUI's ``transformer.<path>`` map take this diffusers-format LoRA module?"""
    path = key.removeprefix("transformer.")
    block, _, rest = path.partition(".")
    index, _, inner = rest.partition(".")
    if kind == "flux1":
        table = {"transformer_blocks": COMFY_FLUX_DIFFUSERS_DOUBLE,
                 "single_transformer_blocks": COMFY_FLUX_DIFFUSERS_SINGLE}
    else:
        table = {"transformer_blocks": COMFY_SD3_DIFFUSERS_BLOCK}
    return key.startswith("transformer.") and index.isdigit() and inner in table.get(block, ())


# ---------------------------------------------------------------- FLUX.1


def test_flux_kohya_names_are_comfyui_modules_and_fuse_exactly():
    model = with_lora(tiny_flux(), FLUX_TARGETS)
    layers = collect(model)
    assert len(layers) == 2 * 14 + 2 * 6  # every target of both double and both single blocks
    state = to_kohya(layers, "flux1")
    names = {k.partition(".")[0] for k in state}
    assert names == {f"lora_unet_{m.replace('.', '_')}" for m in comfy_flux_modules(2, 2)
                     if m.startswith(("double_blocks", "single_blocks"))}
    assert all(f"{n}.{f}" in state for n in names for f in ("lora_down.weight", "lora_up.weight", "alpha"))
    qkv_name, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"
    assert state[f"{qkv_name}.lora_down.weight"].shape == (12, HIDDEN)
    assert state[f"{qkv_name}.lora_up.weight"].shape == (3 * HIDDEN, 12) and state[f"{qkv_name}.alpha"].item() == 24.0
    assert state[f"{linear1}.lora_up.weight"].shape == (7 * HIDDEN, 16)  # q, k, v and the 4 x wide MLP
    assert state[f"{linear1}.alpha"].item() == 32.0
    assert state["lora_unet_double_blocks_1_txt_mlp_0.alpha"].item() == 8.0  # unfused: as trained
    # each fused delta is the stack of peft's own deltas of the member modules
    qkv, add_qkv = ["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    for name, block, members in ((qkv_name, "transformer_blocks.0", qkv),
                                 ("lora_unet_double_blocks_1_txt_attn_qkv", "transformer_blocks.1", add_qkv),
                                 (linear1, "single_transformer_blocks.1", qkv + ["proj_mlp"])):
        assert torch.allclose(file_delta(state, name), peft_delta(model, block, members), rtol=0, atol=1e-6), name
    same_lora(from_kohya(state, (), "flux1"), layers)
    same_lora(from_kohya(state, layers, "flux1"), layers)
    assert to_kohya(layers, "flux1").keys() == state.keys()


def test_flux_attention_only_pads_the_mlp_block_of_linear1():
    layers = collect(with_lora(tiny_flux(), anywhere(ATTENTION)))
    state = to_kohya(layers, "flux1")
    up, down = state["lora_unet_single_blocks_0_linear1.lora_up.weight"], \
        state["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert up.shape == (7 * HIDDEN, 16) and down.shape == (16, HIDDEN)
    assert not up[3 * HIDDEN:].any() and not down[12:].any()
    back = from_kohya(state, (), "flux1")
    same_lora(back, layers)  # no proj_mlp LoRA appears
    assert not any("proj_mlp" in k for k in back)


def test_flux_diffusers_format_reloads_in_flux_pipeline(tmp_path):
    """FluxPipeline.save_lora_weights of our state dict, then load_lora_weights on a fresh
    pipeline: the same latents as the adapted model, bit for bit."""
    from diffusers import FluxPipeline

    model = with_lora(tiny_flux(), FLUX_TARGETS)
    layers = collect(model)
    expected = latents(tiny_pipeline(model))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=transformer_lora(layers),
                                   safe_serialization=True)
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert len(state) == 2 * len(layers)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert all(comfy_maps_diffusers_key("flux1", k.rsplit(".", 2)[0]) for k in state)
    fresh = tiny_pipeline(tiny_flux())
    fresh.load_lora_weights(str(tmp_path))
    reloaded_latents(fresh, expected)
    back = read_diffusers_transformer_lora(state)
    for key, layer in layers.items():
        assert torch.equal(delta(back[key]), layer.alpha / layer.rank * layer.up @ layer.down)


def test_flux_kohya_file_reloads_through_diffusers(tmp_path):
    """diffusers' own kohya converter splits our fused double-block LoRAs back (its single-block
    split is written for FLUX.1's 3072 width only, so the tiny model's single blocks are left
    out here); our own reader takes the whole file back to a diffusers file."""
    from diffusers import FluxPipeline

    model = with_lora(tiny_flux(), FLUX_DOUBLE_TARGETS)
    layers = collect(model)
    assert len(layers) == 2 * 14
    expected = latents(tiny_pipeline(model))
    save_file(to_kohya(layers, "flux1"), str(tmp_path / "kohya.safetensors"))
    fresh = tiny_pipeline(tiny_flux())
    fresh.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    reloaded_latents(fresh, expected)

    model = with_lora(tiny_flux(), FLUX_TARGETS)
    layers = collect(model)
    expected = latents(tiny_pipeline(model))
    save_file(to_kohya(layers, "flux1"), str(tmp_path / "all.safetensors"))
    back = from_kohya(load_file(str(tmp_path / "all.safetensors")), (), "flux1")
    FluxPipeline.save_lora_weights(tmp_path / "back", transformer_lora_layers=transformer_lora(back))
    fresh = tiny_pipeline(tiny_flux())
    fresh.load_lora_weights(str(tmp_path / "back"))
    reloaded_latents(fresh, expected)


def test_flux_kohya_single_blocks_split_by_diffusers_at_flux1_width():
    """diffusers' kohya converter splits linear1 with FLUX.1's sizes (3072: q, k, v, 12288: MLP)
    hard-coded, so the tiny model cannot show it: LoRA tensors of the real width (no model
    needed) go through ``FluxPipeline.lora_state_dict`` and come back as the same deltas; an
    attention-only block gives proj_mlp a zero LoRA."""
    from diffusers import FluxPipeline

    g, width = torch.Generator().manual_seed(3), 3072

    def lora_on(rows, columns=width):
        return LoraLayer(torch.randn(4, columns, generator=g), torch.randn(rows, 4, generator=g) * 0.01, 8.0)

    block0 = {"attn.to_q": width, "attn.to_k": width, "attn.to_v": width, "proj_mlp": 4 * width,
              "norm.linear": 3 * width}
    layers = {f"transformer.single_transformer_blocks.0.{p}": lora_on(rows) for p, rows in block0.items()}
    layers["transformer.single_transformer_blocks.0.proj_out"] = lora_on(width, 5 * width)
    layers.update({f"transformer.single_transformer_blocks.1.attn.{p}": lora_on(width)
                   for p in ("to_q", "to_k", "to_v")})
    converted = FluxPipeline.lora_state_dict(to_kohya(layers, "flux1"))
    for key, layer in layers.items():  # the deltas, applied to a few vectors (diffusers: alpha = rank)
        x = torch.randn(layer.down.shape[1], 3, generator=g)
        got = converted[f"{key}.lora_B.weight"] @ (converted[f"{key}.lora_A.weight"] @ x)
        expected = layer.alpha / layer.rank * layer.up @ (layer.down @ x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), key
    empty = "transformer.single_transformer_blocks.1.proj_mlp"
    assert not converted[f"{empty}.lora_A.weight"].any() and not converted[f"{empty}.lora_B.weight"].any()
    assert len(converted) == 2 * (len(layers) + 1)


# ---------------------------------------------------------------- SD3


def test_sd3_kohya_names_are_comfyui_modules_and_fuse_exactly():
    model = with_lora(tiny_sd3(), SD3_TARGETS)
    layers = collect(model)
    assert len(layers) == 14 + 4 + 11  # block 0 with attn2; the last block's context stream is pre-only
    state = to_kohya(layers, "sd3")
    names = {k.partition(".")[0] for k in state}
    assert names == {f"lora_unet_{m.replace('.', '_')}" for m in comfy_sd3_modules(2, dual=(0,))
                     if m.startswith("joint")}
    qkv, add_qkv = ["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    for name, block, members in (("lora_unet_joint_blocks_0_x_block_attn_qkv", 0, qkv),
                                 ("lora_unet_joint_blocks_0_x_block_attn2_qkv", 0, [f"attn2.{m[5:]}" for m in qkv]),
                                 ("lora_unet_joint_blocks_1_context_block_attn_qkv", 1, add_qkv)):
        assert state[f"{name}.alpha"].item() == 24.0 and state[f"{name}.lora_down.weight"].shape == (12, HIDDEN)
        expected = peft_delta(model, f"transformer_blocks.{block}", members)
        assert torch.allclose(file_delta(state, name), expected, rtol=0, atol=1e-6), name
    # the pre-only context block's modulation is (shift, scale) in the original: halves swapped
    norm = model.get_submodule("transformer_blocks.1.norm1_context.linear").get_delta_weight("default")
    last = file_delta(state, "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1")
    assert torch.equal(last, torch.cat([norm[HIDDEN:], norm[:HIDDEN]]))
    first = state["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"]  # six chunks: as is
    assert torch.equal(first, layers["transformer.transformer_blocks.0.norm1_context.linear"].up)
    same_lora(from_kohya(state, (), "sd3"), layers)
    same_lora(from_kohya(state, layers, "sd3"), layers)


def test_sd3_diffusers_format_reloads_in_sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = with_lora(tiny_sd3(), SD3_TARGETS)
    layers = collect(model)
    expected = latents(tiny_pipeline(model))
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=transformer_lora(layers))
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert len(state) == 2 * len(layers) and all(comfy_maps_diffusers_key("sd3", k.rsplit(".", 2)[0]) for k in state)
    fresh = tiny_pipeline(tiny_sd3())
    fresh.load_lora_weights(str(tmp_path))
    reloaded_latents(fresh, expected)
    # the kohya file, read back by our reader, draws the same
    back = from_kohya(to_kohya(layers, "sd3"), (), "sd3")
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "k", transformer_lora_layers=transformer_lora(back))
    fresh = tiny_pipeline(tiny_sd3())
    fresh.load_lora_weights(str(tmp_path / "k"))
    reloaded_latents(fresh, expected)


def test_text_encoder_names_of_the_transformer_kinds():
    """kohya's prefixes, as ComfyUI's model_lora_keys_clip maps them: CLIP-L ``lora_te1_`` and
    SD3's CLIP-G ``lora_te2_`` under ``text_model``, T5 ``lora_te3_`` + its module path."""
    layer = LoraLayer(torch.ones(1, 4), torch.ones(4, 1), 1.0)
    keys = {"flux1": {"text_encoder.encoder.layers.0.self_attn.q_proj":
                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                      "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q":
                      "lora_te3_encoder_block_0_layer_0_SelfAttention_q"},
            "sd3": {"text_encoder_2.text_model.encoder.layers.1.mlp.fc1":
                    "lora_te2_text_model_encoder_layers_1_mlp_fc1",
                    "text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wo":
                    "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo"}}
    for kind, names in keys.items():
        layers = {key: layer for key in names} | {"transformer.transformer_blocks.0.attn.to_out.0": layer}
        state = to_kohya(layers, kind)
        proj = "double_blocks_0_img_attn_proj" if kind == "flux1" else "joint_blocks_0_x_block_attn_proj"
        assert {k.partition(".")[0] for k in state} == set(names.values()) | {f"lora_unet_{proj}"}
        assert from_kohya(state, layers, kind).keys() == layers.keys()


# ---------------------------------------------------------------- errors


def test_names_refuse_what_they_cannot_place():
    with pytest.raises(ValueError, match="no name in the original layout"):
        original_path("flux1", "transformer_blocks.0.attn.norm_q")
    with pytest.raises(ValueError, match="no original-layout LoRA names"):
        original_path("sdxl", "transformer_blocks.0.attn.to_q")
    layer = LoraLayer(torch.zeros(1, 4), torch.zeros(4, 1), 1.0)
    with pytest.raises(ValueError, match="match no module of a flux1 model"):
        from_kohya(to_kohya({"unet.down_blocks.0.attn1.to_q": layer}, "sd1"), (), "flux1")
    with pytest.raises(ValueError, match="cover the transformer"):
        to_kohya({"unet.x": layer}, "flux1")
    assert original_path("flux1", "single_transformer_blocks.3.proj_mlp") == ("single_blocks.3.linear1", 3)
    assert original_path("sd3", "transformer_blocks.5.attn.to_add_out") == \
        ("joint_blocks.5.context_block.attn.proj", None)
