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
    """Causal softmax attention for short sequences, q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) ->
    (B, nh, Tq, hs), with Tq <= Tk: the queries are the last Tq of the Tk positions.

    With Tq = Tk the same function as `scaled_dot_product_attention(..., is_causal=True)`. Fused
    attention kernels give every (row, head) pair its own tile of 64+ tokens; a planner's rollout
    has B*S*heads (tens of thousands to millions) of pairs with T <= history tokens, where that
    wastes nearly all the work. Written as broadcast products and sums, the few Tq x Tk scores
    become elementwise work that torch.compile fuses into a handful of kernels.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5  # (B, nh, Tq, Tk)
    weights = scores.masked_fill(future_mask(Tq, Tk, q.device), float("-inf")).softmax(-1)  # (B, nh, Tq, Tk)
    weights = F.dropout(weights, dropout, training)
    return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)  # (B, nh, Tq, hs)


def future_mask(Tq: int, Tk: int, device) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j comes after query i; query i sits at position Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(Tk - Tq + 1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with inner width heads * head_dim, then an output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return self.attend(*self.project(x))

    def project(self, x: torch.Tensor, first_query: int = 0):
        """x (B, T, D) -> q (B, nh, T - first_query, hs) or None when first_query = T, and k, v
        (B, nh, T, hs): queries only for the tokens whose outputs are needed."""
        B, T, _ = x.shape
        split = (B, T, 3, self.heads, self.head_dim)
        if first_query == 0:
            return self.qkv(x).view(split).permute(2, 0, 3, 1, 4).unbind(0)
        inner = self.heads * self.head_dim
        w, b = self.qkv.weight, self.qkv.bias  # rows: q, then k, then v
        k, v = F.linear(x, w[inner:], b[inner:]).view(B, T, 2, *split[3:]).permute(2, 0, 3, 1, 4).unbind(0)
        if first_query >= T:
            return None, k, v
        q = F.linear(x[:, first_query:], w[:inner], b[:inner]).view(B, T - first_query, *split[3:])
        return q.transpose(1, 2), k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, nh, Tq, hs) for the last Tq of the Tk positions of k, v (B, nh, Tk, hs) -> (B, Tq, D)."""
        B, _, Tq, _ = q.shape
        Tk = k.shape[2]
        p = self.dropout if self.training else 0.0
        if Tk <= SHORT:
            y = short_causal_attention(q, k, v, p, self.training)  # (B, nh, Tq, hs)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        else:  # is_causal aligns the mask top-left; the queries here are the last positions
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=~future_mask(Tq, Tk, q.device), dropout_p=p)
        y = y.transpose(1, 2).reshape(B, Tq, self.heads * self.head_dim)  # (B, Tq, nh*hs)
        return self.proj_drop(self.proj(y))  # (B, Tq, D)


def _broadcast_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, ...) -> (rows, ...), each of the B entries repeated for rows // B consecutive rows."""
    B = t.shape[0]
    return t.unsqueeze(1).expand(B, rows // B, *t.shape[1:]).reshape(rows, *t.shape[1:])


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

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) tokens, mod (B, T, 6D) = `self.adaLN(c)` of the per-token condition c -> (B, T, D).

        The modulation is passed in, not c, so that a rollout computes it once for every action
        block instead of once per step (`Predictor.modulations`).
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B, T, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))

    def step(self, x: torch.Tensor, mod: torch.Tensor, prefix: torch.Tensor | None = None,
             prefix_mod: torch.Tensor | None = None, last: bool = False):
        """The block in a rollout step, where many rows share their first tokens.

        x (N, T, D), mod (N, T, 6D): the tokens that differ between rows. prefix (B, P, D),
        prefix_mod (B, P, 6D) or None: tokens that precede x and are the same for each group of
        N // B consecutive rows; they are computed once per group and attended to by all of its
        rows. With `last` (the final block) only the last token's output is computed.
        Returns (x (N, T or 1, D), prefix (B, P, D) or None): the same numbers as `forward` on
        the concatenated tokens.
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (N, T, D)
        T = x.shape[1]
        q, k, v = self.attn.project(modulate(self.norm1(x), shift_a, scale_a), T - 1 if last else 0)
        if prefix is not None:
            p_shift_a, p_scale_a, p_gate_a, p_shift_m, p_scale_m, p_gate_m = prefix_mod.chunk(6, dim=-1)
            P = prefix.shape[1]
            pq, pk, pv = self.attn.project(modulate(self.norm1(prefix), p_shift_a, p_scale_a), P if last else 0)
            k = torch.cat([_broadcast_rows(pk, len(x)), k], dim=2)  # (N, nh, P + T, hs)
            v = torch.cat([_broadcast_rows(pv, len(x)), v], dim=2)
            if last:
                prefix = None  # its keys and values were all the final block needed
            else:
                prefix = prefix + p_gate_a * self.attn.attend(pq, pk, pv)
                prefix = prefix + p_gate_m * self.mlp(modulate(self.norm2(prefix), p_shift_m, p_scale_m))
        if last:
            x, gate_a, shift_m, scale_m, gate_m = (t[:, -1:] for t in (x, gate_a, shift_m, scale_m, gate_m))
        x = x + gate_a * self.attn.attend(q, k, v)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m)), prefix


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
                modulations: list[torch.Tensor] | None = None) -> torch.Tensor:
        """emb (B, T, D) frame embeddings, act_emb (B, T, D) conditions -> (B, T, D).

        Instead of `act_emb`, `modulations` (per block (B, T, 6D), from `modulations`) may be given.
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
        for block, mod in zip(self.blocks, mods, strict=True):
            x = block(x, mod)
        return self.norm(x)  # (B, T, D)

    def step(self, emb: torch.Tensor, modulations: list[torch.Tensor], prefix: torch.Tensor | None = None,
             prefix_modulations: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The prediction at the last position of a window, as a rollout needs it: (N, D).

        emb (N, T, D) and `modulations` (per block (N, T, 6D)) are the window's tokens that
        differ between rows. prefix (B, P, D) with `prefix_modulations` (per block (B, P, 6D)),
        or None, are the window's first P tokens where they are the same for each group of
        N // B consecutive rows (a planner's samples of one environment share their observed
        context): they are computed once per group. Equals `forward` on the whole window, last
        position, but the final block computes one query and one MLP row instead of P + T.
        """
        P = 0 if prefix is None else prefix.shape[1]
        T = emb.shape[1]
        if P + T > self.history or (P and len(emb) % len(prefix)):
            raise ValueError(f"step got a window of {P} shared + {T} tokens for {len(emb)} rows "
                             f"(history {self.history}, shared rows must divide them)")
        x = emb + self.pos_embed[:, P:P + T]  # (N, T, D)
        if prefix is not None:
            prefix = prefix + self.pos_embed[:, :P]  # (B, P, D)
        last = len(self.blocks) - 1
        for i, (block, mod) in enumerate(zip(self.blocks, modulations, strict=True)):
            x, prefix = block.step(x, mod, prefix, None if prefix is None else prefix_modulations[i], i == last)
        return self.norm(x[:, 0])  # (N, D)
