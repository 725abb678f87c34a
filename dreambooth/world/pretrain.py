"""Pretrain the "world" base model from scratch on rendered scenes, on a CPU.

Four stages, each resumable from its newest checkpoint in OUT/<stage>/checkpoints/:
  1. vae      an AutoencoderKL (64x64 RGB <-> 16x16x4 latents) on the full color range,
              reconstruction MSE + a small KL.
  2. decoder  the VAE's decoder alone, longer, on the frozen encoder's latents: the latents (and
              so the UNet's data) stay as they are, and fine patterns that a briefly trained
              decoder smears (a star's stripes under its band) come back. PSNR on fresh renders
              is reported after it.
  3. unet     a UNet2DConditionModel and a CLIPTextModel (real CLIP tokenizer) trained together
              from scratch with the noise-prediction loss on frozen-VAE latents of a rendered
              pool; 10% of captions are dropped to "" so classifier-free guidance works.
  4. marks    the UNet and text encoder again, on a new pool in which half the objects carry a
              mark, 70% of those captions name it ("... with a cross ..."), and the loss on the
              latent cells a mark covers weighs 10x. After stage 3 the model drew almost no marks (a
              mark covers 2-4% of the latent cells, so it hardly moves the loss); a base model
              that draws marks, and knows them by name, gives DreamBooth a subject's mark to bind
              rather than a new thing to learn (docs/world.md).
The result is a diffusers folder (fp16 on disk) that `--model world` and
StableDiffusionPipeline.from_pretrained load. As in train.py, the randomness of step s is a
function of (seed, s), so a resumed stage continues exactly.

``workers=N`` trains with N CPU processes of one thread each (gloo). Every worker draws a step's
whole batch of randomness, renders and computes only its rows (rank, rank + N, ...), and scales
its loss by the whole batch; one all-reduce sums the gradients, so every worker takes the
one-process step (up to the order of float sums) and the weights stay identical across workers.
Worker 0 writes checkpoints, metrics and the model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dreambooth import checkpoint as ckpt
from dreambooth.data import arrays_to_tensor
from dreambooth.models import BaseModel
from dreambooth.runlog import log_metrics, read_metrics

RESOLUTION = 64


@dataclass
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 1000
    decoder_lr: float = 5e-4
    unet_steps: int = 8000
    unet_batch: int = 48
    unet_lr: float = 4e-4
    warmup: int = 300
    pool: int = 30000  # rendered scenes whose latents the UNet stage trains on
    calibration: int = 256  # fresh renders that set the latent scale and measure the VAE's PSNR
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    text_hidden: int = 64
    marks_steps: int = 3000
    marks_lr: float = 3e-4
    marks_pool: int = 10000
    marks_rate: float = 0.5  # scenes of the marks pool that carry a mark
    marks_named: float = 0.7  # of those, captions that name it
    mark_weight: float = 10.0  # loss weight of the latent cells a mark covers (others: 1)
    unet_channels: tuple[int, int, int] = (64, 64, 128)  # docs/world.md: the finest level wide
    max_tokens: int = 32  # world captions are short; pipelines pad prompts to this length
    # Object size ranges of the pretraining renders (fractions of the width). The VAE learns on
    # small and large objects alike; the UNet learns on the renderer's range, where shapes and
    # patterns span 7-11 cells of the 16x16 latent grid.
    vae_size_range: tuple[float, float] = (0.25, 0.7)
    size_range: tuple[float, float] = (0.45, 0.7)

    def max_workers(self) -> int:
        """Most worker processes: each must get at least one row of every batch."""
        return min(self.vae_batch, self.unet_batch)


def architecture(cfg: PretrainConfig) -> BaseModel:
    """The untrained world model: diffusers/transformers classes at a CPU-friendly size."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.tokenizer import clip_tokenizer

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION,
        block_out_channels=(32, 32, 64), norm_num_groups=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False)  # attention at 16x16 quadrupled the step time
    h = cfg.text_hidden
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=h, intermediate_size=4 * h, num_attention_heads=1,
        num_hidden_layers=3, max_position_embeddings=77, projection_dim=h,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"))
    c = cfg.unet_channels
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=c, norm_num_groups=16, cross_attention_dim=h, attention_head_dim=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = cfg.max_tokens
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     scheduler=scheduler, kind="sd1", source="world")


