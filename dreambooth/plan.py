"""`dreambooth plan`: a training run's peak accelerator memory, predicted before it starts.

The prediction is one real training step (``train.optimizer_step``: the same code a run executes)
of the real-size model with fake tensors: the model is built from its configs alone under
PyTorch's ``FakeTensorMode`` (no weights read, nothing allocated), and PyTorch's own memory
tracker (``torch.distributed._tools.mem_tracker.MemTracker``) follows every tensor the step
creates and frees: weights, gradients, optimizer state, activations, temporaries. So no hand-kept
table of layer sizes can go stale. The frozen parts the step does not touch (the VAE; the text
encoders once their embeddings are cached) are added at their resident size, unless
``train.offload_frozen`` moves them to the CPU. 8-bit AdamW (bitsandbytes, CUDA only) is planned
as AdamW with its state at 1 byte per value plus one float32 scale per 256 values, which is
how bitsandbytes stores it (paged 8-bit AdamW the same: the plan counts its state all resident,
the worst case, though the driver may evict it to host memory under pressure);
``train.offload_optimizer`` as AdamW with the state of its offloaded tensors in host memory
(``Estimate.host``, beside the GPU's peak). ``train.quantize_base=int8`` runs torchao's int8 layers in the planned
step (they run on fake tensors; their stored bytes are the int8 data and scales); ``nf4`` cannot
(bitsandbytes runs neither on fake tensors nor without CUDA), so it is planned as the unquantized
step with each quantized weight counted at its stored bytes (``_planned_nf4``).

What is counted is tensor memory, as ``torch.cuda.max_memory_allocated`` reports it; the CUDA
context (0.3-0.5 GiB) and allocator fragmentation come on top (``CUDA_OVERHEAD``).
``measure(session)`` runs the same accounting on a real session's step, which is how the tests
check the prediction.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from dreambooth.base_model import TINY_NAMES, BaseModel
from dreambooth.errors import DreamboothError

ARCHITECTURES = ("sd15", "sd21", "sdxl", "flux1-dev", "flux1-schnell", "sd35-medium", "sd35-large")
CUDA_OVERHEAD = 512 * 2**20  # the CUDA context and cuBLAS workspace, beside the tensors
BNB_BYTES = 1 + 4 / 256  # bytes per optimizer-state value under 8-bit AdamW (blockwise, 256 per scale)
GiB = 2**30


@dataclass
class Estimate:
    """Peak tensor bytes of one training step, by kind (``parts``), for the settings in ``settings``;
    ``host``: what ``train.offload_optimizer`` keeps in host memory instead (not in ``peak``)."""

    peak: int
    parts: dict[str, int] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    def gib(self) -> float:
        return self.peak / GiB


class _Tokenizer:
    """Stands in for a tokenizer in a planned step: the ids' values do not change memory."""

    def __init__(self, max_length: int):
        self.model_max_length = max_length

    def __call__(self, text, padding=None, max_length=None, truncation=None, return_tensors=None,
                 add_special_tokens=True):
        n = len(text) if isinstance(text, list) else 1
        ids = torch.zeros(n, max_length or self.model_max_length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids if return_tensors else [1, 2])


class _Accelerator:
    """The part of ``accelerate.Accelerator`` a training step uses, for a planned step."""

    device, num_processes, process_index, is_main_process = torch.device("cpu"), 1, 0, True

    def __init__(self, mixed_precision: str):
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def no_sync(self, module):
        return contextlib.nullcontext()


