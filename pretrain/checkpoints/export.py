"""Write checkpoints: a shareable Hugging Face folder, an initial checkpoint, an in-memory HF model.

A Hugging Face export holds GPT-NeoX ``config.json`` with a ``sinklm`` field, safetensors sharded
above ``max_shard_size``, the tokenizer with the sink tokens and a post-processor that prepends them,
``generation_config.json`` and a model card; softmax1/sink_logit exports also carry the bundled
modelling code (:mod:`pretrain.hf_export`, see :mod:`pretrain.checkpoints.hf_config`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pretrain.checkpoints.dtypes import parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.hf_config import hf_config_dict, sinklm_record
from pretrain.checkpoints.init_format import save_init_checkpoint
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
) -> Path:
    """Write a Hugging Face folder for ``ckpt`` (see the module docstring); returns the folder."""
    cfg = ckpt.config
    dtype = parse_dtype(dtype)
    tok = tokenizer if tokenizer is not None else load_tokenizer_for(ckpt)
    with _output_folder(out, overwrite) as tmp:
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


def check_output_folder(out: str | Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


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
