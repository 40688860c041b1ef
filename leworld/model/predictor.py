"""Causal AdaLN-zero transformer predictor over the history of frame embeddings.

Example:
    >>> import torch
    >>> from leworld.model.predictor import Predictor
    >>> pred = Predictor(dim=64, history=3, depth=2, heads=4, head_dim=16, mlp=128)
    >>> emb, act_emb = torch.randn(8, 3, 64), torch.randn(8, 3, 64)  # (B, T, D)
    >>> pred(emb, act_emb).shape  # (B, T, D); position t predicts frame t+1
    torch.Size([8, 3, 64])

DiT-style blocks: the action embedding of step t (the condition c_t) modulates token t.
SiLU -> Linear(D, 6D), zero-initialised, gives shift/scale/gate for the attention and MLP
branches; x += gate * branch(modulate(LN(x))) with a LayerNorm without affine parameters.
With zero gates every block starts as the identity (AdaLN-zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, all (B, T, D)."""
    return x * (1 + scale) + shift


SHORT = 8  # up to this many tokens, attention is written out instead of calling a fused kernel


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                           training: bool = False) -> torch.Tensor:
    """Causal softmax attention for short sequences, q, k, v (B, nh, T, hs) -> (B, nh, T, hs).

    The same function as `scaled_dot_product_attention(..., is_causal=True)`. Fused attention
    kernels give every (row, head) pair its own tile of 64+ tokens; a planner's rollout has
    B*S*heads (tens of thousands to millions) of pairs with T <= history tokens, where that
    wastes nearly all the work. Written as broadcast products and sums, the few T x T scores
    become elementwise work that torch.compile fuses into a handful of kernels.
    """
    T = q.shape[-2]
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5  # (B, nh, T, T): query i, key j
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T): key after query
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)  # (B, nh, T, T)
    weights = F.dropout(weights, dropout, training)
    return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with inner width heads * head_dim, then an output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D), or with `last_only` the last token's output (B, 1, D).

        `last_only` computes the query (and everything after attention) for the last token
        alone; it attends to every token, so it equals the last row of the full output.
        """
        B, T, _ = x.shape
        if last_only:
            return self._forward_last(x)
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if T <= SHORT:
            y = short_causal_attention(q, k, v, p, self.training)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)  # (B, T, nh*hs)
        return self.proj_drop(self.proj(y))  # (B, T, D)

    def _forward_last(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        inner = self.heads * self.head_dim
        w, b = self.qkv.weight, self.qkv.bias  # rows: q, then k, then v
        q = F.linear(x[:, -1], w[:inner], b[:inner]).view(B, self.heads, self.head_dim)  # (B, nh, hs)
        kv = F.linear(x, w[inner:], b[inner:]).view(B, T, 2, self.heads, self.head_dim)  # (B, T, 2, nh, hs)
        k, v = kv.unbind(2)  # each (B, T, nh, hs)
        scores = (q.unsqueeze(1) * k).sum(-1) * self.head_dim ** -0.5  # (B, T, nh): the last query sees all
        weights = F.dropout(scores.softmax(1), self.dropout, self.training)  # (B, T, nh)
        y = (weights.unsqueeze(-1) * v).sum(1).reshape(B, 1, inner)  # (B, 1, nh*hs)
        return self.proj_drop(self.proj(y))  # (B, 1, D)


class AdaLNBlock(nn.Module):
    """One AdaLN-zero block: conditioned causal attention, then conditioned MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CausalSelfAttention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, dim), nn.Dropout(dropout)
        )
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, D) tokens, mod (B, T, 6D) = `self.adaLN(c)` of the per-token condition c -> (B, T, D).

        The modulation is passed in, not c, so that a rollout computes it once for every action
        block instead of once per step (`Predictor.modulations`). With `last_only` only the last
        token's output (B, 1, D) is computed: the other tokens serve as keys and values only.
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B, T, D)
        attn = self.attn(modulate(self.norm1(x), shift_a, scale_a), last_only)  # (B, T or 1, D)
        if last_only:
            x, gate_a, shift_m, scale_m, gate_m = (t[:, -1:] for t in (x, gate_a, shift_m, scale_m, gate_m))
        x = x + gate_a * attn
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class Predictor(nn.Module):
    """Learned positions over `history` slots + AdaLN-zero blocks + final LayerNorm.

    Args:
        dim: embedding width D (tokens and condition).
        history: maximum number of frames T the predictor sees (positions learned for each).
        depth: number of blocks.
        heads: attention heads.
        head_dim: width of each head (inner attention width heads * head_dim).
        mlp: hidden width of each block's MLP.
        dropout: dropout in attention and MLP (the paper's biggest lever; 0.1).
    """

    def __init__(
        self,
        dim: int = 192,
        history: int = 3,
        depth: int = 6,
        heads: int = 16,
        head_dim: int = 64,
        mlp: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.history = history
        self.pos_embed = nn.Parameter(torch.zeros(1, history, dim))
        self.blocks = nn.ModuleList(AdaLNBlock(dim, heads, head_dim, mlp, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # AdaLN-zero: every block starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)

    def modulations(self, act_emb: torch.Tensor) -> list[torch.Tensor]:
        """act_emb (B, L, D) -> per block the AdaLN shift/scale/gate (B, L, 6D) of every token.

        They depend on the conditions only, so a rollout computes them once for all its action
        blocks and passes windows of them to `forward`.
        """
        return [block.adaLN(act_emb) for block in self.blocks]

    def forward(self, emb: torch.Tensor, act_emb: torch.Tensor | None = None,
                modulations: list[torch.Tensor] | None = None, last_only: bool = False) -> torch.Tensor:
        """emb (B, T, D) frame embeddings, act_emb (B, T, D) conditions -> (B, T, D).

        Instead of `act_emb`, `modulations` (per block (B, T, 6D), from `modulations`) may be given.
        `last_only` returns the prediction of the last position only, (B, 1, D): what a rollout
        needs. Its final block then runs one query and one MLP row instead of T.
        """
        if (act_emb is None) == (modulations is None):
            raise ValueError("Predictor.forward takes exactly one of act_emb and modulations.")
        T = emb.shape[1]
        if T > self.history:
            raise ValueError(
                f"predictor got {T} frames but was built for history={self.history}; "
                f"pass at most the last {self.history} embeddings."
            )
        x = emb + self.pos_embed[:, :T]  # (B, T, D)
        mods = self.modulations(act_emb) if modulations is None else modulations
        last = len(self.blocks) - 1
        for i, (block, mod) in enumerate(zip(self.blocks, mods, strict=True)):
            x = block(x, mod, last_only and i == last)
        return self.norm(x)  # (B, T, D), or (B, 1, D) with last_only
