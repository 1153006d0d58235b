"""The checkpoint layer's API on every format and on bad specs: resolve, describe, read, load, the
hub-name rule, the dtype vocabulary, ``convert`` with :class:`ExportSettings`, the training entry
points. Tiny folders made in process (the ``formats`` fixture); fast."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoints import (
    CheckpointError,
    ExportSettings,
    convert,
    describe,
    dtype_name,
    is_hub_name,
    load_init_for_training,
    load_model,
    parse_dtype,
    read_checkpoint,
    resolve,
    to_hf_model,
)
from pretrain.checkpoints.init_format import save_init_checkpoint
from pretrain.config import ConfigError, ModelConfig
from pretrain.convert import main
from pretrain.model import GPTNeoX

SINK_ID = 50277


@pytest.mark.parametrize(
    "key, fmt, tag",
    [("run", "deepspeed", "global_step2"), ("tag", "deepspeed", "global_step1"), ("init", "init", None),
     ("export", "hf", None), ("stock", "hf", None)],
)  # fmt: skip
def test_every_format_resolves_describes_and_loads(key, fmt, tag, formats):
    """Prevents: a format the layer detects differently in resolve, describe and load, a DeepSpeed tag
    other than `latest` / the named folder, or a load without a tokenizer."""
    spec = formats[key]
    resolved = resolve(spec)
    assert (resolved.format, resolved.tag, resolved.path, resolved.name) == (fmt, tag, spec, spec.name)
    info = describe(spec)
    sinks = [] if key == "stock" else [SINK_ID]
    assert (info.format, info.sink_token_ids, info.variant, info.remote_code) == (fmt, sinks, "sink1" if sinks else "vanilla", False)
    assert info.config_file is not None and info.config_file.is_file()
    assert (info.model_config is None) == (fmt == "hf") and (info.model_type == "gpt_neox") == (fmt == "hf")
    loaded = load_model(spec)
    assert loaded.config.sink_token_ids == sinks and not loaded.model.training
    assert loaded.tokenizer is not None  # the init checkpoint names none: the bundled one with the sinks
    assert loaded.tokenizer.convert_tokens_to_ids("<|sink|>") == SINK_ID if sinks else True


def test_formats_hold_the_same_model(formats):
    """Prevents: a run tag, its initial checkpoint and the HF export of the same weights loading as
    different models, and to_hf_model disagreeing with our model."""
    ids = torch.randint(0, 50277, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [load_model(formats[k]).model(ids).logits for k in ("run", "tag", "init", "export")]
        ckpt = read_checkpoint(formats["init"])
        hf = to_hf_model(ckpt.config, ckpt.state)(ids).logits
    assert all(torch.equal(logits[0], other) for other in logits[1:])
    torch.testing.assert_close(hf, logits[0], rtol=1e-5, atol=1e-5)
    assert read_checkpoint(formats["run"], tag="global_step1").step == 1
    bf16 = load_model(formats["init"], dtype="bf16", device="cpu").model
    assert bf16.embed.weight.dtype == torch.bfloat16


def test_to_hf_model_runs_softmax1(tmp_path):
    """Prevents: to_hf_model building stock softmax attention for a softmax1 model."""
    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64, attention="softmax1")
    torch.manual_seed(0)
    ours = GPTNeoX(cfg).eval()
    hf = to_hf_model(cfg, ours.state_dict())
    ids = torch.randint(0, 50277, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    assert type(hf).__name__ == "SinkLMGPTNeoXForCausalLM"


def _one_line_naming(err: Exception, name: str) -> str:
    text = str(err)
    assert "\n" not in text and name in text, text
    return text


def test_bad_specs_are_one_line_errors_naming_the_path(formats, tmp_path):
    """Prevents: tracebacks, multi-line hub errors or messages without the path for the mistakes users
    make: a missing folder, a file, a folder that is no checkpoint, an unknown tag, options that do
    not apply, a hub name while offline."""
    missing = tmp_path / "missing"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "file.bin").write_text("x")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("model: {}\n")
    cases = [
        (missing, {}, "checkpoint not found"),
        (tmp_path / "file.bin", {}, "is a file"),
        (tmp_path / "notes", {}, "is not a checkpoint"),
        (tmp_path / "fresh", {}, "nothing saved yet"),
        (formats["run"], {"tag": "global_step9"}, "available tags: ['global_step1', 'global_step2']"),
        (formats["export"], {"tag": "global_step1"}, "only applies to a DeepSpeed run"),
        (formats["init"], {"revision": "main"}, "only applies to a Hugging Face hub name"),
    ]
    for spec, kwargs, message in cases:
        for call in (resolve, describe, load_model):
            with pytest.raises(CheckpointError) as info:
                call(spec, **kwargs)
            assert message in _one_line_naming(info.value, str(spec)), (call.__name__, spec)
    # a hub name (tests are offline: HF_HUB_OFFLINE=1), with or without a revision
    for kwargs in ({}, {"revision": "step1000"}):
        for call in (resolve, describe, load_model):
            with pytest.raises(CheckpointError) as info:
                call("nobody-here/no-such-model", **kwargs)
            assert "Hugging Face hub failed" in _one_line_naming(info.value, "nobody-here/no-such-model")


def test_no_latest_lists_the_tags(formats, tmp_path):
    """Prevents: a run folder whose `latest` is gone picking a tag silently."""
    import shutil

    run = shutil.copytree(formats["run"], tmp_path / "run")
    (run / "latest").unlink()
    with pytest.raises(CheckpointError) as info:
        resolve(run)
    assert "no 'latest' file" in _one_line_naming(info.value, str(run)) and "global_step2" in str(info.value)
    assert resolve(run, tag="global_step2").tag == "global_step2"


def test_describe_refuses_untrusted_remote_code(formats, tmp_path):
    """Prevents: describe accepting a softmax1 export when remote code is not allowed, or a sink
    token the tokenizer has but config.json does not declare."""
    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64, attention="softmax1")
    init = save_init_checkpoint(tmp_path / "init", cfg, GPTNeoX(cfg).state_dict())
    export = convert(init, tmp_path / "export", ExportSettings())
    assert describe(export).remote_code and describe(export, trust_remote_code=True).variant == "softmax1"
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        describe(export, trust_remote_code=False)
    config = json.loads((formats["export"] / "config.json").read_text())
    del config["sinklm"]
    (tmp_path / "undeclared").mkdir()
    (tmp_path / "undeclared" / "config.json").write_text(json.dumps(config))
    (tmp_path / "undeclared" / "tokenizer.json").write_bytes((formats["export"] / "tokenizer.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"sink tokens at ids \[50277\]"):
        describe(tmp_path / "undeclared")


def test_hub_name_rule(tmp_path, monkeypatch):
    """Prevents: a local path (or a typo under an existing local folder) being fetched from the hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "real").mkdir(parents=True)
    assert is_hub_name("EleutherAI/pythia-160m") and is_hub_name("owner/model.v2")
    for spec in ("runs/real", "runs/typo", "./a/b", "/abs/path", "~/x", "a/b/c", "plain", "-x/y"):
        assert not is_hub_name(spec), spec


