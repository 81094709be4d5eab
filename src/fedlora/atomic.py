"""Atomic writes: a file or a folder appears whole or not at all; a kill at any moment loses nothing.

Every record fedlora writes (configs, metrics, summaries, checkpoints, adapters, backbone deltas, plots,
the Flower nodes' mirrors) goes through this module, one recipe for all:

    write under a temporary name beside the target (``.<name>.tmp-*``, same file system)
    -> flush and fsync the data -> ``os.replace`` onto the target -> fsync the parent folder

so after a crash the target holds either its previous content or the new one. A folder that
already exists is swapped through ``.<name>.old`` (the previous version stays readable until the
new one is in place; :func:`recover_folder` moves it back if a kill fell between the two renames).
Temporary names a killed writer left behind are found by :func:`stale_temporaries` and removed by
the next write of the same target. Lowest layer: imports nothing from fedlora.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

TMP_TAG = ".tmp-"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}"


def stale_temporaries(target: str | Path) -> list[Path]:
    """Temporary files or folders that killed writes of ``target`` left beside it: ``.<name>.tmp-*``,
    and the untagged ``.<name>.<8 random characters>`` folders of checkpoints saved before this
    module (never ``.<name>.old``, the previous version a swap keeps until it is done)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = _temp_prefix(target)
    legacy = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}")
    return sorted(
        p
        for p in target.parent.iterdir()
        if p.name.startswith(prefix) or (legacy.fullmatch(p.name) is not None and p.is_dir() and not p.is_symlink())
    )


def remove_stale(target: str | Path) -> None:
    """Delete :func:`stale_temporaries` of ``target`` (best effort: read-only folders stay as they are)."""
    for p in stale_temporaries(target):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _refuse_symlink(target: Path) -> None:
    if target.is_symlink():
        raise OSError(f"{target}: is a symbolic link; refusing to replace it (write to the real path)")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path to write ``target``'s new content to (by any library); on leaving the
    block without an error it is fsynced and renamed onto ``target``, else removed."""
    target = Path(target)
    _refuse_symlink(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Replace ``target``'s content with ``data``, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    """Replace ``target``'s content with ``text`` (UTF-8), atomically."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (a trailing newline), atomically."""
    return write_text(target, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_tensors(target: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (made contiguous), atomically."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}) or None)
    return Path(target)


def save_figure(target: str | Path, fig: Any, **kwargs: Any) -> Path:
    """A matplotlib figure saved as ``target`` (a PNG unless ``format`` says otherwise), atomically:
    the temporary name has no image suffix, so the format is passed explicitly."""
    kwargs.setdefault("format", Path(target).suffix.lstrip(".") or "png")
    with atomic_path(target) as tmp:
        fig.savefig(str(tmp), **kwargs)
    return Path(target)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to an append-only log (JSONL) and fsync it: a kill loses at most the line
    being written, never an earlier one. A partial last line is the reader's to drop."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def replace_folder(tmp: str | Path, target: str | Path) -> None:
    """Move the finished folder ``tmp`` onto ``target`` (an existing ``target`` is swapped out
    through ``.<name>.old`` and removed once the new one is in place)."""
    tmp, target = Path(tmp), Path(target)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    old = _old_name(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
        fsync_dir(target.parent)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to fill; on leaving the block without an error
    it replaces ``target`` (see :func:`replace_folder`), else it is removed."""
    target = Path(target)
    _refuse_symlink(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make every run folder private
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(target: str | Path, *, complete: str) -> Path:
    """The folder to read for ``target``: ``target`` itself when it holds the file ``complete``;
    else the previous version a kill left in ``.<name>.old`` (moved back into place when it can
    be). A finished ``target`` makes a leftover ``.old`` stale: it is removed."""
    target = Path(target)
    old = _old_name(target)
    if (target / complete).is_file():
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        return target
    if (old / complete).is_file():
        if not target.exists():
            try:
                os.replace(old, target)
                fsync_dir(target.parent)
                return target
            except OSError:  # a read-only folder: read the previous version where it is
                return old
        return old
    return target


__all__ = [
    "append_line",
    "atomic_folder",
    "atomic_path",
    "fsync_dir",
    "recover_folder",
    "remove_stale",
    "replace_folder",
    "save_figure",
    "stale_temporaries",
    "write_bytes",
    "write_json",
    "write_tensors",
    "write_text",
]
