"""``sinklm convert``: DeepSpeed run folders, Hugging Face folders and initial checkpoints, both ways.

Sources (detected from the folder's contents):

- a DeepSpeed run folder of ``sinklm train`` (``config.yaml`` + ``global_step{N}/`` + ``latest``), any
  ZeRO stage and number of ranks; ZeRO 1-3 are consolidated with DeepSpeed's own ``zero_to_fp32``
  (fp32 master weights), stage 0 from the model-states file;
- a Hugging Face GPT-NeoX folder: a stock one (e.g. a downloaded Pythia) or one of our exports;
- an initial checkpoint (``model.yaml`` + ``model.safetensors``, :mod:`pretrain.init_checkpoint`).

Targets: ``--to hf`` writes a shareable Hugging Face folder (GPT-NeoX ``config.json`` with a
``sinklm`` field, safetensors sharded above ``--max-shard-size``, tokenizer with the sink tokens and a
post-processor that prepends them, ``generation_config.json``, model card). Vanilla and sink-token
models are stock ``gpt_neox``; softmax1/sink_logit cannot be expressed by stock GPT-NeoX, so they get
``model_type: sinklm_gpt_neox`` and bundled modelling code (``trust_remote_code=True``) -- the stock
loader refuses them instead of silently building a vanilla model. ``--to init`` writes an initial
checkpoint for ``train.init_from``, optionally adding sink tokens (``--add-sink-tokens``) or switching
the attention kind (``--attention``) -- continued pretraining of e.g. Pythia with a sink token.

Python API: :func:`read_checkpoint` (weights + config, no model built), :func:`load_model` (a ready
:class:`GPTNeoX`), :func:`export_hf`, :func:`export_init`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from data.shards import DataError
from pretrain.config import ATTENTION_KINDS, ConfigError, ModelConfig, load_yaml
from pretrain.hf_keymap import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from pretrain.init_checkpoint import CONFIG_FILE as INIT_CONFIG_FILE
from pretrain.init_checkpoint import is_init_checkpoint, load_init_checkpoint, save_init_checkpoint
from pretrain.model import GPTNeoX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# HF model_type of exports that stock transformers cannot run (see the module docstring)
REMOTE_MODEL_TYPE = "sinklm_gpt_neox"
REMOTE_ARCHITECTURE = "SinkLMGPTNeoXForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_sinklm.SinkLMGPTNeoXConfig",
    "AutoModelForCausalLM": "modeling_sinklm.SinkLMGPTNeoXForCausalLM",
}
# ModelConfig fields that GPT-NeoX's config.json cannot hold; kept in its ``sinklm.model`` field
_NON_SHAPE_FIELDS = ("name", "sink_logit_init", "init_method", "init_std", "output_init_method")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# prefixes a wrapped module may add to parameter names (DDP/engine wrappers, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class ConvertError(ValueError):
    """Bad input for a conversion; the message names the file, key or option and what was expected."""


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
    path: Path | None = None  # the local folder read
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: GPTNeoX  # in eval mode
    config: ModelConfig
    tokenizer: Any | None  # transformers PreTrainedTokenizerFast with the sink tokens, when known
    source: str


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``deepspeed``, ``deepspeed-tag`` (a ``global_stepN`` folder itself), ``init`` or ``hf``."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ConvertError(f"{path} is a file; expected a checkpoint folder")
    if (path / "config.yaml").is_file() and ((path / "latest").is_file() or any(path.glob("global_step*"))):
        return "deepspeed"
    if any((path / name).is_file() for name in _MODEL_STATES) and (path.parent / "config.yaml").is_file():
        return "deepspeed-tag"
    if is_init_checkpoint(path):
        return "init"
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise ConvertError(f"{path}: a run folder without checkpoints (no latest, no global_step*/): nothing saved yet")
    if (path / "config.json").is_file():
        return "hf"
    found = sorted(p.name for p in path.iterdir())[:12]
    raise ConvertError(
        f"{path} is not a checkpoint: expected a DeepSpeed run folder (config.yaml + latest or global_step*/), "
        f"a Hugging Face folder (config.json + *.safetensors) or an initial checkpoint ({INIT_CONFIG_FILE} + "
        f"model.safetensors); found {found or 'an empty folder'}"
    )


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local folder for ``source``: the path itself, or a Hugging Face hub model (``owner/name``,
    e.g. ``EleutherAI/pythia-160m`` with ``revision="step100000"``) fetched into the HF cache
    (config, safetensors -- or .bin when a repo has none -- and tokenizer files only)."""
    path = Path(source).expanduser()
    if path.exists() or not _HUB_ID.match(str(source)):
        if revision is not None:
            raise ConvertError(f"--revision {revision!r} only applies to a Hugging Face hub name; {source} is local")
        return path
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json"]
    try:
        folder = Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            patterns += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
            folder = Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except Exception as err:  # hub client errors differ by version (offline, unknown repo or revision, HTTP)
        raise ConvertError(
            f"checkpoint {source}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err})"
        ) from None
    return folder


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
    name = Path(str(path)).name  # a hub name's last part, not the cache folder's hash
    path = resolve_source(path, revision)
    kind = detect_format(path)
    if tag is not None and kind not in ("deepspeed",):
        raise ConvertError(f"--tag {tag!r} only applies to a DeepSpeed run folder; {path} is a {kind} checkpoint")
    if kind == "deepspeed-tag":
        ckpt = _read_deepspeed(path.parent, path.name)
    elif kind == "deepspeed":
        ckpt = _read_deepspeed(path, tag)
    elif kind == "init":
        ckpt = _read_init(path)
    else:
        ckpt = _read_hf(path, text_vocab_size, name)
    ckpt.path = path
    if tokenizer is not None:
        ckpt.tokenizer_spec = tokenizer
    ckpt.state = _validated_state(ckpt.state, ckpt.config, ckpt.source)
    return ckpt


