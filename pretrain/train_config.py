"""The training run's configuration: typed sections, composable YAML files, dotted overrides.

A run is described by one or more YAML files merged in order, then ``--section.key=value``
overrides from the command line::

    sinklm train configs/experiments/quickstart-vanilla.yaml --train.max_steps=20 --optimizer.lr=3e-4

File shape (every section optional except ``data.path``)::

    base: quickstart-base.yaml      # file(s) merged first, relative to this file (a list is fine)
    model:                          # a preset name, or a mapping merged onto a preset
      preset: tiny                  # configs/models/<preset>.yaml (or a path to a model YAML)
      attention: softmax1           # any ModelConfig field overrides the preset
    data: {path: runs/data/bundled, text_tokens: 255}
    train: {run_dir: runs/quickstart-vanilla, max_steps: 200, micro_batch_size: 8}
    optimizer: {lr: 1.0e-3}         # null = Pythia's peak lr for the preset's size
    checkpoint: {every: 100, keep_last: 2}
    logging: {log_every: 10}
    wandb: {mode: disabled}
    deepspeed: {config: zero1}      # configs/deepspeed/zero1.json, or a path to a JSON file
    probe: {every: 0}               # the sink / eviction-gap probe (0 = off; null, the default: every 200 steps)

Unknown keys anywhere are errors naming the key path. The resolved config (``model`` as a full
:class:`ModelConfig` mapping, every default filled in) is what the run saves as ``config.yaml``;
feeding that file back to ``sinklm train`` reproduces the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data.pythia_batches import PYTHIA_GLOBAL_BATCH
from data.settings import apply_override, deep_merge, load_config_file, parse_override
from data.token_source import open_token_source
from pretrain.config import CONFIG_DIR, ConfigError, ModelConfig, from_dict, load_yaml, preset_path, to_dict

# Pythia's peak learning rates (EleutherAI/pythia models/*.yml), keyed by ModelConfig.name.
PYTHIA_LR = {
    "tiny": 1e-3,
    "pythia-14m": 1e-3,
    "pythia-31m": 1e-3,
    "pythia-70m": 1e-3,
    "pythia-160m": 6e-4,
    "pythia-410m": 3e-4,
    "pythia-1b": 3e-4,
    "pythia-1.4b": 2e-4,
    "pythia-2.8b": 1.6e-4,
    "pythia-6.9b": 1.2e-4,
    "pythia-12b": 1.2e-4,
}


@dataclass
class DataConfig:
    """Where the tokenized shards are and how samples are cut (see ``data.loader.SampleLoader``)."""

    path: str = ""
    """Folder written by ``sinklm data prepare`` (holds ``manifest.json``), or a Megatron indexed dataset
    (a prefix, its ``.idx``, or a folder holding one ``.idx``): of whole documents, read as one token
    stream (``data.token_source``), or with ``format: pythia`` of samples. Required."""

    format: Literal["shards", "pythia"] = "shards"
    """``shards``: ``path`` is a prepared folder, cut into windows (``data.loader``). ``pythia``:
    ``path`` is Pythia's pre-shuffled Pile (``document.idx`` + ``document-000NN-of-00020.bin``) or
    any Megatron dataset of equal-length samples; step s trains on samples [s G, (s+1) G) with
    G = ``train.global_batch_size`` (null = Pythia's 1024), each ``text_tokens + 1`` long (Pythia:
    2049, so ``seq_len`` = sinks + 2048); ``seed``, ``shuffle`` and ``train_split`` do not apply
    (``data.pythia_batches``)."""

    start_step: int | None = None
    """``format: pythia`` only: the step a fresh run starts at (e.g. 100000, continuing Pythia's
    ``step100000`` from ``train.init_from``): it trains on the batches from that step on, and the
    learning-rate schedule and step counter start there, so ``train.max_steps`` is the last step
    counted from Pythia's step 0. ``null`` = N when ``train.init_from`` records a revision ``stepN``
    (``sinklm convert``), else 0. A resumed run continues from its checkpoint."""

    validation_path: str | None = None
    """A prepared folder whose ``validation_split`` (or a Megatron dataset of documents, all of it) gives
    the validation loss and the probe's text; ``null`` = ``path``'s split for a prepared folder, else none."""

    train_split: str = "train"
    """Split trained on."""

    validation_split: str = "validation"
    """Held-out split for the validation loss."""

    seq_len: int | None = None
    """Sample length fed to the model; ``null`` = the model's ``max_seq_len``."""

    text_tokens: int | None = None
    """Text tokens per sample (the model sees ``sink_tokens`` + this). Set it to the same value
    for every variant of an experiment so they all train on identical text; ``null`` =
    ``seq_len - sink_tokens``."""

    seed: int = 1234
    """Shuffling seed of the sample order."""

    shuffle: bool = True
    """Shuffle training samples (a fresh permutation per epoch)."""


