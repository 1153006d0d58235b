"""Replacing outputs safely (data/outputs.py) and verifying shards against their manifest (data/verify.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data.outputs import OutputError, building, check_output_folder
from data.prepare import prepare, recognise_prepared
from data.shards import DataError, write_shard
from data.verify import VERIFIED_NAME, verify_data


def _only_ours(folder):
    return [p.name for p in folder.iterdir() if p.name != "ours.txt"]


def test_building_swaps_in_only_when_complete(tmp_path):
    """Prevents a failed build from touching the old output or leaving a folder (or its new parents)
    behind, and an interrupted build from showing a half-written output under the final name."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ours.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with building(out, True, "thing", _only_ours) as tmp:
            (tmp / "ours.txt").write_text("new, half written")
            raise RuntimeError("failed half way")
    assert (out / "ours.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with building(out, True, "thing", _only_ours) as tmp:
        (tmp / "ours.txt").write_text("new")
        assert (out / "ours.txt").read_text() == "old"  # not replaced before the end
    assert (out / "ours.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with building(deep, False, "thing", _only_ours):
            raise RuntimeError
    assert not (tmp_path / "a").exists()


def _killed_while(tmp_path, body: str) -> None:
    """Run ``body`` in a child Python that SIGKILLs itself at the end, as a lost node or ``kill -9`` would."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from data.outputs import building, _sibling
        out = Path({str(tmp_path / "out")!r})
        def ours(folder):
            return [p.name for p in folder.iterdir() if p.name != "ours.txt"]
    """) + textwrap.dedent(body) + "\nos.kill(os.getpid(), signal.SIGKILL)\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    assert done.returncode == -signal.SIGKILL


def test_a_killed_build_is_undone_by_the_next(tmp_path):
    """Prevents ``kill -9`` during prepare/convert from leaving hidden half-written copies behind for
    good, and a kill inside the swap (old output moved aside, new not yet in place) from losing the
    earlier output: the next build of the same output removes the first and restores the second."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "ours.txt").write_text("old")
    _killed_while(tmp_path, """
        with building(out, True, "thing", ours) as tmp:
            (tmp / "ours.txt").write_text("half written")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1
    _killed_while(tmp_path, """
        out.rename(_sibling(out, "old"))  # the swap's first rename, then the kill
    """)
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
    with building(out, True, "thing", _only_ours) as tmp:
        assert (out / "ours.txt").read_text() == "old"  # put back before the new build starts
        (tmp / "ours.txt").write_text("new")
    assert (out / "ours.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_the_users_umask(tmp_path):
    """Prevents exports readable only by their owner (mkdtemp's 0700, safetensors' 0600 files)."""
    old = os.umask(0o022)
    try:
        with building(tmp_path / "out", False, "thing", _only_ours) as tmp:
            path = tmp / "ours.txt"
            path.write_text("x")
            path.chmod(0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "ours.txt").stat().st_mode) == 0o644


def test_refuses_foreign_folders_and_overlaps(tmp_path):
    """Prevents --overwrite from deleting files the tool did not write, and outputs overlapping inputs."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(OutputError, match="thesis.tex"):
        check_output_folder(tmp_path / "mine", True, "thing", _only_ours)
    with pytest.raises(OutputError, match="inside the output folder"):
        check_output_folder(tmp_path, True, "thing", _only_ours, inputs=[tmp_path / "mine"])
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output_folder(tmp_path / "mine" / "out", False, "thing", _only_ours, inputs=[tmp_path / "mine"])
    check_output_folder(tmp_path / "empty-or-absent", False, "thing", _only_ours)


def test_prepare_overwrite_replaces_its_own_data_only(tmp_path):
    """An earlier prepared folder (with its verification cache) is replaced; another file in it is refused."""
    out = tmp_path / "data"
    prepare(out, {"train": ["Call me Ishmael."]}, workers=1, progress=False)
    verify_data(out, progress=False)
    assert recognise_prepared(out) == []
    prepare(out, {"train": ["Some years ago."]}, workers=1, progress=False, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] == 1
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="notes.md"):
        prepare(out, {"train": ["Never mind how long."]}, workers=1, progress=False, overwrite=True)
    assert (out / "notes.md").read_text() == "mine"


def _data(tmp_path, ids):
    folder = tmp_path / "d"
    folder.mkdir()
    entry = write_shard(folder / "train-00000.bin", np.asarray(ids, dtype=np.uint16))
    manifest = {"format": "sinklm-token-shards", "version": 1, "tokenizer": {"vocab_size": 100}, "dtype": "uint16",
                "splits": {"train": {"tokens": len(ids), "shards": [entry]}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_verify_hashes_once_and_notices_changes(tmp_path):
    """Prevents re-hashing a large corpus at every start (cache by size + mtime) and a cache hiding a
    later corruption (a rewritten shard has a new mtime)."""
    folder = _data(tmp_path, range(50))
    assert verify_data(folder, progress=False).hashed == 1
    assert (folder / VERIFIED_NAME).is_file()
    import data.verify

    data.verify._VERIFIED_HERE.clear()
    assert verify_data(folder, progress=False).hashed == 0  # from the cache
    shard = folder / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-2:] = b"\x07\x00"
    shard.write_bytes(bytes(raw))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(DataError, match="does not match"):
        verify_data(folder, progress=False)


def test_verify_checks_ids_against_the_vocabulary(tmp_path):
    """Prevents an IndexError deep in the embedding: an id >= tokenizer.vocab_size names the shard."""
    folder = _data(tmp_path, [1, 2, 100, 3])
    with pytest.raises(DataError, match=r"train-00000.bin: holds token id 100, outside the vocabulary of 100"):
        verify_data(folder, progress=False)


def test_verify_command(tmp_path, capsys):
    """`sinklm data verify DIR` succeeds on intact data and says how many shards it checked."""
    from sinklm.cli import main

    folder = _data(tmp_path, range(50))
    assert main(["data", "verify", str(folder), "--no-progress"]) == 0
    assert "1 shard(s) match manifest.json" in capsys.readouterr().out