def _read_deepspeed(run: Path, tag: str | None) -> Checkpoint:
    config_path = run / "config.yaml"
    try:
        run_config = load_yaml(config_path)
    except ConfigError as err:
        raise ConvertError(str(err)) from None
    if not isinstance(run_config.get("model"), dict):
        raise ConvertError(f"{config_path}: no 'model' section (expected the resolved ModelConfig of the run)")
    try:
        cfg = ModelConfig.from_dict(run_config["model"])
    except ConfigError as err:
        raise ConvertError(f"{config_path}: {err}") from None
    tags = sorted((p.name for p in run.iterdir() if p.is_dir() and p.name.startswith("global_step")), key=_step_of)
    if tag is None:
        latest = run / "latest"
        if not latest.is_file():
            raise ConvertError(
                f"{run}: no 'latest' file (no save completed?); pick a tag with --tag, available: {tags or 'none'}"
            )
        tag = latest.read_text().strip()
    tag_dir = run / tag
    if not tag_dir.is_dir():
        raise ConvertError(f"{run}: checkpoint tag {tag!r} not found; available tags: {tags or 'none'}")
    states_file = next((tag_dir / n for n in _MODEL_STATES if (tag_dir / n).is_file()), None)
    if states_file is None:
        raise ConvertError(f"{tag_dir}: no DeepSpeed model-states file (expected one of {', '.join(_MODEL_STATES)})")
    # our own run's file; weights_only=False because it also holds DeepSpeed's config, scheduler and
    # client state as plain Python objects
    states = torch.load(states_file, map_location="cpu", weights_only=False)
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
            raise ConvertError(f"{tag_dir}: ZeRO-{stage} checkpoint without *optim_states.pt files (incomplete copy?)")
        state = states.get("module")
        if not isinstance(state, dict):
            raise ConvertError(f"{states_file}: no 'module' state dict")
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
        step=states.get("step") if isinstance(states.get("step"), int) else (_step_of(tag) if _step_of(tag) >= 0 else None),
        tokens_seen=states.get("tokens_seen") if isinstance(states.get("tokens_seen"), int) else None,
    )


def _step_of(tag: str) -> int:
    match = re.fullmatch(r"global_step(\d+)", tag)
    return int(match.group(1)) if match else -1


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
    expected = set(_expected_shapes(cfg))
    for prefix in _WRAPPER_PREFIXES:
        if not set(state) & expected and state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _read_init(folder: Path) -> Checkpoint:
    try:
        cfg, state = load_init_checkpoint(folder)
    except ConfigError as err:
        raise ConvertError(str(err)) from None
    spec = str(folder) if (folder / "tokenizer.json").is_file() else None
    return Checkpoint(config=cfg, state=state, format="init", source=f"initial checkpoint {folder}", tokenizer_spec=spec)