def worker() -> tuple[int, int]:
    """(rank, number of workers) of this process: (0, 1) outside ``pretrain(workers=N)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_rows(n: int) -> slice:
    """This worker's rows of a batch of n: rank, rank + workers, ..."""
    rank, world = worker()
    return slice(rank, n, world)


def batch_pixels(n: int, seed: int, size_range: tuple[float, float],
                 rows: slice | None = None) -> tuple[torch.Tensor, list[str]]:
    """n fresh renders of the pretraining distribution as (n,3,64,64) in [-1,1], with captions;
    ``rows`` renders only those of the n."""
    from dreambooth.world.render import sample_pretraining

    keep = None if rows is None else range(n)[rows]
    images, captions, _ = sample_pretraining(n, seed, size_range=tuple(size_range), rows=keep)
    return arrays_to_tensor(images), captions


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def calibrate_vae(vae, n: int, size_range: tuple[float, float]) -> float:
    """Set the latent scaling factor to 1/std of the latents of n fresh renders (never trained
    on), as Stable Diffusion's 0.18215 was chosen; return the VAE's PSNR on them."""
    vae.eval().requires_grad_(False)
    x, _ = batch_pixels(n, 10**9 + 1, size_range)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        return psnr(vae.decode(z).sample, x)


def reconstruct(vae, x: torch.Tensor, seed: int, rows: slice = slice(None), batch: int = 0):
    """(posterior, decoded image) of x through a latent drawn from the posterior with ``seed``.
    x may be ``rows`` of a batch of ``batch`` images: the draw is the whole batch's, sliced."""
    posterior = vae.encode(x).latent_dist
    g = torch.Generator().manual_seed(seed)
    shape = (batch or len(x), *posterior.mean.shape[1:])
    z = posterior.mean + posterior.std * torch.randn(shape, generator=g)[rows]
    return posterior, vae.decode(z).sample


def reconstruction_loss(vae, cfg: PretrainConfig, k: int, kl_weight: float) -> torch.Tensor:
    """The VAE's loss on batch k of fresh renders: pixel MSE + kl_weight * KL; a worker computes
    its rows' share (the shares sum to the batch's loss)."""
    n = cfg.vae_batch
    rows = my_rows(n)
    x, _ = batch_pixels(n, cfg.seed * 1_000_003 + k, cfg.vae_size_range, rows)
    posterior, recon = reconstruct(vae, x, cfg.seed * 7 + k, rows, n)
    loss = (recon - x).pow(2).sum() / (n * x[0].numel())
    return loss + kl_weight * posterior.kl().sum() / n if kl_weight else loss


