"""A test fixture: painted "photos" of one synthetic subject (moved from dreambooth/commands/demo.py,
unchanged, so tests/test_pinned_losses.py's photos keep their pixels)."""

import random
from pathlib import Path


def paint_subject(folder: Path, count: int = 5, size: int = 64, seed: int = 0) -> list[Path]:
    """Paint ``count`` 'photos' of one synthetic subject (a red block with a yellow dot) in
    varied positions, sizes and backgrounds."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):  # each photo gets its own background hue, so no two look alike
        bg = tuple(int(60 + 170 * ((i / count + c / 3) % 1)) for c in range(3))
        img = Image.new("RGB", (size * 2, size * 2), bg)
        draw = ImageDraw.Draw(img)
        s = rng.randrange(size // 2, size)
        x, y = rng.randrange(8, size * 2 - s - 8), rng.randrange(8, size * 2 - s - 8)
        draw.rounded_rectangle([x, y, x + s, y + s], radius=s // 5, fill=(200, 30, 40))
        draw.ellipse([x + s // 3, y + s // 3, x + 2 * s // 3, y + 2 * s // 3], fill=(250, 220, 40))
        paths.append(folder / f"photo-{i}.png")
        img.save(paths[-1])
    return paths
