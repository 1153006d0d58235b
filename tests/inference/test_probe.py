"""The training probe: the same numbers as compare and stream-ppl, and the right numbers on models
whose attention is known by construction."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from data.corpora import stream_test_text
from inference import stream_ppl
from inference.backends import load_backend
from inference.compare import CompareSettings, run_compare
from inference.perplexity import perplexity, streaming_nll
from inference.probe import streaming_probe
from inference.stream import TextSettings
from pretrain.checkpoints import Checkpoint, export_hf, load_model
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX
from pretrain.train_config import ProbeConfig

CACHE, TOKENS = 32, 300


def _tiny(sink_tokens: int = 0, attention: str = "softmax", std: float = 0.3) -> GPTNeoX:
    config = ModelConfig.from_preset("tiny", sink_tokens=sink_tokens, attention=attention, num_layers=2,
                                     init_method="normal", init_std=std)
    torch.manual_seed(0)
    return GPTNeoX(config).eval()


def _probe(**kw) -> ProbeConfig:
    return ProbeConfig(**{"every": 10, "start_size": 4, "recent_size": CACHE - 4, "num_tokens": TOKENS, "sink_inputs": 16, **kw})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint (an HF export of a tiny 1-sink-token model with random weights and heads of
    graded sink strength) and a text file; ``ids`` is that text as stream-ppl and compare tokenize it."""
    root = tmp_path_factory.mktemp("probe")
    model = _sink_heads([10.0, 0.25, 0.15, 0.0], std=0.05)
    folder = export_hf(Checkpoint(config=model.config, state=model.state_dict(), format="init", source="test"), root / "ckpt")
    text = root / "moby.txt"
    text.write_text(stream_test_text()[:3000])
    ids, _ = load_backend(folder).tokenize_stream(TextSettings(text=str(text), max_tokens=TOKENS))
    return folder, text, ids


def test_probe_sink_metric_equals_compares(exported):
    """The probe must report compare's sink metric (same inputs, same code), and its eviction
    perplexities must be compare's table cells, for the same checkpoint and text; a probe that
    sampled its own inputs or streamed differently would drift from the report."""
    folder, _, ids = exported
    settings = CompareSettings(cache_size=CACHE, start_sizes=[0, 1, 4], baselines=[], sink_inputs=16, map_inputs=2, progress=False)
    compared = run_compare({"m": str(folder)}, settings, ids=ids)
    got = streaming_probe(load_model(folder).model.eval(), ids, _probe())
    sinks = compared.sinks["m"]
    assert 0.0 < sinks.sink_rate < 1.0  # a number that could differ
    assert got["sink_rate"] == sinks.sink_rate
    for layer, heads in enumerate(sinks.first_key_score):
        assert got[f"first_key_attn_L{layer}"] == pytest.approx(sum(heads) / len(heads), rel=1e-12)
    for start in (0, 1, 4):
        assert got[f"ppl_{start}+{CACHE - start}"] == pytest.approx(compared.table["m"][f"{start}+{CACHE - start}"], rel=1e-12)


def test_eviction_gap_equals_stream_ppl(exported, tmp_path):
    """ppl at 0+W, 1+(W-1), 4+(W-4) must be what `sinklm stream-ppl` prints for those caches."""
    folder, text, ids = exported
    got = streaming_probe(load_model(folder).model.eval(), ids, _probe())
    for start in (0, 1, 4):
        out = tmp_path / f"s{start}"
        argv = [str(folder), "--start-size", str(start), "--cache-size", str(CACHE), "--text", str(text),
                "--max-tokens", str(TOKENS), "--output-dir", str(out), "--no-progress"]
        assert stream_ppl.main(argv) == 0
        reported = json.loads((out / "summary.json").read_text())["results"][0]["ppl"]
        assert got[f"ppl_{start}+{CACHE - start}"] == pytest.approx(reported, rel=1e-12)
    assert got["eviction_gap"] == pytest.approx(got[f"ppl_0+{CACHE}"] / got[f"ppl_4+{CACHE - 4}"] - 1, rel=1e-12)
    assert got["cache_size"] == CACHE


