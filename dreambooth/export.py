"""Export a run's model in the format another tool loads, then prove the export draws the same.

    export_run(run_dir, "single-file", dtype="fp16")  ->  RUN_DIR/export/final-single-file-fp16.safetensors

Formats (``FORMATS``): a diffusers folder, one original-layout ``.safetensors`` (A1111, ComfyUI),
LoRA weights in diffusers or kohya naming, or a LoRA fused into full weights. Every export is
verified before it is reported done: it is read back the way its consumer reads it (a
diffusers folder with ``from_pretrained``, a single file with diffusers' single-file loader, a
LoRA file with ``load_lora_weights`` on the base model), it draws one fixed-seed image, and that
image must match the run model's own within a tolerance in pixel levels (0-255). The result
and the numbers go to ``export.json`` beside the output.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dreambooth.base_model import FLOW_KINDS
from dreambooth.errors import DreamboothError
from dreambooth.files import DiskFullError, atomic_dir, atomic_file, published_stem, write_text_atomic
from dreambooth.prompts import fill_prompt

FORMATS = {
    "diffusers": "a diffusers pipeline folder (from_pretrained); for a LoRA run, the base model "
                 "with the LoRA fused in at --scale",
    "single-file": "one .safetensors in the original Stable Diffusion layout, for A1111, ComfyUI, "
                   "Forge or from_single_file (a LoRA run is fused in at --scale)",
    "lora-diffusers": "LoRA weights for pipe.load_lora_weights (pytorch_lora_weights.safetensors); "
                      "LoRA runs only",
    "lora-kohya": "LoRA weights in kohya/A1111 naming, one .safetensors for models/Lora; LoRA runs only",
    "merged": "a LoRA run's adapters fused into the base weights at --scale, as a diffusers folder",
}
LORA_ONLY = ("lora-diffusers", "lora-kohya", "merged")
FILE_FORMATS = ("single-file", "lora-kohya")
# Default tolerances, max pixel difference (0-255). fp32 LoRA files reload to the same math
# (0); fusing a LoRA or rounding weights to 16 bits changes the sums slightly, and a few
# denoising steps carry that into the image.
TOLERANCE = {"fp32": 2.0, "fp16": 8.0, "bf16": 32.0}
VERIFY_STEPS = 4
KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux1": "flux1", "sd3": "sd3"}


class ExportError(DreamboothError):
    pass


@dataclass
class ExportResult:
    path: Path
    info: dict[str, Any]  # what export.json holds


# ---------------------------------------------------------------- checks (pure)


def torch_dtype(name: str):
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ExportError(f"unknown --dtype '{name}'; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def check_request(fmt: str, mode: str, scale: float, run_dir: Path) -> None:
    """Refuse a format the run cannot give, before any weights are read."""
    if fmt not in FORMATS:
        listing = "\n".join(f"  {name}: {text}" for name, text in FORMATS.items())
        raise ExportError(f"unknown --format '{fmt}'. Formats:\n{listing}")
    if mode == "lora":
        return
    if fmt in LORA_ONLY:
        raise ExportError(f"{run_dir} is a full fine-tune: it has no LoRA adapters to export as "
                          f"'{fmt}'. Use --format diffusers or --format single-file")
    if scale != 1.0:
        raise ExportError(f"--scale sets a LoRA's strength; {run_dir} is a full fine-tune "
                          "(leave --scale at 1)")


def default_output(run_dir: Path, checkpoint: str, fmt: str, dtype: str) -> Path:
    name = run_dir / "export" / f"{checkpoint}-{fmt}-{dtype}"
    return name.with_name(name.name + ".safetensors") if fmt in FILE_FORMATS else name


def check_output(out: Path, fmt: str, photos: str = "") -> None:
    from dreambooth.rundir import refuse_inside_photos

    if fmt in FILE_FORMATS and out.suffix != ".safetensors":
        raise ExportError(f"--format {fmt} writes one file: give --out a path ending in .safetensors "
                          f"(got {out})")
    if out.exists() or out.is_symlink():
        raise ExportError(f"{out} already exists; remove it or choose another --out")
    refuse_inside_photos(out, photos, "the export path")


def info_path(out: Path) -> Path:
    """export.json inside a folder output, NAME.export.json beside a file output."""
    return out.with_suffix(".export.json") if out.suffix == ".safetensors" else out / "export.json"


# ---------------------------------------------------------------- writers: model -> files


def _modules(model) -> list:
    """The model's torch modules (not its tokenizers and scheduler)."""
    import torch

    return [m for m in model.components().values() if isinstance(m, torch.nn.Module)]


