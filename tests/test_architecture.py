"""The import rules of docs/architecture.md, read from the code with ``ast`` (imports inside functions
count): proto/ imports nothing of the project; the shared core imports proto/ and itself; a role imports
itself, the core and proto/, never another role and never the driver package; no role or core module
reaches project code through importlib or __import__ with a literal module name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("learner", "rollout_workers", "reward_servers")


def package_dirs() -> dict[str, str]:
    """Installed package -> top-level folder, from pyproject.toml's package-dir."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: folder for name, folder in setuptools["package-dir"].items()}


def folder_of(module: str, dirs: dict[str, str]) -> str | None:
    """The top-level folder a project module lives in (None: not the project's)."""
    for name in sorted(dirs, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return dirs[name]
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from vgrpo import metrics` imports vgrpo.metrics: count the submodule too
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg = node.args[0] if node.args else None
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                out.append((node.lineno, f"importlib:{arg.value}"))
    return out


def allowed(kind: str) -> set[str]:
    shared = {f for f in package_dirs().values() if f not in (*ROLES, "proto", "vgrpo")}
    if kind == "proto":
        return {"proto"}
    if kind in shared:
        return {"proto", *shared}
    return {kind, "proto", *shared}


def scanned() -> list[tuple[str, Path]]:
    dirs = package_dirs()
    tops = sorted({f for f in dirs.values() if f != "vgrpo"})
    return [(top, p) for top in tops for p in sorted((ROOT / top).rglob("*.py"))]


def test_the_layout_has_a_shared_core_and_the_roles():
    tops = set(package_dirs().values())
    assert {"proto", "core", *ROLES, "vgrpo"} <= tops


@pytest.mark.parametrize("top", ["proto", "core", *ROLES])
def test_each_part_imports_only_what_its_rules_allow(top: str):
    dirs = package_dirs()
    may = allowed(top)
    bad = []
    for kind, path in scanned():
        if kind != top:
            continue
        for line, module in imports(path):
            if module.startswith("importlib:"):
                target = folder_of(module.removeprefix("importlib:"), dirs)
                if target is not None:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: importlib of {module[10:]}")
                continue
            target = folder_of(module, dirs)
            if target is not None and target not in may:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {top}/ imports {module} ({target}/)")
    assert not bad, "\n".join(bad)


def test_the_scan_sees_an_import_inside_a_function(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from vgrpo import driver\n    import importlib\n"
        "    return importlib.import_module('vgrpo.learner.engine')\n"
    )
    found = {m for _, m in imports(probe)}
    assert {"vgrpo.driver", "importlib:vgrpo.learner.engine"} <= found
    assert folder_of("vgrpo.driver", package_dirs()) == "vgrpo"
    assert folder_of("vgrpo.core.flow", package_dirs()) == "core"


def test_no_torchvision_notice_from_transformers_on_a_command(tmp_path: Path):
    """Loading the shipped pipeline (diffusers asks transformers for CLIP and Siglip image processors)
    prints no torchvision fallback notice; transformers' other messages are untouched."""
    import subprocess
    import sys

    code = (
        "import vgrpo.core.policy as P, transformers, logging\n"
        "P.load_pipeline('builtin:tiny-sd3')\n"
        "transformers.CLIPImageProcessor, transformers.SiglipImageProcessor\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another transformers message')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "requires torchvision" not in out.stderr + out.stdout
    assert "another transformers message" in out.stderr
