"""``sinklm zeroshot``: bundled lm-eval tasks, sink-token contexts, numbers equal to lm-eval's own, errors.

Models are tiny GPT-NeoX exports built here with transformers (random weights, scaled up so that
choices get clearly different log-likelihoods) plus the bundled GPT-NeoX tokenizer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

TASK_ARGS = ["--tasks", "arc_easy,winogrande", "--limit", "4", "--device", "cpu", "--batch-size", "4"]
SINK_ID = 50277
# lm-eval's standard YAML of each bundled task (relative to lm_eval/tasks)
STANDARD_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
DATASET_FIELDS = {
    "task", "tag", "custom_dataset", "dataset_kwargs", "dataset_path", "dataset_name",
    "training_split", "validation_split", "test_split", "fewshot_split",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _zeroshot_cache(tmp_path_factory, monkeypatch):
    """Bundled archives are extracted into a cache folder of this test session, not the user's."""
    monkeypatch.setenv("SINKLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sinklm_cache"))


def _tiny_hf_model(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrain.config import ModelConfig
    from pretrain.hf_keymap import to_hf_config

    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**to_hf_config(config)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name and "layer_norm" not in name:
                param.normal_(0.0, 0.2)
    return config, model.eval()


def _write_export(folder: Path, model, tokenizer, sinklm: dict | None) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sinklm is not None:
        config = json.loads((folder / "config.json").read_text())
        config["sinklm"] = sinklm
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same tiny weights as: a vanilla HF export, a 1-sink-token export (tokenizer with the sink,
    prepended by its post-processor, like ``sinklm convert`` writes) and an initial checkpoint."""
    from data.tokenizer import load_tokenizer
    from pretrain.hf_keymap import from_hf_state_dict
    from pretrain.checkpoints.init_format import save_init_checkpoint

    root = tmp_path_factory.mktemp("zeroshot_models")
    config, model = _tiny_hf_model()
    vanilla_field = {"attention": "softmax", "sink_tokens": 0, "sink_token_ids": [], "variant": "vanilla"}
    vanilla = _write_export(root / "vanilla", model, load_tokenizer(), vanilla_field)
    sink_tok = load_tokenizer(num_sink_tokens=1, prepend_sinks=True)
    sink_field = {"attention": "softmax", "sink_tokens": 1, "sink_token_ids": [SINK_ID], "variant": "sink1"}
    sinks = _write_export(root / "sink1", model, sink_tok, sink_field)
    init = save_init_checkpoint(root / "init", config, from_hf_state_dict(model.state_dict()))
    return {"vanilla": vanilla, "sink1": sinks, "init": init}


def _direct_simple_evaluate(folder: Path, tasks: list[str], limit: int, batch_size: int = 4, model: str = "hf"):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from inference.lm_eval_tasks import TASKS_DIR

    return lm_eval.simple_evaluate(
        model=model,
        model_args={"pretrained": str(folder), "device": "cpu", "batch_size": batch_size},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=limit,
        log_samples=False,
    )


def test_tool_numbers_equal_direct_lm_eval(exports, tmp_path, capsys):
    """The tool must report exactly what lm-eval's own simple_evaluate gives for the same task config
    and limit (no altered prompts, metrics or model inputs for a vanilla model), and an initial
    checkpoint of the same weights (rebuilt in memory) must score the same as its HF export."""
    from inference.zeroshot import main

    out = tmp_path / "out"
    rc = main([f"hf={exports['vanilla']}", f"init={exports['init']}", "--out", str(out), *TASK_ARGS])
    assert rc == 0, capsys.readouterr().err
    rows = {row["model"]: row for row in csv.DictReader(open(out / "table.csv"))}
    direct = _direct_simple_evaluate(exports["vanilla"], ["sinklm_arc_easy", "sinklm_winogrande"], limit=4)["results"]
    expected = {
        "arc_easy/acc": direct["sinklm_arc_easy"]["acc,none"],
        "arc_easy/acc_norm": direct["sinklm_arc_easy"]["acc_norm,none"],
        "winogrande/acc": direct["sinklm_winogrande"]["acc,none"],
    }
    for name in ("hf", "init"):
        assert {k: float(rows[name][k]) for k in expected} == expected, name
    assert "winogrande/acc_norm" not in rows["hf"]  # lm-eval reports no acc_norm for Winogrande
    table = (out / "table.md").read_text()
    assert "| Model | Variant | ARC-e | Winogrande |" in table
    arc = f"{100 * expected['arc_easy/acc']:.1f} / {100 * expected['arc_easy/acc_norm']:.1f}"
    assert f"| hf | vanilla | {arc} |" in table
    raw = json.loads((out / "raw" / "hf.json").read_text())
    assert raw["results"]["sinklm_arc_easy"]["acc,none"] == expected["arc_easy/acc"]
    assert raw["sinklm"]["model"]["sink_token_ids"] == [] and raw["sinklm"]["limit"] == 4


def test_api_writes_what_the_cli_writes(exports, tmp_path, capsys):
    """run_zeroshot (the API the experiment calls) with typed settings and named models must write
    the same tables as the CLI given the same options as flags."""
    from inference.zeroshot import ZeroShotSettings, main, run_zeroshot

    settings = ZeroShotSettings(tasks=["winogrande"], limit=4.0, device="cpu", batch_size="4", dtype="fp32")
    assert (settings.limit, settings.batch_size, settings.dtype) == (4, 4, "float32")  # normalised once
    results = run_zeroshot({"hf": str(exports["vanilla"])}, settings, tmp_path / "api")
    assert [(r.source.name, r.source.kind) for r in results] == [("hf", "hf")]
    argv = [f"hf={exports['vanilla']}", "--tasks", "winogrande", "--limit", "4", "--device", "cpu", "--batch-size", "4"]
    assert main([*argv, "--dtype", "float32", "--out", str(tmp_path / "cli")]) == 0, capsys.readouterr().err
    for name in ("table.md", "table.csv"):
        assert (tmp_path / "api" / name).read_text() == (tmp_path / "cli" / name).read_text(), name


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"limit": 0}, "--limit must be positive"),
        ({"batch_size": "x"}, "--batch-size must be an int or 'auto'"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"dtype": "fp8"}, "--dtype: dtype 'fp8'"),
        ({"tasks": ["nope"]}, "unknown task 'nope'"),
    ],
)
def test_bad_settings_are_refused_when_built(fields, message):
    from inference.zeroshot import ZeroShotError, ZeroShotSettings

    with pytest.raises(ZeroShotError, match=message.replace("(", r"\(")):
        ZeroShotSettings(**fields)


@pytest.fixture(scope="module")
def our_checkpoints(exports, tmp_path_factory):
    """The tiny weights as a sink1 training-run folder (DeepSpeed ZeRO-0 layout: config.yaml, latest,
    global_step2/mp_rank_00_model_states.pt), and as a softmax1 initial checkpoint plus its export
    (written by ``sinklm convert``'s export_hf, with the bundled modelling code)."""
    import yaml

    from pretrain.config import ModelConfig
    from pretrain.checkpoints import export_hf, read_checkpoint
    from pretrain.hf_keymap import from_hf_state_dict
    from pretrain.checkpoints.init_format import save_init_checkpoint

    root = tmp_path_factory.mktemp("zeroshot_ours")
    _, model = _tiny_hf_model()
    state = from_hf_state_dict(model.state_dict())
    run = root / "run_sink1"
    (run / "global_step2").mkdir(parents=True)
    sink1 = ModelConfig.from_preset("tiny", sink_tokens=1)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": sink1.to_dict()}))
    module_states = {"module": state, "ds_config": {"zero_optimization": {"stage": 0}}, "dp_world_size": 1}
    torch.save(module_states, run / "global_step2" / "mp_rank_00_model_states.pt")
    (run / "latest").write_text("global_step2")
    softmax1_config = ModelConfig.from_preset("tiny", attention="softmax1")
    softmax1 = save_init_checkpoint(root / "init_softmax1", softmax1_config, state)
    export = export_hf(read_checkpoint(softmax1), root / "hf_softmax1")
    return {"run_sink1": run, "init_softmax1": softmax1, "hf_softmax1": export}


def test_checkpoints_score_like_their_exports(exports, our_checkpoints, tmp_path, capsys):
    """A training-run folder must be evaluated like its HF export (same sinks, same weights), and a
    softmax1 checkpoint rebuilt in memory like its export run through the bundled modelling code."""
    from inference.zeroshot import main, resolve_model

    out = tmp_path / "out"
    models = [f"{name}={path}" for name, path in [*our_checkpoints.items(), ("hf_sink1", exports["sink1"])]]
    rc = main([*models, "--trust-remote-code", "--out", str(out), "--tasks", "arc_easy", *TASK_ARGS[2:]])
    assert rc == 0, capsys.readouterr().err
    rows = {row.pop("model"): row for row in csv.DictReader(open(out / "table.csv"))}
    scores = {name: {k: v for k, v in row.items() if "/" in k} for name, row in rows.items()}
    assert (rows["run_sink1"]["variant"], rows["hf_softmax1"]["variant"]) == ("sink1", "softmax1")
    assert scores["run_sink1"] == scores["hf_sink1"]
    tag = resolve_model(str(our_checkpoints["run_sink1"] / "global_step2"))  # one tag of a run, picked directly
    assert (tag.kind, tag.variant, tag.sink_token_ids) == ("run", "sink1", [SINK_ID])
    assert scores["init_softmax1"] == scores["hf_softmax1"]


def test_softmax1_checkpoint_runs_its_own_kernel(our_checkpoints):
    """The model lm-eval runs for a softmax1 checkpoint must compute softmax1 attention (our model's
    logits), not stock GPT-NeoX softmax on the same weights."""
    from pretrain.checkpoints import load_model
    from inference.zeroshot import build_lm, resolve_model

    lm = build_lm(resolve_model(str(our_checkpoints["init_softmax1"])), device="cpu", batch_size=1)
    ours = load_model(our_checkpoints["init_softmax1"]).model
    _, stock = _tiny_hf_model()
    ids = torch.randint(0, 50277, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, vanilla = lm.model(ids).logits, ours(ids).logits, stock(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - vanilla).abs().max() > 1e-2


def _record_model_inputs(lm) -> list[list[int]]:
    rows: list[list[int]] = []

    def hook(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        rows.extend(ids.tolist())

    lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def test_sink_model_contexts_start_with_sink_id(exports):
    """A sink-token model must see its sink id first in EVERY request, followed by exactly the tokens
    lm-eval feeds a vanilla model (text encoded once: the export's tokenizer, which prepends sinks by
    itself, must not add a second one); forgetting it silently evaluates a different model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from inference.lm_eval_tasks import TASKS_DIR
    from inference.zeroshot import build_lm, resolve_model

    source = resolve_model(str(exports["sink1"]))
    assert (source.sink_token_ids, source.variant) == ([SINK_ID], "sink1")
    sink_lm = build_lm(source, device="cpu", batch_size=1)
    vanilla_lm = HFLM(pretrained=str(exports["vanilla"]), device="cpu", batch_size=1)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    inputs = {}
    for name, lm in (("sink", sink_lm), ("vanilla", vanilla_lm)):
        inputs[name] = _record_model_inputs(lm)
        lm_eval.simple_evaluate(model=lm, tasks=["sinklm_arc_easy"], task_manager=manager, limit=2, log_samples=False)
    assert inputs["sink"] and all(row[0] == SINK_ID and SINK_ID not in row[1:] for row in inputs["sink"])
    assert sorted(inputs["sink"]) == sorted([SINK_ID] + row for row in inputs["vanilla"])


def test_sink_survives_truncation_of_long_contexts(exports):
    """Contexts longer than the model's positions are left-truncated in the text, never in the sinks
    (HFLM's own truncation would cut the sink id off first)."""
    from inference.zeroshot import build_lm, resolve_model

    lm = build_lm(resolve_model(str(exports["sink1"])), device="cpu", batch_size=1)
    rows = _record_model_inputs(lm)
    context, continuation = list(range(1000, 1000 + 400)), [7, 8]
    lm._loglikelihood_tokens([(("ctx", "cont"), context, continuation)], disable_tqdm=True)
    assert len(rows) == 1 and len(rows[0]) == lm.max_length == 256
    assert rows[0] == [SINK_ID] + context[-(256 - 1 - 1) :] + continuation[:-1]


def test_bundled_task_configs_are_lm_eval_standard():
    """Prompts and metrics must be lm-eval's standard ones (published numbers comparable): every field
    of a bundled task except its dataset fields equals the installed lm-eval task's."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from inference.lm_eval_tasks import TASKS_DIR

    def comparable(value):
        if callable(value):
            return (value.__module__, value.__qualname__, value.__code__.co_code)
        return value

    standard_root = Path(lm_eval.tasks.__file__).parent
    for key, rel in STANDARD_YAML.items():
        ours = load_yaml(TASKS_DIR / f"{key}.yaml")
        standard = load_yaml(standard_root / rel)
        assert ours["task"] == f"sinklm_{key}" and ours["validation_split"] == standard["validation_split"]
        assert ours["dataset_kwargs"] == {"archive": key}
        keys = (set(ours) | set(standard)) - DATASET_FIELDS
        assert {k: comparable(ours.get(k)) for k in keys} == {k: comparable(standard.get(k)) for k in keys}, key


def test_online_names_are_lm_eval_standard_tasks():
    """--online must name lm-eval's standard tasks (LAMBADA as lambada_openai, scored by acc), so a typo
    cannot silently evaluate some other task."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from inference.zeroshot import TASKS

    standard_root = Path(lm_eval.tasks.__file__).parent
    files = {**STANDARD_YAML, "lambada": "lambada/lambada_openai.yaml"}
    for task in TASKS:
        config = load_yaml(standard_root / files[task.key], resolve_func=False)
        assert config["task"] == task.online
        assert "acc" in [m["metric"] for m in config["metric_list"]]


def test_bundled_data_reads_offline():
    """All six validation splits load from the committed archives with the network disabled
    (HF_DATASETS_OFFLINE=1 from conftest), complete and with the fields the prompts use, extracted
    into the cache once."""
    import os

    from inference.lm_eval_tasks.bundled_data import cache_root, load_bundled

    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    expected = {
        "arc_easy": (570, "answerKey"),
        "arc_challenge": (299, "answerKey"),
        "hellaswag": (10042, "endings"),
        "openbookqa": (500, "question_stem"),
        "piqa": (1838, "sol2"),
        "winogrande": (1267, "option2"),
    }
    for archive, (rows, column) in expected.items():
        split = load_bundled(archive)["validation"]
        assert (len(split), column in split.column_names) == (rows, True), archive
        assert Path(split.cache_files[0]["filename"]).is_relative_to(cache_root())


def _config_only(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "unknown task 'nope'"),
        ("lambada_offline", "--online"),
        ("missing_data", "bundled zero-shot data missing"),
        ("not_a_model", "not a model folder"),
        ("no_such_path", "no such model folder"),
        ("softmax1_as_stock", "refusing to evaluate it as vanilla"),
        ("softmax1_untrusted", "--trust-remote-code"),
        ("custom_type_no_variant", "refusing to guess the variant"),
        ("bad_sink_ids", "sink_tokens is 2"),
        ("sink_tokenizer_undeclared", "the tokenizer has sink tokens at ids [50277]"),
    ],
)
def test_bad_input_is_a_clear_error(case, message, exports, tmp_path, capsys):
    """Bad input must stop with exit code 2 and a message naming the problem -- before any model
    runs -- and a variant the tool cannot run faithfully must be refused, never run as vanilla."""
    from inference.zeroshot import main

    model, extra = str(exports["vanilla"]), []
    neox = json.loads((exports["vanilla"] / "config.json").read_text())
    if case == "unknown_task":
        extra = ["--tasks", "arc_easy,nope"]
    elif case == "lambada_offline":
        extra = ["--tasks", "lambada"]
    elif case == "missing_data":
        (tmp_path / "empty").mkdir()
        extra = ["--data-dir", str(tmp_path / "empty")]
    elif case == "not_a_model":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("hello")
        model = str(tmp_path / "notes")
    elif case == "no_such_path":
        model = str(tmp_path / "missing")
    elif case == "softmax1_as_stock":
        model = str(_config_only(tmp_path / "m", {**neox, "sinklm": {"attention": "softmax1", "sink_token_ids": []}}))
    elif case == "softmax1_untrusted":
        custom = {**neox, "model_type": "sinklm_gpt_neox", "auto_map": {"AutoModelForCausalLM": "modeling_sinklm.X"}}
        model = str(_config_only(tmp_path / "m", {**custom, "sinklm": {"attention": "softmax1", "sink_token_ids": []}}))
    elif case == "custom_type_no_variant":
        model = str(_config_only(tmp_path / "m", {**neox, "model_type": "sinklm_gpt_neox", "sinklm": None}))
    elif case == "bad_sink_ids":
        model = str(_config_only(tmp_path / "m", {**neox, "sinklm": {"sink_tokens": 2, "sink_token_ids": [SINK_ID]}}))
    elif case == "sink_tokenizer_undeclared":
        # a sink-token model's folder whose config.json lost its sinklm field: not silently vanilla
        model = str(_config_only(tmp_path / "m", {k: v for k, v in neox.items() if k != "sinklm"}))
        (tmp_path / "m" / "tokenizer.json").write_text((exports["sink1"] / "tokenizer.json").read_text())
    rc = main([model, "--out", str(tmp_path / "out"), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()
