"""A tiny trainable model and its tasks, for the transfer-quality test (tests/test_quality.py)
and benchmark (benchmarks/quality): a Llama-style decoder (RMSNorm, RoPE attention, SwiGLU MLP)
whose parameters carry the real Hugging Face Llama names (model.layers.N.self_attn.q_proj.weight,
...), so its checkpoints are safetensors files that loraport's "llama" key map reads; synthetic
sequence tasks scored exactly; full training and LoRA training (low-rank up/down factors on the
linear layers, base frozen); a trained LoRA to and from a LoRA file of any format.

A sequence is [task token, x_1..x_n, SEP, y_1..y_n] over digits 0..DIGITS-1; the model is
trained (and scored) on the y positions only, with teacher forcing, so accuracy is the exact
fraction of output digits predicted right.

Everything is plain torch on the CPU, deterministic for a given seed and thread count."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import archs, formats

DIGITS = 16
SEP = DIGITS
TASKS = {"copy": 17, "reverse": 18, "sort": 19, "cipher": 20, "swap": 21}  # task name -> its token
VOCAB = 24
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@dataclass(frozen=True)
class Config:
    width: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    length: int = 6  # digits per input (and per output)


def init_weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """A fresh model: {Llama weight name: tensor}, Gaussian with 1/sqrt(fan_in) scale."""
    g = torch.Generator().manual_seed(seed)
    h, f = cfg.width, cfg.ffn

    def lin(out, inp):
        return torch.randn(out, inp, generator=g) / math.sqrt(inp)

    w = {"model.embed_tokens.weight": torch.randn(VOCAB, h, generator=g)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        for name in LINEARS[:4]:
            w[p + name + ".weight"] = lin(h, h)
        w[p + "mlp.gate_proj.weight"] = lin(f, h)
        w[p + "mlp.up_proj.weight"] = lin(f, h)
        w[p + "mlp.down_proj.weight"] = lin(h, f) / math.sqrt(2 * cfg.layers)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = lin(VOCAB, h)
    return w


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [B, heads, T, d] (Llama's rotate-half layout)."""
    T, d = x.shape[-2], x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # [d/2]
    angles = torch.arange(T, dtype=torch.float32)[:, None] * freqs  # [T, d/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [T, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def extra_features(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """The conditioning that upgrade (d) feeds on the channels a layer gained: a one-hot of each
    token's position (like an I2V model's extra image channels, information the old model had
    no input for). tokens [B, T] -> [B, T, channels]."""
    B, T = tokens.shape
    pos = torch.arange(T) % channels
    return F.one_hot(pos, channels).float().expand(B, T, channels)


def forward(w: dict[str, torch.Tensor], tokens: torch.Tensor, cfg: Config, lora=None) -> torch.Tensor:
    """Logits [B, T, VOCAB] for tokens [B, T]. ``lora``: {module name: (up [out, r], down [r, in])}
    added to the module's weight (ΔW = up @ down, scale folded in). A linear whose weight has
    more input columns than its input gets `extra_features` on the new columns."""
    lora = lora or {}

    def linear(name, x):
        W = w[name + ".weight"]  # [out, in]
        if W.shape[1] > x.shape[-1]:
            x = torch.cat([x, extra_features(tokens, W.shape[1] - x.shape[-1])], -1)
        y = x @ W.T
        if name in lora:
            up, down = lora[name]
            y = y + (x @ down.T) @ up.T
        return y

    B, T = tokens.shape
    h, nh = cfg.width, cfg.heads
    x = w["model.embed_tokens.weight"][tokens]  # [B, T, h]
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        a = _rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (linear(p + f"self_attn.{n}_proj", a).view(B, T, nh, h // nh).transpose(1, 2) for n in "qkv")
        att = F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)  # [B, nh, T, d]
        x = x + linear(p + "self_attn.o_proj", att.transpose(1, 2).reshape(B, T, h))
        m = _rms(x, w[p + "post_attention_layernorm.weight"])
        x = x + linear(p + "mlp.down_proj", F.silu(linear(p + "mlp.gate_proj", m)) * linear(p + "mlp.up_proj", m))
    return linear("lm_head", _rms(x, w["model.norm.weight"]))


def make_batch(task: str, n: int, length: int, generator: torch.Generator, skew: float = 0.0) -> torch.Tensor:
    """n sequences [n, 2·length + 2] of ``task``. ``skew`` > 0 draws digits from a Zipf-like
    distribution p(d) ∝ (d + 1)^-skew instead of uniformly (a shifted data distribution)."""
    probs = (torch.arange(DIGITS, dtype=torch.float64) + 1) ** -skew
    x = torch.multinomial(probs.expand(n, DIGITS), length, replacement=True, generator=generator)  # [n, L]
    if task == "copy":
        y = x
    elif task == "reverse":
        y = x.flip(1)
    elif task == "sort":
        y = x.sort(1).values
    elif task == "swap":  # copy with each adjacent pair swapped (x2 x1 x4 x3 ...): a new skill
        y = x.view(n, length // 2, 2).flip(2).reshape(n, length)
    elif task == "cipher":  # copy through a fixed derangement of the digits: a new skill
        y = CIPHER[x]
    else:
        raise ValueError(f"unknown task {task!r}")
    head = torch.full((n, 1), TASKS[task])
    sep = torch.full((n, 1), SEP)
    return torch.cat([head, x, sep, y], 1)


CIPHER = (torch.arange(DIGITS) * 5 + 3) % DIGITS  # a bijection with no fixed point


def loss_and_accuracy(logits: torch.Tensor, tokens: torch.Tensor, length: int):
    """Cross-entropy and exact accuracy on the output digits (positions after SEP)."""
    pred = logits[:, length + 1 : -1]  # [B, L, V]: the logits that predict y_1..y_L
    target = tokens[:, length + 2 :]  # [B, L]
    loss = F.cross_entropy(pred.reshape(-1, VOCAB), target.reshape(-1))
    acc = (pred.argmax(-1) == target).float().mean()
    return loss, acc


@dataclass
class Recipe:
    """A training run: tasks mixed uniformly, ``steps`` AdamW steps of ``batch`` sequences."""

    tasks: tuple[str, ...]
    steps: int
    lr: float = 3e-3
    batch: int = 64
    skew: float = 0.0
    seed: int = 0


def schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def train(w: dict[str, torch.Tensor], cfg: Config, recipe: Recipe, trainable=None) -> dict[str, torch.Tensor]:
    """Train a copy of ``w`` (all tensors, or those named in ``trainable``) and return it."""
    w = {k: v.clone() for k, v in w.items()}
    names = list(trainable or w)
    for k in names:
        w[k].requires_grad_(True)
    opt = torch.optim.AdamW([w[k] for k in names], lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(recipe.seed)
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * schedule(step, recipe.steps)
        task = recipe.tasks[step % len(recipe.tasks)]
        tokens = make_batch(task, recipe.batch, cfg.length, g, recipe.skew)
        loss, _ = loss_and_accuracy(forward(w, tokens, cfg), tokens, cfg.length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in w.items()}


def lora_modules(w: dict[str, torch.Tensor], cfg: Config) -> list[str]:
    """The modules a LoRA adapts: every attention and MLP projection (Llama names)."""
    return [f"model.layers.{i}.{n}" for i in range(cfg.layers) for n in LINEARS]


def train_lora(w: dict[str, torch.Tensor], cfg: Config, recipe: Recipe, rank: int) -> dict[str, tuple]:
    """A LoRA of ``rank`` trained on base ``w`` (frozen): {module: (up [out, r], down [r, in])}.
    Standard initialization: down Gaussian / sqrt(in), up zero, so training starts at ΔW = 0."""
    g = torch.Generator().manual_seed(recipe.seed + 1)
    factors = {}
    for name in lora_modules(w, cfg):
        out, inp = w[name + ".weight"].shape
        factors[name] = (
            torch.zeros(out, rank, requires_grad=True),
            (torch.randn(rank, inp, generator=g) / math.sqrt(inp)).requires_grad_(True),
        )
    params = [t for pair in factors.values() for t in pair]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * schedule(step, recipe.steps)
        task = recipe.tasks[step % len(recipe.tasks)]
        tokens = make_batch(task, recipe.batch, cfg.length, g, recipe.skew)
        loss, _ = loss_and_accuracy(forward(w, tokens, cfg, factors), tokens, cfg.length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: (u.detach(), d.detach()) for k, (u, d) in factors.items()}


@torch.no_grad()
def accuracy(w: dict[str, torch.Tensor], cfg: Config, task: str, lora=None, n: int = 512, seed: int = 12345) -> float:
    """Exact accuracy on ``n`` fresh ``task`` sequences from a fixed evaluation seed."""
    tokens = make_batch(task, n, cfg.length, torch.Generator().manual_seed(seed))
    return float(loss_and_accuracy(forward(w, tokens, cfg, lora), tokens, cfg.length)[1])


def lora_state_dict(factors: dict[str, tuple], fmt: str) -> dict[str, torch.Tensor]:
    """A trained LoRA {module: (up, down)} as a ``fmt`` state dict. kohya gets alpha = rank / 2
    (a common training setting) with up doubled to keep ΔW = up @ down; PEFT gets scale 1."""
    arch = archs.get("llama")
    mods = []
    for name, (up, down) in factors.items():
        r = down.shape[0]
        alpha = r / 2 if fmt == "kohya" else None
        scale = 1.0 if alpha is None else alpha / r
        mods.append(formats.LoraModule("model", name, (up / scale).contiguous(), down.contiguous(), alpha, name))
    return formats.state_dict(formats.LoraFile(mods, fmt, arch, "diffusers"), fmt)


def load_lora(path_or_sd, w: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """A LoRA file as {module: (up [out, r], down [r, in])} with scales folded in, down zero-
    padded to the input width of ``w``'s weight (what diffusers does for grown inputs)."""
    out = {}
    for m in formats.read_lora(path_or_sd, arch="llama").modules:
        up, down = m.factors()
        extra = w[m.name + ".weight"].shape[1] - down.shape[1]
        if extra > 0:
            down = torch.cat([down, down.new_zeros(down.shape[0], extra)], 1)
        out[m.name] = (up, down)
    return out
