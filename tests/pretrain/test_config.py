"""Config validation: every bad value names its field."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, ModelConfig


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_heads": 5}, "model.num_heads"),
        ({"rotary_pct": 0.0}, "model.rotary_pct"),
        ({"rotary_pct": 1.5}, "model.rotary_pct"),
        ({"attention": "softmax2"}, "model.attention"),
        ({"sink_tokens": 28}, "model.sink_tokens"),
        ({"sink_tokens": -1}, "model.sink_tokens"),
        ({"hidden_sise": 64}, "model.hidden_sise"),
        ({"num_layers": "six"}, "model.num_layers"),
        ({"use_parallel_residual": "yes"}, "model.use_parallel_residual"),
    ],
)
def test_bad_model_config_names_field(overrides, field):
    data = {"vocab_size": 50277, "num_layers": 2, "hidden_size": 64, "num_heads": 4, **overrides}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(data)


def test_sink_tokens_fill_the_padding_exactly():
    """50,277 padded to 50,304 leaves 27 spare rows: 27 sinks fit, 28 do not."""
    cfg = ModelConfig.from_dict({"sink_tokens": 27})
    assert cfg.sink_token_ids == list(range(50277, 50304))


def test_presets_load_and_unknown_preset_lists_available():
    for name in ["tiny", "14m", "pythia-31m", "pythia-70m", "160m", "410m"]:
        ModelConfig.from_preset(name)
    with pytest.raises(ConfigError, match="available: .*pythia-14m"):
        ModelConfig.from_preset("pythia-7b")


def test_variant_names():
    assert ModelConfig(attention="softmax").variant == "vanilla"
    assert ModelConfig(attention="softmax1").variant == "softmax1"
    assert ModelConfig(sink_tokens=1).variant == "sink1"
    assert ModelConfig(sink_tokens=2).variant == "sink2"