def latent_pool(model: BaseModel, n: int, seed: int, size_range, mark_rate: float = 0.2,
                mark_named: float = 0.0, mark_weight: float = 1.0, tokenizer_2=None) -> dict[str, torch.Tensor]:
    """n rendered scenes as frozen-VAE latents, caption token ids, and per-latent-cell loss
    weights (``mark_weight`` on the cells a mark covers, grown by one cell; 1 elsewhere); with
    ``tokenizer_2`` also its ids of the captions ("ids_2", "empty_2")."""
    from dreambooth.models import encode_latents, tokenize
    from dreambooth.world.render import mark_mask, sample_pretraining

    rank, world = worker()
    chunks = {}  # chunk k of 500 scenes: (latents, token ids, weights); worker k % world makes it
    for k, start in enumerate(range(0, n, 500)):
        if k % world != rank:
            continue
        images, caps, scenes = sample_pretraining(min(500, n - start), seed + start,
                                                  mark_rate=mark_rate, mark_named=mark_named,
                                                  size_range=tuple(size_range))
        weights = None
        if mark_weight != 1.0:
            masks = torch.from_numpy(np.stack([mark_mask(s, im) for s, im in zip(scenes, images)]))
            cells = torch.nn.functional.max_pool2d(masks[:, None].float(), RESOLUTION // 16)
            cells = torch.nn.functional.max_pool2d(cells, 3, stride=1, padding=1)
            weights = 1 + (mark_weight - 1) * cells
        chunks[k] = (encode_latents(model, arrays_to_tensor(images), batch=100),
                     tokenize(model.tokenizer, caps), weights,
                     None if tokenizer_2 is None else tokenize(tokenizer_2, caps))
    if world > 1:
        import torch.distributed as dist

        every = [None] * world
        dist.all_gather_object(every, chunks)
        chunks = {k: v for part in every for k, v in part.items()}
    latents, ids, weights, ids_2 = zip(*(chunks[k] for k in sorted(chunks)))
    pool = dict(latents=torch.cat(latents), ids=torch.cat(ids), empty=tokenize(model.tokenizer, [""])[0])
    if mark_weight != 1.0:
        pool["weights"] = torch.cat(weights)
    if tokenizer_2 is not None:
        pool.update(ids_2=torch.cat(ids_2), empty_2=tokenize(tokenizer_2, [""])[0])
    return pool


def denoising_loss(model: BaseModel, pool: dict[str, torch.Tensor], cfg: PretrainConfig,
                   seed: int) -> torch.Tensor:
    """The noise-prediction loss on a batch drawn from ``pool`` with ``seed``; captions dropped
    to "" at cfg.caption_dropout; weighted per latent cell where the pool has weights. A worker
    computes its rows' share of the batch's loss (the shares sum to the batch's loss)."""
    n = cfg.unet_batch
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, len(pool["latents"]), (n,), generator=g)
    dropped = torch.rand(n, generator=g) < cfg.caption_dropout
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn((n, *pool["latents"].shape[1:]), generator=g)
    rows = my_rows(n)
    idx, t, noise = batch[rows], t[rows], noise[rows]
    x0, tok = pool["latents"][idx], pool["ids"][idx].clone()
    tok[dropped[rows]] = pool["empty"]
    noisy = model.scheduler.add_noise(x0, noise, t)
    pred = model.unet(noisy, t, encoder_hidden_states=model.text_encoder(tok)[0]).sample
    err = (pred - noise) ** 2
    if "weights" not in pool:
        return err.sum() / (n * err[0].numel())
    w = pool["weights"]  # (N, 1, h, w): the mean over the batch's weighted cells, channels alike
    return (w[idx] * err).sum() / (w[batch].sum() * err.shape[1])


def decoder_modules(vae) -> dict[str, torch.nn.Module]:
    """What the decoder stage trains, by checkpoint name: everything after the latents."""
    return {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}


def denoiser_modules(model: BaseModel) -> dict[str, torch.nn.Module]:
    """What the unet and marks stages train, by checkpoint name."""
    return {"unet": model.unet, "text_encoder": model.text_encoder}


def _load_modules(named: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Load checkpoint weights named '<module>.<param>' (as ``_save`` writes them) into modules."""
    for name, module in named.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items()
                                if k.startswith(name + ".")})


def _resume(folder: Path, named: dict[str, torch.nn.Module], optimizer, sched) -> int:
    last = ckpt.latest_checkpoint(folder)
    if last is None:
        return 0
    state = ckpt.load_checkpoint(last)
    _load_modules(named, state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["lr_scheduler"])
    ckpt.set_rng_state(state["rng"])
    if worker()[0] == 0:
        print(f"resuming {folder.name} from {last.name}")
    return state["state"]["step"]


def _save(folder: Path, step: int, named, optimizer, sched, cfg, loss: float) -> None:
    # cloned: tied weights (T5's shared and embed_tokens) are one tensor that safetensors refuses twice
    weights = {f"{n}.{k}": v.clone() for n, m in named.items() for k, v in m.state_dict().items()}
    ckpt.save_checkpoint(folder, step, weights=weights, optimizer_state=optimizer.state_dict(),
                         lr_scheduler_state=sched.state_dict(), state={"loss": loss},
                         config_yaml=json.dumps(asdict(cfg)), keep=1)


def sum_over_workers(params, loss: torch.Tensor) -> float:
    """Sum the workers' gradients (each is its rows' share) and losses in one all-reduce; the
    batch's loss. With one worker, just the loss."""
    if worker()[1] == 1:
        return loss.item()
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view_as(g))
        start += g.numel()
    return flat[-1].item()


def seconds_logged(metrics: Path, stage: str, step: int) -> float:
    """The "seconds" of ``stage``'s last row in ``metrics`` at or before ``step`` (0 if none): where
    a resumed stage's clock goes on from (the time between that row and the kill is not counted)."""
    done = [r["seconds"] for r in read_metrics(metrics) if r.get("stage") == stage and r.get("step", 0) <= step]
    return float(done[-1]) if done else 0.0


