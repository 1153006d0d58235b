"""Streaming under accelerate's big-model placement: a ``device_map`` that offloads some decoder layers to
disk installs accelerate's hooks on the model's modules (weights on "meta", loaded and moved at each forward)
the same way a split across GPUs does, so on a CPU this checks what a multi-GPU split needs of the streaming
code: inputs sent where the embedding runs, the cache's keys kept per layer wherever it runs, sink keys
re-rotated on their own layer, logits scored where the head put them, and every block-driven call
(MPT / Falcon) going through the modules so their hooks fire."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)

from inference.backends import as_backend

VOCAB = 96
LAYERS = 3


def _falcon(**layout) -> FalconForCausalLM:
    return FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                          **layout))


# (model, its layer-list prefix, the modules on the CPU besides layer 0: embedding, rotary, head when tied)
FAMILIES = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS,
                                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)),
              "model.layers", ["model.embed_tokens", "model.rotary_emb", "model.norm"]),
    "falcon-new": (lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), "transformer.h",
                   ["transformer.word_embeddings", "transformer.rotary_emb", "transformer.ln_f", "lm_head"]),
    "falcon-alibi": (lambda: _falcon(alibi=True, new_decoder_architecture=False), "transformer.h",
                     ["transformer.word_embeddings", "transformer.rotary_emb", "transformer.ln_f", "lm_head"]),
    "mpt": (lambda: MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=64, n_layers=LAYERS, n_heads=4, max_seq_len=64)),
            "transformer.blocks", ["transformer.wte", "transformer.norm_f", "lm_head"]),
}


@pytest.fixture(scope="module", params=[(name, where) for name in FAMILIES for where in ("split", "all-on-disk")],
                ids=lambda param: "-".join(param))
def placed(request, tmp_path_factory):
    """(name, plain model, the same weights loaded with layers 1.. (and Llama's head) offloaded to disk, or
    with everything on disk, the embedding too)."""
    name, where = request.param
    make, layers, on_cpu = FAMILIES[name]
    torch.manual_seed(0)
    model = make()
    for p in model.parameters():  # attention far from uniform, so a wrong placement shows
        p.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("offload") / name
    model.save_pretrained(folder)
    if where == "split":
        device_map = {module: "cpu" for module in on_cpu} | {f"{layers}.0": "cpu"}
        device_map |= {f"{layers}.{i}": "disk" for i in range(1, LAYERS)}
        device_map.setdefault("lm_head", "disk")
    else:
        device_map = {"": "disk"}
    mapped = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=folder / "offload").eval()
    blocks = mapped.get_submodule(layers)
    assert {p.device.type for p in blocks[0].parameters()} == {"cpu" if where == "split" else "meta"}
    assert {p.device.type for p in blocks[LAYERS - 1].parameters()} == {"meta"}  # only accelerate's hooks can run it
    return name, AutoModelForCausalLM.from_pretrained(folder).eval(), mapped


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_offloaded_layers_stream_the_plain_models_numbers(placed, mode):
    """The chunked path and the per-token HFSinkCache across the eviction point (start 2, window 8, 40 tokens):
    inputs sent to a "meta" device, logits scored on the wrong device, or a block called around its hook
    (weights never loaded) fail or change the NLL."""
    name, plain, mapped = placed
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    expected = as_backend(name, plain).streaming_nll(ids, 2, 8, mode, chunk_size=7)
    torch.testing.assert_close(as_backend(name, mapped).streaming_nll(ids, 2, 8, mode, chunk_size=7), expected,
                               atol=1e-5, rtol=1e-5)
