"""Training config composition, optimizer groups and schedule, checkpoint pruning, metrics files.

Fast, single-process, no DeepSpeed engine: the multi-process runs are in test_train_runs.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.checkpoints.training import LATEST_FILE, STATE_FILE, check_same_shape, find_resume_point, prune_checkpoints
from pretrain.config import CONFIG_DIR, ConfigError, ModelConfig, load_yaml
from pretrain.metrics import plot_losses, read_metrics, truncate_metrics
from pretrain.model import GPTNeoX
from pretrain.distributed import deepspeed_config, gradient_accumulation_steps
from pretrain.optim import WarmupCosine, param_groups
from pretrain.train_config import OptimizerConfig, resolve_config

EXPERIMENTS = CONFIG_DIR / "experiments"


def test_every_shipped_experiment_resolves():
    """A shipped experiment file with a typo'd key or a broken `base` chain would only fail when a
    user launches it; resolve them all, and check the paper setup is the paper's."""
    # experiment-runner files (top-level `experiment:`) live here too; they are not training configs
    files = [p for p in sorted(EXPERIMENTS.glob("*.yaml")) if "experiment" not in load_yaml(p)]
    assert len(files) >= 9
    for path in files:
        run = resolve_config([path])
        assert run.sample_len <= run.model.max_seq_len
    paper = {v: resolve_config([EXPERIMENTS / f"paper-160m-{v}.yaml"]) for v in ("vanilla", "softmax1", "sink1", "sink2")}
    for variant, run in paper.items():
        assert run.model.name == "pythia-160m"
        assert (run.train.global_batch_size, run.seq_len, run.train.max_steps) == (256, 2048, 143000)
        assert run.optimizer.lr == 6e-4 and run.optimizer.betas == (0.9, 0.95) and run.optimizer.weight_decay == 0.1
        assert run.model.variant == variant
    # every variant trains on the same number of text tokens per sample (identical text)
    assert len({run.text_tokens for run in paper.values()}) == 1
    assert paper["sink2"].sample_len == 2048


def test_overrides_compose_over_files(tmp_path):
    """Dotted overrides must reach nested fields, parse YAML scalars, and model keys must merge
    onto the preset instead of replacing it."""
    run = resolve_config(
        [EXPERIMENTS / "quickstart-sink1.yaml"],
        ["train.max_steps=20", "optimizer.lr=3e-4", "model.num_layers=3", "optimizer.betas=[0.8, 0.9]", "wandb.tags=[a, b]"],
    )
    assert run.train.max_steps == 20 and run.optimizer.lr == 3e-4
    assert run.model.num_layers == 3 and run.model.hidden_size == 64 and run.model.sink_tokens == 1
    assert run.optimizer.betas == (0.8, 0.9) and run.wandb.tags == ["a", "b"]
    # a later file's model mapping merges; --model=<preset> swaps the preset but keeps the variant
    extra = tmp_path / "extra.yaml"
    extra.write_text("model: {attention: softmax1}\ntrain: {run_dir: elsewhere}\n")
    run = resolve_config([EXPERIMENTS / "quickstart-sink1.yaml", extra], ["model=pythia-14m"])
    assert (run.model.name, run.model.attention, run.model.sink_tokens) == ("pythia-14m", "softmax1", 1)
    assert run.train.run_dir == "elsewhere"


