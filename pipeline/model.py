"""The GPT of nanochat's speedrun, written for this pipeline; what differs between nanochat's commits is a
knob of the recipe (pipeline.recipe), carried in GPTConfig.

- token embedding, then a weightless RMSNorm; untied lm_head; no biases anywhere
- smear (recipe knob): each position mixes in the previous one's normed embedding through a gate
- pre-norm blocks: attention (rotary, QK-norm then an optional q/k scale, sliding windows:
  FlashAttention's own on CUDA, a mask elsewhere) and a ReLU^2 MLP (4x)
- before every block: x = resid_lambda[i] * x + x0_lambda[i] * x0, x0 = the normed (smeared) embedding
- value embeddings on alternating layers (always the last), mixed into v through a scaled sigmoid gate
- backout (recipe knob): the residual of the middle layer, scaled, is subtracted before the final norm
- logits soft-capped in fp32; vocab padded to a multiple of 64
- on CUDA the token and value embeddings are kept in bf16, as nanochat keeps them, so the residual
  stream is bf16 too
Sizes come from `--depth` through pipeline.dims.
"""

import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import dims
from pipeline import recipe as recipes
from pipeline.chunked_loss import softcapped_cross_entropy

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

ROTARY_OVERCOMPUTE = 10  # rotary tables cover 10x the context, as nanochat's: CORE prompts run uncropped

# MKL's vector math (torch's CPU cos, exp, log, tanh) sets itself up on its first call; when that call is
# split over threads, the other thread's share came out a few ulp off in 2 to 5 fresh processes of 10,
# so one checkpoint gave two val_bpb (1e-9 apart). One call on one element, in this thread, sets it up
# before any split call: a stage's bytes stay a function of its inputs.
torch.tanh(torch.zeros(1))


@dataclass
class GPTConfig:
    """Shape, and the recipe's model knobs (pipeline.recipe). The knob defaults are the model this
    pipeline trained before recipes were versioned, so an older model.json loads as the model it was."""
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    softcap: float = 15.0
    rope_base: float = 10000
    rotary_bf16: bool = False
    short_window_divisor: int = 2
    short_window_tile: int = 0
    qk_scale: float = 1.0
    ve_gate_channels: int = 32
    ve_gate_scale: float = 2.0
    ve_gate_init: float = 0.0
    wte_init_std: float = 1.0
    c_fc_init_scale: float = 1.0
    resid_lambda_init: tuple = (1.0, 0.0)
    x0_lambda_init: tuple = (0.1, 0.0)
    smear: bool = False
    backout: bool = False
    smear_gate_init: float = 0.0
    backout_lambda_init: float = 0.0
    smear_gate_flops: bool = False

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len=2048, window_pattern="SSSL", aspect_ratio=dims.ASPECT_RATIO,
                   head_dim=dims.HEAD_DIM, recipe=None):
        """The model a run of `recipe` (a nanochat commit; the newest if None) builds at this depth."""
        flags = {"depth": depth, "max_seq_len": sequence_len, "window_pattern": window_pattern,
                 "aspect_ratio": aspect_ratio, "head_dim": head_dim}
        return cls(**dims.model_config(flags, recipes.knobs(recipe), vocab_size))

    def to_dict(self):
        return asdict(self)


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _uniform_or_zeros(weight, high):
    """uniform(0, high), or zeros (which draws nothing from the RNG) when high is 0."""
    if high:
        nn.init.uniform_(weight, 0.0, high)
    else:
        nn.init.zeros_(weight)


def has_value_embedding(layer, n_layer):
    """Every other layer, counted back from the last one (which always has one)."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per layer: how many earlier positions a query may see (pipeline.dims.window_sizes)."""
    return dims.window_sizes(config.sequence_len, config.n_layer, config.window_pattern, asdict(config))


