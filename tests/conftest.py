"""Shared test fixtures. `ray_cluster` is the one local Ray of the whole test session: starting Ray costs
seconds and the CI machine has 2 cores, so every test that needs Ray shares it (and stops only it)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# DeepSpeed compiles its C++ op once per machine into this cache rather than once per test or worker
# (docs/stack-notes.md); set before any Ray worker starts, so that workers inherit it
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vgrpo-torch-extensions"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A local Ray (2 CPUs, no dashboard) with its own temp dir for the whole session; yields the
    `ray.init` address info. It never joins RAY_ADDRESS (`address="local"`), so a test cannot touch
    someone else's cluster; the short /tmp path keeps Ray's unix socket paths under the OS limit."""
    import ray

    if ray.is_initialized():  # a test started its own and left it: not ours to reuse
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="vgrpo-ray-", dir="/tmp")
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
    )
    try:
        yield dict(ctx.address_info)  # type: ignore[attr-defined]  # a RayContext, typed as its base
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# the toy world and its pretrained policy, shared by the objective tests (test_objectives.py,
# test_window_objectives.py)
@pytest.fixture(scope="module")
def world():
    from vgrpo.toy.world import ToyWorld

    return ToyWorld()


@pytest.fixture
def policy(world):
    import torch

    from vgrpo.toy.world import ToyPolicy, pretrained_model

    torch.manual_seed(0)
    return ToyPolicy(pretrained_model(world, steps=300))


def _png_header(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that declare width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def png_header():
    """``png_header(w, h)``: PNG bytes whose header declares w x h pixels."""
    return _png_header


@pytest.fixture(scope="module")
def load_benchmark() -> Iterator[Callable[[str], ModuleType]]:
    """Loads ``benchmarks/<name>.py`` as a module (benchmarks/ is scripts, not a package; it stays on
    sys.path for the module's tests, so that a benchmark's sibling imports resolve)."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, Path(bench) / f"{name}.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    yield load
    sys.path.remove(bench)
