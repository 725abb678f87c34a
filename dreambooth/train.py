"""The DreamBooth training loop: one function, read top to bottom.

    train(cfg, run_dir)  ->  RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/step-N/, final/}

Every random choice for training sample k (which photo, which class image, timestep, noise) is
drawn from a generator seeded by (seed, k). A step's randomness is therefore a function of the
step alone: resuming from a checkpoint replays exactly what an uninterrupted run would have
done, and N processes of batch b see the same samples as one process of batch N·b.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from dreambooth import checkpoint as ckpt
from dreambooth import nullspace, orthogonal
from dreambooth.config import Config, load_config, save_config
from dreambooth.errors import DreamboothError
from dreambooth.loss import draw_timestep, dreambooth_loss, min_snr_weights, offset_noise, snr, training_target
from dreambooth.models import (BaseModel, concat_cond, encode_latents, encode_prompts,
                               load_configured)
from dreambooth.files import DiskFullError, atomic_dir, checksums
from dreambooth.prompts import fill_prompt
from dreambooth.rundir import refuse_inside_photos, writer_lock
from dreambooth.runlog import log_metrics, trim_metrics
from dreambooth.sample import check_subject_guidance
from dreambooth.selection import select_best, should_stop


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # module names; the second is SDXL's


class TrainingError(DreamboothError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    final: Path | None  # None when interrupted (stop_after)
    step: int
    loss: float
    best: int | None = None  # the evaluated step that final/ holds, when evaluation ran


# ------------------------------------------------------------------ randomness by position


def sample_seed(seed: int, k: int, stream: int) -> int:
    """A distinct 63-bit seed for sample k of stream (0: instance, 1: class, 2: order)."""
    return ((seed * 1_000_003 + k) * 7 + stream) % (2**63 - 1)


def nth_of_shuffle(seed: int, n: int, k: int, stream: int) -> int:
    """Index of the k-th draw when 0..n-1 is reshuffled every epoch (epoch = k // n)."""
    g = torch.Generator().manual_seed(sample_seed(seed, k // n, 2 + stream))
    return int(torch.randperm(n, generator=g)[k % n])


def draw_samples(halves, ks: list[int], seed: int, num_train_timesteps: int, noise_offset: float,
                 timestep_bias: float = 0.0, timestep_bias_min: int = 0):
    """Latents, noise, timesteps, prompts and loss masks of global samples ``ks`` from each half
    in turn (half 0: the subject's photos, half 1: class images). A half is (latents, prompts,
    masks or None); the masks are None when no half has any. Each draw uses its own generator."""
    latents, noise, tsteps, prompts, masks = [], [], [], [], []
    masked = any(h[2] is not None for h in halves)
    for stream, (source, source_prompts, source_masks) in enumerate(halves):
        for k in ks:
            i = nth_of_shuffle(seed, len(source), k, stream)
            g = torch.Generator().manual_seed(sample_seed(seed, k, stream))
            tsteps.append(draw_timestep(g, num_train_timesteps, timestep_bias, timestep_bias_min))
            n = torch.randn(source[i].shape, generator=g)
            noise.append(offset_noise(n[None], noise_offset, g)[0])
            latents.append(source[i])
            prompts.append(source_prompts[i])
            if masked:
                masks.append(source_masks[i] if source_masks is not None
                             else torch.ones((1, *source[i].shape[1:])))
    return (torch.stack(latents), torch.stack(noise), torch.cat(tsteps), prompts,
            torch.stack(masks) if masked else None)


# ------------------------------------------------------------------ setup pieces


def setup_trainable(model: BaseModel, cfg: Config) -> dict[str, torch.nn.Module]:
    """Freeze everything, then make trainable what the mode asks for. The one place where
    full fine-tuning and LoRA differ: full unfreezes whole modules, LoRA adds peft adapters
    (base weights stay frozen) and trains only those."""
    for m in (model.vae, model.unet, model.text_encoder, model.text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
    modules = {"unet": model.unet}
    if cfg.train.train_text_encoder or cfg.train.train_token:
        modules["text_encoder"] = model.text_encoder
    if cfg.train.train_text_encoder and model.text_encoder_2 is not None:
        modules["text_encoder_2"] = model.text_encoder_2  # SDXL conditions on both encoders
    if cfg.train.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = {"unet": cfg.lora.unet_targets, "text_encoder": cfg.lora.text_encoder_targets,
                   "text_encoder_2": cfg.lora.text_encoder_targets}
        for name, module in modules.items():
            config = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                lora_dropout=cfg.lora.dropout, init_lora_weights="gaussian",
                                target_modules=targets[name])
            if name == "unet":
                module.add_adapter(config)
            else:  # peft directly: transformers' add_adapter insists on a newer peft than exists
                inject_adapter_in_model(config, module)
                for p_name, p in module.named_parameters():
                    p.requires_grad_("lora_" in p_name)
    else:
        for module in modules.values():
            module.requires_grad_(True)
    if cfg.train.train_token and not cfg.train.train_text_encoder:
        train_token_only(model.text_encoder, model.tokenizer, cfg.data.token)
    return modules


def place_frozen(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move a module that is not trained to ``device``: in ``dtype`` (the mixed-precision one)
    on GPU, which halves its memory; as it is on CPU."""
    return module.to(device, dtype=dtype) if device.type == "cuda" else module.to(device)


def base_prediction(model: BaseModel, cfg: Config, class_prompt: str, n: int, device, dtype):
    """``f(noisy, timesteps)``: the frozen base UNet's prediction for ``n`` class images under the
    class prompt (``prior.target: base``). Call it before any weight changes. Full fine-tuning
    keeps a frozen copy of the UNet (half precision on GPU); LoRA runs the same UNet with its
    adapters switched off, which costs no memory. The prompt is encoded now, by the base text
    encoder, so text-encoder training does not move the target."""
    import copy

    with torch.no_grad():
        cond = encode_prompts(model, [class_prompt], device)
    conds = cond
    for _ in range(n - 1):
        conds = concat_cond(conds, cond)
    if cfg.train.mode == "lora":
        unet = model.unet

        def predict(noisy, timesteps):
            unet.disable_adapters()
            try:
                return unet(noisy, timesteps, **conds).sample
            finally:
                unet.enable_adapters()
        return predict
    frozen = place_frozen(copy.deepcopy(model.unet).requires_grad_(False).eval(), device, dtype)

    def predict(noisy, timesteps):
        return frozen(noisy.to(frozen.dtype), timesteps, **conds).sample
    return predict


NULL_SPACE_BATCHES = 32  # prior.null_space: forward passes of 8 noisy class images


def class_hold(model: BaseModel, cfg: Config, class_latents, class_prompt: str, device, progress: bool):
    """The hold on the class prompt that ``prior.orthogonal_probes`` or ``prior.null_space`` asks
    for, as a call to make after every optimizer step. Its bases are read from the base UNet here,
    before any weight changes; they are seeded, so every process and a resumed run get the same."""
    with torch.no_grad():
        conds = [encode_prompts(model, [p], device) for p in (class_prompt, "")]
    if cfg.prior.orthogonal_probes:
        params = list(model.unet.parameters())
        gb = orthogonal.estimated_bytes(sum(p.numel() for p in params), cfg.prior.orthogonal_probes) / 2**30
        print(f"prior.orthogonal_probes: probing the class prompt ({cfg.prior.orthogonal_probes} probes, "
              f"{gb:.1f} GiB of bases)")
        bases = orthogonal.probe_bases(model.unet, model.scheduler, class_latents, conds,
                                       cfg.prior.orthogonal_probes, cfg.prior.orthogonal_min_t, concat_cond,
                                       progress=progress)
        return functools.partial(orthogonal.hold, params, [p.detach().clone() for p in params], bases)
    print(f"prior.null_space: reading the class prompt's layer inputs ({NULL_SPACE_BATCHES} batches)")
    bases = nullspace.input_bases(model.unet, model.scheduler, class_latents, conds, NULL_SPACE_BATCHES,
                                  cfg.prior.orthogonal_min_t, cfg.prior.null_space, concat_cond,
                                  progress=progress, weighting=cfg.prior.null_space_weighting)
    layers, fixed = nullspace.held_layers(model.unet, bases)
    kept = sum(b.shape[1] for _, b in layers) / max(1, sum(b.shape[0] for _, b in layers))
    print(f"prior.null_space: {len(layers)} layers, {kept:.0%} of their input dimensions held; "
          f"{len(fixed)} other tensors held whole")
    with torch.no_grad():
        base_layers = [nullspace.weight_matrix(m).detach().clone() for m, _ in layers]
    return functools.partial(nullspace.hold, layers, fixed, base_layers, [p.detach().clone() for p in fixed])


def refuse_larger_than_free(need: int, what: str, fix: str) -> None:
    """A TrainingError, before any work, when ``need`` bytes exceed the free memory (the GPU's
    when training runs on one, else the machine's)."""
    free = orthogonal.free_bytes()
    if need > free:
        raise TrainingError(f"{what}: {need / 2**30:.1f} GiB, and "
                            f"{'the GPU' if torch.cuda.is_available() else 'this machine'} has "
                            f"{free / 2**30:.1f} GiB free. {fix}")


def encode_bytes(model: BaseModel, resolution: int) -> int:
    """A floor on the memory the VAE needs to encode one ``resolution`` photo: four float32
    activations of its first block at full size are alive at once (input, norm, conv output,
    residual). The memory planner refines this; here it keeps a mistyped resolution from
    allocating until the kernel kills the process."""
    return 4 * model.vae.config.block_out_channels[0] * resolution**2 * 4


def train_token_only(text_encoder, tokenizer, token: str) -> None:
    """Freeze the text encoder except the input-embedding rows of ``token``'s BPE pieces: the
    embedding matrix is trainable, and a gradient hook zeroes every other row (with Adam and no
    weight decay on it, those rows then never move)."""
    ids = tokenizer(token, add_special_tokens=False).input_ids
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    mask[ids] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def trainable_weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trainable tensors, named 'unet.<param>' / 'text_encoder.<param>' / 'text_encoder_2.<param>'
    (what a checkpoint holds)."""
    return {f"{name}.{p_name}": p for name, m in modules.items()
            for p_name, p in m.named_parameters() if p.requires_grad}


def copy_weights(weights: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's tensors into the trainable ``weights`` (as ``trainable_weights`` names
    them); the two must name the same tensors."""
    if saved.keys() != weights.keys():
        odd = sorted(saved.keys() ^ weights.keys())[:3]
        raise TrainingError(f"the checkpoint does not match the model's trainable weights "
                            f"({len(saved)} saved, {len(weights)} expected; e.g. {odd})")
    with torch.no_grad():
        for name, tensor in saved.items():
            weights[name].copy_(tensor)


def make_optimizer(cfg: Config, modules: dict[str, torch.nn.Module]) -> torch.optim.Optimizer:
    t = cfg.train
    groups = [{"params": [p for p in modules["unet"].parameters() if p.requires_grad], "lr": t.lr}]
    token_only = t.train_token and not t.train_text_encoder  # no decay on untouched rows
    for name in TEXT_ENCODERS:
        if name in modules:
            groups.append({"params": [p for p in modules[name].parameters() if p.requires_grad],
                           "lr": t.text_encoder_lr or t.lr, **({"weight_decay": 0.0} if token_only else {})})
    kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("train.optimizer=adamw8bit needs bitsandbytes: "
                                "pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def instance_data(cfg: Config, model: BaseModel, intake) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """Latents of the subject's photos (and their mirror images when flipping), their prompts,
    and their loss masks on the latent grid (None when no photo has a mask or ``data.masks`` is
    off; a photo without one counts everywhere). ``intake``: ``read_photos`` of data.images."""
    from dreambooth.data import square_crop, to_tensor

    d = cfg.data
    for w in intake.warnings:
        print(f"warning: {w}")
    default = fill_prompt(d.instance_prompt, d.token, d.class_noun)
    use_masks = d.masks and any(p.mask is not None for p in intake.photos)
    crops, prompts, masks = [], [], []
    for photo in intake.photos:
        prompt = fill_prompt(photo.caption, d.token, d.class_noun) if (photo.caption and d.captions) else default
        for flip in ((False, True) if d.flip > 0 else (False,)):
            crops.append(square_crop(photo.image, d.resolution, crop="center", flip=flip))
            prompts.append(prompt)
            if use_masks:
                mask = photo.mask if photo.mask is not None else Image.new("L", photo.image.size, 255)
                masks.append(np.asarray(square_crop(mask, d.resolution, crop="center", flip=flip)) > 127)
                if not masks[-1].any():
                    raise TrainingError(f"{photo.path}: its mask is empty after the center crop "
                                        "(the subject is outside the square middle of the photo) "
                                        "— crop the photo around the subject, or remove its mask")
    latents = encode_latents(model, torch.stack([to_tensor(c) for c in crops]))
    if not use_masks:
        return latents, prompts, None
    return latents, prompts, latent_masks(torch.from_numpy(np.stack(masks)), latents.shape[-1])


def latent_masks(pixel_masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Bool pixel masks (N, H, W) -> float (N, 1, h, w) on the latent grid: a cell counts when
    any of its pixels is set, because the VAE spreads an edge into the cells around it."""
    factor = pixel_masks.shape[-1] // latent_size
    return torch.nn.functional.max_pool2d(pixel_masks[:, None].float(), factor)


def resolve_run_config(cfg: Config, model: BaseModel) -> Config:
    """Fill in what 'auto' left open (the identifier) and check the data settings."""
    from dreambooth.identifier import check_token, pick_token

    if not cfg.data.images:
        raise TrainingError("no photos given: pass --images DIR (a folder of 3-20 photos of the subject)")
    if not cfg.data.class_noun:
        raise TrainingError("no class noun given: pass --class NOUN (e.g. dog, backpack, mug)")
    if cfg.data.crop != "center":
        raise TrainingError("data.crop=random is not supported by training yet: the photos are "
                            "encoded once, from center crops. Use data.crop=center (data.flip > 0 "
                            "adds mirror images)")
    if cfg.data.token == "auto":
        cfg.data.token = pick_token(model.tokenizer)
    else:
        for problem in check_token(cfg.data.token, model.tokenizer):
            print(f"warning: token '{cfg.data.token}': {problem}")
    if cfg.eval.every:
        check_subject_guidance(model, cfg.eval.subject_guidance, "eval.subject_guidance")
    if cfg.train.train_token and cfg.train.mode == "lora":
        raise TrainingError("train.train_token is for full fine-tuning: a LoRA final/ does not "
                            "carry the text encoder's embeddings. Use train.train_text_encoder "
                            "(LoRA on the text encoder) with train.mode=lora")
    for key in ("orthogonal_probes", "null_space"):  # the holds read the class images
        if getattr(cfg.prior, key) and not cfg.prior.enabled:
            print(f"note: prior.{key} is off in this run: it reads the class images, and "
                  "prior.enabled=false draws none")
            setattr(cfg.prior, key, type(getattr(cfg.prior, key))(0))  # the saved config says so
    if cfg.prior.orthogonal_probes and cfg.train.mode != "full":
        raise TrainingError("prior.orthogonal_probes holds the UNet's own weights while the whole UNet "
                            "is fine-tuned: it needs train.mode=full (or set it to 0 for LoRA)")
    if cfg.prior.null_space and not (0 < cfg.prior.null_space <= 1 and cfg.train.mode == "full"
                                     and not cfg.prior.orthogonal_probes):
        raise TrainingError(f"prior.null_space={cfg.prior.null_space}: a fraction in (0, 1] of the class "
                            "prompt's layer inputs, for train.mode=full, without prior.orthogonal_probes")
    if cfg.prior.orthogonal_probes < 0:
        raise TrainingError(f"prior.orthogonal_probes={cfg.prior.orthogonal_probes}: the number of "
                            "probes is 0 (off) or more (256 in the world preset)")
    if cfg.prior.null_space:
        refuse_larger_than_free(nullspace.estimated_bytes(model.unet),
                                "prior.null_space reads the class prompt's inputs to every UNet layer",
                                "Set prior.null_space=0 (or train on a larger device)")
    num_t = model.scheduler.config.num_train_timesteps
    if (cfg.prior.orthogonal_probes or cfg.prior.null_space) and not 0 <= cfg.prior.orthogonal_min_t < num_t:
        raise TrainingError(f"prior.orthogonal_min_t={cfg.prior.orthogonal_min_t}: the probes draw "
                            f"timesteps from it up to the scheduler's {num_t}, so it must lie in "
                            f"[0, {num_t}) (400 probes where the class prompt's drift is decided)")
    if cfg.train.timestep_bias and not (0 < cfg.train.timestep_bias <= 1
                                        and 0 <= cfg.train.timestep_bias_min < num_t):
        raise TrainingError(f"train.timestep_bias={cfg.train.timestep_bias} from train.timestep_bias_min="
                            f"{cfg.train.timestep_bias_min}: the bias is the fraction in (0, 1] of samples "
                            f"whose timestep is drawn from [timestep_bias_min, {num_t}) instead of "
                            f"[0, {num_t}), so the minimum must lie in [0, {num_t})")
    if cfg.prior.orthogonal_probes:
        k, weights = cfg.prior.orthogonal_probes, sum(p.numel() for p in model.unet.parameters())
        refuse_larger_than_free(
            orthogonal.estimated_bytes(weights, k),
            f"prior.orthogonal_probes={k} keeps {k} directions for each of the UNet's "
            f"{weights / 1e6:.1f} M weights",
            "It is for small UNets such as the world model's: lower prior.orthogonal_probes (memory is "
            "proportional to it) or set it to 0")
    if cfg.train.optimizer == "adamw8bit" and not torch.cuda.is_available():
        raise TrainingError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); "
                            "use train.optimizer=adamw on CPU")
    return cfg


# ------------------------------------------------------------------ the loop


def train(cfg: Config | None, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, trust_pickle: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model.path`` on the photos in ``cfg.data.images``; write RUN_DIR.

    ``resume`` continues from the newest checkpoint in ``run_dir`` that verifies, with the run's
    own config.yaml. ``stop_after`` ends this invocation after that many steps, as if
    interrupted. ``trust_pickle`` (this invocation's --trust-pickle, never a file's) allows a
    pickle base model. One process writes a run directory at a time (``rundir.writer_lock``).
    """
    with contextlib.ExitStack() as held:
        return _train(cfg, Path(run_dir), held, resume, progress, stop_after, trust_pickle)


def _train(cfg: Config | None, run_dir: Path, held: contextlib.ExitStack, resume: bool, progress: bool,
           stop_after: int | None, trust_pickle: bool) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers.optimization import get_scheduler

    from dreambooth.data import read_photos
    from dreambooth.prior import class_images, encode_images

    if resume:
        cfg = load_config(run_dir / "config.yaml")
    refuse_inside_photos(run_dir, cfg.data.images, "the run directory")
    t = cfg.train
    # SDXL conditions on each text encoder's penultimate layer, so when they train, the first
    # one's last layer gets no gradient: DDP must look for such parameters or it stops at step 2.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if t.train_text_encoder else []
    acc = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=ddp)
    if resume and acc.is_main_process:  # before the checkpoints and the log are read
        held.enter_context(writer_lock(run_dir))
    torch.manual_seed(t.seed)

    # 1. Model, identifier and resolved config (written before any heavy work).
    model = load_configured(cfg.model, trust_pickle)
    cfg = resolve_run_config(cfg, model)
    # read before config.yaml is written: bad photos must not leave a run that --out refuses
    intake = read_photos(cfg.data.images, cfg.data.resolution)
    refuse_larger_than_free(encode_bytes(model, cfg.data.resolution),
                            f"data.resolution={cfg.data.resolution} (encoding one photo at this size)",
                            "Lower data.resolution (the model's native size is usual: 512 for SD 1.x, "
                            "768 for SD 2.x, 1024 for SDXL)")
    if acc.is_main_process and not resume:
        held.enter_context(writer_lock(run_dir))
        save_config(cfg, run_dir / "config.yaml")
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
    for frozen in (model.vae, model.text_encoder, model.text_encoder_2):
        if frozen is not None:
            place_frozen(frozen, acc.device, low)
    model.unet.to(acc.device)

    # 2. Data, encoded once: instance latents, class latents, prompt embeddings.
    inst_latents, inst_prompts, inst_masks = instance_data(cfg, model, intake)
    class_prompt = fill_prompt(cfg.data.class_prompt, cfg.data.token, cfg.data.class_noun)
    use_prior = cfg.prior.enabled
    if use_prior:
        with acc.main_process_first():  # one process generates and encodes; the rest reuse them
            prior_set = class_images(model, cfg, class_prompt, progress=progress and acc.is_main_process)
            class_latents = encode_images(model, prior_set.paths, cfg.data.resolution, prior_set.folder)
    modules = setup_trainable(model, cfg)
    reference = (base_prediction(model, cfg, class_prompt, t.batch_size, acc.device, low)
                 if use_prior and cfg.prior.target == "base" else None)  # before any weight changes
    hold = (class_hold(model, cfg, class_latents, class_prompt, acc.device, progress and acc.is_main_process)
            if use_prior and (cfg.prior.orthogonal_probes or cfg.prior.null_space) else None)
    if t.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for name in TEXT_ENCODERS:
            if name in modules:
                modules[name].gradient_checkpointing_enable()
    te_steps = t.text_encoder_steps or t.steps
    all_prompts = sorted(set(inst_prompts) | ({class_prompt} if use_prior else set()))
    frozen_cond = None  # prompt -> embedding, computed once the text encoder stops changing

    # 3. Optimizer, LR schedule, accelerate; then resume state if asked.
    optimizer = make_optimizer(cfg, modules)
    lr_sched = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                             num_training_steps=t.steps)
    names = list(modules)
    prepared = acc.prepare(*modules.values(), optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]
    # The text encoders, when trained, run through their accelerate wrappers (gradient sync).
    te_model = replace(model, text_encoder=wrapped.get("text_encoder", model.text_encoder),
                       text_encoder_2=wrapped.get("text_encoder_2", model.text_encoder_2))
    weights = trainable_weights(modules)
    step, seconds = 0, 0.0
    loss_value = float("nan")
    if resume:
        state = ckpt.resume_checkpoint(run_dir)
        if state is not None:  # none: stopped before its first checkpoint, so it starts over
            copy_weights(weights, state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            ckpt.set_rng_state(state["rng"])
            step, seconds = state["state"]["step"], state["state"].get("seconds", 0.0)
            loss_value = state["state"].get("loss", loss_value)
        if acc.is_main_process:
            trim_metrics(run_dir / "metrics.jsonl", step)
            print(f"resuming from {state['path']} (step {step})" if state else
                  f"{run_dir} has no checkpoint yet: starting it from step 0 with its config.yaml")

    # 4. Evaluation (every eval.every steps, from the base model at step 0 on) and the loop.
    evaluator, history = None, []
    if cfg.eval.every > 0 and acc.is_main_process:
        from dreambooth.validation import Evaluator, eval_history

        evaluator = Evaluator(cfg, run_dir)
        history = eval_history(run_dir / "metrics.jsonl")
        if step == 0 and not history:
            history.append(evaluate_now(evaluator, model, 0, run_dir, acc))

    acp = model.scheduler.alphas_cumprod
    num_train_t = model.scheduler.config.num_train_timesteps
    b, accum, world, rank = t.batch_size, t.grad_accum, acc.num_processes, acc.process_index
    end = t.steps if stop_after is None else min(t.steps, step + stop_after)
    bar = tqdm(total=t.steps, initial=step, disable=not (progress and acc.is_main_process),
               desc="train", unit="step", dynamic_ncols=True)
    halves = [(inst_latents, inst_prompts, inst_masks)]  # the batch: instance half, then class half
    if use_prior:
        halves.append((class_latents, [class_prompt] * len(class_latents), None))
    stopped_early = False
    while step < end:
        started = time.perf_counter()
        train_te = any(name in modules for name in TEXT_ENCODERS) and step < te_steps
        totals = torch.zeros(3, device=acc.device)
        for micro in range(accum):
            sync = contextlib.ExitStack()  # DDP: all-reduce gradients on the last micro-batch only
            if micro < accum - 1:
                for module in wrapped.values():
                    sync.enter_context(acc.no_sync(module))
            with sync:
                ks = [((step * accum + micro) * world + rank) * b + j for j in range(b)]
                x0, eps, ts, prompts, masks = draw_samples(halves, ks, t.seed, num_train_t, t.noise_offset,
                                                           t.timestep_bias, t.timestep_bias_min)
                x0, eps, ts = x0.to(acc.device), eps.to(acc.device), ts.to(acc.device)
                noisy = model.scheduler.add_noise(x0, eps, ts)
                target = training_target(model.prediction_type, x0, eps, ts, acp)
                if reference is not None:  # prior.target "base": the class half distils the base
                    with torch.no_grad(), acc.autocast():
                        target = torch.cat([target[:b], reference(noisy[b:], ts[b:]).to(target.dtype)])
                with acc.autocast():
                    if train_te:
                        cond = encode_prompts(te_model, prompts, acc.device)
                    else:
                        if frozen_cond is None:
                            with torch.no_grad():
                                frozen_cond = {p: encode_prompts(model, [p], acc.device) for p in all_prompts}
                        cond = frozen_cond[prompts[0]]
                        for p in prompts[1:]:
                            cond = concat_cond(cond, frozen_cond[p])
                    pred = wrapped["unet"](noisy, ts, **cond).sample
                w = min_snr_weights(snr(ts.cpu(), acp), t.snr_gamma, model.prediction_type) \
                    if t.snr_gamma else None
                parts = dreambooth_loss(pred, target, num_instance=b, prior_weight=cfg.prior.weight,
                                        weights=w, mask=None if masks is None else masks.to(acc.device))
                if not torch.isfinite(parts.total):
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingError(
                        f"loss became {parts.total.item()} at step {step + 1}; stopped. "
                        + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                        + "Lower train.lr, turn on train.max_grad_norm, or use bf16 instead of fp16.")
                acc.backward(parts.total / accum)
                totals += torch.stack([parts.total, parts.instance, parts.prior]).detach() / accum
        if t.max_grad_norm:
            acc.clip_grad_norm_([p for m in modules.values() for p in m.parameters() if p.requires_grad],
                                t.max_grad_norm)
        optimizer.step()
        if hold is not None:  # prior.orthogonal_probes / prior.null_space
            hold()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds += time.perf_counter() - started

        totals = acc.reduce(totals, reduction="mean")
        loss_value = totals[0].item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if acc.is_main_process and (step % t.log_every == 0 or step == t.steps):
            log_metrics(run_dir / "metrics.jsonl", {
                "step": step, "loss": loss_value, "instance_loss": totals[1].item(),
                "prior_loss": totals[2].item(), "lr": lr_sched.get_last_lr()[0],
                "seconds": round(seconds, 4)})
        evaluating = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == t.steps)
        if evaluating:  # before the checkpoint: an evaluation cut short is redone on resume
            stop = 0.0
            if evaluator is not None:
                history.append(evaluate_now(evaluator, model, step, run_dir, acc))
                stop = float(should_stop(history, cfg.eval.early_stop, cfg.eval.flat))
            stopped_early = acc.reduce(torch.tensor([stop], device=acc.device), "sum").item() > 0
            if stopped_early and acc.is_main_process:
                print(f"early stop at step {step}: prompt fidelity fell {cfg.eval.early_stop} "
                      f"evaluations in a row while fidelity stayed flat (eval.early_stop)")
        if (step % t.checkpoint_every == 0 or (step == end and step < t.steps)
                or (evaluating and step < t.steps)):
            acc.wait_for_everyone()
            if acc.is_main_process:
                best = select_best(history, cfg.eval.prompt_floor)
                with disk_full_advice(run_dir):
                    ckpt.save_checkpoint(
                        run_dir, step, weights=weights, optimizer_state=optimizer.state_dict(),
                        lr_scheduler_state=lr_sched.state_dict(),
                        state={"data_position": step * accum * world * b, "loss": loss_value,
                               "seconds": seconds}, config_yaml=config_yaml, keep=t.keep_checkpoints,
                        protect=frozenset({best.step} if best else ()))
        if stopped_early:
            break
    bar.close()

    # 5. Final weights (the best evaluated step's when evaluation chose one): a diffusers folder
    #    (full) or LoRA weights for load_lora_weights; then best.json and report.html.
    final, chosen = None, None
    if step >= t.steps or stopped_early:
        acc.wait_for_everyone()
        if acc.is_main_process:
            kept = {ckpt.checkpoint_step(c) for c in ckpt.list_checkpoints(run_dir)} | {step}
            choice = (select_best(history, cfg.eval.prompt_floor, allowed=kept)
                      if cfg.eval.select_best else None)
            if choice is not None and choice.step != step:
                copy_weights(weights, ckpt.load_weights(
                    run_dir / "checkpoints" / ckpt.step_dir_name(choice.step)))
            with disk_full_advice(run_dir):
                final = save_final(model, modules, cfg, run_dir / "final", config_yaml)
            if choice is not None:
                chosen = choice.step
                (run_dir / "best.json").write_text(json.dumps({
                    **asdict(choice), "final_is_best": True, "last_step": step,
                    "stopped_early": stopped_early}, indent=1))
            from dreambooth.report import write_report

            write_report(run_dir)
    return TrainResult(run_dir=run_dir, final=final, step=step, loss=loss_value, best=chosen)


def evaluate_now(evaluator, model: BaseModel, step: int, run_dir: Path, acc) -> dict:
    """Run the evaluator on the model as it is at ``step``; log and return its record."""
    with acc.autocast():
        record = evaluator(model, ckpt.step_dir_name(step), step)
    log_metrics(run_dir / "metrics.jsonl", record)
    shown = {k: v for k, v in record.items() if k in ("fidelity", "prompt_fidelity")}
    tqdm.write(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return record


# ------------------------------------------------------------------ run-directory I/O


def save_final(model: BaseModel, modules: dict[str, torch.nn.Module], cfg: Config, folder: Path,
               config_yaml: str) -> Path:
    def write(tmp: Path) -> None:
        if cfg.train.mode == "lora":
            from dreambooth.lora import collect_lora, diffusers_lora_layers

            # alpha / r is folded into the up weights: the diffusers format has no alpha field
            parts = diffusers_lora_layers(collect_lora(model))
            type(model.pipeline()).save_lora_weights(
                tmp, **{f"{name}_lora_layers": sd for name, sd in parts.items()}, safe_serialization=True)
        else:
            for m in (model.vae, model.text_encoder, model.text_encoder_2):
                if m is not None and m.dtype != torch.float32:
                    m.to(torch.float32)
            model.save(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / ckpt.FINAL_SUMS).write_text(json.dumps(checksums(tmp), indent=1))

    return atomic_dir(folder, write)


@contextlib.contextmanager
def disk_full_advice(run_dir: Path):
    """A full disk while the run writes: say what is intact and how to go on."""
    try:
        yield
    except DiskFullError as e:
        last = ckpt.latest_checkpoint(run_dir)
        kept = (f"the previous checkpoint ({last.name}) is intact" if last else
                "no checkpoint was written yet")
        raise TrainingError(f"{e}; {kept}. Free space, then continue with "
                            f"`dreambooth train --resume {run_dir}`") from None

