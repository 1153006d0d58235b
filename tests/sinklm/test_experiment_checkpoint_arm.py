"""`sinklm experiment` with a variant that is an existing checkpoint (``checkpoint: owner/name@revision``,
e.g. EleutherAI's released Pythia as the vanilla arm) next to a trained one, end to end offline: the
hub is a hand-made Hugging Face cache (tests/hub_cache_testing.py) holding two revisions of a tiny
GPT-NeoX, the data the session's prepared excerpt of the bundled books."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
from hub_cache_testing import build_hub_cache, use_hub_cache

from sinklm.experiment import checkpoint_record, describe_checkpoint, load_experiment, main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
HUB = "test-owner/tiny-pythia"
COMMITS = {"step1": "1" * 40, "step2": "2" * 40}
COMPARE = {"cache_size": 32, "max_tokens": 256, "dense_max_tokens": 128, "recompute_max_tokens": 40, "chunk_size": 128,
           "sink_inputs": 4, "map_inputs": 4, "progress": False}  # fmt: skip
ZEROSHOT = {"tasks": ["arc_easy"], "limit": 4}


def _experiment(folder: Path, data: Path, vanilla: str) -> Path:
    """One trained variant (the quickstart's sink1, 3 steps) and the checkpoint ``vanilla``."""
    text = f"""experiment:
  name: one trained variant, one existing checkpoint
  report_dir: {folder / 'report'}
  data_path: {data}
  prepare: {{enabled: false}}
  variants:
    sink1: {EXPERIMENTS / 'quickstart-sink1.yaml'}
    vanilla: {{checkpoint: {vanilla}}}
  train_overrides: [train.max_steps=3, train.eval_every=3, train.eval_batches=1, checkpoint.every=3, logging.log_every=1,
                    logging.progress_bar=false]
  compare: {json.dumps(COMPARE)}
  zeroshot: {json.dumps(ZEROSHOT)}
"""
    path = folder / "experiment.yaml"
    path.write_text(text)
    return path


def _run(config: Path, *overrides: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(config), *overrides]) == 0
    print(out.getvalue())
    return out.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = build_hub_cache(tmp_path_factory.mktemp("hf_cache"), HUB, COMMITS, max_seq_len=256)
    with pytest.MonkeyPatch.context() as patch:
        yield use_hub_cache(patch, cache)


@pytest.fixture(scope="module")
def experiment(hub, prepared_corpus, tmp_path_factory):
    """(experiment file, report folder, stdout) after one run."""
    config = _experiment(tmp_path_factory.mktemp("checkpoint_arm"), prepared_corpus, f"{HUB}@step2")
    out = _run(config)
    return config, config.parent / "report", out


@pytest.mark.slow
def test_checkpoint_variant_is_evaluated_not_trained(experiment):
    """Prevents the released vanilla arm costing a training run (or an export, or an ETA share of
    training), and prevents it missing from the comparison, the zero-shot table or the report,
    or appearing there without where it came from (hub name, revision, the commit it resolved to)."""
    config, report, out = experiment
    assert sorted(p.name for p in (report / "runs").iterdir()) == ["sink1"]
    assert sorted(p.name for p in (report / "exports").iterdir()) == ["sink1"]
    assert sorted(p.stem for p in (report / "stages").glob("*.json")) == ["compare", "export-sink1", "train-sink1", "zeroshot"]
    assert "train-vanilla" not in out and "export-vanilla" not in out
    assert re.findall(r"starting \[\d+/(\d+)", out) == ["4"] * 4  # the plan: train, export (sink1), compare, zeroshot
    rows = {row["model"]: row for row in csv.DictReader(open(report / "compare" / "table.csv"))}
    assert list(rows) == ["sink1", "vanilla"]
    index = (report / "index.md").read_text()
    assert f"| vanilla | `{HUB}@step2` | Hugging Face hub `{HUB}` | step2 (commit `{'2' * 12}`) | vanilla, attention=softmax, sink_tokens=0 |" in index
    assert (report / "zeroshot" / "table.md").read_text().strip() in index
    assert "| vanilla | vanilla |" in (report / "zeroshot" / "table.md").read_text()


