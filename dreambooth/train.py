"""The DreamBooth training recipe: setup, one training step, the loop.

    train(cfg, run_dir)  ->  RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/step-N/, final/}

``setup`` loads the model, encodes the data once, builds the optimizer and restores a resumed
run's state, and returns a ``Session`` that owns all of it. ``training_step`` is one micro-batch:
draw samples, noise them, predict, take the loss, backpropagate. ``loop`` runs optimizer steps
with logging, evaluation, checkpoints and early stop, then writes ``final/``. What differs per
kind of model (prompt encoding, noising and target, timesteps, the forward call) is the model's
family (``dreambooth.family``); what differs between full fine-tuning and LoRA is in
``dreambooth.trainable``. Each sample's randomness is a function of its index (``dreambooth.batch``),
so a resumed run, or N processes of batch b, replay exactly what one uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm.auto import tqdm

from dreambooth import checkpoint as ckpt
from dreambooth import shard
from dreambooth.base_model import FLOW_KINDS
from dreambooth.batch import Source, draw_samples, instance_source
from dreambooth.config import Config, load_config, save_config
from dreambooth.errors import DreamboothError
from dreambooth.family import family_of
from dreambooth.files import DiskFullError, atomic_dir, checksums
from dreambooth.loss import dreambooth_loss
from dreambooth.models import BaseModel, load_configured
from dreambooth.prompts import fill_prompt
from dreambooth.quantize import check_available, quantize_base
from dreambooth.rundir import refuse_inside_photos, writer_lock
from dreambooth.runlog import log_metrics, trim_metrics
from dreambooth.selection import select_best, should_stop
from dreambooth.trainable import Trainable, check_optimizer, make_optimizer, make_trainable


class TrainingError(DreamboothError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    final: Path | None  # None when interrupted (stop_after)
    step: int
    loss: float
    best: int | None = None  # the evaluated step that final/ holds, when evaluation ran


@dataclass
class Session:
    """Everything one training run holds, built once by ``setup``."""

    cfg: Config
    run_dir: Path
    acc: Any  # accelerate.Accelerator
    model: BaseModel
    family: Any
    trainable: Trainable
    optimizer: Any
    lr_scheduler: Any
    sources: list[Source]  # what each batch draws from: the subject's photos, then class images
    prompts: list[str]  # every prompt a batch can hold (their conditioning is cached once frozen)
    config_yaml: str
    text_model: BaseModel  # the model with its trained text encoders' accelerate wrappers
    reference: Callable | None = None  # prior.target "base": the frozen model's prediction
    project: Callable | None = None  # prior.null_space: called after every optimizer step
    evaluator: Any = None
    history: list[dict] = field(default_factory=list)  # evaluation records, in step order
    step: int = 0
    seconds: float = 0.0
    loss: float = float("nan")
    frozen_cond: dict | None = None  # prompt -> conditioning, once the text encoders stop training


def train(cfg: Config | None, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, trust_pickle: bool = False,
          stop: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune ``cfg.model.path`` on the photos in ``cfg.data.images``; write RUN_DIR.

    ``resume`` continues from the newest checkpoint in ``run_dir`` that verifies, with the run's
    own config.yaml. ``stop_after`` ends this invocation after that many steps, as if
    interrupted. ``stop``, asked after every step, ends it there with a checkpoint when it says
    True (`dreambooth train` on SIGTERM, the web UI's Stop). ``trust_pickle`` (this invocation's
    --trust-pickle, never a file's) allows a pickle base model. One process writes a run
    directory at a time (``rundir.writer_lock``).
    """
    with contextlib.ExitStack() as held:
        session = setup(cfg, Path(run_dir), held, resume=resume, progress=progress, trust_pickle=trust_pickle)
        return loop(session, stop_after, progress, stop)


# ------------------------------------------------------------------ setup


