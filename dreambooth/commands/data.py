"""`dreambooth data`: check a folder of photos and show how they will be prepared for training."""

from __future__ import annotations

import sys
from pathlib import Path


def data(
    folder: str,
    resolution: int = 512,
    flip: bool = False,
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
        resolution: training resolution: square center crops of this many pixels (default 512)
        flip: also show each photo's mirror image, as training adds them with data.flip > 0
        sheet: write a contact sheet PNG of the crops here, outside the photo folder (default: none)
    """
    from rich.console import Console

    from dreambooth.data import contact_sheet, read_photos
    from dreambooth.errors import InputError

    if resolution < 64 or resolution % 8:
        raise InputError(f"--resolution must be a multiple of 8, at least 64; got {resolution}")
    sheet_path = _resolve(sheet, "--sheet") if sheet else None
    photo_dir = _resolve(folder, "the photo folder")
    if sheet_path and (photo_dir == sheet_path or photo_dir in sheet_path.parents):
        raise InputError(f"--sheet {sheet} is inside the photo folder {folder}, which is never "
                         "written to — put the sheet somewhere else, e.g. --sheet sheet.png")

    intake = read_photos(folder, resolution=resolution)
    table, crops, names = _table(intake, folder, resolution, flip)
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


def _table(intake, folder: str, resolution: int, flip: bool):
    """(one rich table row per photo saying what was done to it, the crops, their names)."""
    from rich.markup import escape
    from rich.table import Table

    from dreambooth.data import square_crop

    table = Table(title=escape(f"{len(intake.photos)} photos in {folder}"))
    names = [ph.path.name for ph in intake.photos]
    table.add_column("file", overflow="fold", min_width=min(max(map(len, names)), 48))
    for column in ("size", "mode", "caption"):
        table.add_column(column, no_wrap=True)
    table.add_column("done", min_width=30)
    crops, crop_names = [], []
    for ph in intake.photos:
        for mirrored in ((False, True) if flip else (False,)):
            crops.append(square_crop(ph.image, resolution, flip=mirrored))
            crop_names.append(ph.path.name + (" (mirrored)" if mirrored else ""))
        done = ph.notes + [f"center-crop {resolution}"] + (["+ mirror image"] if flip else [])
        if min(ph.image.size) < resolution:
            done.append("upscaled")
        w, h = ph.original_size
        cells = [ph.path.name, f"{w}×{h}", ph.original_mode, "yes" if ph.caption else "-", ", ".join(done)]
        table.add_row(*map(escape, cells))
    return table, crops, crop_names


def _resolve(path: str, what: str) -> Path:
    """``path`` made absolute with its links followed; InputError for a link that loops
    (Python 3.11's pathlib raises RuntimeError there, later ones OSError)."""
    from dreambooth.errors import InputError

    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        raise InputError(f"{what} {path}: a symbolic link that loops back on itself — "
                         "pass the real folder or file") from None
