"""Pretrain the flow-matching world model (`--model world-flux`): a FLUX.1-architecture
transformer trained from scratch on the procedural world, so the probes measure flow-matching
DreamBooth the way they measure the UNet world (docs/world.md, "The flow-matching world model").

It reuses the shipped world model's frozen VAE (16x16x4 latents, packed 2x2 into 64 tokens) and
frozen CLIP text encoder (FLUX.1's pooled CLIP input), and trains two things together: a
``FluxTransformer2DModel`` without a guidance input (like FLUX.1 [schnell]; it is sampled with
true classifier-free guidance, so 10% of captions are dropped) and a small ``T5EncoderModel``
over a SentencePiece-style vocabulary of the world's words with one piece per character as the
fallback (so an identifier such as "zwx" spells out in pieces the model never trained on: a
rare token, as DreamBooth wants). The loss is rectified flow's, as ``FluxFamily`` trains it:
noise to (1 - σ) x0 + σ ε at logit-normal σ, velocity target ε - x0, the latent cells a mark
covers weighted ``mark_weight``. One resumable stage (``pretrain._stage``): the pool mixes the
UNet world's two stages (a share of marked objects, most of them named).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreambooth import flow
from dreambooth.models import BaseModel
from dreambooth.world import pretrain as base

RESOLUTION = 64


@dataclass
class FluxPretrainConfig:
    seed: int = 0
    steps: int = 8000
    batch: int = 48
    lr: float = 4e-4
    polish_steps: int = 6000  # a second stage on the same pool, warm-up + cosine again from polish_lr
    polish_lr: float = 1.5e-4
    warmup: int = 300
    pool: int = 20000  # rendered scenes whose latents the stage trains on
    caption_dropout: float = 0.1
    mark_rate: float = 0.4  # scenes that carry a mark
    mark_named: float = 0.7  # of those, captions that name it
    mark_weight: float = 4.0  # loss weight of the latent cells a mark covers (others: 1)
    logit_std: float = 1.0  # σ = sigmoid(N(0, logit_std)): SD3's logit-normal sampling
    hidden: int = 128  # transformer width: one wide attention head
    double_layers: int = 2
    single_layers: int = 4
    t5_hidden: int = 64
    t5_layers: int = 2
    max_tokens: int = 24  # T5 tokens: a world caption is at most 14 words
    checkpoint_every: int = 250

    def max_workers(self) -> int:
        return self.batch


def world_words() -> list[str]:
    """Every word a world caption uses (the T5 vocabulary's whole-word pieces)."""
    from dreambooth.world import render

    words = {"a", "an", "photo", "of", *render.SHAPES, *render.COLORS, *render.PATTERNS}
    for phrase in (*render.BACKGROUND_PHRASES.values(), *render.MARK_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


def t5_tokenizer(max_length: int):
    """The T5 tokenizer: a piece per world word, one per character for the rest (``tiny.t5_tokenizer``)."""
    from dreambooth.tiny import t5_tokenizer as build

    return build(max_length, tuple(world_words()))


def architecture(cfg: FluxPretrainConfig) -> BaseModel:
    """The untrained flow world model around the shipped world model's VAE and CLIP encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from dreambooth.models import WORLD_MODEL, load_folder

    world = load_folder(WORLD_MODEL)
    world.vae.register_to_config(shift_factor=0.0)  # FluxPipeline reads it
    torch.manual_seed(cfg.seed)
    h, rope = cfg.hidden, (cfg.hidden // 4, 3 * cfg.hidden // 8, 3 * cfg.hidden // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * world.vae.config.latent_channels, num_layers=cfg.double_layers,
        num_single_layers=cfg.single_layers, attention_head_dim=h, num_attention_heads=1,
        joint_attention_dim=cfg.t5_hidden, pooled_projection_dim=world.text_encoder.config.hidden_size,
        guidance_embeds=False, axes_dims_rope=rope)
    tokenizer_2 = t5_tokenizer(cfg.max_tokens)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=cfg.t5_hidden, d_kv=cfg.t5_hidden, d_ff=4 * cfg.t5_hidden,
        num_layers=cfg.t5_layers, num_heads=1, relative_attention_num_buckets=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    world.text_encoder.requires_grad_(False).eval()
    world.vae.requires_grad_(False).eval()
    return BaseModel(unet=None, vae=world.vae, text_encoder=world.text_encoder, tokenizer=world.tokenizer,
                     scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), kind="flux1", source="world-flux",
                     text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
                     native_size=RESOLUTION)


def flow_pool(model: BaseModel, cfg: FluxPretrainConfig) -> dict[str, torch.Tensor]:
    """``pretrain.latent_pool``'s latents and mark weights, with T5 ids and the frozen CLIP's
    pooled embedding of every caption (and of the empty caption)."""
    pool = base.latent_pool(model, cfg.pool, 4 * 10**9, base.PretrainConfig.size_range, cfg.mark_rate,
                            cfg.mark_named, cfg.mark_weight, tokenizer_2=model.tokenizer_2)
    with torch.no_grad():
        pool["pooled"] = torch.cat([model.text_encoder(pool["ids"][i:i + 500]).pooler_output
                                    for i in range(0, len(pool["ids"]), 500)])
        pool["empty_pooled"] = model.text_encoder(pool["empty"][None]).pooler_output[0]
    return pool


def flow_loss(model: BaseModel, pool: dict[str, torch.Tensor], cfg: FluxPretrainConfig, seed: int) -> torch.Tensor:
    """The rectified-flow loss on a batch drawn from ``pool`` with ``seed`` (this worker's rows'
    share; the shares sum to the batch's loss)."""
    from dreambooth.flow_family import FluxFamily

    n = cfg.batch
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, len(pool["latents"]), (n,), generator=g)
    dropped = torch.rand(n, generator=g) < cfg.caption_dropout
    sigmas = flow.sample_u(g, n, "logit_normal", 0.0, cfg.logit_std)
    noise = torch.randn((n, *pool["latents"].shape[1:]), generator=g)
    rows = base.my_rows(n)
    idx, sigmas, noise, drop = batch[rows], sigmas[rows], noise[rows], dropped[rows]
    x0, ids = pool["latents"][idx], pool["ids_2"][idx].clone()
    ids[drop] = pool["empty_2"]
    pooled = torch.where(drop[:, None], pool["empty_pooled"], pool["pooled"][idx])
    cond = {"encoder_hidden_states": model.text_encoder_2(ids)[0], "pooled_projections": pooled}
    pred = FluxFamily(model=model).predict(model.transformer, flow.noised(x0, noise, sigmas), sigmas * 1000, cond)
    err = (pred - flow.flow_target(x0, noise)) ** 2
    w = pool["weights"]  # (N, 1, h, w): the mean over the batch's weighted cells, channels alike
    return (w[idx] * err).sum() / (w[batch].sum() * err.shape[1])


def trained_modules(model: BaseModel) -> dict[str, torch.nn.Module]:
    return {"transformer": model.transformer, "text_encoder_2": model.text_encoder_2}


def pretrain_flux(out: Path, cfg: FluxPretrainConfig) -> Path:
    """Run (or resume) the stage into ``out`` and write ``out/model`` (fp16 diffusers folder)."""
    from dreambooth.runlog import log_metrics, read_metrics

    rank, workers = base.worker()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "pretrain-config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model = architecture(cfg)
    pool: dict[str, torch.Tensor] = {}

    def losses(offset: int):  # each stage draws its own batches (offset) from the one pool
        def loss(step: int) -> torch.Tensor:
            if not pool:  # rendered on the first step: a finished stage needs none
                pool.update(flow_pool(model, cfg))
            return flow_loss(model, pool, cfg, cfg.seed * 1_000_003 + step + offset)
        return loss

    def log(record):
        log_metrics(out / "metrics.jsonl", record)

    base._stage("transformer", out, cfg, trained_modules(model), cfg.steps, cfg.lr, losses(5 * 10**7), log)
    if cfg.polish_steps:
        base._stage("polish", out, cfg, trained_modules(model), cfg.polish_steps, cfg.polish_lr, losses(7 * 10**7), log)
    final = out / "model"
    if rank != 0:
        return final
    for m in model.modules():
        m.eval().half()
    base.ckpt.atomic_dir(final, lambda tmp: model.save(tmp))
    last = {}  # stage -> its last metrics row
    for r in read_metrics(out / "metrics.jsonl"):
        last[r["stage"]] = r
    (out / "made.json").write_text(json.dumps({
        "config": asdict(cfg), "workers": workers, "final_loss": list(last.values())[-1]["loss"],
        "seconds": sum(r["seconds"] for r in last.values()), "stage_seconds": {k: r["seconds"] for k, r in last.items()},
        "base": "the shipped world model's VAE and CLIP text encoder",
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in trained_modules(model).items()}},
        indent=1))
    return final


def pretrain(out: str | Path, cfg: FluxPretrainConfig | None = None, workers: int = 1) -> Path:
    """Run (or resume) the flow world model's pretraining into ``out`` with ``workers`` one-thread
    processes; ``out/model`` is the result."""
    cfg = cfg or FluxPretrainConfig()
    if workers < 1 or workers > cfg.max_workers():
        from dreambooth.errors import DreamboothError

        raise DreamboothError(f"workers={workers}: use 1 to {cfg.max_workers()}, one per CPU core")
    return base.run_workers(pretrain_flux, Path(out), cfg, workers)


def load_partial(out: str | Path) -> BaseModel:
    """The model as far as ``out``'s newest checkpoint has trained it (to inspect a run)."""
    cfg = FluxPretrainConfig(**json.loads((Path(out) / "pretrain-config.json").read_text()))
    model = architecture(cfg)
    for stage in ("transformer", "polish"):
        last = base.ckpt.latest_checkpoint(Path(out) / stage)
        if last is not None:
            base._load_modules(trained_modules(model), base.ckpt.load_weights(last))
    return model
