"""Hugging Face folders <-> initial checkpoints: bit-identical round trips, legacy Pythia files,
shards, sink tokens for a released model, dtypes, and load_model agreeing across formats."""

from __future__ import annotations

import json

import torch

from ckpt_testing import hf_tensors
from pretrain.checkpoints import load_model, read_checkpoint
from pretrain.checkpoints.init_format import load_init_checkpoint
from pretrain.convert import main
from pretrain.model import GPTNeoX


def test_stock_hf_round_trip_is_bit_identical(stock_hf, tmp_path):
    """Prevents: any lossy step (dtype, renaming, transposes, dropped tensors, changed shape fields)
    between a Hugging Face GPT-NeoX folder, our initial checkpoint and the export back."""
    assert main([str(stock_hf), str(tmp_path / "init")]) == 0  # HF source defaults to --to init
    assert main([str(tmp_path / "init"), str(tmp_path / "back")]) == 0
    original, back = hf_tensors(stock_hf), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(original[k].dtype == back[k].dtype and torch.equal(original[k], back[k]) for k in original)
    a, b = (json.loads((p / "config.json").read_text()) for p in (stock_hf, tmp_path / "back"))
    shape_keys = [
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "layer_norm_eps", "use_parallel_residual", "tie_word_embeddings", "hidden_act",
        "rope_parameters", "bos_token_id",
    ]  # fmt: skip
    assert {k: a.get(k) for k in shape_keys} == {k: b.get(k) for k in shape_keys}


