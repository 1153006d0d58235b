"""lm-eval's Hugging Face model wrapper, with a sink-token model's sink ids in front of every context.

A sink-token model was trained on samples ``k sink ids + text``; evaluated without them it is a
different (worse) model. lm-eval's ``HFLM`` encodes text with whatever the tokenizer adds by
default, so this subclass encodes text only and prepends the sink ids itself, once per request,
right before the requests are batched -- the one place every loglikelihood request passes through.
With no sink ids it is exactly ``HFLM``.

Registered as lm-eval model ``sinklm-hf``: ``lm_eval --model sinklm-hf --model_args
pretrained=FOLDER,sink_token_ids=50277`` (several ids separated by ``:``), or built directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


def parse_sink_ids(value: Sequence[int] | str | int | None) -> list[int]:
    """``[50277]``, ``"50277"``, ``"50277:50278"`` or ``50277`` -> a list of ints ([] for None/"")."""
    if value is None or value == "":
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(part) for part in value.replace(",", ":").split(":") if part.strip()]
    return [int(v) for v in value]


@register_model("sinklm-hf")
class SinkTokenHFLM(HFLM):
    """``HFLM`` that feeds ``sink_token_ids`` before every loglikelihood context.

    Text is always encoded without special tokens (an exported sink model's tokenizer would
    otherwise prepend its sinks too, twice over). An empty context keeps lm-eval's prefix token
    after the sinks, so a sink model sees the same text tokens a vanilla model does, plus its sinks.
    Long inputs are left-truncated in the text, never in the sinks. Generation and rolling
    loglikelihood (perplexity tasks) are refused for sink models rather than run without sinks.
    """

    def __init__(self, pretrained: Any, sink_token_ids: Sequence[int] | str | int | None = None, **kwargs: Any):
        super().__init__(pretrained=pretrained, **kwargs)
        self.sink_token_ids = parse_sink_ids(sink_token_ids)
        if self.sink_token_ids and self.backend != "causal":
            raise ValueError(f"sink tokens need a causal (decoder-only) model, got backend {self.backend!r}")
        rows = self.model.get_input_embeddings().weight.shape[0]
        bad = [i for i in self.sink_token_ids if not 0 <= i < rows]
        if bad:
            raise ValueError(f"sink token ids {bad} are outside the model's {rows} embedding rows")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        if self.sink_token_ids:
            add_special_tokens = False  # text only: the sinks are added once per request, below
        return super().tok_encode(
            string, add_special_tokens=add_special_tokens, left_truncate_len=left_truncate_len, **kwargs
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.sink_token_ids:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        sinks = list(self.sink_token_ids)
        # HFLM feeds (context + continuation)[-(max_length + 1):][:-1]; keep the sinks inside that window
        text_budget = self.max_length + 1 - len(sinks)
        with_sinks = []
        for strings, context_enc, continuation_enc in requests:
            keep = text_budget - len(continuation_enc)
            if keep < 0:
                raise ValueError(
                    f"a continuation of {len(continuation_enc)} tokens does not fit the model's "
                    f"{self.max_length} positions after {len(sinks)} sink token(s)"
                )
            context_enc = list(context_enc[-keep:]) if keep else []
            with_sinks.append((strings, sinks + context_enc, list(continuation_enc)))
        return super()._loglikelihood_tokens(with_sinks, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.sink_token_ids:
            raise NotImplementedError(
                "rolling loglikelihood (perplexity tasks) is not supported for sink-token models here; "
                "use `sinklm stream-ppl`"
            )
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.sink_token_ids:
            raise NotImplementedError(
                "generation tasks are not supported for sink-token models here; use `sinklm generate`"
            )
        return super().generate_until(requests, disable_tqdm=disable_tqdm)
