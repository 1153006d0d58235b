"""`sinklm experiment`: the quickstart, shrunk to a few steps, end to end through the real tools."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data.settings import ConfigError, load_yaml
from sinklm.experiment import load_experiment, main

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "quickstart.yaml"


def _shrunk(report: Path) -> list[str]:
    return [
        f"report_dir={report}",
        "prepare.max_docs=3",
        "prepare.workers=1",
        "prepare.progress=false",
        "train_overrides=[train.max_steps=6, train.eval_every=3, train.eval_batches=2, checkpoint.every=3, logging.log_every=2, logging.progress_bar=false]",
        "compare.cache_size=32",
        "compare.max_tokens=600",
        "compare.dense_max_tokens=300",
        "compare.recompute_max_tokens=80",
        "compare.chunk_size=128",
        "compare.sink_inputs=4",
        "compare.map_inputs=4",
        "compare.progress=false",
        "zeroshot.tasks=[arc_easy]",
        "zeroshot.limit=4",
    ]


@pytest.fixture(scope="module")
def quickstart_report(tmp_path_factory):
    report = tmp_path_factory.mktemp("exp") / "quickstart"
    assert main([str(QUICKSTART), *_shrunk(report)]) == 0
    return report


@pytest.mark.slow
def test_quickstart_produces_every_report_file(quickstart_report):
    """Prevents: a report that silently lacks a stage's output (plots, tables, exports)."""
    r = quickstart_report
    for variant in ("vanilla", "softmax1", "sink1"):
        assert (r / "runs" / variant / "latest").is_file()
        assert (r / "runs" / variant / "metrics.jsonl").is_file()
        assert (r / "exports" / variant / "config.json").is_file()
        assert (r / "plots" / f"loss_{variant}.png").is_file()
    for rel in ["index.md", "plots/loss_curves.png", "compare/table.md", "compare/table.csv", "compare/ppl_curves.png",
                "compare/sinks.json", "compare/summary.json", "zeroshot/table.md", "zeroshot/table.csv"]:
        assert (r / rel).is_file(), rel
    assert list((r / "compare").glob("attention_*.png"))
    index = (r / "index.md").read_text()
    for heading in ["## Summary", "## What ran", "## Streaming perplexity", "## Attention sinks", "## Zero-shot accuracy"]:
        assert heading in index
    assert "hardware:" in index and "Stage times" in index
    # the table in the report is compare's own table, verbatim
    assert (r / "compare" / "table.md").read_text().strip() in index


@pytest.mark.slow
def test_report_tables_equal_the_individual_commands(quickstart_report, tmp_path):
    """Prevents: the report computing its numbers differently from `sinklm compare`."""
    from inference.compare import main as compare_main

    r = quickstart_report
    args = [f"{v}={r / 'exports' / v}" for v in ("vanilla", "softmax1", "sink1")]
    args += ["--output-dir", str(tmp_path / "cmp"), "--cache-size", "32", "--start-sizes", "0,1,2,4", "--max-tokens", "600",
             "--dense-max-tokens", "300", "--recompute-max-tokens", "80", "--chunk-size", "128",
             "--sink-inputs", "4", "--map-inputs", "4", "--no-progress"]
    assert compare_main(args) == 0
    ours = list(csv.DictReader(open(r / "compare" / "table.csv")))
    direct = list(csv.DictReader(open(tmp_path / "cmp" / "table.csv")))
    assert ours == direct
    sinks = json.loads((r / "compare" / "sinks.json").read_text())
    index = (r / "index.md").read_text()
    for name, metric in sinks.items():
        assert f"| {name} | {metric['sink_rate']:.1%} |" in index


@pytest.mark.slow
def test_report_tables_equal_direct_api_calls(quickstart_report, tmp_path):
    """Prevents: the experiment's in-process stages drifting from the Python APIs a user calls
    (the experiment passes its typed settings straight to run_compare / run_zeroshot)."""
    from inference.compare import CompareSettings, run_compare
    from inference.zeroshot import ZeroShotSettings, run_zeroshot

    r = quickstart_report
    models = {v: str(r / "exports" / v) for v in ("vanilla", "softmax1", "sink1")}
    settings = CompareSettings(cache_size=32, max_tokens=600, dense_max_tokens=300, recompute_max_tokens=80, chunk_size=128,
                               sink_inputs=4, map_inputs=4, progress=False)
    result = run_compare(models, settings, output_dir=tmp_path / "cmp")
    for name in ("table.csv", "sinks.csv", "table.md"):
        assert (tmp_path / "cmp" / name).read_text() == (r / "compare" / name).read_text(), name
    assert result.to_csv() == (r / "compare" / "table.csv").read_text()
    run_zeroshot(models, ZeroShotSettings(tasks=["arc_easy"], limit=4, trust_remote_code=True), tmp_path / "zs")
    assert (tmp_path / "zs" / "table.md").read_text() == (r / "zeroshot" / "table.md").read_text()