def test_resolved_config_round_trips(tmp_path):
    """The saved config.yaml (full model mapping, no preset) fed back must give the same run."""
    import yaml

    run = resolve_config([EXPERIMENTS / "quickstart-softmax1.yaml"], ["train.max_steps=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    again = resolve_config([saved])
    assert again.to_dict() == run.to_dict()
    assert ModelConfig.from_dict(again.to_dict()["model"]) == run.model


@pytest.mark.parametrize(
    "source, key",
    [
        ("train: {max_stepz: 3}", "train.max_stepz"),
        ("optimiser: {lr: 1.0}", "optimiser"),
        ("model: {preset: tiny, hidden_sise: 8}", "model.hidden_sise"),
        ("deepspeed: {config: zero1, stage: 2}", "deepspeed.stage"),
        ("train: {max_steps: many}", "train.max_steps"),
    ],
)
def test_unknown_or_bad_keys_are_named(tmp_path, source, key):
    """A misspelt key must fail loudly with its dotted path, never fall back to a default."""
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {EXPERIMENTS / 'quickstart-vanilla.yaml'}\n{source}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config([path])


def test_lr_defaults_to_pythia_and_custom_shapes_must_set_it(tmp_path):
    """Pythia's per-size peak lr is the default; an unknown shape must not get a silent guess."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: pythia-160m}\ndata: {path: somewhere}\n")
    assert resolve_config([path]).optimizer.lr == 6e-4
    assert resolve_config([path], ["model.preset=pythia-410m"]).optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="optimizer.lr"):
        resolve_config([path], ["model.name=my-shape"])


def test_circular_base_is_an_error(tmp_path):
    """`base` chains that loop would recurse forever."""
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        resolve_config([tmp_path / "a.yaml"])


def test_deepspeed_json_gets_batch_precision_and_clipping():
    """Batch sizes / clipping / precision in the DeepSpeed JSON must come from our config, and a
    global batch that does not split over the ranks must be refused."""
    run = resolve_config([EXPERIMENTS / "paper-160m-vanilla.yaml"], ["deepspeed.zero_stage=3"])
    ds = deepspeed_config(run, world_size=8, precision="bf16")
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    ds = deepspeed_config(run, world_size=1, precision="fp16")
    assert ds["gradient_accumulation_steps"] == 16 and ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    with pytest.raises(ConfigError, match="global_batch_size"):
        gradient_accumulation_steps(run, world_size=3)
    for stage in range(4):
        assert deepspeed_config(resolve_config([EXPERIMENTS / "quickstart-vanilla.yaml"], [f"deepspeed.config=zero{stage}"]), 1, "fp32")["zero_optimization"]["stage"] == stage


def test_no_weight_decay_on_biases_norms_and_sink_logits():
    """Pythia decays only matrices; decaying LayerNorm gains or the sink logit b_h would pull them
    towards 0 and change the model family being compared."""
    model = GPTNeoX(ModelConfig.from_preset("tiny", attention="sink_logit"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.sink_logit" in skipped and "blocks.1.ln_attn.weight" in skipped and "ln_f.bias" in skipped
    assert "blocks.0.attn.qkv.bias" in skipped
    assert decayed == {n for n, p in model.named_parameters() if p.ndim == 2}
    assert "embed.weight" in decayed and "lm_head.weight" in decayed
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_warmup_cosine_schedule_matches_pythia():
    """1% linear warm-up to the peak, cosine to 10% of the peak at the last step."""
    sched = WarmupCosine.from_config(OptimizerConfig(lr=6e-4), max_steps=143000)
    assert sched.warmup_steps == 1430
    assert sched(0) == pytest.approx(6e-4 / 1430)
    assert sched(1429) == pytest.approx(6e-4)
    assert sched(1430) == pytest.approx(6e-4)
    mid = 1430 + (143000 - 1430) // 2
    assert sched(mid) == pytest.approx(6e-4 * (0.1 + 0.9 * 0.5), rel=1e-4)
    assert sched(143000) == pytest.approx(6e-5)
    assert sched(10**6) == pytest.approx(6e-5)  # stays at the floor past decay_steps
    values = [sched(s) for s in range(1430, 143000, 997)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    folder = run_dir / f"global_step{step}"
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / "mp_rank_00_model_states.pt")  # a whole file: resume checks it is not truncated
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"step": step, "config": {"model": ModelConfig.from_preset("tiny").to_dict()}}))
    return folder


def test_prune_keeps_latest_and_in_progress_saves(tmp_path):
    """keep-last-K must never delete what `latest` names nor a newer folder (a save in progress),
    and must clear debris of killed saves older than `latest`."""
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 35, complete=False)  # a save that was killed, superseded by 40
    _fake_checkpoint(tmp_path, 50, complete=False)  # a save in progress
    (tmp_path / LATEST_FILE).write_text("global_step40")
    prune_checkpoints(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["global_step30", "global_step40", "global_step50"]
    point = find_resume_point(tmp_path)
    assert point is not None and point.step == 40
    assert find_resume_point(tmp_path / "global_step30").step == 30
    with pytest.raises(ConfigError, match="not a complete"):
        (tmp_path / LATEST_FILE).write_text("global_step50")
        find_resume_point(tmp_path)


def test_shape_check_names_the_differing_fields():
    """Loading weights of another architecture must fail with the fields that differ."""
    saved = ModelConfig.from_preset("tiny").to_dict()
    check_same_shape(saved, ModelConfig.from_dict({**saved, "name": "renamed", "init_std": 0.5}), "ckpt")
    with pytest.raises(ConfigError, match=r"hidden_size: checkpoint 64 vs config 128.*sink_tokens"):
        check_same_shape(saved, ModelConfig.from_preset("tiny", hidden_size=128, sink_tokens=1), "ckpt")


def test_metrics_truncate_and_plot(tmp_path):
    """A resumed run must drop the records its killed predecessor wrote past the checkpoint (else
    the curve has duplicate steps), survive a half-written last line, and plot to PNG."""
    lines = [json.dumps({"kind": "train", "step": s, "loss": 10 - 0.1 * s}) for s in range(1, 9)]
    lines.append(json.dumps({"kind": "val", "step": 4, "loss": 9.7}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')
    truncate_metrics(tmp_path, 5)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4]
    png = plot_losses(tmp_path, "test")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_is_a_pure_function_of_step():
    """Resume restores only the step count for the lr; the schedule must not carry hidden state."""
    sched = WarmupCosine(peak=1e-3, warmup_steps=3, decay_steps=10, min_ratio=0.1)
    first = [sched(s) for s in range(12)]
    assert [sched(s) for s in range(12)] == first
    assert max(first) == pytest.approx(1e-3) and first[-1] == pytest.approx(1e-4)
    assert not math.isnan(sum(first)) and torch.tensor(first).min() > 0
