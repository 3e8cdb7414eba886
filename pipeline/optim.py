"""MuonAdamW: Muon for the transformer's 2-D matrices, AdamW for embeddings, lm_head and scalars.

Muon (per group of same-shaped matrices, stacked):
  1. Nesterov momentum:      buf = mu*buf + (1-mu)*g,  u = (1-mu)*g + mu*buf
  2. orthogonalise u with 5 Polar Express iterations in bf16 (arXiv 2505.16932); the recipe decides
     where bf16 applies, and whether MuonEq comes before and Muon+ after (muon_update)
  3. NorMuon: equalise per-row (or per-column) scales with a running second moment, keeping the norm
  4. cautious weight decay: decay only where the update and the weight agree in sign
     p -= lr * u + lr * wd * p * [u * p >= 0],   lr scaled by sqrt(max(1, rows / cols))

Under torch.distributed the optimizer averages gradients itself (no DDP wrapper), and every collective
of a step is started before the first update, so the network moves later groups while this rank
updates earlier ones. The work is split over the ranks, as nanochat splits it:
- Muon: gradients are reduce-scattered, so each rank gets the average of its own contiguous chunk of
  every group's matrices; it runs all of Muon on that chunk only (momentum, orthogonalisation, NorMuon,
  the update), and the updated weights are all-gathered.
- AdamW: the big parameters (embeddings, lm_head) likewise by rows; the small ones are all-reduced and
  updated whole on every rank.
So the elementwise work and the state updates are split too, and gradients cross the network once
instead of twice. Each rank's state is then current for its own share only: `gather_state()` (every
rank, before a checkpoint) makes it whole again, so a checkpoint of rank 0's state resumes on any world
size.
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
BUCKET = 1 << 24  # AdamW gradients under this many elements are all-reduced together, as one flat tensor
MUON_STATE = ("momentum_buffer", "second_momentum_buffer")
ADAMW_STATE = ("exp_avg", "exp_avg_sq")
# torch 2.13 renamed these two (the old names warn there); older torch has only the old names
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


MUON_DEFAULTS = {"polar_express_norm": 1.02, "muon_bf16": "always", "muon_eq": False, "muon_plus": False}


def orthogonalize(x, steps=5, norm=1.02):
    """Approximate the nearest semi-orthogonal matrix (U V^T of the SVD) of each matrix in x (K, r, c),
    in x's dtype, with Polar Express's iterations as nanochat writes them (a tall matrix iterates on its
    smaller Gram matrix X^T X)."""
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * norm + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if x.size(-2) > x.size(-1):
            A = x.mT @ x
            x = a * x + x @ (b * A + c * (A @ A))
        else:
            A = x @ x.mT
            x = a * x + (b * A + c * (A @ A)) @ x
    return x


def normuon(g, second, beta2):
    """Scale each row (or column) by the inverse root of its running mean square `second` (updated in
    place), then restore the update's overall norm: every output unit moves at a similar rate. The
    statistics are fp32 whatever g's dtype; the steps follow nanochat's, so the floats are its floats."""
    reduce_dim = -1 if second.size(-1) == 1 else -2
    v_mean = g.float().square().mean(dim=reduce_dim, keepdim=True)
    size = g.size(reduce_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    second.lerp_(v_mean.to(second.dtype), (1 - beta2.to(g.dtype)).to(second.dtype))
    step = second.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return g * (step * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)


def muon_update(grads, buf, second, weights, momentum, lr, weight_decay, beta2, ns_steps, options):
    """One Muon step of a stack of matrices, in place on the momentum `buf`, NorMuon's `second` and the
    `weights` (grads is overwritten too). The scalars are 0-d fp32 tensors; lr already holds the shape
    factor. `options` (the recipe's Muon knobs, MUON_DEFAULTS):
      muon_bf16 "always": the iterations and everything after them in bf16, on any device, with lr, wd
        and NorMuon's beta2 rounded to bf16 too (nanochat until master); "compute": bf16 iterations on
        CUDA only, the rest in the weights' dtype (master)
      muon_eq: rows rescaled to their mean norm before the iterations (MuonEq, arXiv 2603.28254)
      muon_plus: the result's Frobenius norm snapped to sqrt(min(rows, cols)) (Muon+, arXiv 2602.21545)"""
    buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(buf, momentum)
    x = g.bfloat16() if options["muon_bf16"] == "always" or g.is_cuda else g
    if options["muon_eq"]:
        target = x.float().norm(dim=(-2, -1), keepdim=True) / (x.size(-2) ** 0.5)
        x = x * (target / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(x.dtype)
    g = orthogonalize(x, ns_steps, options["polar_express_norm"])
    if options["muon_bf16"] != "always":
        g = g.to(weights.dtype)
    if options["muon_plus"]:
        g = g * (min(g.size(-2), g.size(-1)) ** 0.5 / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
                 ).to(g.dtype)
    g = normuon(g, second, beta2)
    lr, weight_decay = lr.to(g.dtype), weight_decay.to(g.dtype)
    weights.sub_(lr * g + lr * weight_decay * weights * ((g * weights) >= 0))


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, lr, bias1, bias2, beta1, beta2, eps, weight_decay,
                 fp32_math=False):
    """One AdamW step of each parameter, in place; bias1 and bias2 are Adam's bias corrections.
    `fp32_math` (master): a bf16 parameter (the CUDA embeddings) and its bf16 state are updated in fp32
    and stored back; before, the update ran in bf16 itself."""
    for p, g, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        work = [t.float() for t in (p, g, exp_avg, exp_avg_sq)] if fp32_math else (p, g, exp_avg, exp_avg_sq)
        p32, g32, m, v = work
        if weight_decay:
            p32.mul_(1 - lr * weight_decay)
        m.lerp_(g32, 1 - beta1)
        v.lerp_(g32.square(), 1 - beta2)
        p32.sub_(lr / bias1 * m / ((v / bias2).sqrt() + eps))
        if fp32_math and p.dtype != torch.float32:
            p.copy_(p32)
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _chunk(K, rank, world):
    """This rank's rows [lo, hi) of K stacked matrices, and the padded chunk length every rank uses."""
    chunk = -(-K // world)
    return min(K, rank * chunk), min(K, (rank + 1) * chunk), chunk


def _gather_chunks(local, K, async_op=False):
    """All-gather every rank's (chunk, ...) rows into (K, ...): returns (work or None, the whole)."""
    whole = local.new_empty((local.size(0) * dist.get_world_size(), *local.shape[1:]))
    work = ALL_GATHER(whole, local, async_op=async_op)
    return work, whole[:K]


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `kind`: "adamw" (lr, betas, eps, weight_decay) or "muon" (lr, momentum,
    beta2, ns_steps, weight_decay; every param of a muon group has the same shape)."""

    def __init__(self, groups, split_from=BUCKET, compiled=False, muon_options=None, adamw_fp32_math=False):
        for g in groups:
            if g["kind"] == "muon" and len({p.shape for p in g["params"]}) != 1:
                raise ValueError("every parameter of a muon group must have the same shape")
        super().__init__(groups, {})
        self.split_from = split_from  # AdamW parameters this big are split by rows over the ranks
        # compiled (nanochat compiles its optimizer too): an update is a few fused kernels instead of ~25
        # passes over the weights. What changes from step to step (learning rate, momentum, weight decay,
        # bias corrections) goes in as 0-d tensors, so a new value is not a new graph.
        compile_ = (lambda fn: torch.compile(fn, dynamic=False, fullgraph=True)) if compiled else (lambda fn: fn)
        self._muon_update, self._adamw_update = compile_(muon_update), compile_(adamw_update)
        self._varying = (lambda x: torch.tensor(x, dtype=torch.float32)) if compiled else float
        self.muon_options = {**MUON_DEFAULTS, **(muon_options or {})}  # the recipe's Muon knobs
        self.adamw_fp32_math = adamw_fp32_math
        self._state_split = False  # whether the state is current only for each rank's own share

    def _split_rows(self, p, world):
        """Whether AdamW splits this parameter's rows over the ranks (the embeddings and the lm_head)."""
        return world > 1 and p.numel() >= self.split_from and p.size(0) % world == 0

    @torch.no_grad()
    def step(self):
        rank, world = _world()
        # every collective goes out first, in the order the updates need them
        arriving = [self._reduce(group, rank, world) for group in self.param_groups]
        finishing = [(self._adamw if group["kind"] == "adamw" else self._muon)(group, *arrived(), rank, world)
                     for group, arrived in zip(self.param_groups, arriving, strict=True)]
        for finish in finishing:
            finish()
        self._state_split = world > 1

    def gather_state(self):
        """Make every rank's state whole (a collective: call it on every rank, before state_dict)."""
        rank, world = _world()
        if world > 1:
            for group in self.param_groups:
                if group["kind"] == "muon":
                    state = self.state.get(group["params"][0], {})
                    split = [state[name] for name in MUON_STATE if name in state]
                else:
                    split = [self.state[p][name] for p in group["params"]
                             if p in self.state and self._split_rows(p, world) for name in ADAMW_STATE]
                for whole in split:
                    lo, hi, chunk = _chunk(whole.size(0), rank, world)
                    local = whole.new_zeros((chunk, *whole.shape[1:]))
                    local[:hi - lo] = whole[lo:hi]
                    whole.copy_(_gather_chunks(local, whole.size(0))[1])
        self._state_split = False

    def state_dict(self):
        if self._state_split:
            raise RuntimeError("the optimizer's state is split over the ranks: call gather_state() on every "
                               "rank first")
        return super().state_dict()

    def _reduce(self, group, rank, world):
        """Start averaging this group's gradients over the ranks; returns a call that waits for the result."""
        params = [p for p in group["params"] if p.grad is not None]
        if group["kind"] == "muon":
            if params and len(params) != len(group["params"]):
                raise ValueError("a muon group's matrices must all have gradients, or none")
            return self._reduce_scatter(params, rank, world)
        return self._all_reduce(params, rank, world)

    def _all_reduce(self, params, rank, world):
        """AdamW's gradients, averaged. A big one whose rows divide evenly (embeddings, lm_head) is
        reduce-scattered by rows: this rank gets, and will update, its own rows only. Other big ones are
        all-reduced in place, the small ones packed into one flat tensor (one collective, not one each)."""
        rows = [slice(None)] * len(params)
        if world == 1:
            return lambda: (params, [p.grad for p in params], rows)
        own, works = {}, []
        for i, p in enumerate(params):
            if self._split_rows(p, world):
                lo, hi, _ = _chunk(p.size(0), rank, world)
                rows[i], own[i] = slice(lo, hi), p.grad.new_empty((hi - lo, *p.shape[1:]))
                works.append(REDUCE_SCATTER(own[i], p.grad, async_op=True))
        whole = [p.grad for i, p in enumerate(params) if i not in own]
        small = [g for g in whole if g.numel() < BUCKET]
        flat = torch.cat([g.reshape(-1) for g in small]) if small else None
        works += [dist.all_reduce(g, async_op=True) for g in whole if g.numel() >= BUCKET]
        works += [dist.all_reduce(flat, async_op=True)] if small else []

        def arrived():
            for work in works:
                work.wait()
            if small:
                torch._foreach_copy_(small, [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in small]),
                                                                           small, strict=True)])
            grads = [own.get(i, p.grad) for i, p in enumerate(params)]
            torch._foreach_div_(grads, world)
            return params, grads, rows
        return arrived

    @staticmethod
    def _reduce_scatter(params, rank, world):
        """Muon's gradients, stacked (K, r, c): this rank receives the average of its own chunk only."""
        if world == 1 or not params:
            return lambda: (params, torch.stack([p.grad for p in params]) if params else None)
        lo, hi, chunk = _chunk(len(params), rank, world)
        stacked = params[0].grad.new_empty((chunk * world, *params[0].shape))  # padded: every rank gets `chunk`
        torch.stack([p.grad for p in params], out=stacked[:len(params)])
        stacked[len(params):].zero_()  # only the padding: the stack fills the rest
        mine = stacked.new_empty((chunk, *params[0].shape))
        work = REDUCE_SCATTER(mine, stacked, async_op=True)

        def arrived():
            work.wait()
            return params, mine[:hi - lo].div_(world)
        return arrived

    def _adamw(self, group, params, grads, rows, rank, world):
        """Update `rows` of each parameter (all of it, or this rank's share); returns a call that
        finishes the step (gathering every rank's rows)."""
        if not params:
            return lambda: None
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        t, varying = states[0]["step"], self._varying
        self._adamw_update([p[r] for p, r in zip(params, rows, strict=True)], grads,
                           [s["exp_avg"][r] for s, r in zip(states, rows, strict=True)],
                           [s["exp_avg_sq"][r] for s, r in zip(states, rows, strict=True)],
                           varying(group["lr"]), varying(1 - beta1 ** t), varying(1 - beta2 ** t), beta1, beta2,
                           group["eps"], group["weight_decay"], self.adamw_fp32_math)
        works = [ALL_GATHER(p, p[r].clone(), async_op=True) for p, r in zip(params, rows, strict=True)
                 if r != slice(None)]

        def finish():
            for work in works:
                work.wait()
        return finish

    def _muon(self, group, params, grads, rank, world):
        """Update this rank's chunk of the group (all of it on one process); returns a call that
        finishes the step (gathering every rank's updated weights)."""
        if not params:
            return lambda: None
        K, shape = len(params), params[0].shape
        lo, hi, chunk = _chunk(K, rank, world)
        state = self.state[params[0]]
        if not state:
            rows, cols = shape
            state["momentum_buffer"] = torch.zeros((K, *shape), dtype=grads.dtype, device=grads.device)
            state["second_momentum_buffer"] = grads.new_zeros(
                (K, rows, 1) if rows >= cols else (K, 1, cols), dtype=torch.float32)
        local = params[0].new_empty((chunk if world > 1 else K, *shape))
        local[hi - lo:].zero_()  # only the padding (if any): the stack below fills the rest
        if hi > lo:
            scalar = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  0-d: rounded as nanochat's
            self._muon_update(grads, state["momentum_buffer"][lo:hi], state["second_momentum_buffer"][lo:hi],
                              torch.stack(params[lo:hi], out=local[:hi - lo]), scalar(group["momentum"]),
                              scalar(group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5),
                              scalar(group["weight_decay"]), scalar(group["beta2"]), group["ns_steps"],
                              self.muon_options)
        if world == 1:
            torch._foreach_copy_(params, list(local.unbind(0)))
            return lambda: None
        work, whole = _gather_chunks(local, K, async_op=True)

        def finish():
            work.wait()
            torch._foreach_copy_(params, list(whole.unbind(0)))
        return finish
