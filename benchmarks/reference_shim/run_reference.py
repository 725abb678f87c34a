"""Run diffusers' train_dreambooth.py with the torchvision stand-in in stubs/:

    python benchmarks/reference_shim/run_reference.py PATH/train_dreambooth.py [its arguments]

diffusers is imported and transformers asked first, so they record torchvision as absent (as it is)
and take their PIL paths; only then is the stand-in put on the path, where the script's own
``from torchvision import transforms`` finds it. The script then runs as ``__main__``, unchanged.
"""

import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401  (records torchvision as absent at import)
from transformers.utils import import_utils

import_utils.is_torchvision_available()  # cached: False, before the stand-in is on the path
import_utils.is_torchvision_v2_available()

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(__file__).parent / "stubs"))
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
