"""The one dtype vocabulary: ``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``."""

from __future__ import annotations

import torch

from pretrain.checkpoints.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_CHOICES = tuple(DTYPES)  # for ``Literal[DTYPE_CHOICES]`` settings fields and argparse choices
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16`` (a torch dtype passes through)."""
    if isinstance(name, torch.dtype):
        if name not in _NAMES:
            raise CheckpointError(f"dtype {name}: expected one of {', '.join(_NAMES.values())}")
        return name
    dtype = DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise CheckpointError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name config.json and model cards use: ``float32``, ``bfloat16``, ``float16``."""
    return _NAMES[parse_dtype(dtype)]