@pytest.mark.slow
def test_checkpoint_variant_numbers_equal_direct_api_calls(experiment, tmp_path):
    """Prevents the experiment evaluating the checkpoint variant differently from a user's own
    `run_compare` / `run_zeroshot` call on ``owner/name@revision`` (another revision, dtype, text or
    settings): its perplexities, sink metric and accuracies are the same numbers."""
    from inference.compare import CompareSettings, run_compare
    from inference.compare_report import CompareResult
    from inference.zeroshot import ZeroShotSettings, run_zeroshot

    _, report, _ = experiment
    direct = run_compare({"vanilla": f"{HUB}@step2"}, CompareSettings(**COMPARE), output_dir=tmp_path / "cmp")
    ours = CompareResult.load(report / "compare")
    assert direct.table["vanilla"] == ours.table["vanilla"]
    assert direct.sinks["vanilla"].sink_rate == ours.sinks["vanilla"].sink_rate
    ours_csv = [r for r in csv.DictReader(open(report / "compare" / "table.csv")) if r["model"] == "vanilla"]
    assert ours_csv == list(csv.DictReader(open(tmp_path / "cmp" / "table.csv")))
    run_zeroshot({"vanilla": f"{HUB}@step2"}, ZeroShotSettings(**ZEROSHOT, trust_remote_code=True), tmp_path / "zs")
    row = next(line for line in (tmp_path / "zs" / "table.md").read_text().splitlines() if line.startswith("| vanilla |"))
    assert row in (report / "zeroshot" / "table.md").read_text().splitlines()


@pytest.mark.slow
def test_changing_the_revision_redoes_evaluation_not_training(experiment):
    """Prevents a stale comparison when the checkpoint variant names another revision (the stage
    keys hold the resolved commit), and a retraining of the trained variant for it. Runs last: it
    moves the module's report to step1 (without the zero-shot stage, to save its time)."""
    config, report, _ = experiment
    before = {r["model"]: r for r in csv.DictReader(open(report / "compare" / "table.csv"))}
    out = _run(config, f"variants.vanilla.checkpoint={HUB}@step1", "zeroshot.enabled=false")
    for stage in ("train-sink1", "export-sink1"):
        assert f"{stage}: done earlier" in out
    assert "compare: starting" in out
    after = {r["model"]: r for r in csv.DictReader(open(report / "compare" / "table.csv"))}
    assert after["sink1"] == before["sink1"] and after["vanilla"] != before["vanilla"]
    assert f"step1 (commit `{'1' * 12}`)" in (report / "index.md").read_text()


def test_local_checkpoint_folders_resolve_through_the_checkpoint_layer(hub, tmp_path):
    """Prevents a second resolver for local checkpoint variants: a Hugging Face folder and a run
    folder of `sinklm train` (its ``latest`` tag) are described by the checkpoint layer, and what
    identifies their weights (the files of the folder, or of the tag) enters the stage keys."""
    from ckpt_layouts import tiny_checkpoints

    folders = tiny_checkpoints(tmp_path / "ckpts")
    snapshot = hub / f"models--{HUB.replace('/', '--')}" / "snapshots" / COMMITS["step1"]
    config = tmp_path / "local.yaml"
    config.write_text(f"experiment:\n  variants:\n    sink1: {{checkpoint: {folders['run']}}}\n    vanilla: {{checkpoint: {snapshot}}}\n")
    cfg, _ = load_experiment(config)
    assert cfg.trained == [] and list(cfg.checkpoints) == ["sink1", "vanilla"]
    run = checkpoint_record(cfg.checkpoints["sink1"], describe_checkpoint(cfg, "sink1"))
    assert (run["format"], run["variant"], run["sink_tokens"], Path(run["path"]).name) == ("deepspeed", "sink1", 1, "global_step2")
    assert "mp_rank_00_model_states.pt" in [name for name, _, _ in run["files"]]
    hf = checkpoint_record(cfg.checkpoints["vanilla"], describe_checkpoint(cfg, "vanilla"))
    assert (hf["format"], hf["variant"], hf["path"]) == ("hf", "vanilla", str(snapshot.resolve()))
    (folders["run"] / "latest").write_text("global_step1")
    moved = checkpoint_record(cfg.checkpoints["sink1"], describe_checkpoint(cfg, "sink1"))
    assert Path(moved["path"]).name == "global_step1" and moved != run


def test_known_hub_model_at_a_revision_not_in_the_cache_is_one_line(hub, tmp_path, capsys):
    """Prevents an offline run falling back to another revision of a model it has (or failing after
    training): a revision missing from the cache is one line naming the file, the key and the revision."""
    config = tmp_path / "exp.yaml"
    config.write_text(f"experiment:\n  report_dir: {tmp_path / 'report'}\n  variants:\n    vanilla: {{checkpoint: {HUB}@step3}}\n")
    assert main([str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{config}: experiment.variants.vanilla.checkpoint: checkpoint {HUB} at revision step3" in lines[0]
    assert not (tmp_path / "report").exists()
