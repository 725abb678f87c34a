"""`dreambooth bench`: the DreamBench protocol over a dataset folder (``dreambooth.bench``)."""

from __future__ import annotations

from pathlib import Path


def bench(dataset: str, model: str = "tiny", preset: str = "", subjects: int | None = None,
          prompts: int | None = None, images: int = 4, out: str = "dreambooth-bench", dino: str = "",
          clip: str = "", overrides: list[str] | None = None, progress: bool = True) -> int:
    """Run the DreamBench protocol: train each subject, 25 prompts x 4 images, the paper's metrics.

    Prints and writes (OUT/table.md, OUT/results.json) a table like the paper's Table 1: DINO,
    CLIP-I, CLIP-T, PRES, DIV per subject and their mean. Resumable: run the same command again.

    Example: dreambooth bench ../shared/dreambench --model ~/models/sd15 --preset sd15-lora --dino DIR --clip DIR

    Args:
        dataset: folder with subjects.csv, prompts.json and one photo folder per subject
        model: base model (a local diffusers folder, or tiny)
        preset: training preset (default: tiny for --model tiny, else sd15-lora)
        subjects: only the first N subjects of subjects.csv (default: all)
        prompts: only the first N prompts of each kind (default: all 25)
        images: images per prompt (the protocol uses 4)
        out: bench folder (one run per subject, scores, tables)
        dino: local folder of facebook/dino-vits16 (tiny: random, allowed with --model tiny)
        clip: local folder of openai/clip-vit-base-patch32 (tiny: random)
        overrides: training settings, key=value (repeatable)
        progress: show progress bars
    """
    from dreambooth.bench import markdown_table, run_bench
    from dreambooth.errors import InputError

    for flag, value in (("--subjects", subjects), ("--prompts", prompts), ("--images", images)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if model == "tiny" and not (dino or clip):
        dino = clip = "tiny"
        print("note: --model tiny scores with random tiny DINO/CLIP encoders: a check of the "
              "pipeline, not a measurement")
    out_dir = Path(out)
    results = run_bench(Path(dataset), out_dir, model=model, dino=dino, clip=clip,
                        preset=preset or ("tiny" if model == "tiny" else "sd15-lora"),
                        subjects=subjects, prompts=prompts, images=images, overrides=overrides,
                        progress=progress)
    print(markdown_table({**results["subjects"], "**mean**": results["mean"]}))
    print(f"\ntable: {out_dir / 'table.md'}   results: {out_dir / 'results.json'}")
    return 0
