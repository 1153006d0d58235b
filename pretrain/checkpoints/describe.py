"""What a checkpoint is, without reading its weights: format, attention kind, sink token ids,
variant, whether loading its folder with transformers needs the bundled (remote) code.

Refuses what cannot be run faithfully: a softmax1/sink_logit folder that would load as stock
GPT-NeoX, remote code that was not allowed, sink tokens that config.json and tokenizer disagree on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.tokenizer import is_sink_token
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.hf_config import read_config_json, sinklm_field
from pretrain.checkpoints.read import model_config_of
from pretrain.checkpoints.init_format import CONFIG_FILE as INIT_CONFIG_FILE
from pretrain.checkpoints.resolve import RUN_CONFIG_FILE, ResolvedCheckpoint, resolve
from pretrain.config import ModelConfig


@dataclass
class CheckpointInfo:
    """A checkpoint described from its config files alone."""

    format: str
    """``deepspeed``, ``init`` or ``hf``."""
    path: Path
    """The local folder (a hub model's snapshot of its config and tokenizer files)."""
    name: str
    """The folder's own name (a hub model's last part)."""
    hub_name: str | None = None
    """``owner/name`` when the spec was a hub model (load it by that name)."""
    config_file: Path | None = None
    """The config file the description comes from (``config.json``, ``config.yaml`` or ``model.yaml``)."""
    attention: str = "softmax"
    sink_token_ids: list[int] = field(default_factory=list)
    variant: str = "vanilla"
    remote_code: bool = False
    """Loading the folder with transformers runs the modelling code bundled in it."""
    model_type: str | None = None
    """``config.json``'s model_type (Hugging Face folders only)."""
    model_config: ModelConfig | None = None
    """The sinklm ModelConfig (DeepSpeed runs and initial checkpoints; None for Hugging Face folders)."""
    resolved: ResolvedCheckpoint | None = None


def variant_of_hf_config(config: dict[str, Any], where: str, trust_remote_code: bool) -> tuple[str, list[int], str, bool]:
    """(attention, sink ids, variant, needs remote code) from a ``config.json`` mapping, or refuse.

    Our exports carry a ``sinklm`` field; a folder without one is an ordinary model (vanilla).
    """
    attention, ids, variant = sinklm_field(config, where)
    remote_code = attention != "softmax"
    if remote_code:
        model_type = config.get("model_type")
        if model_type == "gpt_neox" or not config.get("auto_map"):
            raise CheckpointError(
                f"{where}: sinklm.attention is {attention!r} but the folder would load as stock "
                f"{model_type!r} (model_type / auto_map), which runs plain softmax attention; refusing to "
                f"evaluate it as vanilla. Re-export it with `sinklm convert`."
            )
        if not trust_remote_code:
            raise CheckpointError(
                f"{where}: a {attention} model runs through the modelling code bundled in its folder; "
                f"rerun with --trust-remote-code to allow that code"
            )
    return attention, ids, variant, remote_code


def check_tokenizer_sinks(folder: Path, sink_ids: list[int]) -> None:
    """A folder whose tokenizer has sink tokens must declare exactly those ids as the model's sinks:
    otherwise config.json and tokenizer disagree on what the model was trained with."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return
    try:
        added = json.loads(file.read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not readable JSON ({err})") from None
    tokenizer_sinks = sorted(t["id"] for t in added if isinstance(t, dict) and is_sink_token(str(t.get("content"))))
    if tokenizer_sinks and tokenizer_sinks != sorted(sink_ids):
        raise CheckpointError(
            f"{folder}: the tokenizer has sink tokens at ids {tokenizer_sinks} but config.json declares sink "
            f"token ids {sink_ids} (field sinklm.sink_token_ids); refusing to guess which the model was trained with"
        )


def describe(
    spec: str | Path, revision: str | None = None, tag: str | None = None, trust_remote_code: bool = True
) -> CheckpointInfo:
    """Describe any checkpoint spec without reading weights (a hub model: config and tokenizer files
    only); a variant that cannot be run faithfully is a :class:`CheckpointError`, and so is one that
    needs its bundled modelling code when ``trust_remote_code`` is False (the default only reports it)."""
    resolved = resolve(spec, revision=revision, tag=tag, weights=False)
    if resolved.format != "hf":
        cfg = model_config_of(resolved)
        file = resolved.run_dir / RUN_CONFIG_FILE if resolved.run_dir else resolved.path / INIT_CONFIG_FILE
        return CheckpointInfo(
            resolved.format, resolved.path, resolved.name, config_file=file, attention=cfg.attention,
            sink_token_ids=cfg.sink_token_ids, variant=cfg.variant, model_config=cfg, resolved=resolved,
        )  # fmt: skip
    file = resolved.path / "config.json"
    config = read_config_json(file)
    where = f"{resolved.hub_name} config.json" if resolved.hub_name else str(file)
    attention, ids, variant, remote = variant_of_hf_config(config, where, trust_remote_code)
    check_tokenizer_sinks(resolved.path, ids)
    return CheckpointInfo(
        "hf", resolved.path, resolved.name, resolved.hub_name, file, attention, ids, variant, remote,
        model_type=config.get("model_type"), resolved=resolved,
    )  # fmt: skip
