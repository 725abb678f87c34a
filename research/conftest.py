"""research/ tests run with `python -m pytest research` from the repository root; they reuse the
package tests' fixtures (tests/conftest.py)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import conftest as package_tests  # noqa: E402  (tests/conftest.py)

isolated_cache, painted_photos = package_tests.isolated_cache, package_tests.painted_photos