def write_diffusers(model, out: Path, dtype) -> None:
    from dreambooth.lora import has_lora, merge_lora

    if has_lora(model):
        merge_lora(model)  # at the strength scale_lora already set
    for module in _modules(model):
        if next(module.parameters()).dtype != dtype:
            module.to(dtype)
    model.save(out)


def write_single_file(model, out: Path, dtype) -> None:
    from dreambooth.lora import has_lora, merge_lora
    from dreambooth.single_file import save_single_file

    if has_lora(model):
        merge_lora(model)
    if model.kind in FLOW_KINDS:  # the transformer alone, in BFL's / SAI's layout
        from dreambooth.transformer_files import save_transformer_file

        save_transformer_file(model.transformer, out, dtype)
    else:
        save_single_file(model, out, dtype)


def write_lora_diffusers(model, out: Path, dtype) -> None:
    from dreambooth.lora import collect_lora, diffusers_lora_layers

    parts = diffusers_lora_layers(collect_lora(model), dtype)
    type(model.pipeline()).save_lora_weights(
        out, **{f"{c}_lora_layers": sd for c, sd in parts.items()}, safe_serialization=True)


def write_lora_kohya(model, out: Path, dtype) -> None:
    from safetensors.torch import save_file

    from dreambooth.kohya import to_kohya
    from dreambooth.lora import collect_lora

    layers = collect_lora(model)
    first = next(iter(layers.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_kohya(layers, model.kind, dtype), str(out), metadata={  # what A1111 shows of a LoRA
        "ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
        "ss_network_alpha": f"{first.alpha:g}", "ss_base_model_version": KOHYA_BASE_VERSION[model.kind],
        "ss_output_name": published_stem(out)})


WRITERS: dict[str, Callable] = {
    "diffusers": write_diffusers, "merged": write_diffusers, "single-file": write_single_file,
    "lora-diffusers": write_lora_diffusers, "lora-kohya": write_lora_kohya,
}


# ---------------------------------------------------------------- readers: files -> model


def reload(fmt: str, out: Path, cfg, config_dir: Path | None, trust_pickle: bool = False):
    """The exported model, read back as its consumer would (float32)."""
    from dreambooth.models import load_base_model, load_configured

    if fmt in ("diffusers", "merged"):
        return load_base_model(str(out))
    if fmt == "single-file" and config_dir is not None:  # the UNet kinds: a whole model
        from dreambooth.single_file import load_single_file

        return load_single_file(out, config=config_dir)
    base = load_configured(cfg, trust_pickle=trust_pickle)
    if fmt == "single-file":  # a transformer file: into the run's base model
        from dreambooth.transformer_files import load_transformer_file

        base.transformer = load_transformer_file(out)
        return base
    if fmt == "lora-kohya" and base.kind in FLOW_KINDS:
        return _load_kohya_transformer_lora(base, out)
    base.pipeline().load_lora_weights(str(out))
    return base


def _load_kohya_transformer_lora(base, out: Path):
    """A FLUX.1 / SD 3.x kohya file read back by our own inverse (``kohya.from_kohya``: diffusers
    converts FLUX.1's only at the released widths, SD 3.x's not at all), then loaded as a diffusers
    LoRA; ComfyUI's reading of these names is checked separately (docs/export.md)."""
    import torch
    from safetensors.torch import load_file

    from dreambooth.kohya import TEXT_PREFIXES, from_kohya
    from dreambooth.lora import diffusers_lora_layers

    text = [f"{part}.{path}" for part in TEXT_PREFIXES[base.kind] if getattr(base, part, None) is not None
            for path, m in getattr(base, part).named_modules() if isinstance(m, torch.nn.Linear)]
    layers = from_kohya(load_file(str(out)), text, base.kind)
    with tempfile.TemporaryDirectory(prefix="dreambooth-kohya-") as tmp:
        type(base.pipeline()).save_lora_weights(
            tmp, **{f"{c}_lora_layers": sd for c, sd in diffusers_lora_layers(layers).items()},
            safe_serialization=True)
        base.pipeline().load_lora_weights(tmp)
    return base


# ---------------------------------------------------------------- verification


def render(model, settings: dict[str, Any]):
    """The verification image of ``model`` as a uint8 array (H, W, 3)."""
    import numpy as np
    import torch

    from dreambooth.sample import generate

    for module in _modules(model):
        module.to("cuda" if torch.cuda.is_available() else "cpu")
    image = generate(model, [settings["prompt"]], [settings["seed"]], steps=settings["steps"],
                     guidance=settings["guidance"], scheduler=settings["scheduler"],
                     resolution=settings["resolution"])[0]
    return np.asarray(image)


def max_pixel_diff(a, b) -> int:
    """Largest per-channel difference between two uint8 images, in levels (0-255)."""
    import numpy as np

    if a.shape != b.shape:
        raise ExportError(f"the exported model drew a {b.shape} image, the run model {a.shape}")
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def verify_settings(cfg, prompt: str) -> dict[str, Any]:
    """What the verification image is drawn with: the run's sample settings, few steps."""
    d = cfg.data
    prompt = fill_prompt(prompt or (cfg.sample.prompts or ["a photo of {token} {class}"])[0], d.token, d.class_noun)
    return {"prompt": prompt, "seed": cfg.sample.seed,
            "steps": VERIFY_STEPS, "guidance": cfg.sample.guidance, "scheduler": cfg.sample.scheduler,
            "resolution": d.resolution}


# ---------------------------------------------------------------- the whole export


def write_and_reload(model, fmt: str, out: Path, dtype, cfg, settings: dict, log: Callable[[str], None],
                     trust_pickle: bool = False):
    """Write ``model`` as ``fmt`` under a temporary name beside ``out``, draw the verification
    image from the files as their consumer reads them, then rename them to ``out``. Returns the
    image. A full disk is an ExportError that says nothing was left behind."""
    from dreambooth.single_file import write_configs

    drawn = []

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="dreambooth-export-") as scratch:
            # a single file is read back with this model's own configs (it may be any size)
            config_dir = (write_configs(model, Path(scratch) / "configs")
                          if fmt == "single-file" and model.kind not in FLOW_KINDS else None)
            WRITERS[fmt](model, tmp, dtype)
            log(f"wrote {out}; verifying ...")
            drawn.append(render(reload(fmt, tmp, cfg, config_dir, trust_pickle), settings))

    try:
        (atomic_file if fmt in FILE_FORMATS else atomic_dir)(out, write)
    except DiskFullError as e:
        raise ExportError(f"{e}: free space and export again") from None
    return drawn[0]



