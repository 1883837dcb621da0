"""A tiny GPT: the base model that every fine-tuning method in this project adapts.

A decoder-only transformer in the GPT-2 layout (Radford et al. 2019), pre-LayerNorm, with learned
position embeddings and character-level tokens:

    x_0 = E[idx] + P[0..T)                                   (token + position embeddings)
    x_l = x_{l-1} + Attn(LN(x_{l-1}));  x_l = x_l + MLP(LN(x_l))   for each of n_layer blocks
    logits = LN(x_L) W_head^T

Attention uses four *separate* linears, `q_proj`, `k_proj`, `v_proj` and `o_proj`, and the MLP two,
`up_proj` and `down_proj`, so that adapters can target each by name as in the LoRA paper
(arXiv 2106.09685: section 7.1's experiments choose W_q and W_v). `lm_head` is NOT tied to the
token embedding: it is a linear of its own, and it is not an adapter target by default (only
linears inside the blocks are; see `adapters.ALL_LINEAR`).

Letters in the shape comments: B batch, T time (sequence length), C channels (n_embd),
nh heads, hs head size (C // nh), V vocabulary size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import check_bool, check_int, check_number, check_probability

# GPT-2's initialisation: N(0, 0.02) for weights and embeddings, and the residual projections scaled
# by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth (GPT-2 paper,
# section 2.3).
INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 96      # number of distinct token ids (characters + the unknown token)
    block_size: int = 64      # longest context the model attends over, in tokens
    n_layer: int = 3          # number of transformer blocks
    n_head: int = 4           # attention heads per block; must divide n_embd
    n_embd: int = 128         # width of the residual stream (C)
    mlp_ratio: int = 4        # hidden width of the MLP is mlp_ratio * n_embd
    dropout: float = 0.0      # dropout on attention weights and residual branches while training
    bias: bool = True         # whether linears and LayerNorms carry a bias

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            check_int(getattr(self, name), f"GPTConfig.{name}", low=1)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_probability(self.dropout, "GPTConfig.dropout")
        check_bool(self.bias, "GPTConfig.bias")

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.o_proj = nn.Linear(C, C, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal multi-head self-attention of x (B, T, C) -> (B, T, C), with the four projections
        q_proj, k_proj, v_proj, o_proj and n_head heads of C // n_head channels; position t
        attends to positions 0..t only. Dropout (on the attention weights and the output) only
        while training."""
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs) + causal mask) v   (Vaswani et al. 2017, eq. 1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up_proj(x))  # (B, T, mlp_ratio * C)
        return F.dropout(self.down_proj(h), self.dropout, self.training)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-LN residual (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """The tiny GPT. `GPT(config, generator=None)`; `generator` seeds the initial weights."""

    def __init__(self, config: GPTConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else INIT_STD
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """`(logits (B, T, V), loss)`: loss is the mean cross-entropy, None without targets."""
        self._check_ids(idx, "idx")
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            self._check_ids(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, "
                                 f"got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))  # mean over B*T
        return logits, loss

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise TypeError(f"{name} must be a 2-D torch.long tensor (B, T)")
        if ids.shape[1] > self.config.block_size:
            raise ValueError(f"{name} has {ids.shape[1]} tokens, more than block_size "
                             f"{self.config.block_size}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.config.vocab_size})")

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `idx` (B, T); returns (B, T + max_new_tokens).

        The context is cropped to the last `block_size` tokens. `temperature` divides the logits;
        `top_k` keeps only the k most likely tokens; `generator` makes sampling reproducible.
        """
        check_int(max_new_tokens, "max_new_tokens", low=0)
        check_number(temperature, "temperature", low=0, low_open=True)
        if top_k is not None:
            check_int(top_k, "top_k", low=1, high=self.config.vocab_size)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # (B, <=block_size)
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
        return idx
