"""``sinklm data verify DIR``: every shard against the sha256 its manifest records, and every token id
against the manifest's vocabulary -- a same-size corruption never trains silently on garbage.

Training runs the same check before DeepSpeed starts (:func:`verify_data`), and the loader when it
first opens a split. A shard is hashed once: the result is cached in ``<DIR>/.verified.json`` under
the shard's size and modification time, so a 100 GB corpus is read once, not at every start (a
read-only data folder is simply re-verified each time).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.settings import ArgumentParser
from data.shards import HEADER_BYTES, MANIFEST_NAME, DataError, read_header, read_manifest, write_json_atomic

VERIFIED_NAME = ".verified.json"
_CHUNK_BYTES = 1 << 24


@dataclass
class VerifyReport:
    shards: int = 0
    hashed: int = 0  # shards read this time (the rest came from the cache)


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache(data_dir: Path) -> dict[str, Any]:
    try:
        cache = json.loads((data_dir / VERIFIED_NAME).read_bytes())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _hash_shard(path: Path, vocab_size: int, bar: Any) -> tuple[str, int]:
    """(sha256 of the token bytes, largest id) of one shard, read in chunks."""
    header = read_header(path)
    digest, largest = hashlib.sha256(), -1
    chunk = _CHUNK_BYTES - _CHUNK_BYTES % header.dtype.itemsize
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while data := f.read(chunk):
            digest.update(data)
            ids = np.frombuffer(data, dtype=header.dtype.newbyteorder("<"))
            if ids.size:
                largest = max(largest, int(ids.max()))
            bar.update(len(data))
    return digest.hexdigest(), largest


def check_ids(path: Path, largest: int, vocab_size: int, manifest_path: Path) -> None:
    if largest >= vocab_size:
        raise DataError(
            f"{path}: holds token id {largest}, outside the vocabulary of {vocab_size} tokens "
            f"({manifest_path}: tokenizer.vocab_size); the shard is corrupt or from another tokenizer"
        )


_VERIFIED_HERE: set[tuple[str, str, int, int]] = set()  # (path, sha256, size, mtime_ns) checked in this process


def verify_data(
    data_dir: str | Path, splits: Sequence[str] | None = None, manifest: dict[str, Any] | None = None, progress: bool = True
) -> VerifyReport:
    """Check the shards of ``splits`` (default: all) against the manifest's sha256 and vocabulary;
    raise :class:`DataError` naming the first bad shard. Results are cached by size and mtime."""
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    manifest_path = data_dir / MANIFEST_NAME
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    chosen = list(manifest["splits"]) if splits is None else [s for s in splits if s in manifest["splits"]]
    cache = _read_cache(data_dir)
    todo, report = [], VerifyReport()
    for split in chosen:
        for entry in manifest["splits"][split]["shards"]:
            path = data_dir / entry["file"]
            read_header(path)  # missing or truncated: named before any hashing
            report.shards += 1
            stamp = _stamp(path)
            if (str(path.resolve()), entry["sha256"], stamp["size"], stamp["mtime_ns"]) in _VERIFIED_HERE:
                continue
            hit = cache.get(entry["file"])
            if isinstance(hit, dict) and hit.get("sha256") == entry["sha256"] and {k: hit.get(k) for k in ("size", "mtime_ns")} == stamp:
                check_ids(path, int(hit.get("max_id", vocab_size)), vocab_size, manifest_path)
                continue
            todo.append((path, entry))
    if not todo:
        return report
    total = sum(p.stat().st_size - HEADER_BYTES for p, _ in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {data_dir.name}", disable=not progress, leave=False)
    try:
        for path, entry in todo:
            stamp = _stamp(path)
            digest, largest = _hash_shard(path, vocab_size, bar)
            if digest != entry["sha256"]:
                raise DataError(
                    f"{path}: sha256 {digest[:16]}... does not match {manifest_path}'s {entry['sha256'][:16]}...: "
                    "the shard changed after it was prepared (prepare the data again)"
                )
            check_ids(path, largest, vocab_size, manifest_path)
            cache[entry["file"]] = {**stamp, "sha256": digest, "max_id": largest}
            _VERIFIED_HERE.add((str(path.resolve()), digest, stamp["size"], stamp["mtime_ns"]))
            report.hashed += 1
    finally:
        bar.close()
    try:
        write_json_atomic(data_dir / VERIFIED_NAME, cache)
    except OSError:
        pass  # a read-only data folder: verified again next time
    return report


def split_identity(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """What a checkpoint records of the data it trained on: the split's token count and one sha256 over
    its shards' sha256s, so a resume on other data is refused before any engine starts."""
    entry = manifest["splits"][split]
    combined = hashlib.sha256("".join(s["sha256"] for s in entry["shards"]).encode()).hexdigest()
    return {"split": split, "tokens": int(entry["tokens"]), "sha256": combined}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="sinklm data verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a folder written by `sinklm data prepare` (manifest.json + shards)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    try:
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: not a folder (expected a prepared data folder with {MANIFEST_NAME})")
        report = verify_data(data_dir, progress=not args.no_progress)
    except DataError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{data_dir}: {report.shards} shard(s) match {MANIFEST_NAME} ({report.hashed} hashed now, the rest cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