@pytest.mark.slow
def test_report_leads_with_like_for_like_table_and_shows_sink_curves(quickstart_report):
    """Prevents Table 3 putting dense (a short prefix) and recompute (a shorter one) beside streaming
    columns over the whole text as if comparable: the like-for-like table (compare's same-tokens
    table, verbatim) comes first and the full-length one is labelled; and the probe's curves of
    every variant are in one figure, from each run's probe records."""
    from inference.compare_report import CompareResult, same_tokens_table

    index = (quickstart_report / "index.md").read_text()
    table3 = index[index.index("## Streaming perplexity"):]
    like = "\n".join(same_tokens_table(CompareResult.load(quickstart_report / "compare"))).strip()
    assert like and table3.index("### Like for like") < table3.index(like) < table3.index("### Full length")
    assert "## Attention sinks during training" in index and (quickstart_report / "plots" / "sinks_curves.png").is_file()
    for variant in ("vanilla", "softmax1", "sink1"):
        probes = [json.loads(line) for line in (quickstart_report / "runs" / variant / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "probe"' in line]
        assert [r["step"] for r in probes] == [6]  # probe.every: null -> the default interval, and after the last step
        assert (quickstart_report / "plots" / f"sinks_{variant}.png").is_file()
        assert f"| {variant} | 6 | {probes[0]['sink_rate']:.1%} |" in index


@pytest.mark.slow
def test_rerun_skips_finished_stages(quickstart_report, capsys):
    """Prevents: a re-run redoing hours of training instead of resuming finished stages."""
    assert main([str(QUICKSTART), *_shrunk(quickstart_report)]) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "train-vanilla", "export-sink1", "compare", "zeroshot"):
        assert f"{stage}: done earlier" in out


def test_bad_experiment_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment:\n  variants: {vanilla: quickstart-vanilla.yaml}\n  compare: {cache_sise: 4}\n")
    with pytest.raises(ConfigError, match="compare.cache_sise"):
        load_experiment(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("experiment:\n  variants: {vanilla: nowhere.yaml}\n")
    with pytest.raises(ConfigError, match="variants.vanilla: training config not found: nowhere.yaml"):
        load_experiment(missing)
    assert main([str(missing)]) == 2


def test_every_shipped_experiment_config_loads(tmp_path, monkeypatch):
    """Prevents: a shipped experiment (paper-160m, gpu-day-70m, pythia-160m-continue...) failing on a
    cluster only after its data is prepared because a key or a variant file is wrong, its trained
    variants seeing different text, a trained variant running without the sink probe (issue 15; the
    paper configs had ``probe.every: 0``, which is off), or a checkpoint arm that is not the model it is
    named after. Hub checkpoint arms resolve in a hand-made offline cache holding those revisions."""
    from hub_cache_testing import build_hub_cache, use_hub_cache

    from pretrain.checkpoints import describe
    from pretrain.checkpoints.resolve import split_revision
    from pretrain.train_config import resolve_config

    experiments = [p for p in QUICKSTART.parent.glob("*.yaml") if "\nexperiment:" in "\n" + p.read_text()]
    assert {p.stem for p in experiments} >= {"quickstart", "paper-160m", "gpu-day-70m", "pythia-160m-continue"}
    hub_arms = {}
    for path in experiments:
        for value in load_yaml(path)["experiment"]["variants"].values():
            if isinstance(value, dict) and "@" in value.get("checkpoint", ""):
                name, revision = split_revision(value["checkpoint"])
                hub_arms.setdefault(name, {})[revision] = f"{len(hub_arms):040d}"
    for name, revisions in hub_arms.items():
        build_hub_cache(tmp_path, name, revisions)
    use_hub_cache(monkeypatch, tmp_path)
    for path in experiments:
        cfg, base = load_experiment(path)
        runs = {name: resolve_config([str(base / cfg.variants[name].config)], []) for name in cfg.trained}
        assert runs, path.name
        for name, run in runs.items():
            assert run.model.variant == name, (path.name, name, run.model.variant)
            assert run.probe.interval(available=True) > 0, (path.name, name, run.probe.every)
        for name, spec in cfg.checkpoints.items():
            assert describe(spec).variant == name, (path.name, name)
        assert len({(run.text_tokens, run.data.seed, run.train.max_steps) for run in runs.values()}) == 1, path.name
    assert hub_arms == {"EleutherAI/pythia-160m-deduped": {"step101000": "0" * 40}}
    continued = load_experiment(QUICKSTART.parent / "pythia-160m-continue.yaml")[0]
    sink1 = resolve_config([str(QUICKSTART.parent / continued.variants["sink1"].config)], [])
    assert continued.checkpoints["vanilla"] == f"EleutherAI/pythia-160m-deduped@step{sink1.train.max_steps}"
    assert sink1.train.max_steps - sink1.data.start_step == 1000
