"""The memory plan for the configurations docs/performance.md reports, from the shipped real-size
configs (no weights; each row is one training step on fake tensors, dreambooth/plan.py).

    OMP_NUM_THREADS=1 python benchmarks/plan_table.py [TEXT]   (TEXT: only the rows whose name has it)
"""

from __future__ import annotations

import time

import torch

ROWS = [  # (what, architecture, preset, --set items)
    ("SD 1.5 full, 512 px, 8-bit AdamW, checkpointing", "sd15", "sd15-full",
     ["train.optimizer=adamw8bit", "train.gradient_checkpointing=true"]),
    ("SD 1.5 full, 512 px, AdamW, checkpointing", "sd15", "sd15-full", ["train.gradient_checkpointing=true"]),
    ("SD 1.5 full, 512 px, bf16, AdamW on the CPU (train.offload_optimizer), checkpointing", "sd15", "sd15-full",
     ["train.offload_optimizer=true", "train.mixed_precision=bf16", "train.gradient_checkpointing=true"]),
    ("SD 1.5 LoRA, 512 px (preset)", "sd15", "sd15-lora", []),
    ("SDXL LoRA, 1024 px, checkpointing", "sdxl", "sdxl-lora", ["train.gradient_checkpointing=true"]),
    ("SDXL LoRA, 1024 px, checkpointing, frozen parts offloaded", "sdxl", "sdxl-lora",
     ["train.gradient_checkpointing=true", "train.offload_frozen=true"]),
    ("FLUX.1 [dev] LoRA, 512 px, bf16 base, checkpointing, T5/CLIP/VAE offloaded", "flux1-dev", "flux1-dev-lora",
     ["train.offload_frozen=true"]),
    ("FLUX.1 [dev] LoRA, 1024 px, bf16 base, checkpointing, T5/CLIP/VAE offloaded", "flux1-dev", "flux1-dev-lora",
     ["train.offload_frozen=true", "data.resolution=1024"]),
    ("FLUX.1 [dev] LoRA, 512 px, int8 base, checkpointing, T5/CLIP/VAE offloaded", "flux1-dev", "flux1-dev-lora",
     ["train.offload_frozen=true", "train.quantize_base=int8"]),
    ("FLUX.1 [dev] LoRA, 512 px, NF4 base, checkpointing, T5/CLIP/VAE offloaded", "flux1-dev", "flux1-dev-lora",
     ["train.offload_frozen=true", "train.quantize_base=nf4"]),
    ("FLUX.1 [dev] LoRA, 1024 px, NF4 base, checkpointing, T5/CLIP/VAE offloaded", "flux1-dev", "flux1-dev-lora",
     ["train.offload_frozen=true", "train.quantize_base=nf4", "data.resolution=1024"]),
    ("SD 3.5 medium LoRA, 1024 px (preset), frozen parts offloaded", "sd35-medium", "sd35-lora",
     ["train.offload_frozen=true"]),
]


def main(only: str = "") -> None:
    """Every row, or those whose description contains ``only``."""
    from dreambooth.config import build_config
    from dreambooth.plan import CUDA_OVERHEAD, GiB, predict

    torch.set_num_threads(1)
    print("| run | predicted peak (GiB, tensors) | + CUDA context | of which weights | activations | planned in |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, arch, preset, items in [r for r in ROWS if only in r[0]]:
        cfg = build_config(preset, overrides=items, extra={"model.path": arch, "data.class_noun": "dog"})
        started = time.perf_counter()
        e = predict(cfg)
        host = f" (host memory: {sum(e.host.values()) / GiB:.2f} GiB)" if e.host else ""
        print(f"| {what}{host} | {e.gib():.2f} | {(e.peak + CUDA_OVERHEAD) / GiB:.2f} | {e.parts['weights'] / GiB:.2f} | "
              f"{e.parts['activations and temporaries'] / GiB:.2f} | {time.perf_counter() - started:.0f} s |", flush=True)


if __name__ == "__main__":
    import sys

    main(" ".join(sys.argv[1:]))
