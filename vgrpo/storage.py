"""``train.storage``: where a run directory lives on a multi-node cluster.

- unset: ``runs/<name>`` beside the driver (the default; fine on one machine).
- a path (or ``file://`` URL) on a filesystem every node mounts (NFS, Lustre, a Kubernetes RWX volume):
  the run directory is ``<storage>/<name>``; checkpoints, the ZeRO shards every learner rank writes on
  its own node, samples and metrics all land there directly.
- an fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``abfs://…``): the run directory stays local
  (``runs/<name>``) and is mirrored to ``<url>/<name>`` with :func:`mirror_run_dir`. The URL is checked
  before anything starts: fsspec and the protocol's package (s3fs, gcsfs, adlfs) must be installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from vgrpo.proto.config import ConfigError

FIELD = "train.storage"


def is_remote(storage: str) -> bool:
    """An fsspec URL other than file:// (which is a local path)."""
    return "://" in storage and not storage.startswith("file://")


def _local(storage: str) -> Path:
    return Path(storage.removeprefix("file://")).expanduser()


def check_storage(storage: str | None, check_path: bool = True) -> None:
    """Raises ConfigError naming ``train.storage`` when the URL's protocol is not available, or (with
    ``check_path``) when the local path cannot hold a run directory. A dry run checks no path: the path
    is the cluster's, not necessarily this machine's."""
    if not storage:
        return
    if is_remote(storage):
        protocol = storage.split("://", 1)[0]
        try:
            import fsspec
        except ImportError:
            raise ConfigError(
                [
                    f"{FIELD} = {storage!r} is a URL, which needs fsspec; fix: pip install fsspec (and the "
                    "package of its protocol, e.g. s3fs for s3://, gcsfs for gs://), or give a shared path"
                ]
            ) from None
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise ConfigError(
                [
                    f"{FIELD} = {storage!r}: fsspec's {protocol!r} protocol needs a package that is not "
                    f"installed ({e}); fix: install it (s3fs for s3://, gcsfs for gs://, adlfs for abfs://)"
                ]
            ) from None
        except ValueError:
            raise ConfigError(
                [
                    f"{FIELD} = {storage!r}: {protocol!r} is not a protocol fsspec knows; fix: a shared "
                    "path such as /mnt/shared/vgrpo, or a URL like s3://bucket/prefix"
                ]
            ) from None
        return
    path = _local(storage)
    if not check_path:
        return
    if path.exists() and not path.is_dir():
        raise ConfigError([f"{FIELD} = {storage!r} is a file, not a folder; fix: give a folder"])
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            [
                f"{FIELD} = {storage!r}: cannot create the run directory there ({existing} is not writable); "
                "fix: a folder this user (and every node) can write"
            ]
        )


def default_run_dir(storage: str | None, name: str) -> Path:
    """The run directory when --run-dir is not given: ``<storage>/<name>`` for a shared path, else
    ``runs/<name>`` (a remote URL is mirrored from there by :func:`mirror_run_dir`)."""
    if storage and not is_remote(storage):
        return _local(storage) / name
    return Path("runs") / name


def remote_run_dir(storage: str | None, name: str) -> str | None:
    """``<url>/<name>`` for a remote ``train.storage``, else None."""
    if storage and is_remote(storage):
        return storage.rstrip("/") + "/" + name
    return None


def mirror_run_dir(local: Path, url: str) -> int:
    """Uploads the local run directory to ``url`` (files whose size differs or that are missing there);
    returns the number of files copied. Partial checkpoints (``.step_N.tmp``) are skipped."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    copied = 0
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local)
        if not path.is_file() or any(part.startswith(".") and part.endswith(".tmp") for part in rel.parts):
            continue
        target = f"{root.rstrip('/')}/{rel.as_posix()}"
        try:
            if fs.exists(target) and fs.size(target) == path.stat().st_size:
                continue
        except (OSError, NotImplementedError):
            pass
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)
        copied += 1
    return copied