def export_run(run_dir: str | Path, fmt: str = "diffusers", out: str | Path = "", dtype: str = "fp32",
               checkpoint: str = "final", scale: float = 1.0, prompt: str = "",
               tolerance: float | None = None, log: Callable[[str], None] = print,
               trust_pickle: bool = False) -> ExportResult:
    """Write ``checkpoint`` of the run in ``run_dir`` as ``fmt`` and verify it (see module doc).
    The output is written and verified under a temporary name and renamed into place, so a kill
    or a full disk leaves no partial export under ``out``."""
    from dreambooth.lora import scale_lora
    from dreambooth.rundir import Run

    run = Run(run_dir)
    run_dir, mode = run.path, run.config.train.mode
    check_request(fmt, mode, scale, run_dir)
    dt = torch_dtype(dtype)
    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    if tol < 0:
        raise ExportError(f"--tolerance is a pixel difference, 0 or more; got {tol:g}")
    if out:  # refuse a bad --out before minutes of loading
        check_output(Path(out), fmt, run.config.data.images)

    model, cfg, name = run.load(checkpoint, trust_pickle)
    if fmt == "single-file" and model.kind in FLOW_KINDS and (cfg.train.train_text_encoder or cfg.train.train_token):
        raise ExportError(f"a {model.kind} single file holds the transformer alone, and {run_dir} also trained "
                          "its text encoders: export it with --format diffusers (or a LoRA format)")
    out = Path(out) if out else default_output(run_dir, name, fmt, dtype)
    check_output(out, fmt, cfg.data.images)
    if mode == "lora":
        scale_lora(model, scale)
    settings = verify_settings(cfg, prompt)
    started = time.perf_counter()
    reference = render(model, settings)
    exported = write_and_reload(model, fmt, out, dt, cfg, settings, log, trust_pickle)
    diff = max_pixel_diff(reference, exported)
    info = {"format": fmt, "dtype": dtype, "checkpoint": name, "source_run": str(run_dir.resolve()),
            "base_model": cfg.model.path, "mode": mode, "scale": scale, "output": str(out.resolve()),
            "verified": diff <= tol, "max_pixel_diff": diff, "tolerance": tol,
            "verify": settings, "seconds": round(time.perf_counter() - started, 2)}
    write_text_atomic(info_path(out), json.dumps(info, indent=1))
    if diff > tol:
        raise ExportError(
            f"verification failed: the export at {out} draws an image up to {diff} levels (0-255) "
            f"away from the run model's, over the tolerance {tol:g}. A {dtype} export of this "
            "model may need a looser --tolerance (try fp32 to see the exact difference); the "
            f"details are in {info_path(out)}")
    return ExportResult(path=out, info=info)
