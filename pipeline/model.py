"""The GPT of nanochat's speedrun (Feb 2026 recipe, leaderboard runs 1-4), written for this pipeline.

- token embedding, then a weightless RMSNorm; untied lm_head; no biases anywhere
- pre-norm blocks: attention (rotary, QK-norm, sliding window: FlashAttention's own on CUDA, a mask
  elsewhere) and a ReLU^2 MLP (4x)
- before every block: x = resid_lambda[i] * x + x0_lambda[i] * x0, x0 = the normed embedding
- value embeddings on alternating layers (always the last), mixed into v through a 2*sigmoid gate
- logits soft-capped at 15 in fp32; vocab padded to a multiple of 64
Sizes come from `--depth` through pipeline.dims.
"""

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import dims

try:  # FlashAttention's own sliding window, in torch since 2.10: a windowed layer skips the keys it cannot see
    from torch.nn.attention.varlen import varlen_attn
    FLASH_WINDOWS = "window_size" in inspect.signature(varlen_attn).parameters
except ImportError:
    varlen_attn, FLASH_WINDOWS = None, False
HALF = (torch.bfloat16, torch.float16)  # the dtypes FlashAttention computes in


FA3 = None  # FlashAttention-3's interface once use_fa3() has loaded it: then every layer runs through it
FA3_KERNEL = "varunneal/flash-attention-3"  # the HuggingFace `kernels` build nanochat loads on Hopper


def use_fa3():
    """Load FlashAttention-3 for every attention layer, as nanochat does on Hopper (sm90), where it is
    faster than torch's own FlashAttention-2. It comes through HuggingFace `kernels` (not a pinned
    dependency: `pip install kernels`), which fetches the kernel from the hub once. Returns why not where
    it does not load: then torch's kernels run, as on any other GPU."""
    global FA3
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        return "not a Hopper GPU (FlashAttention-3 is built for sm90 only)"
    try:
        from kernels import get_kernel
    except ImportError:
        return "HuggingFace `kernels` is not installed (pip install kernels)"
    try:
        FA3 = get_kernel(FA3_KERNEL).flash_attn_interface
    except Exception as e:  # the hub out of reach, or no build for this torch and CUDA
        return f"{FA3_KERNEL} did not load ({type(e).__name__}: {e})"
    return None


def flash_windows_supported():
    """Whether this process can run the short windows through FlashAttention: a torch whose varlen_attn
    takes window_size, and a GPU it has flash kernels for (Ampere, sm80, or newer; a T4 or V100 keeps
    the masked path instead of failing)."""
    return FLASH_WINDOWS and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)

SOFTCAP = 15.0
ROPE_BASE = 10000.0
VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many channels of the block input