@pytest.mark.parametrize("sink_tokens,start_size", [(0, 4), (1, 1)])
def test_probe_loss_is_the_mean_streaming_nll(sink_tokens, start_size):
    """``loss``/``ppl`` stay what the probe logged before: streaming_nll's mean under the probe's own
    start_size + recent_size cache, with exp(loss) as ppl."""
    model = _tiny(sink_tokens)
    ids = torch.randint(0, 50277, (200,), generator=torch.Generator().manual_seed(1))
    got = streaming_probe(model, ids, _probe(start_size=start_size, recent_size=40, eviction_starts=[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = float(streaming_nll(model, ids, start_size, 40, mode="fast", progress=False).double().mean())
    assert got["loss"] == want and got["ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    assert (got["start_size"], got["recent_size"]) == (start_size, 40)
    assert got["ppl_0+" + str(start_size + 40)] == perplexity(
        streaming_nll(model, ids, 0, start_size + 40, mode="fast", progress=False))


def _sink_heads(strengths: list[float], std: float = 0.0, sink_tokens: int = 1, attention: str = "softmax") -> GPTNeoX:
    """A sink-token model whose head h puts attention on key 0 with logit ~14 * strengths[h]
    against ~0 for every other key, by construction: the sink token's embedding is [1, -1, 0, ...]
    (LayerNorm makes it +-sqrt(C/2)); queries get a constant ``strengths[h]`` along a head dim that
    RoPE leaves alone, and only the sink's key has a component there. With ``std == 0`` every other
    weight is zero (attention outputs and MLPs too, so every layer sees the embeddings): strength 10
    means all attention on key 0 in every layer, strength 0 uniform attention (every score 0);
    ``std > 0`` adds random weights of that size."""
    model = _tiny(sink_tokens=sink_tokens, attention=attention, std=max(std, 1e-3))
    cfg = model.config
    D, free = cfg.head_dim, cfg.head_dim - 1  # the last head dim is not rotated
    assert cfg.rotary_ndims <= free
    with torch.no_grad():
        if std == 0.0:
            for p in model.parameters():
                p.zero_()
            for ln in [model.ln_f, *(m for b in model.blocks for m in (b.ln_attn, b.ln_mlp))]:
                ln.weight.fill_(1.0)
        model.embed.weight[cfg.sink_token_ids[0], :2] = torch.tensor([1.0, -1.0])
        for block in model.blocks:
            for h, strength in enumerate(strengths):
                block.attn.qkv.bias[h * 3 * D + free] = strength  # q along `free`, for every token
                block.attn.qkv.weight[h * 3 * D + D + free, 0] = 10.0  # k = 10 * LN(x)[0]: large only for the sink
    return model


def test_first_key_taking_all_attention_gives_100_percent():
    """Provably all attention on key 0 -> sink metric 100%, first-key and sink-token mass 1."""
    model = _sink_heads([10.0] * 4)
    ids = torch.randint(0, 50277, (TOKENS,), generator=torch.Generator().manual_seed(3))
    got = streaming_probe(model, ids, _probe(start_size=1, recent_size=CACHE - 1))
    assert got["sink_rate"] == 1.0
    assert got["first_key_attn"] == pytest.approx(1.0, abs=1e-6)
    assert got["sink_token_attn"] == pytest.approx(1.0, abs=1e-6)
    assert "noop_attn" not in got


def test_uniform_attention_gives_0_percent_and_closed_form_masses():
    """Uniform attention (all scores 0): no sink head (first-key score H_64/64 ~ 0.074 < 0.3); a 2-sink-token model's
    mass on its sinks is mean_i min(2, i+1)/(i+1); softmax1's extra key (logit 0, like every real key
    here) takes mean_i 1/(i+2) -- a probe that read the wrong keys or renormalised would not match."""
    T = 64
    ids = torch.randint(0, 50277, (TOKENS,), generator=torch.Generator().manual_seed(4))
    got = streaming_probe(_sink_heads([0.0] * 4, sink_tokens=2), ids, _probe(start_size=2, recent_size=CACHE - 2))
    assert got["sink_rate"] == 0.0
    assert got["first_key_attn"] == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T, rel=1e-5)
    assert got["sink_token_attn"] == pytest.approx(sum(min(2, i + 1) / (i + 1) for i in range(T)) / T, rel=1e-5)
    noop = streaming_probe(_sink_heads([0.0] * 4, attention="softmax1"), ids, _probe())
    assert noop["sink_rate"] == 0.0
    assert noop["noop_attn"] == pytest.approx(sum(1 / (i + 2) for i in range(T)) / T, rel=1e-5)
    assert noop["noop_attn_L1"] == pytest.approx(noop["noop_attn_L0"], rel=1e-5)


def test_probe_is_silent_and_keeps_the_callers_mode():
    """A start_size that differs from the model's sink count is a deliberate probe setting: no warning;
    the caller owns train/eval mode (the probe does not switch it)."""
    model = _tiny(sink_tokens=1).train()
    ids = torch.randint(0, 50277, (120,), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = streaming_probe(model, ids, ProbeConfig(start_size=4, recent_size=28, sink_inputs=4))
    assert math.isfinite(out["loss"]) and model.training and torch.is_grad_enabled()


def test_bad_probe_settings_name_the_key():
    """Probe settings that cannot run (a start size outside the cache, sink inputs longer than the
    text read) must fail when the config is read, naming the key, not hours into training."""
    from pretrain.config import CONFIG_DIR, ConfigError
    from pretrain.train_config import resolve_config

    config = [CONFIG_DIR / "experiments" / "quickstart-vanilla.yaml"]
    with pytest.raises(ConfigError, match=r"probe.eviction_starts: each start size must be in 0..255 .* got 256"):
        resolve_config(config, ["probe.eviction_starts=[0,256]"])
    with pytest.raises(ConfigError, match="probe.num_tokens"):
        resolve_config(config, ["probe.num_tokens=32"])
    assert resolve_config(config, []).probe.interval(available=True) > 0  # on by default under `sinklm train`
    assert resolve_config(config, []).probe.interval(available=False) == 0  # off without a probe function