@dataclass
class TrainConfig:
    """Length of the run, batch, precision, where it is saved."""

    run_dir: str = "runs/default"
    """Run folder: checkpoints ``global_step{N}/``, ``latest``, ``config.yaml``, ``metrics.jsonl``."""

    max_steps: int = 1000
    """Optimizer steps."""

    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""

    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; sets gradient accumulation =
    global / (micro x world size), which must divide exactly. ``null``: use ``grad_accum_steps``."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (used when ``global_batch_size`` is null)."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto`` = bf16 on GPUs that support it, else fp32 (always fp32 on CPU)."""

    seed: int = 1234
    """Seed of the initial weights (identical on every rank)."""

    eval_every: int = 0
    """Validation loss every N steps (and at the end); 0 = only at the end."""

    eval_batches: int = 8
    """Micro-batches per rank in each validation pass (the same samples every time)."""

    compile: Literal["auto", True, False] = "auto"
    """``torch.compile`` the model inside the DeepSpeed engine: ``auto`` = on for CUDA, off for a CPU
    (where compiling costs minutes and gains little); ``true``/``false`` force it. On a GPU it costs
    about a minute of compiling, then ~25% more tokens/s for Pythia-160M on an H200."""

    def compile_on(self, device_type: str) -> bool:
        """Whether ``compile`` means compiling on a ``device_type`` (``cuda``, ``cpu``) device."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)

    init_from: str | None = None
    """An initial checkpoint folder (``sinklm convert --to init``) loaded before DeepSpeed starts."""

    resume: str = "auto"
    """``auto``: continue from ``run_dir/latest`` if it exists; ``never``: refuse a run folder that
    already holds checkpoints; or a path to a run folder / ``global_step{N}`` folder to start from."""


@dataclass
class OptimizerConfig:
    """AdamW with warm-up + cosine decay: Pythia's recipe by default."""

    lr: float | None = None
    """Peak learning rate; ``null`` = Pythia's for the model preset (1e-3 for 14m-70m, 6e-4 for
    160m, 3e-4 for 410m)."""

    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of the peak."""

    warmup_ratio: float = 0.01
    """Linear warm-up over this fraction of ``max_steps`` (Pythia: 1%)."""

    warmup_steps: int | None = None
    """Explicit warm-up length; overrides ``warmup_ratio``."""

    decay_steps: int | None = None
    """Steps over which the cosine decays (then stays at the minimum); ``null`` = ``max_steps``."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""

    eps: float = 1e-8
    """Adam epsilon."""

    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to biases, LayerNorms or other 1-D parameters."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""


@dataclass
class CheckpointConfig:
    """When to save and how many to keep."""

    every: int = 1000
    """Save ``global_step{N}`` every N steps (0 = only at the end)."""

    keep_last: int = 2
    """Keep the newest K complete checkpoints (0 = keep all)."""

    save_at_end: bool = True
    """Save after the last step."""


@dataclass
class LoggingConfig:
    """Console, JSONL and plots (all on rank 0)."""

    log_every: int = 10
    """Console line every N steps (metrics.jsonl gets every step)."""

    progress_bar: bool = True
    """A tqdm bar with loss, lr and ETA (only on a terminal or when forced true)."""

    plot: bool = True
    """Write ``loss.png`` at each checkpoint and at the end."""

    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for MFU; ``null`` = guessed from the GPU name (none on CPU)."""


@dataclass
class WandbConfig:
    """Weights & Biases; never required and never prompts."""

    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "sinklm"
    entity: str | None = None
    name: str | None = None
    """Run name; ``null`` = the run folder's name."""
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    """Where wandb writes; ``null`` = the run folder."""


@dataclass
class DeepSpeedSection:
    """DeepSpeed engine settings. Batch sizes, clipping and precision come from ``train`` /
    ``optimizer`` and override whatever the JSON says."""

    config: str = "zero1"
    """``zero0`` ... ``zero3`` (``configs/deepspeed/``) or a path to a DeepSpeed JSON file."""

    zero_stage: int | None = None
    """Override the JSON's ZeRO stage."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Merged (recursively) into the JSON, e.g. ``{zero_optimization: {overlap_comm: true}}``."""


DEFAULT_PROBE_EVERY = 200
"""``probe.every: null``: steps between probes; at this interval the probe adds under 2% to a
CPU quickstart run (``benchmarks/bench_probe.py``)."""


