"""``train.shard=fsdp``: the denoiser of a full fine-tune split over the processes of ``accelerate launch``.

accelerate's FSDP (version 2, which is PyTorch's ``fully_shard``) keeps 1/N of every weight, its
gradient and its AdamW state on each of N processes, and gathers one block's weights at a time
for its forward and backward pass. The blocks are the classes the denoiser lists in its
``_no_split_modules`` (diffusers names them: ``BasicTransformerBlock`` and ``ResnetBlock2D`` for a
UNet, ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock`` for FLUX.1,
``JointTransformerBlock`` for SD 3.x), so no list of layer names is kept here.

The run directory does not change: a checkpoint holds the whole tensors under the names an
unsharded run gives them (gathered on the main process, which writes it), and its optimizer state
is numbered as ``torch.optim.Optimizer.state_dict`` numbers it. So a sharded run resumes
unsharded, or on another number of GPUs, and ``final/`` exports as any other. With one process
there is nothing to shard and the run is an ordinary one.

accelerate 1.16 turns FSDP on for accelerator devices only: ``AcceleratorState`` sets
``DistributedType.FSDP`` in its branch for MULTI_GPU, MULTI_NPU, ... (accelerate/state.py), and
on CPU (MULTI_CPU, gloo) drops the plugin, which would train every process on whole copies as
DDP. A sharded run on CPU processes is refused (``check``); tests/test_fsdp.py lifts that one
gate to run this code on two gloo processes.
"""

from __future__ import annotations

from typing import Any

import torch

from dreambooth.errors import DreamboothError


def plugin(cfg) -> Any:
    """accelerate's FSDP plugin for ``train.shard=fsdp`` when more than one process runs; else None."""
    if cfg.train.shard != "fsdp":
        return None
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if PartialState(cpu=not torch.cuda.is_available()).num_processes == 1:  # as train.setup's Accelerator
        print("note: train.shard=fsdp with one process: nothing to shard, the run trains unsharded")
        return None
    # transformer_based_wrap with no class names: the denoiser's _no_split_modules; whole tensors
    # for checkpoints (FULL_STATE_DICT); every rank loads the model (no cpu_ram_efficient_loading)
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                          cpu_ram_efficient_loading=False, activation_checkpointing=False)


def sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def check(acc, cfg) -> None:
    """Refuse a ``train.shard=fsdp`` run of several processes that accelerate does not shard."""
    if cfg.train.shard == "fsdp" and acc.num_processes > 1 and not sharded(acc):
        raise DreamboothError(
            f"train.shard=fsdp: accelerate runs these {acc.num_processes} processes as "
            f"{acc.distributed_type.value}, not FSDP: accelerate 1.16 shards on GPUs (and other "
            "accelerators) only, and on CPU processes it would train whole copies. Launch on GPUs, "
            "or set train.shard=none")


