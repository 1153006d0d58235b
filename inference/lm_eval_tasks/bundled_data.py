"""Dataset loader for the bundled zero-shot tasks: lm-eval calls it through ``custom_dataset``.

The validation splits live in ``data/zeroshot/<name>.tar.gz`` (a ``datasets.save_to_disk`` folder,
compressed; source and licences in ``data/zeroshot/README.md``). On first use an archive is
extracted to ``<cache>/zeroshot/<sha256 prefix>/<name>`` and opened with ``datasets.load_from_disk``:
memory-mapped, and with a cache folder of its own, so lm-eval's repeated ``process_docs`` maps
(HellaSwag's runs over 10k rows several times per evaluation) are computed once and reused.
``<cache>`` is ``$SINKLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/sinklm``, else ``~/.cache/sinklm``.

lm-eval calls the loader with the task's ``dataset_kwargs`` (``archive``) plus the task metadata,
which may carry ``data_dir`` (``TaskManager(metadata={"data_dir": ...})`` / ``lm_eval --metadata``)
to read the archives from another folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import datasets

import data as _data_package

BUNDLED_DIR = Path(_data_package.__file__).resolve().parent / "zeroshot"
SPLIT = "validation"


def archive_path(archive: str, data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or BUNDLED_DIR).expanduser() / f"{archive}.tar.gz"


def cache_root() -> Path:
    if os.environ.get("SINKLM_CACHE_DIR"):
        return Path(os.environ["SINKLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sinklm"


def extracted(path: Path) -> Path:
    """The archive's contents in the cache (extracted once; keyed by content, so an edited archive
    or another ``data_dir`` never reuses stale files). Safe against concurrent first uses."""
    if not path.is_file():
        raise FileNotFoundError(f"bundled zero-shot data {path} is missing (see data/zeroshot/README.md)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_root() / "zeroshot" / digest / path.name.removesuffix(".tar.gz")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with tarfile.open(path, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links and absolute paths
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_split(path: Path, split: str = SPLIT) -> datasets.Dataset:
    """One split of a ``save_to_disk`` folder stored as ``<split>/...`` inside a .tar.gz."""
    folder = extracted(path) / split
    if not (folder / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path}: no '{split}' split (expected {split}/dataset_info.json and data-*.arrow)")
    return datasets.load_from_disk(str(folder))


def load_bundled(archive: str, data_dir: str | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` entry point: the bundled validation split of ``archive`` (e.g. ``arc_easy``)."""
    return datasets.DatasetDict({SPLIT: read_split(archive_path(archive, data_dir))})
