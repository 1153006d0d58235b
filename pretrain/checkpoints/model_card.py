"""The ``README.md`` model card of a Hugging Face export."""

from __future__ import annotations

import torch
import yaml

from pretrain.checkpoints.dtypes import dtype_name
from pretrain.checkpoints.hf_config import REMOTE_MODEL_TYPE
from pretrain.checkpoints.read import Checkpoint

_KERNELS = {
    "softmax": "vanilla softmax attention",
    "softmax1": "softmax1 (softmax-off-by-one: an implicit extra key with logit 0 and value 0)",
    "sink_logit": "sink_logit (a learnable per-head logit b_h in the softmax denominator)",
}


def model_card(ckpt: Checkpoint, dtype: torch.dtype) -> str:
    cfg = ckpt.config
    remote = cfg.attention != "softmax"
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if remote else ")")
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
        f"- attention kernel: {_KERNELS[cfg.attention]}",
        f"- sink tokens: {sinks}",
        f"- shape: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"{cfg.num_params():,} parameters, context {cfg.max_seq_len}",
        f"- weights: {dtype_name(dtype)}; converted from {ckpt.source}"
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