def test_legacy_pythia_folder_fp16_bin(stock_hf, tmp_path):
    """Prevents: failing on the files a Pythia download really has (transformers 4 config with
    rotary_pct/rope_scaling null, fp16 pytorch_model.bin with attention.bias/masked_bias and
    rotary inv_freq buffers) or losing precision converting it and back."""
    legacy = tmp_path / "pythia-legacy"
    legacy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (legacy / name).write_bytes((stock_hf / name).read_bytes())
    config = json.loads((stock_hf / "config.json").read_text())
    for key in ("rope_parameters", "dtype"):
        config.pop(key, None)
    config.update(rotary_pct=0.25, rotary_emb_base=10000, rope_scaling=None, torch_dtype="float16", classifier_dropout=0.1)
    (legacy / "config.json").write_text(json.dumps(config))
    weights = {k: v.half() for k, v in hf_tensors(stock_hf).items()}
    for i in range(2):
        weights[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(1)
    torch.save(weights, legacy / "pytorch_model.bin")
    assert main([str(legacy), str(tmp_path / "init")]) == 0
    assert main([str(tmp_path / "init"), str(tmp_path / "back"), "--dtype", "fp16"]) == 0
    back = hf_tensors(tmp_path / "back")
    assert all(torch.equal(back[k], weights[k]) for k in back) and len(back) == len(weights) - 6
    assert read_checkpoint(legacy).config.name == "pythia-legacy"


def test_sharded_export_loads_and_round_trips(stock_hf, tmp_path):
    """Prevents: shards or an index that transformers cannot read, or a sharded folder our reader
    cannot convert back."""
    from transformers import AutoModelForCausalLM

    assert main([str(stock_hf), str(tmp_path / "sharded"), "--to", "hf", "--max-shard-size", "2MB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert hf_tensors(tmp_path / "sharded").keys() == hf_tensors(stock_hf).keys()
    ids = torch.randint(0, 50277, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(stock_hf).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()(ids).logits
    assert torch.equal(a, b)
    assert main([str(tmp_path / "sharded"), str(tmp_path / "init")]) == 0
    assert load_init_checkpoint(tmp_path / "init")[0].num_layers == 2


def test_add_sink_token_to_a_released_model(stock_hf, tmp_path):
    """Prevents: sink rows initialised from garbage (Pythia's padding rows are untrained), other
    weights touched, or an initial checkpoint that ``sinklm train`` cannot load with k sinks."""
    out = tmp_path / "init-sink"
    assert main([str(stock_hf), str(out), "--add-sink-tokens", "2", "--attention", "sink_logit", "--sink-logit-init", "0.5"]) == 0
    cfg, state = load_init_checkpoint(out)
    assert (cfg.sink_tokens, cfg.attention, cfg.variant) == (2, "sink_logit", "sink_logit+sink2")
    before = read_checkpoint(stock_hf).state
    mean = before["embed.weight"][: cfg.vocab_size].mean(0)
    assert torch.allclose(state["embed.weight"][cfg.sink_token_ids], mean.expand(2, -1))
    others = [i for i in range(cfg.padded_vocab_size) if i not in cfg.sink_token_ids]
    assert torch.equal(state["embed.weight"][others], before["embed.weight"][others])
    assert all(torch.equal(state[k], v) for k, v in before.items() if k != "embed.weight")
    assert all(torch.equal(state[f"blocks.{i}.attn.sink_logit"], torch.full((4,), 0.5)) for i in range(2))
    model = GPTNeoX(cfg)
    model.load_state_dict(state, strict=True)  # what train.init_from does
    # a vanilla switch (softmax) with the sinks keeps the text logits of the released model exactly
    assert main([str(stock_hf), str(tmp_path / "sink1"), "--add-sink-tokens", "1"]) == 0
    sink_model = load_model(tmp_path / "sink1").model
    plain = load_model(stock_hf).model
    ids = torch.randint(0, 50277, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(sink_model(ids).logits, plain(ids).logits)


def test_dtype_choice(stock_hf, tmp_path):
    """Prevents: --dtype being ignored or mislabelled in config.json."""
    from transformers import AutoModelForCausalLM

    for flag, dtype, name in (("bf16", torch.bfloat16, "bfloat16"), ("fp16", torch.float16, "float16")):
        out = tmp_path / flag
        assert main([str(stock_hf), str(out), "--to", "hf", "--dtype", flag]) == 0
        assert {t.dtype for t in hf_tensors(out).values()} == {dtype}
        assert json.loads((out / "config.json").read_text())["dtype"] == name
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == dtype
        assert load_model(out).model.embed.weight.dtype == torch.float32  # load_model's dtype argument decides


def test_load_model_sources_agree(stock_hf, tmp_path):
    """Prevents: load_model giving different models for the same weights in different formats, or
    losing the tokenizer of a HF folder."""
    assert main([str(stock_hf), str(tmp_path / "init")]) == 0
    assert main([str(tmp_path / "init"), str(tmp_path / "export")]) == 0
    ids = torch.randint(0, 50277, (2, 10), generator=torch.Generator().manual_seed(1))
    loaded = [load_model(p) for p in (stock_hf, tmp_path / "init", tmp_path / "export")]
    with torch.no_grad():
        logits = [m.model(ids).logits for m in loaded]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    # the HF folder's own tokenizer travels through the initial checkpoint
    assert all(m.tokenizer is not None for m in loaded) and (tmp_path / "init" / "tokenizer.json").is_file()
    assert not loaded[0].model.training
    # and the HF GPT-NeoX reference agrees with our model on these weights
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(stock_hf).eval()(ids).logits
    assert (hf_logits - logits[0]).abs().max().item() <= 1e-5
    half = load_model(tmp_path / "export", dtype=torch.bfloat16).model
    assert half.lm_head.weight.dtype == torch.bfloat16




def test_softmax1_export_loads_without_a_prompt(tmp_path):
    """Prevents: loading a softmax1/sink_logit export (compare, zeroshot, stream-ppl, the experiment) stopping
    at transformers' "Do you wish to run the custom code? [y/N]" prompt: its tokenizer needs no modelling
    code, and a non-interactive run (CI, the experiment) must never wait on the terminal."""
    import subprocess
    import sys

    from pretrain.checkpoints import ExportSettings, convert
    from pretrain.checkpoints.init_format import save_init_checkpoint
    from pretrain.config import ModelConfig
    from pretrain.model import GPTNeoX

    cfg = ModelConfig.from_preset("tiny", attention="softmax1")
    init = save_init_checkpoint(tmp_path / "init", cfg, GPTNeoX(cfg).state_dict())
    export = convert(init, tmp_path / "export", ExportSettings(to="hf"))

    # a fresh process: in this one an earlier import may have registered the bundled config class already
    code = f"from pretrain.checkpoints import load_model; print(load_model({str(export)!r}).config.attention)"
    result = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "custom code" not in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "softmax1"
