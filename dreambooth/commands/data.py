"""`dreambooth data`: check a folder of photos and show how they will be prepared for training."""

from __future__ import annotations

import sys
from pathlib import Path


def data(
    folder: str,
    resolution: int = 512,
    crop: str = "center",
    flip: float = 0.0,
    seed: int = 0,
    sheet: str | None = None,
) -> int:
    """Check a folder of photos and show how each will be prepared for training.

    Reads JPEG, PNG, WebP, BMP and MPO photos (EXIF orientation applied, any mode converted to
    RGB, transparency on white) and IMAGE.txt captions beside them. Prints one table row per
    photo and warnings (small photos, near-duplicates, too many photos, photos over 89
    megapixels, entries skipped: sub-folders, pipes, links that loop). Bad files (unreadable,
    corrupt, too small or too large, a link whose target is missing) are listed all at once and
    the command exits 2. The photo folder is only ever read.

    Args:
        folder: folder holding the subject's photos
        resolution: training resolution: square crops of this many pixels (default 512)
        crop: center or random (random uses --seed)
        flip: probability of a horizontal flip per crop, 0 to 1 (default 0)
        seed: seed for random crops and flips (default 0)
        sheet: write a contact sheet PNG of the crops here, outside the photo folder (default: none)
    """
    import random

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dreambooth.data import contact_sheet, read_photos, square_crop
    from dreambooth.errors import InputError

    if crop not in ("center", "random"):
        raise InputError(f"--crop must be 'center' or 'random', got '{crop}'")
    if not 0.0 <= flip <= 1.0:
        raise InputError(f"--flip is a probability between 0 and 1, got {flip}")
    if resolution < 64 or resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, at least 64; got {resolution}")
    sheet_path = _resolve(sheet, "--sheet") if sheet else None
    photo_dir = _resolve(folder, "the photo folder")
    if sheet_path and (photo_dir == sheet_path or photo_dir in sheet_path.parents):
        raise InputError(f"--sheet {sheet} is inside the photo folder {folder}, which is never "
                         "written to — put the sheet somewhere else, e.g. --sheet sheet.png")

    intake = read_photos(folder, resolution=resolution)
    rng = random.Random(seed)
    table = Table(title=escape(f"{len(intake.photos)} photos in {folder}"))
    names = [ph.path.name for ph in intake.photos]
    table.add_column("file", overflow="fold", min_width=min(max(map(len, names)), 48))
    table.add_column("size", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("caption", no_wrap=True)
    table.add_column("done", min_width=30)
    crops = []
    for ph in intake.photos:
        flipped = flip > 0 and rng.random() < flip  # drawn here so each row says what it got
        crops.append(square_crop(ph.image, resolution, crop, flip=flipped, rng=rng))
        done = ph.notes + [f"{crop}-crop {resolution}"]
        if min(ph.image.size) < resolution:
            done.append("upscaled")
        if flipped:
            done.append("flipped")
        w, h = ph.original_size
        cells = [ph.path.name, f"{w}×{h}", ph.original_mode, "yes" if ph.caption else "-", ", ".join(done)]
        table.add_row(*map(escape, cells))
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console.width = max(console.width, 120)
    console.print(table)
    for w in intake.warnings:
        print(f"warning: {w}", file=sys.stderr)
    n_cap = sum(ph.caption is not None for ph in intake.photos)
    n_mask = sum(ph.mask is not None for ph in intake.photos)
    print(f"{len(intake.photos)} photos ready at {resolution}×{resolution} ({n_cap} with captions"
          + (f", {n_mask} with masks" if n_mask else "") + ").")
    if sheet_path:
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(crops, names).save(sheet_path, format="PNG")
        print(f"contact sheet: {sheet_path}")
    return 0


def _resolve(path: str, what: str) -> Path:
    """``path`` made absolute with its links followed; InputError for a link that loops
    (Python 3.11's pathlib raises RuntimeError there, later ones OSError)."""
    from dreambooth.errors import InputError

    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        raise InputError(f"{what} {path}: a symbolic link that loops back on itself — "
                         "pass the real folder or file") from None
