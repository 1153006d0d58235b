"""The one checkpoint layer: resolve any spec once, read, describe, load, transform, export.

Formats: a DeepSpeed run folder of ``sinklm train`` (+ tag, or one ``global_stepN`` folder), a
Hugging Face GPT-NeoX folder (our export or stock, e.g. Pythia), a hub name (+ revision), an initial
checkpoint (``model.yaml`` + ``model.safetensors``). See docs/design.md ("checkpoint formats").

Modules: :mod:`.resolve` (spec -> folder, format, tag; the hub-name rule), :mod:`.dtypes` (the dtype
vocabulary), :mod:`.read` (weights + config), :mod:`.describe` (no weights), :mod:`.load` (a ready
model + tokenizer), :mod:`.transform` (sink tokens, attention kind), :mod:`.export` /
:mod:`.model_card` / :mod:`.hf_config` (Hugging Face folders), :mod:`.init_format` (initial
checkpoints), :mod:`.conversion` (``convert`` and :class:`ExportSettings`), :mod:`.training`
(save / resume during training).
"""

from pretrain.checkpoints.conversion import ExportSettings, convert
from pretrain.checkpoints.describe import CheckpointInfo, check_tokenizer_sinks, describe, variant_of_hf_config
from pretrain.checkpoints.dtypes import DTYPE_CHOICES, DTYPES, dtype_name, parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.export import export_hf, export_init, to_hf_model
from pretrain.checkpoints.init_format import load_init_for_training
from pretrain.checkpoints.load import LoadedModel, load_model, load_tokenizer_for
from pretrain.checkpoints.read import Checkpoint, read_checkpoint
from pretrain.checkpoints.resolve import ResolvedCheckpoint, is_hub_name, resolve
from pretrain.checkpoints.transform import add_sink_tokens, set_attention

__all__ = [
    "DTYPE_CHOICES", "DTYPES", "Checkpoint", "CheckpointError", "CheckpointInfo", "ExportSettings", "LoadedModel", "ResolvedCheckpoint",
    "add_sink_tokens", "check_tokenizer_sinks", "convert", "describe", "dtype_name", "export_hf", "export_init",
    "is_hub_name", "load_init_for_training", "load_model", "load_tokenizer_for", "parse_dtype", "read_checkpoint",
    "resolve", "set_attention", "to_hf_model", "variant_of_hf_config",
]  # fmt: skip
