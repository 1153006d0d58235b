"""DeepSpeed run folders -> Hugging Face exports for every variant: logits of the training engine,
tags, export contents, the stock loader's refusal, tokenizer, generate, byte-identical round trips.

DeepSpeed checkpoints are real: ``make_ds_runs.py`` trains tiny models for two steps under
``torchrun`` with 2 CPU ranks (gloo) at ZeRO 0, 1 and 3 and records the engine's own logits.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ckpt_testing import REMOTE, RUNS, TEXT, hf_load, run_name, variant
from pretrain.checkpoints import load_model, read_checkpoint
from pretrain.convert import main
from pretrain.model import GPTNeoX

# --------------------------------------------------------------------------------------------
# DeepSpeed -> HF: logits of the training engine
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("spec", RUNS)
def test_deepspeed_export_reproduces_training_logits(spec, ds_runs, exports):
    """Prevents: a ZeRO consolidation, key-map or kernel error that makes the exported model (stock
    GPT-NeoX for vanilla/sink tokens, bundled code for softmax1/sink_logit) predict differently from
    the model that was trained; and load_model on the run disagreeing with both."""
    name = run_name(spec)
    kind = variant(name)
    reference = torch.load(ds_runs / name / "reference.pt")
    hf = hf_load(exports[name], remote=kind in REMOTE)
    expected_class = "SinkLMGPTNeoXForCausalLM" if kind in REMOTE else "GPTNeoXForCausalLM"
    assert type(hf).__name__ == expected_class
    with torch.no_grad():
        hf_logits = hf(reference["input_ids"]).logits
        ours = load_model(ds_runs / name)
        ours_logits = ours.model(reference["input_ids"]).logits
    assert (hf_logits - reference["logits"]).abs().max().item() <= 1e-5
    assert (ours_logits - reference["logits"]).abs().max().item() <= 1e-5
    assert ours.config.variant == json.loads((exports[name] / "config.json").read_text())["sinklm"]["variant"]
    assert ours.tokenizer is not None and "ZeRO-" + spec[0] in ours.source


@pytest.mark.slow
def test_tag_selection(ds_runs):
    """Prevents: --tag / a global_stepN path picking another checkpoint than asked."""
    run = ds_runs / "zero3-sink1"
    by_latest, by_tag, by_path = load_model(run), load_model(run, tag="global_step2"), load_model(run / "global_step2")
    for other in (by_tag, by_path):
        assert all(torch.equal(a, b) for a, b in zip(by_latest.model.state_dict().values(), other.model.state_dict().values()))
    assert "tag global_step2" in by_path.source


@pytest.mark.slow
def test_export_folder_contents(exports):
    """Prevents: an export missing the pieces a user needs (tokenizer, generation config, model card
    naming the variant and training config, bundled code only where needed)."""
    for name, folder in exports.items():
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
        remote = variant(name) in REMOTE
        assert ({"modeling_sinklm.py", "configuration_sinklm.py"} <= files) == remote
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == ("sinklm_gpt_neox" if remote else "gpt_neox")
        assert ("auto_map" in config) == remote
        card = (folder / "README.md").read_text()
        assert config["sinklm"]["variant"] in card and "zero_optimization" in card
        assert "trust_remote_code=True" in card if remote else "trust_remote_code" not in card
    # the bundled code must stand alone: it may not import sinklm's packages
    code = (exports["zero3-softmax1"] / "modeling_sinklm.py").read_text()
    assert "import pretrain" not in code and "from pretrain" not in code and "sinklm." not in code


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3-softmax1", "zero1-sink_logit"])
def test_stock_loader_refuses_softmax1_and_sink_logit(name, exports):
    """Prevents: a softmax1/sink_logit export silently loading as a vanilla GPT-NeoX."""
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM, pipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(exports[name])
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("text-generation", model=str(exports[name]))
    # forcing the stock class anyway: transformers warns that the model type is not gpt_neox
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    logging.getLogger("transformers").addHandler(handler)
    try:
        GPTNeoXForCausalLM.from_pretrained(exports[name])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert any("sinklm_gpt_neox" in r.getMessage() and r.levelno >= logging.WARNING for r in records)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --------------------------------------------------------------------------------------------
# tokenizer and generate
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1-vanilla", "zero3-sink1", "zero1-sink2"])
def test_exported_tokenizer_prepends_sinks_like_training(name, exports, prepared_corpus):
    """Prevents: an exported tokenizer that drops, duplicates or misplaces the sink tokens, so that
    inference sees inputs the model was never trained on."""
    from transformers import AutoTokenizer

    from data.loader import SampleLoader
    from data.tokenizer import load_tokenizer

    cfg = read_checkpoint(exports[name]).config
    tok = AutoTokenizer.from_pretrained(exports[name])
    text_ids = load_tokenizer(None).encode(TEXT, add_special_tokens=False)
    assert tok(TEXT).input_ids == cfg.sink_token_ids + text_ids
    assert tok.convert_ids_to_tokens(cfg.sink_token_ids) == (["<|sink|>"] if cfg.sink_tokens == 1 else [f"<|sink_{i}|>" for i in range(cfg.sink_tokens)])
    # training samples start with the same ids (the loader prepends them itself)
    sample = next(iter(SampleLoader(prepared_corpus, "train", 32, 2, sink_ids=cfg.sink_token_ids)))
    assert sample["input_ids"][:, : cfg.sink_tokens].tolist() == [cfg.sink_token_ids] * 2
    assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) == TEXT


def _greedy_reference(model: GPTNeoX, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache) with our model."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3-softmax1", "zero1-sink_logit", "zero3-sink1"])
def test_generate_on_export_matches_our_model(name, ds_runs, exports):
    """Prevents: a broken KV cache in the bundled modelling code (wrong positions or masks during
    incremental decoding) and padding that leaks into attention in batched generation."""
    from transformers import AutoTokenizer

    folder = exports[name]
    hf = hf_load(folder, remote=variant(name) in REMOTE)
    tok = AutoTokenizer.from_pretrained(folder)
    ours = load_model(ds_runs / name).model
    enc = tok(TEXT, return_tensors="pt")
    out = hf.generate(**enc, max_new_tokens=12, do_sample=False)
    assert out[0].tolist() == _greedy_reference(ours, enc["input_ids"], 12)
    # a left-padded batch generates what each prompt generates alone
    short = "Call me Ishmael."
    tok.padding_side = "left"
    batch = tok([TEXT, short], return_tensors="pt", padding=True)
    outs = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    alone = hf.generate(**tok(short, return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert outs[1, -6:].tolist() == alone[0, -6:].tolist()



@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1-sink2", "zero3-sink_logit"])
def test_export_round_trip_is_byte_identical(name, exports, tmp_path):
    """Prevents: information lost when an export goes through an initial checkpoint and back
    (sink tokens, sink logits, attention kind, config fields): the files must be byte-identical."""
    assert main([str(exports[name]), str(tmp_path / "init")]) == 0
    assert main([str(tmp_path / "init"), str(tmp_path / "back")]) == 0
    for file in ("config.json", "model.safetensors"):
        assert (exports[name] / file).read_bytes() == (tmp_path / "back" / file).read_bytes(), file