# MKL's vector math (torch's CPU cos, exp, log, tanh) sets itself up on its first call; when that call is
# split over threads, the other thread's share came out a few ulp off in 2 to 5 fresh processes of 10,
# so one checkpoint gave two val_bpb (1e-9 apart). One call on one element, in this thread, sets it up
# before any split call: a stage's bytes stay a function of its inputs.
torch.tanh(torch.zeros(1))


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len=2048, window_pattern="SSSL",
                   aspect_ratio=dims.ASPECT_RATIO, head_dim=dims.HEAD_DIM):
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=dims.num_heads(depth, aspect_ratio, head_dim),
                   n_embd=dims.model_dim(depth, aspect_ratio, head_dim), window_pattern=window_pattern)

    def to_dict(self):
        return asdict(self)


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer, n_layer):
    """Every other layer, counted back from the last one (which always has one)."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per layer: how many earlier positions a query may see. 'L' is the full context, 'S' half of it;
    the pattern tiles over the layers and the last layer is always 'L'."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern {config.window_pattern!r} must be made of S and L")
    full, short = config.sequence_len, config.sequence_len // 2
    sizes = [full if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = full
    return sizes


def rotary_tables(seq_len, head_dim, device=None):
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate the two halves of each head by position-dependent angles (x: B, T, H, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_mask(seq_len, window, device=None):
    """True where query i may attend to key j: j <= i and i - j <= window."""
    i = torch.arange(seq_len, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= window)


def attention(q, k, v, window=None, kernel="masked"):
    """Causal self-attention on (B, T, H, D) tensors. window: None (every earlier position) or
    (size, mask): each query sees itself and the `size` positions before it. kernel (GPT.window_kernel):
    - "fa3": FlashAttention-3 (use_fa3) for every layer, its own window_size for the short ones
    - "flash": the short windows through torch's varlen FlashAttention, which applies the window itself
      and skips the blocks outside it, as nanochat's flash_attn window_size does
    - otherwise SDPA, causal, or with the boolean T x T `mask`: that computes every score and discards
      the masked ones (and cannot use the flash kernel at all)."""
    B, T, H, D = q.shape
    if kernel in ("fa3", "flash"):
        # autocast does not reach these custom ops: give them the dtype SDPA would have computed in
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
        if dtype in HALF and kernel == "fa3":
            y = FA3.flash_attn_func(*(t.to(dtype) for t in (q, k, v)), causal=True,
                                    window_size=(-1 if window is None else window[0], 0))
            return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp
        if dtype in HALF and window is not None:
            starts = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)  # B sequences of T
            y = varlen_attn(*(t.reshape(B * T, H, D).to(dtype) for t in (q, k, v)), starts, starts, T, T,
                            window_size=(window[0], 0))
            return y.view(B, T, H, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if window is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window[1][:T, :T])
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, self.n_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, kernel):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # gate in (0, 2), 1 at init: the value embedding starts fully mixed in
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        return self.c_proj(attention(q, k, v, window, kernel).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kernel):
        x = x + self.attn(rms_norm(x), ve, cos, sin, window, kernel)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        vocab = dims.pad_vocab(config.vocab_size)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, config.n_embd)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        self.windows = window_sizes(config)
        cos, sin = rotary_tables(config.sequence_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # one precomputed mask per short window: no tensors are built inside forward (torch.compile)
        for w in sorted(set(self.windows) - {config.sequence_len}):
            self.register_buffer(f"mask_{w}", window_mask(config.sequence_len, w), persistent=False)
        self.flash_windows = flash_windows_supported()  # False: the masked SDPA path on CUDA too (bench)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: unit-variance embeddings, a near-zero lm_head, zero output projections so
        every block starts as the identity, uniform(-s, s) with std 1/sqrt(d) for the other matrices."""
        d = self.config.n_embd
        s = math.sqrt(3) / math.sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        cos, sin = rotary_tables(self.config.sequence_len, d // self.config.n_head, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for w in set(self.windows) - {self.config.sequence_len}:
            getattr(self, f"mask_{w}").copy_(window_mask(self.config.sequence_len, w, self.cos.device))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.head(self.trunk(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def trunk(self, idx):
        """The normed last hidden state (B, T, C): what the lm_head reads."""
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        kernel = self.window_kernel(idx.device)
        x = rms_norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            w = self.windows[i]
            x = block(x, ve, cos, sin, None if w >= T else (w, getattr(self, f"mask_{w}")), kernel)
        return rms_norm(x)

    def head(self, h):
        """Soft-capped fp32 logits of hidden states `h` (..., C); CORE scoring calls it on the scored
        positions only, which spares the (positions x vocab) logits of every prompt token."""
        logits = self.lm_head(h)[..., :self.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def window_kernel(self, device):
        """What computes the attention layers on `device`: "fa3" (FlashAttention-3 runs every layer, the
        short windows too), else what runs the short windows: "flash" (torch's FlashAttention sliding
        window), "masked" (SDPA with a mask, every score computed) or "none" (no short windows)."""
        if device.type == "cuda" and FA3 is not None:
            return "fa3"
        if all(w >= self.config.sequence_len for w in self.windows):
            return "none"
        return "flash" if self.flash_windows and device.type == "cuda" else "masked"

    def num_scaling_params(self):
        """Parameter counts by kind; scaling params (for the data:param ratio) = transformer_matrices + lm_head."""
        counts = {"wte": self.transformer.wte.weight.numel(),
                  "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
                  "lm_head": self.lm_head.weight.numel(),
                  "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
                  "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel()}
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
        return counts

    def estimate_flops(self):
        """Training FLOPs per token: 6 per weight that multiplies (embeddings are lookups, so they are
        left out) plus attention's 12 * heads * head_dim * the positions each layer attends to."""
        counts = self.num_scaling_params()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn
