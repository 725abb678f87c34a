"""Shared test setup: one torch thread (two threads on a 2-core shared box run many times slower),
offline hub, and paths to the DreamBench photos beside the checkout when present."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "dreambench"


@pytest.fixture
def dreambench() -> Path:
    if not (DREAMBENCH / "subjects.csv").is_file():
        pytest.skip(f"DreamBench photos not found at {DREAMBENCH} (they live in ../shared beside the repo)")
    return DREAMBENCH


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A class-image cache of this test's own (DREAMBOOTH_CACHE), so no test reuses another's."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def painted_photos(tmp_path) -> Path:
    """Three painted photos of one subject in tmp_path/photos."""
    from painting import paint_subject

    return paint_subject(tmp_path / "photos", count=3)[0].parent