def _read_hf(folder: Path, text_vocab_size: int | None, name: str) -> Checkpoint:
    config_path = folder / "config.json"
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"{config_path}: not valid JSON ({err})") from None
    model_type = hf.get("model_type")
    if model_type not in ("gpt_neox", REMOTE_MODEL_TYPE):
        raise ConvertError(f"{config_path}: model_type {model_type!r} is not GPT-NeoX (expected 'gpt_neox')")
    for key, ok in (("hidden_act", ("gelu", None)), ("tie_word_embeddings", (False, None)), ("attention_bias", (True, None))):
        if hf.get(key) not in ok:
            raise ConvertError(f"{config_path}: {key}={hf.get(key)!r} is not supported (sinklm's GPT-NeoX has {ok[0]!r})")
    rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConvertError(f"{config_path}: rope_type {rope_type!r} is not supported (only plain RoPE)")
    sinklm = hf.get("sinklm") or {}
    if model_type == REMOTE_MODEL_TYPE and not sinklm:
        raise ConvertError(f"{config_path}: model_type {REMOTE_MODEL_TYPE!r} without the 'sinklm' field")
    attention = sinklm.get("attention", "softmax")
    if attention not in ATTENTION_KINDS:
        raise ConvertError(
            f"{config_path}: sinklm.attention: unknown attention kind {attention!r}; expected one of {', '.join(ATTENTION_KINDS)}"
        )
    has_tokenizer = (folder / "tokenizer.json").is_file()
    vocab = text_vocab_size or sinklm.get("vocab_size") or (_tokenizer_text_vocab(folder) if has_tokenizer else None)
    notes = []
    if vocab is None:
        # a stock folder without a tokenizer: assume GPT-NeoX-20B's 50,277 when its padding fits
        padded = int(hf["vocab_size"])
        vocab = 50277 if padded == 50304 else padded
        notes.append(f"no tokenizer in {folder}: assuming {vocab} text tokens (set --text-vocab-size to change)")
    extra = {k: v for k, v in (sinklm.get("model") or {}).items() if k in _NON_SHAPE_FIELDS}
    extra.setdefault("name", name)
    try:
        cfg = from_hf_config(hf, text_vocab_size=int(vocab), **extra)
    except (ConfigError, ValueError, KeyError) as err:
        raise ConvertError(f"{config_path}: {err}") from None
    state = from_hf_state_dict_checked(_read_hf_weights(folder), config_path)
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


