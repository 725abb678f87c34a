"""Tiny models of the real architectures, built in-process in about a second, for tests and CPU
runs: ``tiny``, ``tiny-sd2``, ``tiny-sdxl`` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel
with the real CLIP tokenizer, DDPM scheduler) and ``tiny-flux1``, ``tiny-sd3``.

For FLUX.1 and SD 3.x the classes are the real ones (FluxTransformer2DModel / SD3Transformer2DModel, a 16-channel
AutoencoderKL with the families' scaling and shift, CLIP and T5 encoders, FlowMatchEulerDiscreteScheduler)
at tiny sizes, with one or two wide attention heads (many narrow heads dominate CPU time). T5's
real vocabulary is a SentencePiece model that cannot be downloaded here: ``t5_tokenizer`` builds
a character-level Unigram vocabulary with the ``tokenizers`` library, wrapped in transformers'
``T5TokenizerFast`` (so a pipeline saves and reloads it as tokenizer.json), in which every
identifier spells out as distinct tokens.
"""

from __future__ import annotations

import string

from typing import Any

from dreambooth.base_model import TINY_NAMES, BaseModel
from dreambooth.errors import ModelError

T5_MAX_LENGTH = 32  # tokens: the tiny T5's prompt length (one per character, plus </s>)
VAE_FACTORS = {"flux1": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}  # (scaling, shift) of the real VAEs


def t5_tokenizer(max_length: int = T5_MAX_LENGTH, words: tuple[str, ...] = ()):
    """A T5TokenizerFast over a character-level Unigram vocabulary (pad 0, </s> 1, <unk> 2), with
    a whole-word piece ("▁word") for each of ``words`` before the characters: the Unigram model
    then reads those words as one token and spells out anything else."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = ["▁", *string.ascii_lowercase, *string.digits, *string.punctuation]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in ["▁" + w for w in words] + chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def tiny_t5(vocab_size: int, hidden: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden, d_ff=2 * hidden,
                                   num_layers=2, num_heads=1, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def tiny_vae(kind: str, resolution: int):
    from diffusers import AutoencoderKL

    scaling, shift = VAE_FACTORS[kind]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, sample_size=resolution,
                         block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=False,
                         use_post_quant_conv=False)


def build_tiny_flow(name: str, seed: int = 0, resolution: int = 64) -> BaseModel:
    """``tiny-flux1`` (FLUX.1 [dev]: guidance embedding, CLIP-L + T5) or ``tiny-sd3`` (CLIP-L,
    CLIP-G, T5); the same ``seed`` gives the same weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    from dreambooth.tokenizer import clip_tokenizer

    kind = {"tiny-flux1": "flux1", "tiny-sd3": "sd3"}[name]
    torch.manual_seed(seed)
    vae, t5_tok = tiny_vae(kind, resolution), t5_tokenizer()
    if kind == "flux1":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15)
        return BaseModel(unet=None, vae=vae, text_encoder=_tiny_text_encoder(32), tokenizer=clip_tokenizer(),
                         scheduler=scheduler, kind=kind, source=name, text_encoder_2=tiny_t5(len(t5_tok)),
                         tokenizer_2=t5_tok, transformer=transformer, native_size=resolution)
    # SD 3.5 medium's layout (q/k norms, a second attention in the first block). SD 3.x pads the two
    # CLIPs' side-by-side hidden states (32 + 32) to T5's width, so T5 is wider
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=1, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        out_channels=16, pos_embed_max_size=resolution // 8, qk_norm="rms_norm", dual_attention_layers=(0,))
    return BaseModel(unet=None, vae=vae, text_encoder=_tiny_text_encoder(32, with_projection=True),
                     tokenizer=clip_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                     kind=kind, source=name, transformer=transformer,
                     text_encoder_2=_tiny_text_encoder(32, with_projection=True, pad_id=0),
                     tokenizer_2=clip_tokenizer(pad_token="!"), text_encoder_3=tiny_t5(len(t5_tok), hidden=64),
                     tokenizer_3=t5_tok)


def _tiny_text_encoder(hidden: int, with_projection: bool = False, pad_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=1,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id, hidden_act="quick_gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def build_tiny(name: str = "tiny", seed: int = 0, resolution: int = 64) -> BaseModel:
    """A tiny random model of the real architecture; the same ``seed`` gives the same weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreambooth.tokenizer import clip_tokenizer

    if name not in TINY_NAMES:
        raise ModelError(f"unknown tiny model '{name}'; choose one of {', '.join(TINY_NAMES)}")
    if name in ("tiny-flux1", "tiny-sd3"):
        return build_tiny_flow(name, seed, resolution)
    kind = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}[name]
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    unet_args: dict[str, Any] = dict(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=1,
    )
    extra: dict[str, Any] = {}
    if kind == "sd1":
        text_encoder, tokenizer = _tiny_text_encoder(32), clip_tokenizer()
    elif kind == "sd2":  # SD 2.x: linear projections in attention, v-prediction, pads with "!"
        unet_args.update(use_linear_projection=True)
        text_encoder, tokenizer = _tiny_text_encoder(32, pad_id=0), clip_tokenizer(pad_token="!")
    else:  # SDXL: two text encoders (concatenated), pooled text + size/crop "time ids"
        unet_args.update(
            cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        text_encoder, tokenizer = _tiny_text_encoder(32), clip_tokenizer()
        extra = dict(text_encoder_2=_tiny_text_encoder(32, with_projection=True, pad_id=0),
                     tokenizer_2=clip_tokenizer(pad_token="!"))
    unet = UNet2DConditionModel(**unet_args)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     scheduler=scheduler, kind=kind, source=name, **extra)
