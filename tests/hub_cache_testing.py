"""A hand-made Hugging Face hub cache, read offline, for any test package: ``from hub_cache_testing
import build_hub_cache, use_hub_cache`` (tests/ is on sys.path through tests/conftest.py).

The layout is the hub client's own (``models--owner--name/refs/<revision>`` holding a commit,
``snapshots/<commit>/`` the files), so ``owner/name@revision`` resolves through the real hub
client with ``HF_HUB_OFFLINE`` and no network."""

from __future__ import annotations

from pathlib import Path

import torch


def build_hub_cache(cache: Path, hub: str, commits: dict[str, str], max_seq_len: int = 64) -> Path:
    """Write revision -> commit of hub model ``hub`` (``owner/name``) into the HF cache ``cache``:
    a tiny stock GPT-NeoX (hidden 32) per revision, each initialised from its own seed (so every
    revision has different weights), with the bundled tokenizer. Returns ``cache``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.tokenizer import load_tokenizer
    from pretrain.config import ModelConfig
    from pretrain.hf_keymap import to_hf_config

    repo = Path(cache) / f"models--{hub.replace('/', '--')}"
    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=max_seq_len)
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    for seed, (revision, commit) in enumerate(commits.items()):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(hf_cfg)
        model.save_pretrained(repo / "snapshots" / commit)
        load_tokenizer(None).save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return Path(cache)


def use_hub_cache(monkeypatch, cache: Path) -> Path:
    """Point the hub client at ``cache``, offline, for the rest of the test (``monkeypatch``: a
    pytest ``MonkeyPatch``, also a module-scoped ``pytest.MonkeyPatch.context()``)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