def from_hf_state_dict_checked(hf_state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    try:
        return from_hf_state_dict(hf_state)
    except KeyError as err:
        raise ConvertError(f"{where.parent}: {err.args[0]} (not a GPT-NeoX weight)") from None


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = folder / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for name in tqdm(files, desc="reading shards", disable=len(files) < 2):
                state.update(_load_weights_file(folder / name, loader))
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_weights_file(folder / "pytorch_model.bin", "pt")
    raise ConvertError(f"{folder}: no weights (expected model.safetensors, a sharded index or pytorch_model.bin)")


def _load_weights_file(path: Path, loader: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConvertError(f"{path}: listed in the shard index but missing")
    if loader == "st":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of a :class:`GPTNeoX` for ``cfg``, in module order (no memory used)."""
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _validated_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """The state in module order; missing, unexpected or mis-shaped tensors are an error."""
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConvertError(
            f"{source}: weights do not match the {cfg.variant} config ({cfg.num_layers} layers, attention "
            f"{cfg.attention}): missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ConvertError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, the config expects {tuple(shape)}")
    return {k: state[k] for k in expected}


def load_tokenizer_for(ckpt: Checkpoint, prepend_sinks: bool = True):
    """The checkpoint's tokenizer with its sink tokens (post-processor prepending them if asked),
    checked against the model: same text vocabulary, and the training fingerprint when known."""
    from data.tokenizer import base_vocab_size, load_tokenizer, tokenizer_fingerprint

    cfg = ckpt.config
    tokenizer = load_tokenizer(
        ckpt.tokenizer_spec, cfg.sink_tokens, padded_vocab_size=cfg.padded_vocab_size, prepend_sinks=prepend_sinks
    )
    base = base_vocab_size(tokenizer)
    name = ckpt.tokenizer_spec or "the bundled GPT-NeoX-20B tokenizer"
    if base != cfg.vocab_size:
        raise ConvertError(
            f"tokenizer {name} has {base} text tokens but the model's vocab_size is {cfg.vocab_size}; "
            "pass the run's tokenizer with --tokenizer"
        )
    if ckpt.tokenizer_fingerprint and tokenizer_fingerprint(tokenizer) != ckpt.tokenizer_fingerprint:
        raise ConvertError(
            f"tokenizer {name} (fingerprint {tokenizer_fingerprint(tokenizer)}) is not the one the run trained with "
            f"(fingerprint {ckpt.tokenizer_fingerprint}); pass it with --tokenizer"
        )
    return tokenizer


def load_model(
    path: str | Path,
    tag: str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """A ready :class:`GPTNeoX` (eval mode, ``dtype``) from any supported checkpoint folder or hub name.

    The returned ``tokenizer`` is None when the checkpoint names none (an initial checkpoint without
    tokenizer files); ``tokenizer`` overrides where it comes from.
    """
    ckpt = read_checkpoint(path, tag=tag, tokenizer=tokenizer, revision=revision)
    model = GPTNeoX(ckpt.config)
    model.load_state_dict(ckpt.state, strict=True)
    model.to(dtype).eval()
    tok = None
    if ckpt.format != "init" or ckpt.tokenizer_spec is not None:
        tok = load_tokenizer_for(ckpt)
    return LoadedModel(model=model, config=ckpt.config, tokenizer=tok, source=ckpt.source)


# --------------------------------------------------------------------------------------------
# changing the model: sink tokens, attention kind
# --------------------------------------------------------------------------------------------


def add_sink_tokens(ckpt: Checkpoint, count: int) -> Checkpoint:
    """``count`` more sink tokens; their input-embedding rows start at the mean embedding of the
    text tokens (a neutral, in-distribution vector). Output rows are kept: padded rows never appear
    as targets, so a trained model already gives them low logits, and no label is ever a sink."""
    if count < 1:
        raise ConvertError(f"--add-sink-tokens must be >= 1, got {count}")
    cfg = ckpt.config
    try:
        new_cfg = replace(cfg, sink_tokens=cfg.sink_tokens + count)
    except ConfigError as err:
        raise ConvertError(f"--add-sink-tokens {count}: {err}") from None
    new_ids = new_cfg.sink_token_ids[cfg.sink_tokens :]
    embed = ckpt.state["embed.weight"].clone()
    mean = embed[: cfg.vocab_size].float().mean(dim=0)
    embed[new_ids] = mean.to(embed.dtype)
    state = dict(ckpt.state, **{"embed.weight": embed})
    note = f"added {count} sink token(s) at ids {new_ids}, embedding = mean of {cfg.vocab_size} text-token rows"
    return replace(ckpt, config=new_cfg, state=state, notes=ckpt.notes + [note])


def set_attention(ckpt: Checkpoint, kind: str, sink_logit_init: float | None = None) -> Checkpoint:
    """Switch the attention kernel; sink_logit gains a per-head logit (``sink_logit_init``, default
    the config's), leaving sink_logit drops it."""
    if kind not in ATTENTION_KINDS:
        raise ConvertError(f"--attention: unknown attention kind {kind!r}; expected one of {', '.join(ATTENTION_KINDS)}")
    cfg = ckpt.config
    init = cfg.sink_logit_init if sink_logit_init is None else sink_logit_init
    new_cfg = replace(cfg, attention=kind, sink_logit_init=init)
    state = {k: v for k, v in ckpt.state.items() if not k.endswith("attn.sink_logit")}
    notes = list(ckpt.notes)
    if kind == "sink_logit":
        for i in range(cfg.num_layers):
            old = ckpt.state.get(f"blocks.{i}.attn.sink_logit")
            state[f"blocks.{i}.attn.sink_logit"] = old if old is not None else torch.full((cfg.num_heads,), float(init))
    elif cfg.attention == "sink_logit":
        notes.append("dropped the learned sink logits (the new kernel has none)")
    if kind != cfg.attention:
        notes.append(f"attention {cfg.attention} -> {kind}")
    return replace(ckpt, config=new_cfg, state=_validated_state(state, new_cfg, ckpt.source), notes=notes)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of an export: GPT-NeoX fields plus the ``sinklm`` field; softmax1/sink_logit
    get a model type stock transformers does not know and an ``auto_map`` to the bundled code."""
    from sinklm import __version__

    hf = to_hf_config(cfg)
    if cfg.attention != "softmax":
        hf["architectures"] = [REMOTE_ARCHITECTURE]
        hf["model_type"] = REMOTE_MODEL_TYPE
        hf["auto_map"] = dict(AUTO_MAP)
    hf["dtype"] = _DTYPE_NAMES[dtype]
    hf["torch_dtype"] = _DTYPE_NAMES[dtype]  # transformers 4.x reads this name
    hf["sinklm"] = {
        "attention": cfg.attention,
        "sink_tokens": cfg.sink_tokens,
        "sink_token_ids": cfg.sink_token_ids,
        "variant": cfg.variant,
        "version": __version__,
        "vocab_size": cfg.vocab_size,
        "model": cfg.to_dict(),
    }
    return hf


def export_hf(
    ckpt: Checkpoint,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    tokenizer: Any | None = None,
) -> Path:
    """Write a Hugging Face folder for ``ckpt`` (see the module docstring); returns the folder."""
    cfg = ckpt.config
    tok = tokenizer if tokenizer is not None else load_tokenizer_for(ckpt)
    with _output_folder(out, overwrite) as tmp:
        hf_state = to_hf_state_dict({k: v.to(dtype) for k, v in ckpt.state.items()})
        _write_safetensors(hf_state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
        if cfg.attention != "softmax":
            from pretrain.hf_export import FILES, SOURCE_DIR

            for name in FILES:
                shutil.copyfile(SOURCE_DIR / name, tmp / name)
        tok.save_pretrained(str(tmp))
        generation = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(ckpt, dtype))
    return Path(out)


def export_init(ckpt: Checkpoint, out: str | Path, overwrite: bool = False) -> Path:
    """Write an initial checkpoint (fp32, our names) for ``train.init_from``. When the source names a
    tokenizer (e.g. a HF folder's own), its files go along, so converting back keeps it."""
    tok = load_tokenizer_for(ckpt) if ckpt.tokenizer_spec is not None else None
    with _output_folder(out, overwrite) as tmp:
        state = {k: v.to(torch.float32) for k, v in tqdm(ckpt.state.items(), desc="fp32", leave=False)}
        save_init_checkpoint(tmp, ckpt.config, state)
        if tok is not None:
            tok.save_pretrained(str(tmp))
    return Path(out)


def _write_safetensors(hf_state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    try:
        split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    except ValueError as err:
        raise ConvertError(f"--max-shard-size {max_shard_size!r}: {err}") from None
    bar = tqdm(total=sum(t.numel() * t.element_size() for t in hf_state.values()), unit="B", unit_scale=True, desc="writing weights")
    for filename, names in split.filename_to_tensors.items():
        # clone: zero_to_fp32 returns views into one flat buffer, which safetensors refuses to save
        shard = {name: hf_state[name].detach().contiguous().clone() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    bar.close()
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


class _output_folder:
    """Build the output in a temporary sibling folder and move it into place at the end, so an
    interrupted conversion never leaves a half-written folder that looks complete."""

    def __init__(self, out: str | Path, overwrite: bool):
        self.out = Path(out)
        check_output_folder(self.out, overwrite)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)


def _model_card(ckpt: Checkpoint, dtype: torch.dtype) -> str:
    cfg = ckpt.config
    remote = cfg.attention != "softmax"
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")")
    kernel = {
        "softmax": "vanilla softmax attention",
        "softmax1": "softmax1 (softmax-off-by-one: an implicit extra key with logit 0 and value 0)",
        "sink_logit": "sink_logit (a learnable per-head logit b_h in the softmax denominator)",
    }[cfg.attention]
    sinks = (
        f"{cfg.sink_tokens} learnable sink token(s) {cfg.sink_token_ids}, prepended by the tokenizer's post-processor"
        if cfg.sink_tokens
        else "none"
    )
    training = ckpt.run_config if ckpt.run_config is not None else {"model": cfg.to_dict()}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sinklm, gpt-neox, attention-sinks, streaming-llm]",
        "---",
        "",
        f"# {cfg.name} ({cfg.variant})",
        "",
        "A Pythia-style GPT-NeoX language model trained with sinklm, a toolkit for StreamingLLM "
        "(Xiao et al., ICLR 2024) experiments with attention sinks.",
        "",
        f"- variant: **{cfg.variant}**",
        f"- attention kernel: {kernel}",
        f"- sink tokens: {sinks}",
        f"- shape: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"{cfg.num_params():,} parameters, context {cfg.max_seq_len}",
        f"- weights: {_DTYPE_NAMES[dtype]}; converted from {ckpt.source}"
        + (f", step {ckpt.step}" if ckpt.step is not None else "")
        + (f", {ckpt.tokens_seen:,} tokens seen" if ckpt.tokens_seen is not None else ""),
        *(f"- note: {n}" for n in ckpt.notes),
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")"),
        f"model = {load}",
        "```",
        "",
    ]
    if remote:
        lines += [
            f"Stock GPT-NeoX cannot express the {cfg.attention} kernel: `config.json` has model type "
            f"`{REMOTE_MODEL_TYPE}` and the modelling code is bundled here, so loading needs "
            "`trust_remote_code=True` (it runs offline); without it transformers refuses the folder.",
            "",
        ]
    if cfg.sink_tokens:
        lines += [
            "The tokenizer prepends the sink token(s) to every encoding, as in training; a stream or "
            "prompt must start with them.",
            "",
        ]
    heading = "## Training configuration" if ckpt.run_config is not None else "## Model configuration"
    lines += [heading, "", "```yaml", yaml.safe_dump(training, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm convert",
        description="Convert checkpoints: a DeepSpeed run folder, a Hugging Face GPT-NeoX folder or an "
        "initial checkpoint -> a Hugging Face folder (--to hf) or an initial checkpoint for train.init_from "
        "(--to init).",
    )
    parser.add_argument("source", help="DeepSpeed run folder, Hugging Face folder (or hub name) or initial checkpoint")
    parser.add_argument("output", help="output folder (must be empty or absent unless --overwrite)")
    parser.add_argument("--to", choices=("hf", "init"), help="target (default: init for a HF source, else hf)")
    parser.add_argument("--revision", help="hub revision when SOURCE is a hub name, e.g. step100000 for Pythia")
    parser.add_argument("--tag", help="DeepSpeed checkpoint tag, e.g. global_step1000 (default: the one in 'latest')")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype of a HF export (default: fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="split HF weights into shards above this size (default: 5GB)")
    parser.add_argument("--tokenizer", help="tokenizer.json / folder / hub name (default: the one the checkpoint names)")
    parser.add_argument("--text-vocab-size", type=int, help="text tokens of a stock HF folder without a tokenizer (default 50277 for Pythia)")
    parser.add_argument("--add-sink-tokens", type=int, metavar="K", help="add K sink tokens (embedding = mean text-token embedding)")
    parser.add_argument("--attention", choices=ATTENTION_KINDS, help="switch the attention kernel")
    parser.add_argument("--sink-logit-init", type=float, help="initial b_h when switching to sink_logit (default: the config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_folder(args.output, args.overwrite)  # before reading a possibly large checkpoint
        ckpt = read_checkpoint(
            args.source, tag=args.tag, tokenizer=args.tokenizer, text_vocab_size=args.text_vocab_size, revision=args.revision
        )
        src, out = ckpt.path.resolve(), Path(args.output).resolve()
        if out == src or src in out.parents:
            raise ConvertError(f"output {out} must not be the source folder or inside it")
        target = args.to or ("init" if ckpt.format == "hf" else "hf")
        if target == "init" and args.dtype != "fp32":
            raise ConvertError(f"--dtype {args.dtype}: initial checkpoints are always fp32")
        if args.add_sink_tokens is not None:
            ckpt = add_sink_tokens(ckpt, args.add_sink_tokens)
        if args.attention is not None or args.sink_logit_init is not None:
            ckpt = set_attention(ckpt, args.attention or ckpt.config.attention, args.sink_logit_init)
        print(f"source: {ckpt.source}\nmodel:  {ckpt.config.name}, variant {ckpt.config.variant}", file=sys.stderr)
        for note in ckpt.notes:
            print(f"note:   {note}", file=sys.stderr)
        if target == "init":
            export_init(ckpt, args.output, overwrite=args.overwrite)
        else:
            export_hf(ckpt, args.output, dtype=DTYPES[args.dtype], max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (ConvertError, ConfigError, DataError) as err:  # DataError: tokenizer problems
        print(f"sinklm convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {target} checkpoint: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
