"""The bad-input battery's harness (issue 13), shared by one test module per package
(tests/data/test_bad_inputs_data.py, tests/pretrain/test_bad_inputs_pretrain.py,
tests/inference/test_bad_inputs_inference.py, tests/sinklm/test_bad_inputs_cli.py).

Every case runs a `sinklm` command in process (through the one console command) on a fresh workspace
and asserts what the project promises for bad input: exit status 2, exactly one stderr line that
names the file / key / option and what was expected or found, no traceback, and nothing changed on
disk -- the whole workspace (data, runs, exports, the would-be output) is byte-for-byte as before, so
the two cases that used to destroy data (`convert nest/run_copy nest --overwrite`, `data prepare
--overwrite bad.jsonl`) prove the source run and the old data intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ckpt_layouts import tiny_checkpoints
from pretrain.config import CONFIG_DIR

QUICKSTART = str(CONFIG_DIR / "experiments" / "quickstart-vanilla.yaml")
EXPERIMENT = str(CONFIG_DIR / "experiments" / "quickstart.yaml")
_TEMPLATE: list[Path] = []


def template(tmp_path_factory) -> Path:
    """A prepared data folder, a ZeRO-0 run folder, an init checkpoint and an export, made once per session."""
    if not _TEMPLATE:
        from data.corpora import read_book
        from data.prepare import prepare

        root = tmp_path_factory.mktemp("bad_input_template")
        book = read_book("melville-moby_dick")
        prepare(root / "data", {"train": [book[:20_000]], "validation": [book[20_000:30_000]]}, workers=1, progress=False)
        tiny_checkpoints(root)
        _TEMPLATE.append(root)
    return _TEMPLATE[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Workspace:
    """A per-case folder; ``get(name)`` copies a template entry in on first use (the template itself
    is made only when a case needs one)."""

    def __init__(self, root: Path, template: Callable[[], Path]):
        self.root, self.template = root, template

    def get(self, name: str, as_name: str | None = None) -> Path:
        target = self.root / (as_name or name)
        if not target.exists():
            shutil.copytree(self.template() / name, target)
        return target

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        out[rel] = ("dir", st.st_mode) if path.is_dir() else (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode)
    return out


# --------------------------------------------------------------------------------------------
# inputs made for the cases
# --------------------------------------------------------------------------------------------


def _manifest(ws: Workspace, folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def data_without_vocab(ws: Workspace) -> Path:
    data = ws.get("data", "data_novocab")
    manifest = _manifest(ws, data)
    del manifest["tokenizer"]["vocab_size"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def data_corrupt(ws: Workspace) -> Path:
    """Same size, different bytes: only the sha256 can tell."""
    data = ws.get("data", "data_corrupt")
    shard = data / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100:110] = bytes(10)
    shard.write_bytes(bytes(raw))
    return data


def data_out_of_vocab(ws: Workspace) -> Path:
    """A shard holding id 60000 (>= the 50277-token vocabulary), consistent with its manifest."""
    from data.shards import open_shard, write_shard

    data = ws.get("data", "data_oov")
    shard = data / "train-00000.bin"
    ids = open_shard(shard).astype("uint16").copy()
    ids[5] = 60000
    shard.unlink()
    entry = write_shard(shard, ids)
    manifest = _manifest(ws, data)
    manifest["splits"]["train"]["shards"] = [entry]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def run_for_training(ws: Workspace, *, train_data: dict | None, truncate_latest: bool) -> Path:
    """A `sinklm train` run folder of the quickstart config (state files only, tiny .pt files)."""
    from pretrain.train_config import resolve_config

    data, run_dir = ws.get("data"), ws.root / "trained"
    run = resolve_config([QUICKSTART], [f"data.path={data}", f"train.run_dir={run_dir}"])
    manifest = _manifest(ws, data)
    for step in (2, 4):
        folder = run_dir / f"global_step{step}"
        folder.mkdir(parents=True)
        torch.save({"step": step}, folder / "mp_rank_00_model_states.pt")
        state = {"step": step, "config": run.to_dict(), "tokenizer": manifest["tokenizer"], "text_tokens": run.text_tokens,
                 "world_size": 1, "train_data": train_data}  # fmt: skip
        (folder / "sinklm_state.json").write_text(json.dumps(state))
    if truncate_latest:
        truncate(run_dir / "global_step4" / "mp_rank_00_model_states.pt")
    (run_dir / "latest").write_text("global_step4")
    return run_dir


def train_argv(ws: Workspace, data: Path | str, *extra: str) -> list[str]:
    return ["train", QUICKSTART, f"--data.path={data}", f"--train.run_dir={ws.root / 'newrun'}", *extra]


BAD_UTF8_JSONL = b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n'
RANDOM_BYTES = bytes(torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist())
CONTROL_TEXT = ("plain words " * 50 + "\x01\x02\x03\x1b" * 30).encode()

Case = Callable[["Workspace"], tuple[list[str], list[str]]]
"""workspace -> (argv after `sinklm`, the texts the error line must contain)."""


def _run(argv: list[str]) -> int:
    from sinklm.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:  # argparse
        return exit_.code if isinstance(exit_.code, int) else 1


class Battery:
    """One package's cases: ``@battery.case(name)`` registers, :meth:`check` runs one."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def case(self, name: str) -> Callable[[Case], Case]:
        def register(fn: Case) -> Case:
            self.cases[name] = fn
            return fn

        return register

    def check(self, name: str, tmp_path: Path, tmp_path_factory, capsys, monkeypatch) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.chdir(tmp_path)
        ws = Workspace(tmp_path / "ws", lambda: template(tmp_path_factory))
        ws.root.mkdir()
        argv, expected = self.cases[name](ws)
        before = _snapshot(tmp_path)
        capsys.readouterr()
        rc = _run(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, f"exit status {rc}, stderr: {err}"
        assert err and "\n" not in err, f"expected one stderr line, got:\n{err}"
        visible = err.split("\r")[-1].strip()  # a progress bar redraws with \r and clears itself when closed
        assert visible.startswith("sinklm") and ": error: " in visible and "Traceback" not in err, err
        for text in expected:
            assert text in visible, f"{text!r} not named in: {visible}"
        assert _snapshot(tmp_path) == before, "the command changed files although it failed"