@dataclass
class ProbeConfig:
    """Periodic probe on the validation split: Gu et al.'s sink metric, the attention on the first
    key (and on the sink tokens / the extra key of softmax1, sink_logit) and the eviction gap;
    needs an evaluation function from the caller (``sinklm train`` passes
    ``inference.probe.streaming_probe``)."""

    every: int | None = None
    """Run every N steps (0 = off; ``null`` = every ``DEFAULT_PROBE_EVERY`` steps when the trainer
    has a probe function and a validation split, else off). Also after the last step."""

    start_size: int = 4
    """Start tokens of the probe's own cache (its ``loss`` / ``ppl``)."""
    recent_size: int = 252
    """Recent tokens of that cache; W = start_size + recent_size is the eviction gap's cache size."""
    num_tokens: int = 2048
    """Tokens from the start of the validation split that the probe reads (stream and sink inputs)."""
    eviction_starts: list[int] = field(default_factory=lambda: [0, 1, 4])
    """Start sizes s of the eviction gap: perplexity under s + (W - s) caches."""
    sink_inputs: int = 64
    """Inputs of the sink metric (Gu et al.: 64)."""
    sink_length: int = 64
    """Tokens per sink-metric input (Gu et al.: 64)."""

    def interval(self, available: bool) -> int:
        """Steps between probes (0 = none); ``available``: a probe function and a validation split."""
        if self.every is None:
            return DEFAULT_PROBE_EVERY if available else 0
        return self.every


@dataclass
class RunConfig:
    """Everything a training run needs; ``to_dict()`` is the resolved ``config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    @property
    def text_tokens(self) -> int:
        return self.data.text_tokens if self.data.text_tokens is not None else self.seq_len - self.model.sink_tokens

    @property
    def validation_dir(self) -> str | None:
        """Where the validation split is read (``data.validation_path``, else ``data.path`` for
        shards); None: no validation source."""
        if self.data.validation_path:
            return self.data.validation_path
        return self.data.path if self.data.format == "shards" else None

    def validation_text(self, count: int) -> np.ndarray:
        """The first ``count`` tokens of the validation text (int64; a prepared folder's split or a
        Megatron dataset): what the sink probe streams, in training and when replayed from checkpoints."""
        source = open_token_source(self.validation_dir, self.data.validation_split, self.model.vocab_size, verify=False)
        return source.stream[:count]

    @property
    def sample_len(self) -> int:
        """Tokens the model sees per sample: sink tokens + text tokens."""
        return self.model.sink_tokens + self.text_tokens

    def validate(self) -> None:
        """Cross-section checks (each section validated its own fields already)."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{key}: {message}")

        if not self.data.path:
            fail("data.path", "required: the folder written by `sinklm data prepare`")
        if self.data.start_step is not None:
            if self.data.format != "pythia":
                fail("data.start_step", f"only applies to data.format=pythia (found format {self.data.format!r})")
            if not 0 <= self.data.start_step < self.train.max_steps:
                fail(
                    "data.start_step",
                    f"must be in [0, train.max_steps={self.train.max_steps}) (max_steps counts from step 0), "
                    f"got {self.data.start_step}",
                )
        if self.text_tokens < 1:
            fail("data.text_tokens", f"must be >= 1, got {self.text_tokens}")
        if self.sample_len > self.model.max_seq_len:
            fail(
                "data.text_tokens",
                f"{self.model.sink_tokens} sink + {self.text_tokens} text tokens exceed "
                f"model.max_seq_len={self.model.max_seq_len}",
            )
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches"):
            if getattr(self.train, key) < 1:
                fail(f"train.{key}", f"must be >= 1, got {getattr(self.train, key)}")
        for key, value in (
            ("train.eval_every", self.train.eval_every),
            ("checkpoint.every", self.checkpoint.every),
            ("checkpoint.keep_last", self.checkpoint.keep_last),
            ("probe.every", self.probe.every or 0),
        ):
            if value < 0:
                fail(key, f"must be >= 0, got {value}")
        probe, cache = self.probe, self.probe.start_size + self.probe.recent_size
        if probe.start_size < 0 or probe.recent_size < 1:
            fail("probe.recent_size", f"the probe's cache needs start_size >= 0 and recent_size >= 1, got {probe.start_size} + {probe.recent_size}")
        for s in probe.eviction_starts:
            if not 0 <= s < cache:
                fail("probe.eviction_starts", f"each start size must be in 0..{cache - 1} (W = start_size + recent_size), got {s}")
        if probe.sink_inputs < 1 or probe.sink_length < 2 or probe.num_tokens < max(2, probe.sink_length):
            fail("probe.num_tokens", f"need sink_inputs >= 1, sink_length >= 2 and num_tokens >= sink_length; got "
                 f"{probe.sink_inputs}, {probe.sink_length}, {probe.num_tokens}")
        if self.logging.log_every < 1:
            fail("logging.log_every", f"must be >= 1, got {self.logging.log_every}")
        opt = self.optimizer
        if opt.lr is None or opt.lr <= 0:
            fail("optimizer.lr", f"must be > 0, got {opt.lr}")
        if not 0.0 <= opt.min_lr_ratio <= 1.0:
            fail("optimizer.min_lr_ratio", f"must be in [0, 1], got {opt.min_lr_ratio}")
        if not 0.0 <= opt.warmup_ratio < 1.0:
            fail("optimizer.warmup_ratio", f"must be in [0, 1), got {opt.warmup_ratio}")
        if opt.grad_clip < 0:
            fail("optimizer.grad_clip", f"must be >= 0, got {opt.grad_clip}")
        if self.deepspeed.zero_stage is not None and self.deepspeed.zero_stage not in (0, 1, 2, 3):
            fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.deepspeed.zero_stage}")


