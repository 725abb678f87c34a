"""Repository-level promises: the README's commands, CI, no torchvision anywhere, no research code
and no import cycle in the package."""

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

    seen, todo = set(), [("dreambooth", frozenset({"test", "ui"}))]
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


def package_imports() -> dict[str, set[str]]:
    """Every module under dreambooth/ -> the modules it imports (at module level and inside
    functions alike), read with ast."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "dreambooth").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = found
    return graph


def test_no_module_of_the_package_imports_research():
    """research/ may import dreambooth, never the reverse (research/README.md)."""
    bad = {m: sorted(i for i in imported if i == "research" or i.startswith("research."))
           for m, imported in package_imports().items()}
    assert not {m: i for m, i in bad.items() if i}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & graph.keys()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c", "os"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(package_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