def config_folder(path: str) -> tuple[Path | None, str]:
    """(folder of diffusers configs, tiny name or "") for ``model.path``: an architecture name, a
    world model, a local diffusers folder, or a single file (the configs of its architecture)."""
    from dreambooth.models import WORLD_MODELS
    from dreambooth.transformer_files import SHIPPED

    if path in TINY_NAMES:
        return None, path
    if path in ARCHITECTURES:
        return SHIPPED / path, ""
    if path in WORLD_MODELS:
        return WORLD_MODELS[path], ""
    file = Path(path).expanduser()
    if file.is_file():
        return SHIPPED / _file_architecture(file), ""
    if not (file / "model_index.json").is_file():
        raise DreamboothError(f"cannot plan for --model {path}: give a local diffusers folder, a single-file "
                              f"checkpoint, a tiny model, or an architecture: {', '.join(ARCHITECTURES)}")
    return file, ""


def _file_architecture(file: Path) -> str:
    """The shipped architecture of a single-file checkpoint, from its header (no weights read)."""
    from safetensors import safe_open

    from dreambooth.ldm_keys import LayoutError, detect_kind
    from dreambooth.single_file import ARCH_FOLDERS
    from dreambooth.transformer_files import detect_transformer

    if file.suffix.lower() != ".safetensors":
        raise DreamboothError(f"{file}: plan reads .safetensors headers only; pass the architecture instead")
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    try:
        return detect_transformer(shapes)
    except LayoutError:
        pass
    try:
        return ARCH_FOLDERS[detect_kind(shapes)]
    except (LayoutError, KeyError) as e:
        raise DreamboothError(f"{file}: not a checkpoint plan knows ({e})") from None


def build_from_configs(path: str) -> BaseModel:
    """The model ``path`` names, built from its configs in the active (fake) mode, with stand-in
    tokenizers (CLIP's 77 tokens, T5's 512)."""
    import importlib

    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import AutoConfig

    from dreambooth.models import PARTS, _detect_kind
    from dreambooth.tiny import build_tiny

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    folder, tiny = config_folder(path)
    if tiny:  # seconds to build for real (schedulers read their tensors' values while built)
        with unset_fake_temporarily():
            model = build_tiny(tiny)
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if getattr(model, name) is not None:
                setattr(model, name, _Tokenizer(getattr(model, name).model_max_length))
        return model
    import json

    kind = _detect_kind(folder, json.loads((folder / "model_index.json").read_text()))
    parts = {}
    for name, (library, cls_name) in PARTS[kind].items():
        cls = getattr(importlib.import_module(library), cls_name)
        if name.startswith("tokenizer"):
            parts[name] = _Tokenizer(_max_length(folder / name, 512 if cls_name.startswith("T5") else 77))
        elif name == "scheduler":
            flow = cls is FlowMatchEulerDiscreteScheduler
            with unset_fake_temporarily():
                parts[name] = (FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler).from_pretrained(
                    folder, subfolder=name)
        elif library == "diffusers":
            parts[name] = cls.from_config(cls.load_config(folder, subfolder=name))
        else:
            parts[name] = cls(AutoConfig.from_pretrained(folder / name))
    return BaseModel(**{"unet": None, **parts}, kind=kind, source=path)


def _max_length(folder: Path, default: int) -> int:
    """A tokenizer folder's model_max_length (its prompt length), else the family's default."""
    import json

    try:
        value = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError):
        return default
    return int(value) if isinstance(value, (int, float)) and 0 < value < 100_000 else default


def _bytes(modules) -> int:
    """Bytes of the modules' parameters and buffers, each tensor once (tied weights are one)."""
    seen = {id(s): s.nbytes() for m in modules for t in [*m.parameters(), *m.buffers()] for s in _storages(t)}
    return sum(seen.values())


