"""Seconds per training step on the tiny model: our `train()` beside a plain diffusers-style loop.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py [--steps 30] [--warmup 5]

Ours: the project's real `train()` (model.path=tiny, data.resolution=64, train.batch_size=1, prior
on, 1 thread); per-step time is read from metrics.jsonl's cumulative `seconds`. It encodes the
photos and class images through the VAE once, and runs the frozen text encoder once per prompt.

Plain: the loop of the diffusers DreamBooth example script, written out below. Every step it
reads the instance photo and the class image from disk, tokenizes both prompts, encodes both
images through the VAE, runs the text encoder on both prompts, then UNet forward/backward, gradient
clipping and an AdamW step. Same model, trainable parameters, batch and resolution.

Both are timed from fetching the batch to the end of the optimizer step; the first `--warmup`
steps are dropped and the median of the next `--steps` is reported. All modes run in one process,
one after the other, so the ratios compare like with like; the absolute numbers move with the
machine's load.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dreambooth.config import Config, build_config  # noqa: E402

MODES = {  # name -> config overrides
    "full": ["train.mode=full"],
    "full + text encoder": ["train.mode=full", "train.train_text_encoder=true"],
    "lora": ["train.mode=lora", "train.lr=1e-2"],
}


def make_cfg(photos: Path, steps: int, sets: list[str]) -> Config:
    return build_config("tiny", overrides=[
        f"data.images={photos}", "data.class_noun=toy", "data.token=zwx", "model.path=tiny",
        "data.resolution=64", "train.batch_size=1", "prior.enabled=true", "prior.num_images=4",
        "prior.steps=2", f"train.steps={steps}", f"train.checkpoint_every={steps + 1}",
        "train.log_every=1", *sets])


def ours(cfg: Config, run_dir: Path) -> list[float]:
    """Per-step seconds of the project's `train()`, from metrics.jsonl's cumulative `seconds`."""
    from dreambooth.runlog import read_metrics
    from dreambooth.train import train

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # token warnings
        train(cfg, run_dir, progress=False)
    cumulative = [r["seconds"] for r in read_metrics(run_dir / "metrics.jsonl")]
    return [b - a for a, b in zip([0.0] + cumulative, cumulative)]


def plain(cfg: Config) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step seconds of a loop in the style of diffusers' train_dreambooth.py (no caching),
    and per-step seconds of the parts that our loop does once: data, VAE, frozen text encoder."""
    from dreambooth.data import to_tensor
    from dreambooth.models import load_base_model, tokenize
    from dreambooth.prior import class_images, load_image
    from dreambooth.trainable import make_trainable

    t, d = cfg.train, cfg.data
    torch.manual_seed(t.seed)
    model = load_base_model(cfg.model.path)
    class_prompt = d.class_prompt.format(**{"class": d.class_noun})
    instance_prompt = d.instance_prompt.format(token=d.token, **{"class": d.class_noun})
    photos = sorted(p for p in Path(d.images).iterdir() if p.suffix == ".png")
    prior = class_images(model, cfg, class_prompt, progress=False).paths  # cached by now
    params = make_trainable(model, cfg).parameters()  # the same trainable parameters as ours
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay, eps=t.adam_eps)
    vae, unet, text_encoder, noise_scheduler = model.vae, model.unet, model.text_encoder, model.scheduler
    times, parts = [], {"data": [], "vae": [], "text encoder": []}
    for step in range(t.steps):
        started = time.perf_counter()
        # The example's Dataset + collate_fn: read and transform both images, tokenize both prompts.
        pixels = torch.stack([to_tensor(load_image(photos[step % len(photos)], d.resolution)),
                              to_tensor(load_image(prior[step % len(prior)], d.resolution))])
        input_ids = tokenize(model.tokenizer, [instance_prompt, class_prompt])
        data_done = time.perf_counter()
        # The example's training step.
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        vae_done = time.perf_counter()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(t.train_text_encoder):
            encoder_hidden_states = text_encoder(input_ids)[0]
        te_done = time.perf_counter()
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        pred, pred_prior = model_pred.chunk(2)
        target, target_prior = noise.chunk(2)
        loss = F.mse_loss(pred, target) + cfg.prior.weight * F.mse_loss(pred_prior, target_prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        parts["data"].append(data_done - started)
        parts["vae"].append(vae_done - data_done)
        if not t.train_text_encoder:  # a trained text encoder runs every step in both loops
            parts["text encoder"].append(te_done - vae_done)
    return times, parts


def main() -> None:
    from dreambooth.world.render import held_out_subjects

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DREAMBOOTH_CACHE"] = str(tmp / "cache")  # class images: generated once
        photos = held_out_subjects()[7].save_photos(tmp / "photos", 3)[0].parent  # the demo's subject
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), tiny model, 64 px, "
              f"batch 1 + 1 class image; median of {args.steps} steps after {args.warmup} warm-up")
        rows, breakdown = [], {}
        for i, (name, sets) in enumerate(MODES.items()):
            cfg = make_cfg(photos, args.warmup + args.steps, sets)
            ours_s = statistics.median(ours(cfg, tmp / f"run-{i}")[args.warmup:])
            plain_times, parts = plain(cfg)
            plain_s = statistics.median(plain_times[args.warmup:])
            rows.append((name, ours_s, plain_s))
            breakdown[name] = {k: statistics.median(v[args.warmup:]) for k, v in parts.items() if v}
        print(f"\n| {'mode':<20} | ours s/step | plain s/step | plain/ours |")
        print(f"| {'-' * 20} | ----------: | -----------: | ---------: |")
        for name, o, p in rows:
            print(f"| {name:<20} | {o:11.4f} | {p:12.4f} | {p / o:9.2f}x |")
        print("\nPlain loop, median s/step of the parts ours does once (share of its step):")
        for (name, _, p) in rows:
            print(f"  {name:<20} " + ", ".join(f"{k} {v:.4f} ({v / p:.0%})"
                                                for k, v in breakdown[name].items()))


if __name__ == "__main__":
    main()
