"""Repository-level promises: the README's commands, CI, and no torchvision anywhere."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    first, second = readme_commands()
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert first in head and second in head, "the two commands must open the README"
    for cmd in (first, second):
        assert "\n" not in cmd.strip(), "each command is one line a user can copy"
        assert cmd.index("torch==2.13.0") < cmd.index("-e "), "torch is installed first"
    assert first.rstrip().endswith("dreambooth demo")
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines[-1] == second.strip()
    assert all("apt-get install" in line and "chromium" in line for line in ci_lines[:-1])


def test_importing_everything_never_imports_torchvision():
    code = ("import sys, pkgutil, importlib, dreambooth\n"
            "for m in pkgutil.walk_packages(dreambooth.__path__, 'dreambooth.'):\n"
            "    importlib.import_module(m.name)\n"
            "import diffusers, transformers, peft, accelerate\n"
            "from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline\n"
            "bad = [n for n in ('torchvision', 'timm', 'open_clip') if n in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_forbidden_dependency_even_indirectly():
    """Walk the installed requirement closure of dreambooth (extras that are not asked for are
    skipped, as pip would) and check that nothing pulls torchvision, timm or open_clip."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [("dreambooth", frozenset({"test"}))]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            env = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in env):
                todo.append((req.name, frozenset(req.extras)))
    assert "torch" in seen and "diffusers" in seen
    assert not seen & {"torchvision", "timm", "open-clip-torch"}