def test_dtype_vocabulary(formats, tmp_path):
    """Prevents: fp32/float32, bf16/bfloat16, fp16/float16 meaning different things in different tools."""
    for names, dtype in ((("fp32", "float32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16), (("fp16", "float16"), torch.float16)):
        assert all(parse_dtype(n) == dtype and dtype_name(n) == names[1] for n in names)
        assert parse_dtype(dtype) == dtype
    with pytest.raises(CheckpointError, match="'float8'.*fp32"):
        parse_dtype("float8")
    out = convert(formats["init"], tmp_path / "bf16", ExportSettings(dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(formats["init"]), str(tmp_path / "fp16"), "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(CheckpointError, match="always fp32"):
        convert(formats["export"], tmp_path / "init", ExportSettings(to="init", dtype="bf16"))


def test_load_init_for_training(formats):
    """Prevents: train.init_from starting from another architecture or from a folder that is no
    initial checkpoint."""
    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64, sink_tokens=1)
    state = load_init_for_training(formats["init"], cfg)
    GPTNeoX(cfg).load_state_dict(state, strict=True)
    with pytest.raises(ConfigError, match="sink_tokens: checkpoint 1 vs config 0"):
        load_init_for_training(formats["init"], ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64))
    with pytest.raises(ConfigError, match="is not an initial checkpoint"):
        load_init_for_training(formats["export"], cfg)


def test_resolve_needs_no_weights(formats, tmp_path):
    """Prevents: describe reading weights (it must work on a folder whose weights are unreadable)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((formats["export"] / name).read_bytes())
    (folder / "model.safetensors").write_text("not weights")
    assert describe(folder).variant == "sink1"
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(folder)
    assert "truncated or corrupt" in _one_line_naming(info.value, str(folder / "model.safetensors"))
