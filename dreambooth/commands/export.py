"""`dreambooth export`: a run's model as a diffusers folder, an A1111/ComfyUI file or a LoRA file."""

from __future__ import annotations


def export(run_dir: str, format: str = "diffusers", out: str = "", dtype: str = "fp32",
           checkpoint: str = "final", scale: float = 1.0, prompt: str = "",
           tolerance: float | None = None, trust_pickle: bool = False) -> int:
    """Write a run's model in another tool's format, then check that it draws the same image.

    Formats:
      diffusers       diffusers pipeline folder; for a LoRA run, the base model with the LoRA
                      fused in at --scale (the same as merged)
      single-file     one .safetensors in the original Stable Diffusion layout, for A1111,
                      ComfyUI, Forge and from_single_file (a LoRA run is fused in at --scale)
      lora-diffusers  pytorch_lora_weights.safetensors for pipe.load_lora_weights (LoRA runs)
      lora-kohya      one .safetensors in kohya/A1111 naming, for models/Lora (LoRA runs)
      merged          a LoRA run fused into full weights at --scale, as a diffusers folder

    The export is read back the way its consumer reads it and draws one fixed-seed image at
    the run's resolution; it fails unless that image is within --tolerance pixel levels of the
    run model's. The numbers go to export.json beside the output.

    Example: dreambooth export runs/dog --format single-file --dtype fp16 --out dog.safetensors

    Args:
        run_dir: the run directory (from `dreambooth train --out`)
        format: diffusers, single-file, lora-diffusers, lora-kohya or merged
        out: output folder, or .safetensors file for single-file and lora-kohya (default: RUN_DIR/export/CHECKPOINT-FORMAT-DTYPE)
        dtype: weight precision written: fp32, fp16 or bf16
        checkpoint: final, best, or step-N
        scale: LoRA strength baked into the export (LoRA runs; 1.0 = as trained)
        prompt: verification prompt ({token} and {class} allowed; default: the run's first sample prompt)
        tolerance: largest pixel difference (0-255) accepted (default: 2 for fp32, 8 for fp16, 32 for bf16)
        trust_pickle: allow pickle weights (.ckpt/.pt/.bin) in the run's base model for this command only (unpickling runs code; never read from a config file)
    """
    from dreambooth.export import export_run

    result = export_run(run_dir, format, out, dtype=dtype, checkpoint=checkpoint, scale=scale,
                        prompt=prompt, tolerance=tolerance, trust_pickle=trust_pickle)
    info = result.info
    v = info["verify"]
    print(f"verified: max pixel difference {info['max_pixel_diff']} (tolerance {info['tolerance']:g}) "
          f"on '{v['prompt']}', seed {v['seed']}, {v['steps']} steps, {v['resolution']} px")
    print(f"done: {info['checkpoint']} of {run_dir} as {format} ({dtype}) in {result.path}")
    return 0
