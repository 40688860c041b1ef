"""Vision Transformer encoder (ViT-Tiny in the paper config); returns the CLS token.

Example:
    >>> import torch
    >>> from leworld.model.vit import ViT
    >>> vit = ViT(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp=128)
    >>> vit(torch.randn(4, 3, 32, 32)).shape  # (B, width)
    torch.Size([4, 64])

Pre-LN transformer blocks with GELU MLPs and a final LayerNorm; attention is
`torch.nn.functional.scaled_dot_product_attention` (fused kernels where available).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"ViT width {width} is not divisible by heads {heads}; pick heads that divide it.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape  # N tokens, W width
        qkv = self.qkv(x).view(B, N, 3, self.heads, W // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(y.transpose(1, 2).reshape(B, N, W))  # (B, N, W)


class Block(nn.Module):
    """Pre-LN transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (conv) + CLS token + learned positions + pre-LN blocks + final LayerNorm.

    Args:
        image_size: side of the square input image in pixels.
        patch_size: side of one patch; must divide image_size.
        width: token width.
        depth: number of transformer blocks.
        heads: attention heads (width // heads per head).
        mlp: hidden width of each block's MLP.
        in_channels: image channels.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp: int = 768,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}; "
                "choose a patch size that divides the image side."
            )
        self.width = width
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, Hp, Wp), already normalised -> CLS token (B, width)."""
        x = self.patch_embed(images)  # (B, W, Hp/p, Wp/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, W)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # (B, W)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
