"""Is a checkpoint file whole? Cheap structural checks, done before any loader touches the file, so a
truncated or corrupt ``model.safetensors`` or DeepSpeed ``*.pt`` is one line naming the file instead
of a deep library traceback (or, for a DeepSpeed run, an error after a minute of engine start-up).

- ``.safetensors``: the 8-byte header length, the JSON header, and the file size the header's
  largest ``data_offsets`` implies;
- ``.pt`` (torch's zip format, which DeepSpeed writes): the zip central directory at the end of the
  file, which truncation removes.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{path}: truncated or corrupt safetensors file (header of {length} bytes, file of {size})"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return f"{path}: truncated or corrupt safetensors file (unreadable header)"
    if not isinstance(header, dict):
        return f"{path}: truncated or corrupt safetensors file (header is not a mapping)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{path}: truncated or corrupt safetensors file (its header needs {expected} bytes, the file has {size})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole torch-saved (zip) file, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path}: truncated or corrupt checkpoint file ({path.stat().st_size} bytes; {err})"
    return None


def file_problem(path: Path) -> str | None:
    """The problem with one weights or engine file (by suffix), or None."""
    if path.name.endswith(".safetensors"):
        return safetensors_problem(path)
    if path.suffix == ".pt":
        return torch_file_problem(path)
    return None


def folder_problem(folder: Path) -> str | None:
    """The first damaged ``*.pt`` / ``*.safetensors`` file directly in ``folder``, or None."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            problem = file_problem(path)
            if problem:
                return problem
    return None
