"""Next-token cross-entropy through the vocabulary head without the full (B x T x V) logits.

Training only needs the loss and its gradients, never all the logits at once. :func:`chunked_lm_loss`
walks the rows in chunks: for each chunk it forms the logits (rows x V) in one reused fp32 buffer,
takes the log-sum-exp and the target logit, and, when gradients are wanted, turns the same buffer
into ``softmax - onehot`` in place and immediately folds it into the gradients of the hidden states
(rows x C) and of the head weight (V x C, accumulated in fp32). The backward pass then only scales
those by the incoming gradient. Nothing is recomputed and the largest temporary is one chunk of
logits, which is allocated once per call and reused for every chunk (the full-logits path allocates,
and the kernel zero-fills, two B x T x V fp32 tensors per step: on a CPU that page-faulting was half
the quickstart's step time).

The arithmetic is the full path's: logits in the matmul's dtype (autocast's when autocast is on),
then fp32 for the softmax, mean over the targets that are not ``ignore_index``. Not a fused kernel:
plain PyTorch matmuls, so it runs wherever the model runs; ``torch.compile`` leaves it eager (a
graph break) and compiles the trunk.
"""

from __future__ import annotations

import torch

# the logits buffer per chunk: small enough for a CPU allocator to keep (glibc maps anything above
# its 32 MiB mmap ceiling afresh), large enough that the head matmul runs at full speed on a GPU
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one fp32 chunk of logits stays within ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(hidden @ weight.T, labels); gradients formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, rows: int, grads: bool):
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        # needs_input_grad ignores no_grad (validation): the caller says whether grads are wanted
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            h = hidden.to(dtype)
            w = weight.to(dtype)
            n, c = h.shape
            v = w.shape[0]
            valid = labels != ignore_index
            count = valid.sum()
            weights = valid.to(torch.float32)  # per row: 1 for a target, 0 for ignored
            if need_h or need_w:
                weights = weights / count  # d(mean)/d(row loss)
            targets = labels.masked_fill(~valid, 0)
            rows = min(rows, n)
            logits = torch.empty(rows, v, dtype=torch.float32, device=device)
            low = torch.empty(rows, v, dtype=dtype, device=device) if dtype != torch.float32 else None
            grad_h = torch.empty(n, c, dtype=dtype, device=device) if need_h else None
            grad_w = torch.zeros(v, c, dtype=torch.float32, device=device) if need_w else None
            grad_w_part = torch.empty(v, c, dtype=dtype, device=device) if need_w and low is not None else None
            total = torch.zeros((), dtype=torch.float32, device=device)
            for a in range(0, n, rows):
                b = min(a + rows, n)
                hc, buf = h[a:b], logits[: b - a]
                if low is None:
                    torch.mm(hc, w.t(), out=buf)
                else:
                    torch.mm(hc, w.t(), out=low[: b - a])
                    buf.copy_(low[: b - a])
                # log-sum-exp in place (torch.logsumexp would allocate a chunk-sized temporary)
                y = targets[a:b, None]
                picked = buf.gather(1, y)
                top = buf.amax(dim=-1, keepdim=True)
                sumexp = buf.sub_(top).exp_().sum(dim=-1, keepdim=True)
                total += ((top + sumexp.log() - picked).squeeze(1) * valid[a:b]).sum()
                if not (need_h or need_w):
                    continue
                row = weights[a:b, None]  # ignored rows -> 0, others 1 / count
                buf.mul_(row / sumexp)  # softmax, scaled
                buf.scatter_add_(1, y, -row)  # - onehot(target), scaled
                g = buf if low is None else low[: b - a].copy_(buf)
                if need_h:
                    torch.mm(g, w, out=grad_h[a:b])
                if need_w:
                    if grad_w_part is None:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w.add_(torch.mm(g.t(), hc, out=grad_w_part))
        ctx.save_for_backward(
            grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None
        )
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_output.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_output.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


@torch._dynamo.disable
def chunked_lm_loss(
    hidden: torch.Tensor,  # (B, T, C) final hidden states
    weight: torch.Tensor,  # (V, C) the head
    labels: torch.Tensor,  # (B, T), aligned with hidden
    ignore_index: int = -100,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` (exactly
    :func:`pretrain.model.lm_loss` of the full logits), ``rows`` rows of logits at a time."""
    if rows is None:
        rows = chunk_rows(weight.shape[0], hidden.device)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index, int(rows), torch.is_grad_enabled()
    )
