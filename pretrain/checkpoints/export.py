"""Write checkpoints: a shareable Hugging Face folder, an initial checkpoint, an in-memory HF model.

A Hugging Face export holds GPT-NeoX ``config.json`` with a ``sinklm`` field, safetensors sharded
above ``max_shard_size``, the tokenizer with the sink tokens and a post-processor that prepends them,
``generation_config.json`` and a model card; softmax1/sink_logit exports also carry the bundled
modelling code (:mod:`pretrain.hf_export`, see :mod:`pretrain.checkpoints.hf_config`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data.outputs import building, check_output_folder
from pretrain.checkpoints.dtypes import parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.hf_config import hf_config_dict, read_config_json, sinklm_record
from pretrain.checkpoints.init_format import CONFIG_FILE as INIT_CONFIG_FILE
from pretrain.checkpoints.init_format import is_init_checkpoint, save_init_checkpoint
from pretrain.checkpoints.load import load_tokenizer_for
from pretrain.checkpoints.model_card import model_card
from pretrain.checkpoints.read import Checkpoint
from pretrain.config import ModelConfig
from pretrain.hf_export import FILES, SOURCE_DIR
from pretrain.hf_keymap import load_into_hf_model, to_hf_config, to_hf_state_dict


def export_hf(
    ckpt: Checkpoint,
    out: str | Path,
    dtype: str | torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    tokenizer: Any | None = None,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write a Hugging Face folder for ``ckpt`` (see the module docstring); returns the folder."""
    cfg = ckpt.config
    dtype = parse_dtype(dtype)
    tok = tokenizer if tokenizer is not None else load_tokenizer_for(ckpt)
    with _output_folder(out, overwrite, inputs) as tmp:
        hf_state = to_hf_state_dict({k: v.to(dtype) for k, v in ckpt.state.items()})
        _write_safetensors(hf_state, tmp, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
        if cfg.attention != "softmax":
            for name in FILES:
                shutil.copyfile(SOURCE_DIR / name, tmp / name)
        tok.save_pretrained(str(tmp))
        generation = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(ckpt, dtype))
    return Path(out)


def export_init(
    ckpt: Checkpoint, out: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = (), source: dict[str, Any] | None = None
) -> Path:
    """Write an initial checkpoint (fp32, our names) for ``train.init_from``, ``source`` recorded in its
    metadata (:mod:`pretrain.checkpoints.init_format`). When the source names a tokenizer (e.g. a HF
    folder's own), its files go along, so converting back keeps it."""
    tok = load_tokenizer_for(ckpt) if ckpt.tokenizer_spec is not None else None
    with _output_folder(out, overwrite, inputs) as tmp:
        state = {k: v.to(torch.float32) for k, v in tqdm(ckpt.state.items(), desc="fp32", leave=False)}
        save_init_checkpoint(tmp, ckpt.config, state, source)
        if tok is not None:
            tok.save_pretrained(str(tmp))
    return Path(out)


def to_hf_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> Any:
    """An in-memory transformers model (eval mode) with our weights: stock GPT-NeoX for softmax
    attention, the bundled export code (imported from the package, so no remote code is involved)
    for softmax1 / sink_logit."""
    hf_config = to_hf_config(config)
    if config.attention == "softmax":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config))
    else:
        from pretrain.hf_export.configuration_sinklm import SinkLMGPTNeoXConfig
        from pretrain.hf_export.modeling_sinklm import SinkLMGPTNeoXForCausalLM

        fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
        model = SinkLMGPTNeoXForCausalLM(SinkLMGPTNeoXConfig(**fields, sinklm=sinklm_record(config)))
    load_into_hf_model(model, to_hf_state_dict(state))
    return model.eval()


def _write_safetensors(hf_state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    try:
        split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    except ValueError as err:
        raise CheckpointError(f"--max-shard-size {max_shard_size!r}: {err}") from None
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


EXPORT_KIND = "export (Hugging Face folder or initial checkpoint)"
# every name an export writes (tokenizer files vary with the transformers version, hence the patterns)
_EXPORT_NAMES = re.compile(
    r"config\.json|generation_config\.json|README\.md|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
    r"|tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\.json|merges\.txt"
    rf"|{re.escape(INIT_CONFIG_FILE)}"
)


def recognise_export(folder: Path) -> list[str]:
    """Entries of ``folder`` an export of ours does not write (all of them unless it is one of our exports)."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        ours = is_init_checkpoint(folder) or "sinklm" in read_config_json(folder / "config.json")
    except CheckpointError:
        ours = False
    if not ours:
        return names
    return [n for n in names if not ((folder / n).is_file() and (_EXPORT_NAMES.fullmatch(n) or n in FILES))]


def check_export_folder(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an output that is not absent, empty or (with ``overwrite``) an earlier export, or that overlaps the source."""
    check_output_folder(out, overwrite, EXPORT_KIND, recognise_export, inputs)


def _output_folder(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()):
    """Build the export in a temporary sibling folder, swapped in at the end (:mod:`data.outputs`)."""
    return building(out, overwrite, EXPORT_KIND, recognise_export, inputs)