def _stage(name: str, out: Path, cfg: PretrainConfig, named: dict, steps: int, lr: float,
           loss_fn, log) -> None:
    """One resumable training stage: AdamW, warm-up + cosine, loss_fn(step) -> scalar loss."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    params = [p for m in named.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, steps // 10), steps)
    folder = out / name  # checkpoints in OUT/<stage>/checkpoints/step-N
    step = _resume(folder, named, optimizer, sched)
    first = worker()[0] == 0  # the worker that reports and saves
    bar = tqdm(total=steps, initial=step, desc=name, unit="step", dynamic_ncols=True, disable=not first)
    # "seconds" is the stage's time over all its runs: a resumed stage goes on from its last row
    started, loss = time.perf_counter() - seconds_logged(out / "metrics.jsonl", name, step), float("nan")
    while step < steps:
        loss_t = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        loss = sum_over_workers(params, loss_t)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if first and (step % 50 == 0 or step == steps):
            log({"stage": name, "step": step, "loss": loss, "lr": sched.get_last_lr()[0],
                 "seconds": round(time.perf_counter() - started, 2)})
        if first and (step % cfg.checkpoint_every == 0 or step == steps):
            _save(folder, step, named, optimizer, sched, cfg, loss)
    bar.close()
    _check_workers_agree(params, name)


def _check_workers_agree(params, stage: str) -> None:
    """Workers take identical steps, so their weights must be equal; fail loudly if not."""
    rank, world = worker()
    if world == 1:
        return
    import torch.distributed as dist

    mine = torch.stack([sum(p.detach().double().sum() for p in params),
                        sum(p.detach().double().abs().sum() for p in params)])
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RuntimeError(f"pretraining workers hold different weights after the {stage} stage: "
                           f"{[e.tolist() for e in every]}")


def pretrain(out: str | Path, cfg: PretrainConfig | None = None, workers: int = 1) -> Path:
    """Run (or resume) every stage into ``out`` and write ``out/model`` (fp16 diffusers folder),
    with ``workers`` CPU processes of one thread each (the module's docstring)."""
    cfg = cfg or PretrainConfig()
    if workers < 1 or workers > cfg.max_workers():
        from dreambooth.errors import DreamboothError

        raise DreamboothError(f"workers={workers}: use 1 to {cfg.max_workers()}, "
                              "one per CPU core (each worker trains a share of every batch)")
    check_resumable(Path(out), cfg)
    return run_workers(_pretrain, Path(out), cfg, workers)


def run_workers(target, out: Path, cfg, workers: int) -> Path:
    """``target(out, cfg)`` in this process, or in ``workers`` one-thread processes joined by gloo
    (each trains its rows of every batch: the module's docstring)."""
    if workers == 1:
        return target(out, cfg)
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the workers to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(workers, port, str(out), cfg, target), nprocs=workers, join=True)
    return out / "model"


# The settings that set the shapes of the UNet stages' checkpointed weights (the VAE's are fixed).
SHAPES = ("unet_channels", "text_hidden")