def setup(cfg: Config | None, run_dir: Path, held: contextlib.ExitStack, *, resume: bool = False,
          progress: bool = True, trust_pickle: bool = False) -> Session:
    """Model, resolved config (written before any heavy work), data, trainable weights, optimizer
    and, with ``resume``, the newest good checkpoint's state. ``held`` keeps the run's lock."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers.optimization import get_scheduler

    from dreambooth.data import read_photos

    if resume:
        cfg = load_config(run_dir / "config.yaml")
    refuse_inside_photos(run_dir, cfg.data.images, "the run directory")
    # SDXL conditions on each text encoder's penultimate layer, so when they train, the first
    # one's last layer gets no gradient: DDP must look for such parameters or it stops at step 2.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.train.train_text_encoder else []
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                      kwargs_handlers=ddp, fsdp_plugin=shard.plugin(cfg))  # train.shard=fsdp: dreambooth.shard
    shard.check(acc, cfg)
    if resume and acc.is_main_process:  # before the checkpoints and the log are read
        held.enter_context(writer_lock(run_dir))
    torch.manual_seed(cfg.train.seed)

    model = load_configured(cfg, trust_pickle)
    cfg = check_run(cfg, model)
    intake = read_photos(cfg.data.images, cfg.data.resolution)  # before config.yaml: bad photos leave no run
    if acc.is_main_process and not resume:
        held.enter_context(writer_lock(run_dir))
        save_config(cfg, run_dir / "config.yaml")
    family = family_of(model, cfg)
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    for module in model.modules():
        if module is not family.denoiser(model):
            place_frozen(module, acc.device, frozen_dtype)
    family.denoiser(model).to(acc.device)

    sources, class_prompt = data_sources(cfg, model, intake, acc, progress)
    if cfg.train.mode == "lora":  # the base weights are frozen: half precision on GPU (LoRA stays fp32)
        place_frozen(family.denoiser(model), acc.device, frozen_dtype)
    trainable = make_trainable(model, cfg)
    quantize_base(family.denoiser(model), cfg.train.quantize_base)  # LoRA: its frozen linear weights in fewer bits
    prior = cfg.prior
    reference = (base_prediction(model, family, cfg, class_prompt, cfg.train.batch_size, acc.device, frozen_dtype)
                 if prior.enabled and prior.target == "base" else None)  # before any weight changes
    project = None
    if prior.enabled and prior.null_space:
        from dreambooth.nullspace import class_prompt_projection

        project = class_prompt_projection(model, family, sources[1].latents, class_prompt, prior.null_space,
                                          prior.null_space_min_t, acc.device, progress and acc.is_main_process)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(trainable, family.denoiser(model))

    optimizer = make_optimizer(cfg, trainable)
    lr_scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps,
                                 num_training_steps=cfg.train.steps)
    *wrapped, optimizer = acc.prepare(*trainable.modules.values(), optimizer)
    trainable.wrapped = dict(zip(trainable.modules, wrapped))
    text_model = replace(model, text_encoder=trainable.wrapped.get("text_encoder", model.text_encoder),
                         text_encoder_2=trainable.wrapped.get("text_encoder_2", model.text_encoder_2))
    prompts = sorted({p for s in sources for p in s.prompts})
    session = Session(cfg, run_dir, acc, model, family, trainable, optimizer, lr_scheduler, sources, prompts,
                      yaml.safe_dump(cfg.to_dict(), sort_keys=False), text_model, reference, project)
    shard.announce(session)
    if resume:
        restore(session)
    if cfg.train.offload_frozen:
        if not trainable.trains_text():
            conditioning(session, prompts[:1])  # every prompt's embedding, before the encoders leave
        move_frozen(session, torch.device("cpu"))
    start_evaluation(session)  # (an evaluation brings them back for its samples, then away again)
    return session


def enable_checkpointing(trainable: Trainable, denoiser: torch.nn.Module) -> None:
    """Gradient checkpointing in every trained module (diffusers and transformers name it apart)."""
    for module in trainable.modules.values():
        (module.enable_gradient_checkpointing if module is denoiser else module.gradient_checkpointing_enable)()


def frozen_parts(s: Session) -> dict[str, torch.nn.Module]:
    """The modules a training step does not run: the VAE and the text encoders that do not train
    (their latents and embeddings are cached). ``train.offload_frozen`` moves these."""
    trained = {id(m) for m in s.trainable.modules.values()}
    return {name: m for name, m in s.model.components().items() if isinstance(m, torch.nn.Module)
            and id(m) not in trained and m is not s.family.denoiser(s.model)}


def move_frozen(s: Session, device) -> None:
    """``train.offload_frozen``: the ``frozen_parts`` to ``device`` (the CPU during training; back
    for evaluation and the final samples)."""
    if not s.cfg.train.offload_frozen:
        return
    for module in frozen_parts(s).values():
        module.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_subject(cfg: Config) -> None:
    """Refuse a config that names no photos or no class noun (train's first check; the web UI's
    too, before anything is written)."""
    if not cfg.data.images:
        raise TrainingError("no photos given: pass --images DIR (a folder of 3-20 photos of the subject)")
    if not cfg.data.class_noun:
        raise TrainingError("no class noun given: pass --class NOUN (e.g. dog, backpack, mug)")


def check_run(cfg: Config, model: BaseModel) -> Config:
    """Fill in what 'auto' left open (the identifier) and refuse, before any work, what this run
    cannot do with this model on this machine."""
    from dreambooth.identifier import check_token, pick_token

    check_subject(cfg)
    if cfg.data.token == "auto":
        cfg.data.token = pick_token(model.tokenizer)
    else:
        for problem in check_token(cfg.data.token, model.tokenizer):
            print(f"warning: token '{cfg.data.token}': {problem}")
    if cfg.prior.null_space and not cfg.prior.enabled:
        print("note: prior.null_space is off in this run: it reads the class images, and "
              "prior.enabled=false draws none")
        cfg.prior.null_space = 0.0  # the saved config says so
    if model.kind in FLOW_KINDS:
        other = [f"{key}={value}" for key, value in (("prior.scheduler", cfg.prior.scheduler),
                 ("sample.scheduler", cfg.sample.scheduler), ("eval.scheduler", cfg.eval.scheduler),
                 ("sweep.scheduler", ",".join(cfg.sweep.scheduler))) if value != "euler"]
        if other:
            raise TrainingError(f"{model.kind} samples with flow matching's Euler, not {', '.join(other)}: "
                                "set those to euler, or start from a flux1-* or sd35-* preset")
    if cfg.prior.null_space and model.kind in FLOW_KINDS:
        raise TrainingError("prior.null_space reads a UNet's layers: it is for SD 1.x/2.x/XL (the world "
                            f"preset's option), not {model.kind}; set prior.null_space=0")
    if cfg.prior.null_space:
        from dreambooth.nullspace import estimated_bytes

        refuse_larger_than_free(estimated_bytes(family_of(model).denoiser(model)),
                                "prior.null_space reads the class prompt's inputs to every UNet layer",
                                "It is the world preset's option, for small UNets: set prior.null_space=0")
    refuse_larger_than_free(encode_bytes(model, cfg.data.resolution),
                            f"data.resolution={cfg.data.resolution} (encoding one photo at this size)",
                            "Lower data.resolution (the model's native size is usual: 512 for SD 1.x, "
                            "768 for SD 2.x, 1024 for SDXL)")
    check_optimizer(cfg, torch.cuda.is_available())
    check_available(cfg.train.quantize_base, torch.cuda.is_available())
    return cfg


def free_bytes() -> int:
    """Memory free for the run: the GPU's when training runs on one, else the machine's."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def refuse_larger_than_free(need: int, what: str, fix: str) -> None:
    """A TrainingError, before any work, when ``need`` bytes exceed the free memory."""
    free = free_bytes()
    if need > free:
        raise TrainingError(f"{what}: {need / 2**30:.1f} GiB, and "
                            f"{'the GPU' if torch.cuda.is_available() else 'this machine'} has "
                            f"{free / 2**30:.1f} GiB free. {fix}")