# --------------------------------------------------------------------------------------------
# composing files and overrides (the engine is data.settings; the model section is run-specific)
# --------------------------------------------------------------------------------------------


def _normalize_model(section: Any, where: str) -> dict[str, Any]:
    """``model: tiny`` -> ``{preset: tiny}`` so files and overrides merge as mappings."""
    if section is None:
        return {}
    if isinstance(section, str):
        return {"preset": section}
    if isinstance(section, dict):
        return dict(section)
    raise ConfigError(f"{where}: model: expected a preset name or a mapping, found {section!r}")


def _normalize_file(data: dict[str, Any], path: Path) -> dict[str, Any]:
    if "model" in data:
        data = {**data, "model": _normalize_model(data["model"], str(path))}
    return data


def _merge_run(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    if "model" in update and "model" in base:
        # a full model mapping (e.g. a saved config.yaml) replaces a preset rather than mixing with it
        if _is_full_model(update["model"]):
            base = {**base, "model": {}}
    return deep_merge(base, update)


def _is_full_model(section: dict[str, Any]) -> bool:
    return {"num_layers", "hidden_size", "num_heads", "vocab_size"} <= set(section)


def load_run_file(path: str | Path) -> dict[str, Any]:
    """One run-config file with its ``base`` files merged underneath; a bare name such as
    ``quickstart-vanilla`` means ``configs/experiments/quickstart-vanilla.yaml``."""
    path = Path(path)
    if not path.is_file() and not path.suffix:
        candidate = CONFIG_DIR / "experiments" / f"{path}.yaml"
        path = candidate if candidate.is_file() else path
    return load_config_file(path, normalize=_normalize_file, merge=_merge_run)


def _apply_run_override(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    if keys[0] == "model":
        data = {**data, "model": _normalize_model(data.get("model"), "override")}
        if keys == ["model"] and isinstance(value, str):
            keys = ["model", "preset"]  # --model=pythia-14m swaps the preset, keeps other model keys
    return apply_override(data, keys, value)


def build_model_config(section: dict[str, Any]) -> ModelConfig:
    section = dict(section)
    preset = section.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(section, where="model")
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset: expected a preset name or path, found {preset!r}")
    path = preset_path(preset)
    try:
        return ModelConfig.from_dict({**load_yaml(path), **section}, where="model")
    except ConfigError as err:
        raise ConfigError(f"{err} (model preset {path})") from None


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """A validated :class:`RunConfig` from a merged mapping (defaults filled in)."""
    data = dict(data)
    model = build_model_config(_normalize_model(data.pop("model", None), "config"))
    run = from_dict(RunConfig, data)
    run.model = model
    if run.optimizer.lr is None:
        if model.name not in PYTHIA_LR:
            raise ConfigError(
                f"optimizer.lr: no default peak learning rate for model {model.name!r}; set it "
                f"(Pythia's: {', '.join(f'{k} {v:g}' for k, v in PYTHIA_LR.items() if k.startswith('pythia'))})"
            )
        run.optimizer.lr = PYTHIA_LR[model.name]
    if run.data.format == "pythia" and run.train.global_batch_size is None:
        run.train.global_batch_size = PYTHIA_GLOBAL_BATCH
    run.optimizer.betas = tuple(run.optimizer.betas)  # type: ignore[assignment]
    if len(run.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers, found {list(run.optimizer.betas)}")
    run.validate()
    return run


def resolve_config(files: list[str | Path], overrides: list[str] = ()) -> RunConfig:
    """Merge ``files`` in order, apply ``overrides`` (``section.key=value``), validate."""
    if not files:
        raise ConfigError("no config file given (e.g. configs/experiments/quickstart-vanilla.yaml)")
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge_run(merged, load_run_file(path))
    for text in overrides:
        keys, value = parse_override(text)
        merged = _apply_run_override(merged, keys, value)
    return build_run_config(merged)