def _storages(t: torch.Tensor) -> list:
    """The storages that hold a tensor's data: its own, or for a quantized weight those of the
    tensors it keeps (torchao's ``Int8Tensor``: int8 data and scales; bitsandbytes' ``Params4bit``:
    packed data, absmax and codes), whose own storage says nothing."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    state = getattr(t, "quant_state", None)
    extra = [x for st in (state, getattr(state, "state2", None)) if st is not None
             for x in vars(st).values() if isinstance(x, torch.Tensor)]
    return [t.untyped_storage(), *(x.untyped_storage() for x in extra)]


def resident_frozen(s) -> dict[str, int]:
    """The frozen modules a step does not create but that stay on the device: the VAE (the latents
    are cached) and the text encoders that do not train (their embeddings are cached), unless
    ``train.offload_frozen`` moves them to the CPU; and ``prior.target: base``'s frozen copy."""
    from dreambooth.train import frozen_parts

    parts = {} if s.cfg.train.offload_frozen else frozen_parts(s)
    out = {f"{name} (frozen)": _bytes([m]) for name, m in parts.items()}
    if getattr(s.reference, "module", None) is not None:  # prior.target base, full: a frozen copy
        out["frozen copy of the denoiser (prior.target: base)"] = _bytes([s.reference.module])
    return out


class LiveBytes:
    """A dispatch mode that follows every tensor storage a step creates until it is freed, and
    keeps the peak of the live bytes (what ``torch.cuda.max_memory_allocated`` measures on a GPU).
    The same on fake tensors (a planned step) and real ones (a measured step)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.add(out)
                return out

        self.mode, self.live, self.now, self.peak = Mode(), {}, 0, 0

    def add(self, tensors) -> None:
        import weakref

        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                for storage in _storages(t):
                    if id(storage) not in self.live:
                        self.live[id(storage)] = storage.nbytes()
                        self.now += storage.nbytes()
                        weakref.finalize(storage, self._free, id(storage))
        self.peak = max(self.peak, self.now)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)


def step_peak(s, planned_nf4: bool = False) -> Estimate:
    """Peak tensor bytes of an optimizer step of session ``s`` (real or fake), in steady state: the
    optimizer's state is made first (an update with zero gradients), then the step is followed by
    ``LiveBytes`` from the weights, state and caches alive before it. The frozen modules the step
    does not touch are added at their resident size (``resident_frozen``). ``planned_nf4``: the
    session's base is not quantized and stands in for ``train.quantize_base=nf4``'s."""
    from dreambooth.train import conditioning, optimizer_step

    if not s.trainable.trains_text():
        conditioning(s, s.prompts[:1])
    for p in s.trainable.parameters():
        p.grad = torch.zeros_like(p)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    tracker = LiveBytes()
    touched = [*s.trainable.modules.values()] + ([s.model.text_encoder] if s.trainable.trains_text() else [])
    state = [t for st in s.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    tracker.add([*(t for m in touched for t in [*m.parameters(), *m.buffers()]), *state])
    before = tracker.now
    with tracker.mode:
        optimizer_step(s)
    optimizer = sum(t.untyped_storage().nbytes() for t in state)
    trained = sum(p.numel() * p.element_size() for p in s.trainable.parameters())
    parts = {"weights": before - optimizer, "gradients": trained, "optimizer state": optimizer,
             "activations and temporaries": tracker.peak - before - trained}
    # planned as AdamW: 8 bytes a value, bitsandbytes keeps ~2. Paged: all of it resident, the worst case
    if s.cfg.train.optimizer in ("adamw8bit", "paged_adamw8bit"):
        parts["optimizer state"] = int(optimizer * 2 * BNB_BYTES / 8)
    host = _offloaded_state(s, parts) if s.cfg.train.offload_optimizer else {}
    if planned_nf4:
        _planned_nf4(s, parts)
    parts.update(resident_frozen(s))
    return Estimate(sum(parts.values()), parts, settings=settings_of(s.cfg), host=host)


def _offloaded_state(s, parts: dict[str, int]) -> dict[str, int]:
    """``train.offload_optimizer``: the state of the tensors torchao offloads (``OFFLOAD_MIN_SIZE``
    values or more) leaves the GPU's parts for host memory, where pinned copies of those weights
    and gradients join it; the smaller tensors' state stays on the GPU. Returns the host bytes."""
    from dreambooth.trainable import OFFLOAD_MIN_SIZE

    moved = [(p, st) for p, st in s.optimizer.state.items() if p.numel() >= OFFLOAD_MIN_SIZE]
    state = sum(t.untyped_storage().nbytes() for _, st in moved for t in st.values() if isinstance(t, torch.Tensor))
    copies = sum(p.numel() * p.element_size() for p, _ in moved)
    parts["optimizer state"] -= state
    return {"optimizer state": state, "weights and gradients (copies)": 2 * copies}


def _planned_nf4(s, parts: dict[str, int]) -> None:
    """``train.quantize_base=nf4`` without bitsandbytes' layers, which run neither on fake tensors
    nor without CUDA: computed from the linear layers' shapes, as 8-bit AdamW's state is
    (``BNB_BYTES``). Each weight ``quantize_base`` would convert counts at its stored bytes
    (``quantize.stored_bytes``) instead of its planned dtype's; and one layer's weight at the compute
    dtype, the largest, joins the temporaries: bitsandbytes dequantizes a layer's weight for each
    forward and backward call and frees it after."""
    from dreambooth.quantize import frozen_linears, stored_bytes

    weights = [m.weight for m in frozen_linears(s.family.denoiser(s.model)).values()]
    full = [w.numel() * w.element_size() for w in weights]
    parts["weights"] -= sum(full) - sum(stored_bytes(*w.shape, "nf4", w.element_size()) for w in weights)
    parts["activations and temporaries"] += max(full, default=0)


def settings_of(cfg) -> dict[str, object]:
    t = cfg.train
    out = {"mode": t.mode, "mixed_precision": t.mixed_precision, "gradient_checkpointing": t.gradient_checkpointing,
           "optimizer": t.optimizer, "offload_optimizer": t.offload_optimizer, "offload_frozen": t.offload_frozen, "resolution": cfg.data.resolution,
           "batch_size": t.batch_size, "prior": cfg.prior.enabled, "train_text_encoder": t.train_text_encoder}
    if t.mode == "lora":
        out["lora_rank"] = cfg.lora.rank
        out["quantize_base"] = t.quantize_base
    return out


def fake_session(cfg):
    """A training session of ``cfg`` over a model built from configs, every tensor fake (call it
    inside ``FakeTensorMode``): one latent per source, placeholder prompts, the run's trainable
    weights, optimizer and (``prior.target: base``) reference, as ``train.setup`` makes them."""
    from diffusers.optimization import get_scheduler

    from dreambooth.batch import Source
    from dreambooth.family import family_of
    from dreambooth.models import configure
    from dreambooth.quantize import check_available, quantize_base
    from dreambooth.train import Session, base_prediction, enable_checkpointing
    from dreambooth.trainable import make_optimizer, make_trainable

    model = configure(build_from_configs(cfg.model.path), cfg)
    cfg.data.token = "zwx" if cfg.data.token == "auto" else cfg.data.token
    family = family_of(model, cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
    for module in model.modules():  # planned for a GPU, where frozen weights are kept in that dtype
        if module is not family.denoiser(model) or cfg.train.mode == "lora":
            module.to(dtype=dtype)
    side = cfg.data.resolution // model.vae_scale_factor
    latents = torch.zeros(1, model.vae.config.latent_channels, side, side)
    prompts = [f"a photo of {cfg.data.token} {cfg.data.class_noun or 'dog'}", f"a photo of a {cfg.data.class_noun or 'dog'}"]
    sources = [Source(latents, prompts[:1])] + ([Source(latents.clone(), prompts[1:])] if cfg.prior.enabled else [])
    trainable = make_trainable(model, cfg)
    if cfg.train.quantize_base == "int8":  # as train.setup does (nf4: _planned_nf4)
        check_available("int8", cuda=True)
        quantize_base(family.denoiser(model), "int8")
    # fake tensors cannot be deep-copied: full fine-tuning's frozen copy is built again from the
    # configs, in the dtype a GPU run keeps it in
    def frozen_copy(_):
        return getattr(build_from_configs(cfg.model.path), family.denoiser_name).to(dtype=dtype)

    reference = (base_prediction(model, family, cfg, prompts[1], cfg.train.batch_size, torch.device("cpu"), dtype,
                                 frozen_copy=frozen_copy)
                 if cfg.prior.enabled and cfg.prior.target == "base" else None)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(trainable, family.denoiser(model))
    optimizer = make_optimizer(cfg, trainable, plan=True)
    sched = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=cfg.train.steps)
    trainable.wrapped = dict(trainable.modules)
    return Session(cfg, Path("."), _Accelerator(cfg.train.mixed_precision), model, family, trainable, optimizer,
                   sched, sources, sorted(set(p for src in sources for p in src.prompts)), "", model, reference)


def predict(cfg) -> Estimate:
    """The peak of one training step of ``cfg`` (a copy is planned; ``cfg`` is not changed)."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusers.utils import logging as diffusers_logging

    cfg = copy.deepcopy(cfg)
    diffusers_logging.set_verbosity_error()  # a note on every cast of a fake model to half precision
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # While the model is built, Module.to (peft, the dtype casts) swaps each fake weight for its
    # converted self, which Python refuses while a weakref to it exists, and the mode's dispatch
    # cache and its converter's memo keep one on every fake tensor: build without the cache and
    # with a plain memo, then give both back, since the plain memo keeps every tensor alive
    memo = mode.fake_tensor_converter.meta_converter
    mode.cache_enabled, weak_memo, memo.tensor_memo = False, memo.tensor_memo, {}
    with mode:
        session = fake_session(cfg)
        mode.cache_enabled, memo.tensor_memo = True, weak_memo
        return step_peak(session, planned_nf4=cfg.train.mode == "lora" and cfg.train.quantize_base == "nf4")


def measure(session) -> Estimate:
    """The same accounting on a real session's next step (the step is taken)."""
    return step_peak(session)


def on_gpus(estimate: Estimate, cfg, gpus: int) -> Estimate:
    """``estimate`` on each of ``gpus`` GPUs (``dreambooth plan --gpus N``; ``train``'s preflight
    with the launched processes). ``train.shard=fsdp``: the denoiser's weights, gradients and
    optimizer state split N ways plus the blocks gathered at once (``shard.per_gpu``, over the
    units FSDP makes of the denoiser built from its configs); ``none``: every GPU holds it all."""
    settings = {**estimate.settings, "gpus": gpus}
    if gpus <= 1 or cfg.train.shard != "fsdp":
        return Estimate(estimate.peak, dict(estimate.parts), settings, dict(estimate.host))
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth.family import family_of
    from dreambooth.shard import per_gpu, unit_bytes

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_from_configs(cfg.model.path)
        units = unit_bytes(family_of(model, cfg).denoiser(model))
    parts = per_gpu(estimate.parts, units, gpus, 2 if cfg.train.mixed_precision in ("fp16", "bf16") else 4)
    return Estimate(sum(parts.values()), parts, settings)


# ---------------------------------------------------------------- fitting a budget


def parse_budget(text: str | None) -> int | None:
    """Bytes of GPU memory: "24GB", "24GiB", "24" (GB), or "auto" (this machine's GPU; None when
    it has none). None for None or ""."""
    if not text:
        return None
    if text == "auto":
        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    number = text.upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        value = float(number)
    except ValueError:
        raise DreamboothError(f"--gpu {text}: give the GPU's memory, e.g. --gpu 24GB, or --gpu auto") from None
    if value <= 0:
        raise DreamboothError(f"--gpu {text}: the memory must be positive")
    return int(value * GiB)


def fits(estimate: Estimate, budget: int) -> bool:
    return estimate.peak + CUDA_OVERHEAD <= budget


def switches(cfg) -> list[tuple[str, list[str]]]:
    """The switches that lower a run's memory, cheapest in quality first, each as (why, --set
    items), for those that still apply to ``cfg``."""
    t, out = cfg.train, []
    if t.batch_size > 1:
        out.append(("one image per micro-batch, the same batch by accumulation",
                    ["train.batch_size=1", f"train.grad_accum={t.grad_accum * t.batch_size}"]))
    if not t.gradient_checkpointing:
        out.append(("recompute activations in the backward pass (slower steps)", ["train.gradient_checkpointing=true"]))
    if t.mixed_precision == "no":
        out.append(("bf16 compute, frozen weights in bf16", ["train.mixed_precision=bf16"]))
    if t.optimizer == "adamw" and not t.offload_optimizer:
        out.append(("8-bit AdamW state (bitsandbytes, CUDA)", ["train.optimizer=adamw8bit"]))
    if not (t.offload_optimizer or t.shard == "fsdp" or t.mixed_precision == "fp16" or cfg.prior.null_space):
        out.append(("AdamW's state and update on the CPU (torchao, CUDA; slower steps)",  # replaces 8-bit AdamW
                    ["train.optimizer=adamw", "train.offload_optimizer=true"]))
    if not t.offload_frozen:
        out.append(("VAE and frozen text encoders to the CPU once cached", ["train.offload_frozen=true"]))
    if t.mode == "lora" and t.quantize_base != "nf4":
        out.append(("quantized frozen base: its linear weights in 4 bits (NF4, bitsandbytes, CUDA)",
                    ["train.quantize_base=nf4"]))
    for side in (768, 512, 384, 256):
        if side < cfg.data.resolution:
            out.append((f"train at {side} px", [f"data.resolution={side}"]))
    if t.mode == "lora" and cfg.lora.rank > 4:
        out.append(("LoRA rank 4", ["lora.rank=4", f"lora.alpha={cfg.lora.alpha * 4 / cfg.lora.rank:g}"]))
    return out


def advise(cfg, budget: int, estimate: Estimate | None = None, gpus: int = 1) -> list[tuple[str, list[str], Estimate]]:
    """Switches added one by one in ``switches`` order until the run fits ``budget``, each with the
    predicted peak once it and those before it are on. Empty when the run fits as it is; the last
    row does not fit when nothing does. (A lower resolution replaces the one before it.) ``gpus``:
    per GPU of that many (``on_gpus``)."""
    estimate = estimate or on_gpus(predict(cfg), cfg, gpus)
    rows: list[tuple[str, list[str], Estimate]] = []
    current = cfg
    while not fits(estimate, budget):
        options = switches(current)
        if not options:
            break
        why, items = options[0]
        current = _with(current, items)
        estimate = _derived(estimate, items, current) or on_gpus(predict(current), current, gpus)
        rows.append((why, items, estimate))
    return rows


def plan_run(cfg, budget: int | None, gpus: int = 1) -> tuple[Estimate, list[tuple[str, list[str], Estimate]]]:
    """The run's predicted peak on each of ``gpus`` GPUs, and with a ``budget`` the switches that
    make it fit (``advise``): what `dreambooth plan` and the web UI report."""
    estimate = on_gpus(predict(cfg), cfg, gpus)
    return estimate, (advise(cfg, budget, estimate, gpus) if budget is not None else [])


def _derived(estimate: Estimate, items: list[str], cfg) -> Estimate | None:
    """The estimate after a switch that changes one known part, without another planned step:
    8-bit AdamW (the optimizer state) and offloading the untouched frozen modules."""
    parts = dict(estimate.parts)
    if items == ["train.optimizer=adamw8bit"]:
        parts["optimizer state"] = int(parts["optimizer state"] * 2 * BNB_BYTES / 8)
    elif items == ["train.offload_frozen=true"]:
        parts = {k: v for k, v in parts.items() if not k.endswith(" (frozen)")}
    else:
        return None
    return Estimate(sum(parts.values()), parts, settings_of(cfg), dict(estimate.host))