def _inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def training_state(s) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, optimizer state) as a checkpoint stores them (``Trainable.weights``' names, the
    optimizer's numbered state). Sharded, every process must call it: the whole tensors are
    gathered onto the main process's CPU, and the others get ({}, {})."""
    if not sharded(s.acc):
        return s.trainable.weights(), s.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    (name, module), = s.trainable.modules.items()
    whole = get_model_state_dict(module, options=_options(cpu_offload=True))
    by_name = get_optimizer_state_dict(module, _inner(s.optimizer), options=_options(cpu_offload=True))
    if not s.acc.is_main_process:
        return {}, {}
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    return {f"{name}.{n}": whole[n] for n in trained}, numbered(by_name)


def numbered(state: dict) -> dict:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's) keyed by the
    parameters' positions over the groups instead, as ``Optimizer.state_dict`` keys it."""
    names = [n for group in state["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def named(state: dict, names: list[str]) -> dict:
    """The inverse of ``numbered``: ``names`` are the parameters' names in the groups' order."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def load_training_state(s, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Put a checkpoint's weights and optimizer state into the session, sharded or not (every
    process has read the whole checkpoint; each keeps its shard)."""
    if not sharded(s.acc):
        s.trainable.load(weights)
        s.optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    (name, module), = s.trainable.modules.items()
    expected = {f"{name}.{n}" for n, p in module.named_parameters() if p.requires_grad}
    if weights.keys() != expected:
        odd = sorted(weights.keys() ^ expected)[:3]
        raise DreamboothError(f"the checkpoint does not match the model's trainable weights "
                              f"({len(weights)} saved, {len(expected)} expected; e.g. {odd})")
    set_model_state_dict(module, {k.removeprefix(f"{name}."): v for k, v in weights.items()},
                         options=_options(strict=False))  # the buffers are not trained or saved
    names = [n for n, p in module.named_parameters() if p.requires_grad]  # make_optimizer's order
    set_optimizer_state_dict(module, _inner(s.optimizer), named(optimizer_state, names), options=_options())


def gather_denoiser(s) -> None:
    """Sharded: every process takes part in gathering the denoiser; the main process's model then
    holds a whole, unsharded copy (on the CPU), which ``final/`` saves. Unsharded: nothing."""
    if not sharded(s.acc):
        return
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    module = s.family.denoiser(s.model)
    whole = get_model_state_dict(module, options=_options(cpu_offload=True))
    if not s.acc.is_main_process:
        return
    plain = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # FSDP<class> -> class
    with init_empty_weights(include_buffers=False):
        copy = plain.from_config(module.config)
    copy.load_state_dict(whole, strict=True, assign=True)
    setattr(s.model, s.family.denoiser_name, copy.eval())


def announce(s) -> None:
    """Sharded: one line from the main process, how the denoiser was split."""
    if not (sharded(s.acc) and s.acc.is_main_process):
        return
    from torch.distributed.fsdp import FSDPModule

    module = s.family.denoiser(s.model)
    units = sum(isinstance(m, FSDPModule) for m in module.modules())
    held = sum(p.to_local().numel() for p in module.parameters())
    total = sum(p.numel() for p in module.parameters())
    print(f"train.shard=fsdp: the denoiser in {units} FSDP units over {s.acc.num_processes} processes; "
          f"this one holds {held} of its {total} weights")


# ---------------------------------------------------------------- the plan's per-GPU figure (pure)


def unit_bytes(denoiser: torch.nn.Module) -> list[int]:
    """Bytes of the weights of each unit FSDP gathers at once, the root first (the weights no
    inner unit holds), as ``accelerate``'s FSDP2 preparation splits the denoiser: its wrap policy
    for the plugin of ``plugin`` (the ``_no_split_modules`` blocks), and the last norm among the
    root's children as one more unit. Works on fake tensors (``dreambooth.plan``)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import _find_final_norm, fsdp2_prepare_auto_wrap_policy

    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    fsdp.set_auto_wrap_policy(denoiser)
    policy = fsdp2_prepare_auto_wrap_policy(fsdp, denoiser)
    final_norm = _find_final_norm(denoiser)
    units = [m for m in denoiser.modules() if m is denoiser or policy(m) or m is final_norm]
    owner = {}  # parameter -> the innermost unit holding it (modules() lists outer before inner)
    for i, unit in enumerate(units):
        for p in unit.parameters():
            owner[id(p)] = (i, p.numel() * p.element_size())
    sizes = [0] * len(units)
    for i, size in owner.values():
        sizes[i] += size
    return sizes


def per_gpu(parts: dict[str, int], units: list[int], n: int, compute_bytes: int = 4) -> dict[str, int]:
    """The parts of one training step's peak (``dreambooth.plan``) on each of ``n`` GPUs under
    ``train.shard=fsdp``: the denoiser's weights (``units``), their gradients and optimizer
    state 1/n each; activations and the frozen modules as on one GPU; plus what is whole at
    once ("gathered blocks"): the root unit and two blocks (the one running and the next one,
    prefetched, FSDP2's default) of weights, and one unit's gradient before it is reduce-scattered,
    at ``compute_bytes`` per value (2 under bf16/fp16, whose copies FSDP gathers). One GPU: the
    run is unsharded and ``parts`` is returned as it is."""
    if n <= 1:
        return dict(parts)
    whole = sum(units)
    out = dict(parts)
    out["weights"] = parts["weights"] - whole + -(-whole // n)
    out["gradients"] = -(-parts["gradients"] // n)
    out["optimizer state"] = -(-parts["optimizer state"] // n)
    blocks = sorted(units[1:], reverse=True)[:2]
    out["gathered blocks (FSDP)"] = (units[0] + sum(blocks) + max(units)) * compute_bytes // 4
    return out
