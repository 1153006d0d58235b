"""Read any checkpoint format into our parameter names plus its :class:`ModelConfig` (no model built).

DeepSpeed runs of any ZeRO stage and number of ranks: ZeRO 1-3 are consolidated with DeepSpeed's own
``zero_to_fp32`` (fp32 master weights), stage 0 from the model-states file. Hugging Face GPT-NeoX
folders (stock, e.g. Pythia, or our exports) and initial checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.hf_config import NON_SHAPE_FIELDS, REMOTE_MODEL_TYPE, read_config_json, sinklm_field
from pretrain.checkpoints.init_format import load_init_checkpoint, read_init_config
from pretrain.checkpoints.resolve import MODEL_STATES, RUN_CONFIG_FILE, ResolvedCheckpoint, resolve
from pretrain.checkpoints.integrity import file_problem, folder_problem
from pretrain.checkpoints.training import other_tags_hint, step_of
from pretrain.config import ConfigError, ModelConfig, load_yaml
from pretrain.hf_keymap import from_hf_config, from_hf_state_dict
from pretrain.model import GPTNeoX

# prefixes a wrapped module may add to parameter names (DDP/engine wrappers, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class Checkpoint:
    """Weights in our parameter names plus everything needed to rebuild or export the model."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    format: str  # "deepspeed" | "hf" | "init"
    source: str  # human-readable: path, tag, ZeRO stage...
    tokenizer_spec: str | None = None  # where the tokenizer comes from (None: the bundled GPT-NeoX one)
    tokenizer_fingerprint: str | None = None  # what training used, when known
    run_config: dict[str, Any] | None = None  # a DeepSpeed run's resolved config.yaml
    step: int | None = None
    tokens_seen: int | None = None
    resolved: ResolvedCheckpoint | None = None  # where the spec pointed (the folder read; a hub name, revision)
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path | None:
        """The local folder read (a hub model's snapshot folder)."""
        return self.resolved.path if self.resolved is not None else None


def read_run_config(run: Path) -> tuple[dict[str, Any], ModelConfig]:
    """A DeepSpeed run's resolved ``config.yaml`` and the ModelConfig of its ``model`` section."""
    config_path = run / RUN_CONFIG_FILE
    try:
        run_config = load_yaml(config_path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"{config_path}: no 'model' section (expected the resolved ModelConfig of the run)")
    try:
        return run_config, ModelConfig.from_dict(run_config["model"])
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None


def model_config_of(resolved: ResolvedCheckpoint) -> ModelConfig:
    """The ModelConfig of a DeepSpeed run or an initial checkpoint, from its YAML alone."""
    if resolved.format == "deepspeed":
        return read_run_config(resolved.run_dir)[1]  # type: ignore[arg-type]
    if resolved.format == "init":
        try:
            return read_init_config(resolved.path)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    raise CheckpointError(f"{resolved.path}: a Hugging Face folder has no sinklm ModelConfig of its own")


def read_checkpoint(
    path: str | Path,
    tag: str | None = None,
    tokenizer: str | None = None,
    text_vocab_size: int | None = None,
    revision: str | None = None,
) -> Checkpoint:
    """Weights (our names, as stored: fp32 for DeepSpeed) and config of any supported checkpoint.

    ``tag`` picks a DeepSpeed checkpoint (default: the one named in ``latest``); ``tokenizer``
    overrides where the tokenizer comes from; ``text_vocab_size`` tells a stock HF folder without a
    tokenizer how many of its embedding rows are real tokens; ``revision`` picks a hub revision.
    """
    resolved = resolve(path, revision=revision, tag=tag)
    if resolved.format == "deepspeed":
        ckpt = _read_deepspeed(resolved)
    elif resolved.format == "init":
        ckpt = _read_init(resolved.path)
    else:
        ckpt = _read_hf(resolved.path, text_vocab_size, resolved.name)
    ckpt.resolved = resolved
    if tokenizer is not None:
        ckpt.tokenizer_spec = tokenizer
    ckpt.state = validated_state(ckpt.state, ckpt.config, ckpt.source)
    return ckpt


def _read_deepspeed(resolved: ResolvedCheckpoint) -> Checkpoint:
    run, tag, tag_dir = resolved.run_dir, resolved.tag, resolved.tag_dir
    run_config, cfg = read_run_config(run)  # type: ignore[arg-type]
    states_file = next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()), None)
    if states_file is None:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model-states file (expected one of {', '.join(MODEL_STATES)})")
    problem = folder_problem(tag_dir)
    if problem:
        raise CheckpointError(problem + other_tags_hint(run, tag, "--tag"))  # type: ignore[arg-type]
    # our own run's file; weights_only=False because it also holds DeepSpeed's config, scheduler and
    # client state as plain Python objects
    try:
        states = torch.load(states_file, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle / zip errors differ by torch version
        raise CheckpointError(
            f"{states_file}: truncated or corrupt ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
            + other_tags_hint(run, tag, "--tag")  # type: ignore[arg-type]
        ) from None
    ds_config = states.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    ranks = int(states.get("dp_world_size") or 1)
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    if (optim_files and stage > 0) or (stage == 0 and any(f.name.startswith("bf16_") for f in optim_files)):
        # ZeRO 1-3 (and bf16 stage 0): DeepSpeed's own consolidation of the fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=tag)
        how = "fp32 master weights via zero_to_fp32"
    else:
        if stage > 0:
            raise CheckpointError(f"{tag_dir}: ZeRO-{stage} checkpoint without *optim_states.pt files (incomplete copy?)")
        state = states.get("module")
        if not isinstance(state, dict):
            raise CheckpointError(f"{states_file}: no 'module' state dict")
        how = "model-states file"
    # sinklm train's client state records the manifest's tokenizer (spec + fingerprint)
    tokenizer_meta = states.get("tokenizer") if isinstance(states.get("tokenizer"), dict) else {}
    fingerprint = tokenizer_meta.get("fingerprint")
    return Checkpoint(
        config=cfg,
        state=_strip_wrapper_prefix(state, cfg),
        format="deepspeed",
        source=f"DeepSpeed run {run} tag {tag} (ZeRO-{stage}, {ranks} rank{'s' if ranks != 1 else ''}, {how})",
        tokenizer_spec=_usable_spec(tokenizer_meta.get("spec")) or _run_tokenizer_spec(run_config),
        tokenizer_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        run_config=run_config,
        step=states.get("step") if isinstance(states.get("step"), int) else step_of(tag),  # type: ignore[arg-type]
        tokens_seen=states.get("tokens_seen") if isinstance(states.get("tokens_seen"), int) else None,
    )


def _run_tokenizer_spec(run_config: dict[str, Any]) -> str | None:
    """The tokenizer a run trained with: ``data.tokenizer`` if set, else the data manifest's spec."""
    data = run_config.get("data") or {}
    if data.get("tokenizer"):
        return str(data["tokenizer"])
    manifest = Path(str(data.get("path") or "")) / "manifest.json"
    if data.get("path") and manifest.is_file():
        return _usable_spec((json.loads(manifest.read_text()).get("tokenizer") or {}).get("spec"))
    return None


def _usable_spec(spec: str | None) -> str | None:
    """A manifest's tokenizer spec as :func:`data.tokenizer.load_tokenizer` takes it: the bundled
    tokenizer is recorded as ``bundled:<name>`` and loaded with ``None``."""
    if not spec or str(spec).startswith("bundled:"):
        return None
    return str(spec)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    expected = set(expected_shapes(cfg))
    for prefix in _WRAPPER_PREFIXES:
        if not set(state) & expected and state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _read_init(folder: Path) -> Checkpoint:
    try:
        cfg, state = load_init_checkpoint(folder)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    spec = str(folder) if (folder / "tokenizer.json").is_file() else None
    return Checkpoint(config=cfg, state=state, format="init", source=f"initial checkpoint {folder}", tokenizer_spec=spec)


def _read_hf(folder: Path, text_vocab_size: int | None, name: str) -> Checkpoint:
    config_path = folder / "config.json"
    hf = read_config_json(config_path)
    model_type = hf.get("model_type")
    if model_type not in ("gpt_neox", REMOTE_MODEL_TYPE):
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is not GPT-NeoX (expected 'gpt_neox')")
    for key, ok in (("hidden_act", ("gelu", None)), ("tie_word_embeddings", (False, None)), ("attention_bias", (True, None))):
        if hf.get(key) not in ok:
            raise CheckpointError(f"{config_path}: {key}={hf.get(key)!r} is not supported (sinklm's GPT-NeoX has {ok[0]!r})")
    rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"{config_path}: rope_type {rope_type!r} is not supported (only plain RoPE)")
    sinklm_field(hf, str(config_path))  # validates the attention kind and sink tokens it declares
    sinklm = hf.get("sinklm") or {}
    has_tokenizer = (folder / "tokenizer.json").is_file()
    vocab = text_vocab_size or sinklm.get("vocab_size") or (_tokenizer_text_vocab(folder) if has_tokenizer else None)
    notes = []
    if vocab is None:
        # a stock folder without a tokenizer: assume GPT-NeoX-20B's 50,277 when its padding fits
        padded = int(hf["vocab_size"])
        vocab = 50277 if padded == 50304 else padded
        notes.append(f"no tokenizer in {folder}: assuming {vocab} text tokens (set --text-vocab-size to change)")
    extra = {k: v for k, v in (sinklm.get("model") or {}).items() if k in NON_SHAPE_FIELDS}
    extra.setdefault("name", name)
    try:
        cfg = from_hf_config(hf, text_vocab_size=int(vocab), **extra)
    except (ConfigError, ValueError, KeyError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    try:
        state = from_hf_state_dict(_read_hf_weights(folder))
    except KeyError as err:
        raise CheckpointError(f"{folder}: {err.args[0]} (not a GPT-NeoX weight)") from None
    return Checkpoint(
        config=cfg,
        state=state,
        format="hf",
        source=f"Hugging Face folder {folder}",
        tokenizer_spec=str(folder) if has_tokenizer else None,
        notes=notes,
    )


def _tokenizer_text_vocab(folder: Path) -> int:
    from data.tokenizer import base_vocab_size, load_tokenizer

    return base_vocab_size(load_tokenizer(str(folder)))


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in tqdm(files, desc="reading shards", disable=len(files) < 2):
                state.update(_load_weights_file(folder / name, loader))
            return state
    if (folder / "model.safetensors").is_file():
        return _load_weights_file(folder / "model.safetensors", "st")
    if (folder / "pytorch_model.bin").is_file():
        return _load_weights_file(folder / "pytorch_model.bin", "pt")
    raise CheckpointError(f"{folder}: no weights (expected model.safetensors, a sharded index or pytorch_model.bin)")


def _load_weights_file(path: Path, loader: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: listed in the shard index but missing")
    problem = file_problem(path)
    if problem:
        raise CheckpointError(problem)
    try:
        if loader == "st":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle errors differ by version
        raise CheckpointError(f"{path}: unreadable weights ({type(err).__name__}: {' '.join(str(err).split())})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a :class:`GPTNeoX` for ``cfg``, in module order (no memory used)."""
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def validated_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The state in module order; missing, unexpected or mis-shaped tensors are an error."""
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the {cfg.variant} config ({cfg.num_layers} layers, attention "
            f"{cfg.attention}): missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, the config expects {tuple(shape)}")
    return {k: state[k] for k in expected}