def rotary_tables(seq_len, head_dim, base=10000, bf16=False, device=None):
    """cos and sin of each (position, channel pair)'s angle, (1, T, 1, head_dim/2). `bf16`: rounded to
    bf16, as nanochat kept them on every device until 6ed7d1d."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos[None, :, None, :], sin[None, :, None, :]


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
        self.qk_scale = config.qk_scale
        self.gate_channels, self.gate_scale = config.ve_gate_channels, config.ve_gate_scale
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = (nn.Linear(config.ve_gate_channels, self.n_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, kernel):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # gate in (0, scale): the value embedding mixed in per head
            gate = self.gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1:  # sharper attention, the scale split between q and k
            q, k = q * self.qk_scale, k * self.qk_scale
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
        if config.smear:
            self.smear_gate = nn.Linear(dims.SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.windows = window_sizes(config)
        cos, sin = rotary_tables(config.sequence_len * ROTARY_OVERCOMPUTE, config.n_embd // config.n_head,
                                 config.rope_base, config.rotary_bf16)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # one precomputed mask per short window: no tensors are built inside forward (torch.compile)
        for w in sorted(set(self.windows) - {config.sequence_len}):
            self.register_buffer(f"mask_{w}", window_mask(config.sequence_len, w), persistent=False)
        self.flash_windows = flash_windows_supported()  # False: the masked SDPA path on CUDA too (bench)
        self.chunked_loss = True  # on a CPU, the training loss a chunk of rows at a time (False: bench, tests)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init, drawn in nanochat's order (so a seed gives nanochat's very weights): normal
        embeddings, a near-zero lm_head, uniform(-s, s) with std 1/sqrt(d) for the block matrices (c_fc
        scaled by the recipe), zero output projections so every block starts as the identity, the per-layer
        scalars, the smear gate, the value embeddings, then the value-embedding gates."""
        c = self.config
        s = 3**0.5 * c.n_embd**-0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=c.wte_init_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s * c.c_fc_init_scale, s * c.c_fc_init_scale)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for lambdas, (first, drop) in ((self.resid_lambdas, c.resid_lambda_init), (self.x0_lambdas, c.x0_lambda_init)):
            for i in range(c.n_layer):  # first at layer 0, falling by `drop` to the last layer
                lambdas[i] = first - (drop * i / max(c.n_layer - 1, 1))
        if c.smear:
            nn.init.zeros_(self.smear_lambda)
            _uniform_or_zeros(self.smear_gate.weight, c.smear_gate_init)
        if c.backout:
            nn.init.constant_(self.backout_lambda, c.backout_lambda_init)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                _uniform_or_zeros(block.attn.ve_gate.weight, c.ve_gate_init)
        cos, sin = rotary_tables(c.sequence_len * ROTARY_OVERCOMPUTE, c.n_embd // c.n_head, c.rope_base, c.rotary_bf16,
                                 self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for w in set(self.windows) - {c.sequence_len}:
            getattr(self, f"mask_{w}").copy_(window_mask(c.sequence_len, w, self.cos.device))
        self.embeddings_bf16_on_cuda()

    def embeddings_bf16_on_cuda(self):
        """On CUDA, the token and value embeddings live in bf16, as nanochat keeps them (its AdamW state
        for them too), so the residual stream is bf16 from the first layer on."""
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)
        return self

    def forward(self, idx, targets=None, loss_reduction="mean"):
        h = self.trunk(idx)
        if (targets is not None and self.chunked_loss and h.device.type == "cpu" and type(self.lm_head) is nn.Linear
                and (loss_reduction == "mean" or (loss_reduction == "none" and not torch.is_grad_enabled()))):
            # never the whole (rows x vocab) logits: on a CPU their passes cost as much as the matmuls (training),
            # and they would be the peak of memory (evaluation). An fp8 lm_head keeps its own matmul.
            return softcapped_cross_entropy(h.view(-1, h.size(-1)), self.lm_head.weight[:self.config.vocab_size],
                                            targets.reshape(-1), self.config.softcap, loss_reduction)
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def trunk(self, idx):
        """The normed last hidden state (B, T, C): what the lm_head reads."""
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        if cos.size(1) < T:  # past even 10x the context (where nanochat stops): tables made for this call
            c = self.config
            cos, sin = rotary_tables(T, c.n_embd // c.n_head, c.rope_base, c.rotary_bf16, idx.device)
        kernel = self.window_kernel(idx.device)
        x = rms_norm(self.transformer.wte(idx))
        if self.config.smear:  # each position takes in some of the previous one: bigram-like input
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :dims.SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, backout, backout_layer = x, None, self.config.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self._window(self.windows[i], T, idx.device), kernel)
            if i == backout_layer:
                backout = x
        if self.config.backout:  # take the mid-depth features back out before the logits
            x = x - self.backout_lambda.to(x.dtype) * backout
        return rms_norm(x)

    def _window(self, w, T, device):
        """(size, mask) for a layer that sees `w` positions back, None when that covers all T. Past the
        training context (an uncropped CORE prompt) every layer is a window, its mask made here."""
        if w >= T:
            return None
        if self.config.sequence_len >= T:
            return w, getattr(self, f"mask_{w}")
        return w, window_mask(T, w, device)

    def head(self, h):
        """Soft-capped fp32 logits of hidden states `h` (..., C); CORE scoring calls it on the scored
        positions only, which spares the (positions x vocab) logits of every prompt token."""
        logits = self.lm_head(h)[..., :self.config.vocab_size].float()
        return self.config.softcap * torch.tanh(logits / self.config.softcap)

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
                  "scalars": sum(p.numel() for name, p in self.named_parameters() if "." not in name)
                  + (self.smear_gate.weight.numel() if self.config.smear else 0)}
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters())
        counts["scaling"] = counts["transformer_matrices"] + counts["lm_head"]
        return counts

    def estimate_flops(self):
        """Training FLOPs per token: 6 per weight that multiplies (embeddings are lookups and the scalars are
        left out, the smear gate too until nanochat master) plus attention's 12 * heads * head_dim * the
        positions each layer attends to (pipeline.dims.flops_per_token, which a test holds to this)."""
        counts = self.num_scaling_params()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        if self.config.smear and self.config.smear_gate_flops:
            matmul_params += self.smear_gate.weight.numel()
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn
