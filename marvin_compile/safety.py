"""Guards for loading compiled code: a shared library runs with the user's rights when loaded."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from marvin_compile.frontend import ModelError

MANIFEST = "manifest.json"


def check_not_shared(path: Path) -> None:
    """Refuse a file or directory that other users can write to or that another user owns."""
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
        stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    ):
        raise PermissionError(f"refusing to load from {path}: it is writable by group or others (chmod go-w)")
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        raise PermissionError(f"refusing to load from {path}: owned by uid {st.st_uid}, not by you")


def read_manifest(model_dir: str | os.PathLike, kind: str, command: str) -> tuple[Path, dict]:
    """The manifest of a model directory of the given kind ("compiled" or "deployed")."""
    d = Path(model_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise ModelError(
            f"{d} is not a {kind} model directory (no {MANIFEST}); run `marvin-compile {command}`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise ModelError(f"{d} holds a {manifest.get('kind', 'unknown')} model, expected a {kind} one")
    return d, manifest
