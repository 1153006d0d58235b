"""Exactness checks of the fast paths on the device they are fast on (run by ``gpu_check.sh``).

1. decode: the fixed-shape decode step (``--decode graph`` on CUDA: one captured CUDA graph
   replayed per token) against SinkCache's eager path, every attention kind and a sink-token model,
   B=2, through filling and past the point where eviction starts; fp32 (tolerance 1e-5) and bf16;
2. loss: the chunked cross-entropy through the head against ``F.cross_entropy`` of the full
   logits, value and gradients, fp32 (1e-6 relative) and under bf16 autocast;
3. training: 20 AdamW steps of a small model, ``torch.compile``\\ d vs eager, bf16 autocast: the
   losses agree within bf16 noise.

Prints one JSON object (every check's max difference, its tolerance and ``ok``) and exits 1 if a
check failed. ``--device cpu --decode eager --no-compile`` runs the same checks on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.cache import SinkCache  # noqa: E402
from inference.decode_step import MODES, DecodeStep, StaticSinkCache  # noqa: E402
from pretrain.chunked_loss import chunked_lm_loss  # noqa: E402
from pretrain.config import ModelConfig  # noqa: E402
from pretrain.model import GPTNeoX, lm_loss  # noqa: E402

VARIANTS = [("softmax", 0), ("softmax1", 0), ("sink_logit", 0), ("softmax", 1)]


def check(name: str, diff: float, tol: float) -> dict:
    return {"check": name, "max_diff": diff, "tolerance": tol, "ok": bool(diff <= tol)}


@torch.no_grad()
def decode_checks(device, mode: str, shape: str, recent: int = 60, length: int = 160) -> list[dict]:
    out = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        for attention, sinks in VARIANTS:
            cfg = ModelConfig.from_preset(shape, attention=attention, sink_tokens=sinks, sink_logit_init=0.7)
            torch.manual_seed(0)
            model = GPTNeoX(cfg).to(device, dtype).eval()
            start = 4  # the cache fills at start + recent tokens and evicts for the rest of the length
            ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
            ids[:, :sinks] = torch.tensor(cfg.sink_token_ids, device=device)
            cache = SinkCache(start, recent)
            want = torch.stack([model(ids[:, t : t + 1], cache=cache).logits[:, -1].float() for t in range(length)], 1)
            step = DecodeStep(model, StaticSinkCache(model, 2, start, recent), mode)
            got = torch.stack([step(ids[:, t]).clone() for t in range(length)], 1)
            scale = want.abs().max().item() if dtype == torch.bfloat16 else 1.0
            diff = ((got - want).abs().max() / scale).item()
            out.append(check(f"decode {mode} vs SinkCache {cfg.variant} {str(dtype)[6:]}", diff, tol))
    return out


def loss_checks(device) -> list[dict]:
    torch.manual_seed(0)
    hidden = torch.randn(4, 512, 256, device=device)
    weight = torch.randn(50304, 256, device=device) * 0.05
    labels = torch.randint(0, 50304, (4, 512), device=device)
    labels[:, :3] = -100
    out = []
    for name, ctx, tol in (("fp32", torch.autocast(device.type, enabled=False), 1e-6),
                           ("bf16 autocast", torch.autocast(device.type, dtype=torch.bfloat16), 2e-2)):
        results = []
        for fn in (lambda h, w: lm_loss(h @ w.t(), labels), lambda h, w: chunked_lm_loss(h, w, labels)):
            h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            with ctx:
                loss = fn(h, w)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        for part, a, b in zip(("value", "grad hidden", "grad weight"), *results):
            diff = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
            out.append(check(f"chunked loss {part} {name} (relative)", diff, tol))
    return out


def training_check(device, steps: int = 20) -> dict:
    cfg = ModelConfig.from_preset("pythia-14m")
    data = torch.randint(0, cfg.vocab_size, (steps, 4, 257), generator=torch.Generator().manual_seed(2)).to(device)
    curves = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPTNeoX(cfg).to(device).train()
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for batch in data:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(batch[:, :-1], labels=batch[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        curves.append(losses)
    diff = max(abs(a - b) / abs(b) for a, b in zip(*curves))
    return {**check(f"compiled vs eager training, {steps} steps bf16 (relative loss)", diff, 2e-2), "losses": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decode", choices=MODES, default=None, help="the step's mode (default: graph on CUDA, eager on CPU)")
    parser.add_argument("--shape", default="pythia-14m", help="model of the decode checks")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-training check")
    parser.add_argument("--recent", type=int, default=60, help="decode checks: window of the 4 + recent cache")
    parser.add_argument("--length", type=int, default=160, help="decode checks: tokens streamed (> 4 + recent)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_exactness: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    mode = args.decode or ("graph" if device.type == "cuda" else "eager")
    checks = decode_checks(device, mode, args.shape, args.recent, args.length) + loss_checks(device)
    if not args.no_compile:
        checks.append(training_check(device))
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['max_diff']:.3g} (tolerance {c['tolerance']:g})", flush=True)
    result = {"device": str(device), "decode_mode": mode, "checks": checks, "ok": all(c["ok"] for c in checks)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
