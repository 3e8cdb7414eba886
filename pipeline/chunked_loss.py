"""The lm_head, soft-cap and cross-entropy a chunk of rows at a time, with the gradients made on the way.

The (rows x vocab) fp32 logits are the biggest tensors of a step: at d4 (4096 rows x 32768) the logits,
their soft-capped copy and the gradient are 512 MB each, and on a CPU their elementwise passes are as
slow as the lm_head's matmuls. Here each chunk's logits are soft-capped, reduced to a loss and turned
into d loss / d logits while the chunk is still in cache; the chunk's share of d h and d W is taken at
once (the softmax is at hand then), so no full logits tensor ever exists and backward only scales the
saved gradients by the upstream one. Same function as `GPT.head` + F.cross_entropy: targets of -1 are
ignored (a loss of 0 with reduction "none") and the mean is over the others; only the summation order
differs (tests/test_model.py).
"""

import torch

CHUNK_ROWS = 512  # rows per chunk: 64 MB of fp32 logits at vocab 32768 (bench/README.md)


def _chunk(logits, targets, softcap, need_grad):
    """(each row's loss, d (their sum) / d logits or None)."""
    t = torch.tanh(logits.float() / softcap)
    z = softcap * t
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    valid = targets != -1
    picked = targets.clamp(min=0).unsqueeze(1)
    losses = torch.where(valid, (lse - z.gather(1, picked)).squeeze(1), 0.0)
    if not need_grad:
        return losses, None
    grad = torch.exp(z - lse).scatter_add(1, picked, torch.full_like(lse, -1.0))
    grad = grad * (1 - t * t) * valid.unsqueeze(1)  # through the soft-cap; ignored rows give nothing
    return losses, grad.to(logits.dtype)


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_rows):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h, grad_w = [], torch.zeros_like(weight)
        for start in range(0, h.size(0), chunk_rows):
            rows = h[start:start + chunk_rows]
            losses, grad = _chunk(rows @ weight.t(), targets[start:start + chunk_rows], softcap, True)
            total = total + losses.sum()
            grad_h.append(grad @ weight)
            grad_w.addmm_(grad.t(), rows)
        count = (targets != -1).sum().clamp(min=1)
        ctx.save_for_backward(torch.cat(grad_h), grad_w, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None, None


def softcapped_cross_entropy(h, weight, targets, softcap, reduction="mean", chunk_rows=CHUNK_ROWS):
    """Cross-entropy of softcap * tanh((h @ weight.T) / softcap) against `targets` (-1: ignored), the mean
    or ("none") each row's. h (N, C), weight (V, C) with V the real vocab (padding rows sliced off),
    targets (N,). Gradients are made only for the mean (training); "none" is for evaluation."""
    if reduction == "mean" and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _SoftcappedCrossEntropy.apply(h, weight, targets, softcap, chunk_rows)
    losses = torch.cat([_chunk(h[s:s + chunk_rows] @ weight.t(), targets[s:s + chunk_rows], softcap, False)[0]
                        for s in range(0, h.size(0), chunk_rows)])
    if reduction == "none":
        return losses
    return losses.sum() / (targets != -1).sum().clamp(min=1)