def read_config(text: str) -> dict:
    """A saved PretrainConfig (pretrain-config.json, a checkpoint's config.yaml): JSON lists back
    to the dataclass's tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}


def check_resumable(out: Path, cfg: PretrainConfig) -> None:
    """Refuse to resume ``out`` if a stage's newest checkpoint holds weights of other shapes than
    ``cfg`` makes (a folder from before a change of the defaults), before any stage loads them."""
    from dreambooth.errors import DreamboothError

    for stage in ("unet", "marks"):
        last = ckpt.latest_checkpoint(out / stage)
        if last is None or not (last / "config.yaml").is_file():
            continue
        saved = read_config((last / "config.yaml").read_text())
        differ = [f"{k} {saved[k]} there, {getattr(cfg, k)} now" for k in SHAPES
                  if k in saved and saved[k] != getattr(cfg, k)]
        if differ:
            raise DreamboothError(
                f"{last} holds weights of other shapes ({'; '.join(differ)}), so {out} cannot be "
                "resumed with these settings: pass a new --out folder (or delete this one)")


def _worker(rank: int, workers: int, port: int, out: str, cfg, target) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=workers)
    try:
        target(Path(out), cfg)
    finally:
        dist.destroy_process_group()


def _pretrain(out: Path, cfg: PretrainConfig) -> Path:
    rank, workers = worker()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "pretrain-config.json").write_text(json.dumps(asdict(cfg), indent=1))
    model = architecture(cfg)
    metrics = out / "metrics.jsonl"

    def log(record):
        log_metrics(metrics, record)

    # Stage 1: the VAE.
    vae = model.vae

    def vae_loss(step: int) -> torch.Tensor:
        return reconstruction_loss(vae, cfg, step, cfg.kl_weight)

    _stage("vae", out, cfg, {"vae": vae}, cfg.vae_steps, cfg.vae_lr, vae_loss, log)
    vae.eval().requires_grad_(False)

    # Stage 2: the decoder alone, on the frozen encoder's latents (the encoder has no gradient).
    decoder = decoder_modules(vae)

    def decoder_loss(step: int) -> torch.Tensor:  # batches and draws the vae stage never used
        return reconstruction_loss(vae, cfg, step + 5 * 10**8, 0.0)

    for m in decoder.values():
        m.requires_grad_(True)
    _stage("decoder", out, cfg, decoder, cfg.decoder_steps, cfg.decoder_lr, decoder_loss, log)
    vae.eval().requires_grad_(False)
    vae_psnr = calibrate_vae(vae, cfg.calibration, cfg.size_range)  # every worker: the same
    if rank == 0:
        print(f"VAE: PSNR {vae_psnr:.2f} dB on {cfg.calibration} fresh renders; latent scaling {vae.config.scaling_factor:.4f}")

    # Stage 3: UNet + text encoder on a pool of frozen-VAE latents.
    pool: dict[str, torch.Tensor] = {}  # rendered on the first step: a finished stage needs none

    def unet_loss(step: int) -> torch.Tensor:
        if not pool:
            pool.update(latent_pool(model, cfg.pool, 2 * 10**9, cfg.size_range))
        return denoising_loss(model, pool, cfg, cfg.seed * 1_000_003 + step + 10**7)

    _stage("unet", out, cfg, denoiser_modules(model), cfg.unet_steps, cfg.unet_lr,
           unet_loss, log)
    pool.clear()  # 120 MB the marks stage does not use

    # Stage 4: the same, on a pool where marks are common, often named, and weigh more.
    marks_pool: dict[str, torch.Tensor] = {}

    def marks_loss(step: int) -> torch.Tensor:
        if not marks_pool:
            marks_pool.update(latent_pool(model, cfg.marks_pool, 3 * 10**9, cfg.size_range,
                                          cfg.marks_rate, cfg.marks_named, cfg.mark_weight))
        return denoising_loss(model, marks_pool, cfg, cfg.seed * 1_000_003 + step + 3 * 10**7)

    _stage("marks", out, cfg, denoiser_modules(model), cfg.marks_steps, cfg.marks_lr,
           marks_loss, log)

    # Ship: fp16 diffusers folder + how it was made.
    final = out / "model"
    if rank != 0:
        return final
    for m in (model.unet, model.vae, model.text_encoder):
        m.eval().half()
    ckpt.atomic_dir(final, lambda tmp: model.save(tmp))
    for m in (model.unet, model.vae, model.text_encoder):
        m.float()
    losses, seconds = {}, {}
    for r in read_metrics(metrics):
        losses[r["stage"]], seconds[r["stage"]] = r["loss"], r["seconds"]
    (out / "made.json").write_text(json.dumps({
        "config": asdict(cfg), "workers": workers, "vae_psnr_db": round(vae_psnr, 2),
        "final_losses": losses, "stage_seconds": seconds,
        "parameters": {n: sum(p.numel() for p in m.parameters())
                       for n, m in (("unet", model.unet), ("vae", model.vae),
                                    ("text_encoder", model.text_encoder))}}, indent=1))
    return final


def load_partial(out: str | Path, cfg: PretrainConfig | None = None) -> BaseModel:
    """The model as far as ``out``'s newest checkpoints have trained it (to inspect a run)."""
    cfg = cfg or PretrainConfig(**read_config((Path(out) / "pretrain-config.json").read_text()))
    model = architecture(cfg)
    for stage, named in (("vae", {"vae": model.vae}),
                         ("decoder", decoder_modules(model.vae)),
                         ("unet", denoiser_modules(model)), ("marks", denoiser_modules(model))):
        last = ckpt.latest_checkpoint(Path(out) / stage)
        if last is not None:  # the weights only: optimizer state is not needed to inspect
            _load_modules(named, ckpt.load_weights(last))
    calibrate_vae(model.vae, cfg.calibration, cfg.size_range)
    return model
