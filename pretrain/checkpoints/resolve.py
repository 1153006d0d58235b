"""Resolve a checkpoint spec once: a local folder or a Hugging Face hub name (+ revision), its format
and, for a DeepSpeed run, the tag. Nothing here reads weights.

Formats (detected from the folder's contents; see docs/design.md, "checkpoint formats"):

- ``deepspeed``: a run folder of ``sinklm train`` (``config.yaml`` + ``global_step{N}/`` + ``latest``)
  or one of its ``global_step{N}`` folders;
- ``init``: an initial checkpoint (``model.yaml`` + ``model.safetensors``);
- ``hf``: a Hugging Face folder (``config.json`` + weights): one of our exports, a stock GPT-NeoX
  (e.g. a downloaded Pythia), or a hub model fetched into the HF cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.init_format import CONFIG_FILE as INIT_CONFIG_FILE
from pretrain.checkpoints.init_format import is_init_checkpoint
from pretrain.checkpoints.training import LATEST_FILE, list_checkpoints, read_latest

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
RUN_CONFIG_FILE = "config.yaml"
_HUB_CONFIG_FILES = ["config.json", "tokenizer*", "special_tokens_map.json"]


def split_revision(spec: str | Path, revision: str | None = None) -> tuple[str, str | None]:
    """``owner/name@rev`` (a hub name with a revision, e.g. ``EleutherAI/pythia-160m-deduped@step143000``)
    -> (``owner/name``, ``rev``); any other spec comes back unchanged with ``revision``. So every tool
    taking a checkpoint spec takes a hub revision too, without a flag of its own."""
    text = str(spec)
    name, sep, rev = text.rpartition("@")
    if not sep or Path(text).expanduser().exists() or not is_hub_name(name):
        return text, revision
    if not rev:
        raise CheckpointError(f"checkpoint {text}: expected a revision after '@' (a branch, tag or commit, e.g. step143000)")
    if revision is not None and revision != rev:
        raise CheckpointError(f"checkpoint {text}: revision {rev!r} in the name contradicts --revision {revision!r}")
    return name, rev


def is_hub_name(spec: str | Path) -> bool:
    """THE hub-name rule: ``owner/name`` that is neither an existing path nor under an existing local
    folder (``runs/typo`` is a missing local folder, not a hub model)."""
    text = str(spec)
    if not _HUB_ID.fullmatch(text):
        return False
    path = Path(text).expanduser()
    return not path.exists() and not Path(path.parts[0]).is_dir()


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a spec points, without any weights read."""

    path: Path
    """The local folder named (a run folder or one of its tags, an HF folder or hub snapshot, an init checkpoint)."""
    format: str
    """``deepspeed``, ``init`` or ``hf``."""
    name: str
    """The folder's own name (a hub model's last part)."""
    tag: str | None = None
    """The DeepSpeed checkpoint tag read (``global_step{N}``); None for other formats."""
    run_dir: Path | None = None
    """The DeepSpeed run folder holding ``config.yaml`` and the tags; None for other formats."""
    hub_name: str | None = None
    """``owner/name`` when the spec was a hub model."""
    revision: str | None = None
    """The hub revision asked for."""

    @property
    def tag_dir(self) -> Path:
        if self.run_dir is None or self.tag is None:
            raise CheckpointError(f"{self.path} is a {self.format} checkpoint, not a DeepSpeed run")
        return self.run_dir / self.tag


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def fetch_from_hub(hub_name: str, revision: str | None = None, weights: bool = True) -> Path:
    """The HF-cache folder of a hub model: config and tokenizer files, plus the weights (safetensors,
    or .bin when a repo has none) when ``weights``."""
    from huggingface_hub import snapshot_download

    patterns = list(_HUB_CONFIG_FILES)
    if weights:
        patterns += ["model*.safetensors", "model.safetensors.index.json"]
    try:
        folder = Path(snapshot_download(hub_name, revision=revision, allow_patterns=patterns))
        if weights and not any(folder.glob("*.safetensors")):
            patterns += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
            folder = Path(snapshot_download(hub_name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # hub client errors differ by version (offline, unknown repo or revision, HTTP)
        at = f" at revision {revision}" if revision else ""
        raise CheckpointError(
            f"checkpoint {hub_name}{at}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(err).__name__}: {_one_line(err)})"
        ) from None
    return folder


def _detect(path: Path) -> str:
    """``deepspeed``, ``deepspeed-tag`` (a ``global_stepN`` folder itself), ``init`` or ``hf``."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (no such model folder, and not a hub name)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model folder; expected a checkpoint folder")
    if (path / RUN_CONFIG_FILE).is_file() and ((path / LATEST_FILE).is_file() or any(path.glob("global_step*"))):
        return "deepspeed"
    if any((path / name).is_file() for name in MODEL_STATES) and (path.parent / RUN_CONFIG_FILE).is_file():
        return "deepspeed-tag"
    if is_init_checkpoint(path):
        return "init"
    if (path / RUN_CONFIG_FILE).is_file() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: a run folder without checkpoints (no latest, no global_step*/): nothing saved yet")
    if (path / "config.json").is_file():
        return "hf"
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(
        f"{path} is not a checkpoint (not a model folder): expected a DeepSpeed run folder (config.yaml + latest or "
        f"global_step*/), a Hugging Face folder (config.json + *.safetensors) or an initial checkpoint "
        f"({INIT_CONFIG_FILE} + model.safetensors); found {found or 'an empty folder'}"
    )


def _pick_tag(run: Path, tag: str | None) -> str:
    tags = [p.name for _, p in list_checkpoints(run)]
    if tag is None:
        tag = read_latest(run)
        if tag is None:
            raise CheckpointError(
                f"{run}: no 'latest' file (no save completed?); pick a tag with --tag, available: {tags or 'none'}"
            )
    if not (run / tag).is_dir():
        raise CheckpointError(f"{run}: checkpoint tag {tag!r} not found; available tags: {tags or 'none'}")
    return tag


def resolve(
    spec: str | Path, revision: str | None = None, tag: str | None = None, *, weights: bool = True
) -> ResolvedCheckpoint:
    """Resolve ``spec`` (a folder or a hub name) once; ``tag`` picks a DeepSpeed checkpoint (default:
    the one ``latest`` names), ``revision`` a hub revision (or ``owner/name@revision``, see
    :func:`split_revision`). ``weights=False`` fetches only a hub model's config and tokenizer files.
    Every problem is a one-line :class:`CheckpointError`."""
    text, revision = split_revision(spec, revision)
    hub_name = text if is_hub_name(text) else None
    if hub_name is not None:
        path, name = fetch_from_hub(hub_name, revision, weights), hub_name.split("/")[-1]
    else:
        if revision is not None:
            raise CheckpointError(f"--revision {revision!r} only applies to a Hugging Face hub name; {text} is local")
        path = Path(text).expanduser()
        name = path.resolve().name
    kind = _detect(path)
    if tag is not None and kind != "deepspeed":
        raise CheckpointError(f"--tag {tag!r} only applies to a DeepSpeed run folder; {path} is a {kind} checkpoint")
    if kind == "deepspeed-tag":
        return ResolvedCheckpoint(path, "deepspeed", name, tag=path.name, run_dir=path.parent)
    if kind == "deepspeed":
        return ResolvedCheckpoint(path, "deepspeed", name, tag=_pick_tag(path, tag), run_dir=path)
    return ResolvedCheckpoint(path, kind, name, hub_name=hub_name, revision=revision)