def _with(cfg, items: list[str]):
    import copy

    from dreambooth.config import apply_overrides, validate

    new = copy.deepcopy(cfg)
    apply_overrides(new, items)
    return validate(new)


def report(cfg, estimate: Estimate, budget: int | None, advice) -> str:
    """The plan as text: the peak by part, whether it fits, and the switches that make it fit."""
    lines = [f"model {cfg.model.path}, {cfg.train.mode} at {cfg.data.resolution} px, batch {cfg.train.batch_size}"
             f"{' + prior' if cfg.prior.enabled else ''}, {cfg.train.mixed_precision} precision, "
             f"optimizer {cfg.train.optimizer}{' on the CPU' if cfg.train.offload_optimizer else ''}, checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}"
             f"{f', frozen base in {cfg.train.quantize_base}' if cfg.train.quantize_base != 'none' else ''}",
             f"predicted peak GPU memory (tensors, one training step{_gpus_note(cfg, estimate)}):"]
    lines += [f"  {name:<52} {size / GiB:8.2f} GiB" for name, size in estimate.parts.items()]
    lines.append(f"  {'total':<52} {estimate.gib():8.2f} GiB  (+ {CUDA_OVERHEAD / GiB:.1f} GiB CUDA context)")
    if estimate.host:
        lines.append("in host memory (train.offload_optimizer; not in the GPU's total):")
        lines += [f"  {name:<52} {size / GiB:8.2f} GiB" for name, size in estimate.host.items()]
    if budget is None:
        return "\n".join(lines + ["pass --gpu 24GB (or --gpu auto on the GPU) to check that it fits"])
    if fits(estimate, budget):
        return "\n".join(lines + [f"fits in {budget / GiB:.3g} GiB"])
    lines.append(f"does NOT fit in {budget / GiB:.3g} GiB. Switches, cheapest in quality first:")
    for why, items, after in advice:
        mark = "fits" if fits(after, budget) else "still over"
        lines.append(f"  --set {' --set '.join(items):<58} {after.gib():7.2f} GiB  {mark}   ({why})")
    if not advice or not fits(advice[-1][2], budget):
        lines.append("no switch here makes it fit: a larger GPU, or LoRA instead of full fine-tuning")
    return "\n".join(lines)


def _gpus_note(cfg, estimate: Estimate) -> str:
    gpus = estimate.settings.get("gpus", 1)
    if gpus <= 1:
        return ""
    if cfg.train.shard == "fsdp":
        return f", on each of {gpus} GPUs, sharded by FSDP"
    return f", on each of {gpus} GPUs: train.shard=none holds it all on each; train.shard=fsdp splits it"


def preflight(cfg) -> None:
    """``train``'s check before it loads any weights: on a GPU (or with DREAMBOOTH_GPU_MEMORY=24GB
    set, a budget to plan against), refuse a run the plan says cannot fit, with the switches that
    make it fit."""
    import os

    budget = parse_budget(os.environ.get("DREAMBOOTH_GPU_MEMORY") or ("auto" if torch.cuda.is_available() else ""))
    if budget is None:
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))  # the processes launched: one GPU each
    try:
        estimate = on_gpus(predict(cfg), cfg, gpus)
    except DreamboothError:
        raise
    except Exception as e:  # an operation fake tensors cannot run: train without the check
        print(f"note: the memory plan could not run ({type(e).__name__}: {str(e)[:200]}); training without it")
        return
    if not fits(estimate, budget):
        raise DreamboothError("this run does not fit the GPU:\n" + report(cfg, estimate, budget, advise(cfg, budget, estimate, gpus))
                              + "\n(`dreambooth plan` with the same settings prints this again)")
