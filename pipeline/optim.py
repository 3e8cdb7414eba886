"""MuonAdamW: Muon for the transformer's 2-D matrices, AdamW for embeddings, lm_head and scalars.

Muon (per group of same-shaped matrices, stacked):
  1. Nesterov momentum:      buf = mu*buf + (1-mu)*g,  u = (1-mu)*g + mu*buf
  2. orthogonalise u with 5 Polar Express iterations in bf16 (arXiv 2505.16932)
  3. NorMuon: equalise per-row (or per-column) scales with a running second moment, keeping the norm
  4. cautious weight decay: decay only where the update and the weight agree in sign
     p -= lr * u + lr * wd * p * [u * p >= 0],   lr scaled by sqrt(max(1, rows / cols))

Under torch.distributed the optimizer averages gradients itself (no DDP wrapper). Each rank then
orthogonalises its share of every group (the expensive part) and the results are all-gathered, so
every rank applies the same update and holds the same state: a checkpoint of rank 0's state resumes
on any world size.
"""

import torch
import torch.distributed as dist

# (a, b, c) per iteration: X <- a X + (b A + c A^2) X with A = X X^T
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g, steps=5):
    """Approximate the nearest semi-orthogonal matrix (U V^T of the SVD) of each matrix in g (K, r, c).
    bf16 on GPUs, as nanochat; fp32 elsewhere, where bf16 matmuls are slow rather than fast."""
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind`: "adamw" (lr, betas, eps, weight_decay) or "muon" (lr, momentum,
    beta2, ns_steps, weight_decay; every param of a muon group has the same shape)."""

    def __init__(self, groups):
        for g in groups:
            if g["kind"] == "muon" and len({p.shape for p in g["params"]}) != 1:
                raise ValueError("every parameter of a muon group must have the same shape")
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self):
        rank, world = _world()
        if world > 1:
            self._average_gradients(world)
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
            else:
                self._muon(group, rank, world)

    def _average_gradients(self, world, bucket=1 << 24):
        """All-reduce every gradient: big ones in place, small ones packed into ~16M-element buckets
        (a handful of collectives instead of hundreds, without a second copy of every gradient)."""
        pending = []

        def flush():
            if pending:
                flat = torch.cat([g.reshape(-1) for g in pending])
                dist.all_reduce(flat)
                torch._foreach_copy_(pending, [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in pending]),
                                                                             pending, strict=True)])
                pending.clear()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.numel() >= bucket:
                    dist.all_reduce(p.grad)
                else:
                    if pending and (pending[0].dtype != p.grad.dtype or
                                    sum(g.numel() for g in pending) + p.grad.numel() > bucket):
                        flush()
                    pending.append(p.grad)
        flush()
        torch._foreach_div_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], world)

    def _adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))

    def _muon(self, group, rank, world):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = torch.stack([p.grad for p in params])
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(grads)
            rows, cols = grads.shape[-2:]
            state["second_momentum_buffer"] = grads.new_zeros(
                (len(params), rows, 1) if rows >= cols else (len(params), 1, cols), dtype=torch.float32)
        mu = group["momentum"]
        buf = state["momentum_buffer"]
        buf.lerp_(grads, 1 - mu)
        update = self._orthogonalize_shared(grads.lerp_(buf, mu), group["ns_steps"], rank, world)
        update = self._normuon(update, state["second_momentum_buffer"], group["beta2"])
        rows, cols = grads.shape[-2:]
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        stacked = torch.stack(params)
        mask = (update * stacked) >= 0
        stacked.sub_(lr * update + lr * group["weight_decay"] * stacked * mask)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @staticmethod
    def _orthogonalize_shared(u, steps, rank, world):
        """Orthogonalise all K matrices, each rank doing a contiguous chunk, then share the results."""
        if world == 1:
            return orthogonalize(u, steps).to(u.dtype)
        K = u.size(0)
        chunk = -(-K // world)
        # shared in the dtype the iteration ran in (bf16 on GPUs): half the bytes of fp32, same values
        mine = orthogonalize(u[rank * chunk:min(K, (rank + 1) * chunk)], steps)
        padded = mine.new_zeros((chunk * world, *u.shape[1:]))
        local = mine.new_zeros((chunk, *u.shape[1:]))
        local[:mine.size(0)] = mine
        dist.all_gather_into_tensor(padded, local)
        return padded[:K].to(u.dtype)

    @staticmethod
    def _normuon(u, second, beta2):
        """Scale each row (or column) by the inverse root of its running mean square, then restore the
        update's overall norm: every output unit moves at a similar rate."""
        reduce_dim = -1 if second.size(-1) == 1 else -2
        sq = u.float().square()
        mean_sq = sq.mean(dim=reduce_dim, keepdim=True)
        second.lerp_(mean_sq, 1 - beta2)
        scaled = u.float() * second.clamp_min(1e-10).rsqrt()
        norm = sq.sum(dim=(-2, -1), keepdim=True).sqrt()
        scaled_norm = scaled.square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-10)
        return (scaled * (norm / scaled_norm)).to(u.dtype)