def encode_bytes(model: BaseModel, resolution: int) -> int:
    """A floor on the memory the VAE needs to encode one ``resolution`` photo: four float32
    activations of its first block at full size are alive at once (input, norm, conv output,
    residual). It keeps a mistyped resolution from allocating until the kernel kills the process."""
    return 4 * model.vae.config.block_out_channels[0] * resolution**2 * 4


def place_frozen(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move a module that is not trained to ``device``: in ``dtype`` (the mixed-precision one)
    on GPU, which halves its memory; as it is on CPU."""
    return module.to(device, dtype=dtype) if device.type == "cuda" else module.to(device)


def data_sources(cfg: Config, model: BaseModel, intake, acc, progress: bool) -> tuple[list[Source], str]:
    """(sources, class prompt): the subject's photos, then (with the prior) the class images,
    generated once by the frozen model and cached (one process generates, the rest reuse them)."""
    from dreambooth.prior import class_images, encode_images

    sources = [instance_source(cfg, model, intake)]
    class_prompt = fill_prompt(cfg.data.class_prompt, cfg.data.token, cfg.data.class_noun)
    if cfg.prior.enabled:
        with acc.main_process_first():
            found = class_images(model, cfg, class_prompt, progress=progress and acc.is_main_process)
            latents = encode_images(model, found.paths, cfg.data.resolution, found.folder)
        sources.append(Source(latents, [class_prompt] * len(latents)))
    return sources, class_prompt


def base_prediction(model: BaseModel, family, cfg: Config, class_prompt: str, n: int, device, dtype,
                    frozen_copy: Callable | None = None):
    """``f(noisy, timesteps)``: the frozen base model's prediction for ``n`` class images under the
    class prompt (``prior.target: base``). Call it before any weight changes. Full fine-tuning
    keeps a frozen copy of the denoiser (half precision on GPU; ``frozen_copy(denoiser)`` makes it,
    default a deep copy); LoRA runs the same one with its adapters switched off, which costs no
    memory. The prompt is encoded now, by the base text encoder, so text-encoder training does not
    move the target."""
    import copy

    with torch.no_grad():
        cond = family.encode_prompts(model, [class_prompt], device)
    conds = cond
    for _ in range(n - 1):
        conds = family.concat_cond(conds, cond)
    denoiser = family.denoiser(model)
    if cfg.train.mode == "lora":
        def predict(noisy, timesteps):
            denoiser.disable_adapters()
            try:
                return family.predict(denoiser, noisy, timesteps, conds)
            finally:
                denoiser.enable_adapters()
        return predict
    frozen = place_frozen((frozen_copy or copy.deepcopy)(denoiser).requires_grad_(False).eval(), device, dtype)

    def predict(noisy, timesteps):
        return family.predict(frozen, noisy.to(frozen.dtype), timesteps, conds)
    predict.module = frozen  # the copy's memory, for the plan (dreambooth.plan)
    return predict


def restore(s: Session) -> None:
    """Continue from the newest checkpoint that verifies (none: the run starts again from step 0)."""
    state = ckpt.resume_checkpoint(s.run_dir)
    if state is not None:
        shard.load_training_state(s, state["weights"], state["optimizer"])
        s.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ckpt.set_rng_state(state["rng"])
        s.step, s.seconds = state["state"]["step"], state["state"].get("seconds", 0.0)
        s.loss = state["state"].get("loss", s.loss)
    if s.acc.is_main_process:
        trim_metrics(s.run_dir / "metrics.jsonl", s.step)
        print(f"resuming from {state['path']} (step {s.step})" if state else
              f"{s.run_dir} has no checkpoint yet: starting it from step 0 with its config.yaml")


def start_evaluation(s: Session) -> None:
    """With ``eval.every``: the evaluator, the run's evaluations so far, and the base model's at step 0."""
    if s.cfg.eval.every > 0 and s.acc.is_main_process:
        from dreambooth.validation import Evaluator, eval_history

        s.evaluator = Evaluator(s.cfg, s.run_dir)
        s.history = eval_history(s.run_dir / "metrics.jsonl")
        if s.step == 0 and not s.history:
            s.history.append(evaluate_now(s))


# ------------------------------------------------------------------ one step


def training_step(s: Session, micro: int) -> torch.Tensor:
    """One micro-batch of step ``s.step``: backpropagate its loss; return (loss, instance, prior)."""
    t = s.cfg.train
    b = t.batch_size
    # global sample indices: the same for any split of the batch over processes and micro-batches
    ks = [((s.step * t.grad_accum + micro) * s.acc.num_processes + s.acc.process_index) * b + j for j in range(b)]
    x0, eps, ts, prompts, masks = draw_samples(s.sources, ks, t.seed, lambda g: s.family.draw_timestep(g, s.model),
                                               t.noise_offset)
    x0, eps, ts = x0.to(s.acc.device), eps.to(s.acc.device), ts.to(s.acc.device)
    noisy, target = s.family.noisy_and_target(s.model, x0, eps, ts)
    if s.reference is not None:  # prior.target "base": the class half distils the frozen model
        with torch.no_grad(), s.acc.autocast():
            target = torch.cat([target[:b], s.reference(noisy[b:], ts[b:]).to(target.dtype)])
    with s.acc.autocast():
        cond = conditioning(s, prompts)
        pred = s.family.predict(s.trainable.wrapped[s.family.denoiser_name], noisy, ts, cond)
    parts = dreambooth_loss(pred, target, num_instance=b, prior_weight=s.cfg.prior.weight,
                            weights=s.family.loss_weights(s.model, ts, t.snr_gamma),
                            mask=None if masks is None else masks.to(s.acc.device))
    if not finite(parts.total):
        last = ckpt.latest_checkpoint(s.run_dir)
        raise TrainingError(f"loss became {parts.total.item()} at step {s.step + 1}; stopped. "
                            + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                            + "Lower train.lr, turn on train.max_grad_norm, or use bf16 instead of fp16.")
    s.acc.backward(parts.total / t.grad_accum)  # the mean over micro-batches
    return torch.stack([parts.total, parts.instance, parts.prior]).detach()


def finite(x: torch.Tensor) -> bool:
    """Whether a scalar is finite; a planned step's fake tensor (``dreambooth.plan``) holds no value."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x) or bool(torch.isfinite(x))


def conditioning(s: Session, prompts: list[str]) -> dict:
    """The denoiser's conditioning for ``prompts``: through the text encoders while they train
    (the first ``train.text_encoder_steps``), else from a cache made once they are frozen."""
    t = s.cfg.train
    if s.trainable.trains_text() and s.step < (t.text_encoder_steps or t.steps):
        return s.family.encode_prompts(s.text_model, prompts, s.acc.device)
    if s.frozen_cond is None:
        with torch.no_grad():
            s.frozen_cond = {p: s.family.encode_prompts(s.model, [p], s.acc.device) for p in s.prompts}
    cond = s.frozen_cond[prompts[0]]
    for p in prompts[1:]:
        cond = s.family.concat_cond(cond, s.frozen_cond[p])
    return cond


def optimizer_step(s: Session) -> torch.Tensor:
    """All micro-batches of one step, then the update; returns the step's mean losses."""
    accum = s.cfg.train.grad_accum
    totals = torch.zeros(3, device=s.acc.device)
    for micro in range(accum):
        with contextlib.ExitStack() as sync:  # DDP: all-reduce gradients on the last micro-batch only
            if micro < accum - 1:
                for module in s.trainable.wrapped.values():
                    sync.enter_context(s.acc.no_sync(module))
            totals += training_step(s, micro) / accum
    if s.cfg.train.max_grad_norm:
        s.acc.clip_grad_norm_(s.trainable.parameters(), s.cfg.train.max_grad_norm)
    s.optimizer.step()
    if s.project is not None:  # prior.null_space
        s.project()
    s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return totals


# ------------------------------------------------------------------ the loop


def loop(s: Session, stop_after: int | None = None, progress: bool = True,
         stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train from ``s.step`` to ``train.steps`` (or ``stop_after`` more steps, or until ``stop()``
    says so): log every ``train.log_every``, evaluate every ``eval.every`` (before that step's
    checkpoint, so an evaluation cut short is redone on resume), checkpoint every
    ``train.checkpoint_every`` and where it ends early."""
    t, acc = s.cfg.train, s.acc
    end = t.steps if stop_after is None else min(t.steps, s.step + stop_after)
    bar = tqdm(total=t.steps, initial=s.step, disable=not (progress and acc.is_main_process),
               desc="train", unit="step", dynamic_ncols=True)
    stopped_early = False
    while s.step < end:
        started = time.perf_counter()
        totals = acc.reduce(optimizer_step(s), reduction="mean")
        s.step += 1
        s.seconds += time.perf_counter() - started
        s.loss = totals[0].item()
        bar.update(1)
        bar.set_postfix(loss=f"{s.loss:.4f}")
        if acc.is_main_process and (s.step % t.log_every == 0 or s.step == t.steps):
            log_metrics(s.run_dir / "metrics.jsonl", {
                "step": s.step, "loss": s.loss, "instance_loss": totals[1].item(),
                "prior_loss": totals[2].item(), "lr": s.lr_scheduler.get_last_lr()[0],
                "seconds": round(s.seconds, 4)})
        evaluating = s.cfg.eval.every > 0 and (s.step % s.cfg.eval.every == 0 or s.step == t.steps)
        if evaluating:
            stopped_early = evaluate_and_maybe_stop(s)
        if stop is not None and s.step < end and stop():
            end = s.step  # checkpointed below, as a stop_after would be
        if s.step % t.checkpoint_every == 0 or (s.step == end and s.step < t.steps) or (evaluating and s.step < t.steps):
            save_checkpoint(s)
        if stopped_early:
            break
    bar.close()
    final, chosen = None, None
    if s.step >= t.steps or stopped_early:
        acc.wait_for_everyone()
        shard.gather_denoiser(s)  # sharded: the main process's model gets the whole denoiser
        if acc.is_main_process:
            final, chosen = finish(s, stopped_early)
    return TrainResult(run_dir=s.run_dir, final=final, step=s.step, loss=s.loss, best=chosen)


def evaluate_now(s: Session) -> dict:
    """Run the evaluator on the model as it is now; log and return its record."""
    move_frozen(s, s.acc.device)
    with s.acc.autocast():
        record = s.evaluator(s.model, ckpt.step_dir_name(s.step), s.step)
    move_frozen(s, torch.device("cpu"))
    log_metrics(s.run_dir / "metrics.jsonl", record)
    shown = {k: v for k, v in record.items() if k in ("fidelity", "prompt_fidelity")}
    tqdm.write(f"eval step {s.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return record


def evaluate_and_maybe_stop(s: Session) -> bool:
    """Evaluate (main process) and decide early stop (every process agrees)."""
    stop = 0.0
    if s.evaluator is not None:
        s.history.append(evaluate_now(s))
        stop = float(should_stop(s.history, s.cfg.eval.early_stop, s.cfg.eval.flat))
    stopped = s.acc.reduce(torch.tensor([stop], device=s.acc.device), "sum").item() > 0
    if stopped and s.acc.is_main_process:
        print(f"early stop at step {s.step}: prompt fidelity fell {s.cfg.eval.early_stop} "
              f"evaluations in a row while fidelity stayed flat (eval.early_stop)")
    return stopped


def save_checkpoint(s: Session) -> None:
    s.acc.wait_for_everyone()
    weights, optimizer_state = shard.training_state(s)  # sharded: every process gathers its part
    if not s.acc.is_main_process:
        return
    t = s.cfg.train
    best = select_best(s.history, s.cfg.eval.prompt_floor)
    with disk_full_advice(s.run_dir):
        ckpt.save_checkpoint(
            s.run_dir, s.step, weights=weights, optimizer_state=optimizer_state,
            lr_scheduler_state=s.lr_scheduler.state_dict(),
            state={"data_position": s.step * t.grad_accum * s.acc.num_processes * t.batch_size,
                   "loss": s.loss, "seconds": s.seconds},
            config_yaml=s.config_yaml, keep=t.keep_checkpoints, protect=frozenset({best.step} if best else ()))


def finish(s: Session, stopped_early: bool) -> tuple[Path, int | None]:
    """``final/``: the best evaluated step's weights when evaluation chose one, else the last;
    then best.json and report.html. Returns (final/, the chosen step or None)."""
    from dreambooth.report import write_report

    move_frozen(s, s.acc.device)
    kept = {ckpt.checkpoint_step(c) for c in ckpt.list_checkpoints(s.run_dir)} | {s.step}
    choice = select_best(s.history, s.cfg.eval.prompt_floor, allowed=kept) if s.cfg.eval.select_best else None
    if choice is not None and choice.step != s.step:
        s.trainable.load(ckpt.load_weights(s.run_dir / "checkpoints" / ckpt.step_dir_name(choice.step)))
    with disk_full_advice(s.run_dir):
        final = save_final(s.model, s.cfg, s.run_dir / "final", s.config_yaml)
    if choice is not None:
        (s.run_dir / "best.json").write_text(json.dumps({
            **asdict(choice), "final_is_best": True, "last_step": s.step, "stopped_early": stopped_early}, indent=1))
    write_report(s.run_dir)
    return final, None if choice is None else choice.step


# ------------------------------------------------------------------ run-directory I/O


def save_final(model: BaseModel, cfg: Config, folder: Path, config_yaml: str) -> Path:
    """``final/``: a diffusers folder (full) or LoRA weights for ``load_lora_weights``, the config,
    and checksums.json, written atomically."""
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
