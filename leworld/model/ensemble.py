"""Several trained world models planned as one: the planning cost is the sum of their costs.

Example:
    >>> import torch
    >>> from leworld.model import LeWMConfig, LeWorldModel, ModelEnsemble
    >>> cfg = LeWMConfig(encoder="cnn", image_size=32, cnn_channels=(8, 8, 8), enc_width=32, embed_dim=16,
    ...                  proj_hidden=32, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
    ...                  action_hidden=16)
    >>> ensemble = ModelEnsemble([LeWorldModel(cfg), LeWorldModel(cfg)]).eval()
    >>> pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)  # (B, T, C, Hp, Wp)
    >>> emb = ensemble.encode(pixels)  # (B, T, 2 * 16): the members' embeddings side by side
    >>> ensemble.rollout(emb, torch.zeros(2, 50, 4, cfg.action_block_dim)).shape  # (B, S, T, 2 * 16)
    torch.Size([2, 50, 4, 32])

An ensemble looks like one `LeWorldModel` to the planner (`LatentProblem`, `MPCPolicy`): its
embedding of a frame is the concatenation of its members' embeddings, and its rollout runs each
member on its own slice and concatenates the predictions. The squared L2 distance between two
such embeddings is the sum of the members' squared distances, so a plan is scored by every
member at once: a sequence that only one member's errors make look good is not cheap for the
others. This is the usual answer of model-based control to a planner exploiting its model's
mistakes (an ensemble of learned dynamics models); it changes nothing in how each model was
trained.

The members must act alike: the same frame size, action size, frameskip and training-set action
statistics (actions are z-scored once, for all of them). They may differ in everything else
(encoder head, embedding size, history, predictor depth, training seed or SIGReg weight).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from .lewm import LeWMConfig, LeWorldModel


class ModelEnsemble(nn.Module):
    """K world models behind one model's interface; the latent cost is the sum of theirs.

    Args:
        models: two or more LeWorldModels trained on the same env and action statistics.

    `config` is the first member's, with `history` the longest of the members' (so the planner
    keeps enough frames for every member; each one reads only its own last `history`) and
    `embed_dim` the sum of their embedding sizes. `members_config` lists every member's own.
    """

    def __init__(self, models: Sequence[LeWorldModel]) -> None:
        super().__init__()
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}; plan with the model itself")
        first = models[0].config
        for i, m in enumerate(models[1:], start=1):
            c = m.config
            for key in ("image_size", "action_dim", "frameskip"):
                if getattr(c, key) != getattr(first, key):
                    raise ValueError(f"ensemble member {i} has {key}={getattr(c, key)}, member 0 has "
                                     f"{getattr(first, key)}: its members must see the same frames and actions")
            same_stats = (torch.allclose(m.action_mean.cpu(), models[0].action_mean.cpu(), rtol=1e-4, atol=1e-6)
                          and torch.allclose(m.action_std.cpu(), models[0].action_std.cpu(), rtol=1e-4, atol=1e-6))
            if not same_stats:
                raise ValueError(f"ensemble member {i} z-scores actions with other statistics than member 0 "
                                 f"(mean {m.action_mean.tolist()} vs {models[0].action_mean.tolist()}, std "
                                 f"{m.action_std.tolist()} vs {models[0].action_std.tolist()}): train the members "
                                 "on the same dataset")
        self.members = nn.ModuleList(models)
        self.dims = [m.config.embed_dim for m in models]
        self.config: LeWMConfig = dataclasses.replace(
            first, history=max(m.config.history for m in models), embed_dim=sum(self.dims))
        self.members_config = [m.config for m in models]

    def normalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        """Raw actions or blocks -> z-scored, with the members' shared statistics."""
        return self.members[0].normalize_actions(a)

    def denormalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_actions`."""
        return self.members[0].denormalize_actions(a)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, T, C, Hp, Wp) -> the members' embeddings side by side (B, T, sum D_k)."""
        return torch.cat([m.encode(pixels) for m in self.members], dim=-1)

    def split(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """(..., sum D_k) -> one (..., D_k) slice per member."""
        if emb.shape[-1] != self.config.embed_dim:
            raise ValueError(f"ensemble embeddings have {self.config.embed_dim} = {' + '.join(map(str, self.dims))} "
                             f"numbers, got last dim {emb.shape[-1]}; encode the frames with the ensemble")
        return list(emb.split(self.dims, dim=-1))

    def rollout(self, context_emb: torch.Tensor, action_blocks: torch.Tensor,
                context_actions: torch.Tensor | None = None, share_context: bool = True) -> torch.Tensor:
        """Each member's `rollout` on its slice of `context_emb`; returns (B, S, T, sum D_k)."""
        return torch.cat([m.rollout(ctx, action_blocks, context_actions, share_context)
                          for m, ctx in zip(self.members, self.split(context_emb), strict=True)], dim=-1)

    def member_costs(self, pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """pred (..., sum D_k), goal broadcastable to it -> each member's squared distance (..., K)."""
        return torch.stack([(p - g).square().sum(-1) for p, g in zip(self.split(pred), self.split(goal))], dim=-1)
