"""Small patchify-stem CNN encoder: the fast CPU alternative to the ViT.

Example:
    >>> import torch
    >>> from leworld.model.cnn import CNN
    >>> cnn = CNN(image_size=64, channels=(32, 64, 128), width=192)
    >>> cnn(torch.randn(4, 3, 64, 64)).shape  # (B, width)
    torch.Size([4, 192])

Conv 4x4 stride 4 (patchify) -> conv 3x3 stride 2 -> conv 3x3 stride 2, GELU after each,
then flatten (keeps where things are in the image) -> Linear to `width`. No normalisation
layers: the BatchNorm lives in the projector, and GroupNorm is slow on CPU.

`head="keypoints"` keeps the map at a quarter of the image side instead (conv 3x3 stride 1
twice, the last with `channels[2]` maps) and reads each map as a keypoint: the expected (x, y)
under a softmax over its positions, with a learned temperature (a spatial softmax). The image
is then described by where `channels[2]` features are, to a fraction of a cell, and an
object's orientation by where its parts are relative to each other.

`head="hybrid"` reads the same keypoints and, beside them, a coarse description of what is
where: the keypoint branch's second map (before its last convolution) goes on through two 3x3
stride-2 convolutions to a map at a sixteenth of the image side, which is flattened. The keypoints give positions to a fraction
of a cell; the coarse map gives the shapes around them (an object's outline, hence its
orientation), as the flatten head does.

`head="moments"` reads each keypoint map's spread as well as its mean: beside the expected
(x, y), the second central moments (var x, var y, cov xy) of the same softmax, in cells
squared. A map that covers an object gives its position from the mean and its orientation
(modulo a half turn) from the covariance, both as near-linear features.
"""

from __future__ import annotations

import torch
from torch import nn


HEADS = ("flatten", "keypoints", "hybrid", "moments")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class CNN(nn.Module):
    """Patchify-stem CNN returning one feature vector per image.

    Args:
        image_size: side of the square input image in pixels (at least 16).
        channels: output channels of the three convolutions.
        width: size of the returned feature (the projector's input).
        in_channels: image channels.
        head: "flatten" (the feature map, flattened), "keypoints" (a spatial softmax),
            "hybrid" (the keypoints and a flattened coarse map, side by side) or "moments"
            (the keypoints with each map's covariance).
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: tuple[int, int, int] = (32, 64, 128),
        width: int = 192,
        in_channels: int = 3,
        head: str = "flatten",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"CNN head must be one of {HEADS}, got {head!r}.")
        if len(channels) != 3:
            raise ValueError(f"CNN needs 3 channel counts (one per conv), got {tuple(channels)}.")
        if image_size < 16:
            raise ValueError(f"CNN image_size must be at least 16 pixels, got {image_size}.")
        c1, c2, c3 = channels
        self.width, self.head_kind = width, head
        if head in ("keypoints", "hybrid", "moments"):
            self.convs = nn.Sequential(
                nn.Conv2d(in_channels, c1, kernel_size=4, stride=4), nn.GELU(),  # (B, c1, Hp/4, Wp/4)
                nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.GELU(),  # (B, c2, Hp/4, Wp/4)
                nn.Conv2d(c2, c3, kernel_size=3, padding=1),  # (B, c3, Hp/4, Wp/4): one map per keypoint
            )
            side = _conv_out(image_size, 4, 4, 0)
            grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1  # cell centres in [-1, 1]
            self.register_buffer("grid", grid, persistent=False)
            self.log_temperature = nn.Parameter(torch.zeros(()))
            self.cell = 2.0 / side  # side of one cell in grid units
            features = 5 * c3 if head == "moments" else 2 * c3
            if head == "hybrid":
                self.coarse = nn.Sequential(  # from the second map (B, c2, Hp/4, Wp/4)
                    nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1), nn.GELU(),  # (B, c3, Hp/8, Wp/8)
                    nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1), nn.GELU(),  # (B, c3, Hp/16, Wp/16)
                )
                coarse_side = _conv_out(_conv_out(side, 3, 2, 1), 3, 2, 1)
                features += c3 * coarse_side * coarse_side
            self.head = nn.Linear(features, width)
            return
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=4, stride=4), nn.GELU(),  # (B, c1, Hp/4, Wp/4)
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1), nn.GELU(),  # (B, c2, Hp/8, Wp/8)
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1), nn.GELU(),  # (B, c3, Hp/16, Wp/16)
        )
        side = _conv_out(_conv_out(_conv_out(image_size, 4, 4, 0), 3, 2, 1), 3, 2, 1)
        self.head = nn.Linear(c3 * side * side, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, Hp, Wp), already normalised -> features (B, width)."""
        if self.head_kind == "hybrid":
            shared = self.convs[:4](images)  # (B, c2, Hp/4, Wp/4), after the second GELU
            points = self.keypoints(self.convs[4:](shared))  # (B, 2*c3)
            return self.head(torch.cat([points, self.coarse(shared).flatten(1)], dim=1))
        maps = self.convs(images)
        if self.head_kind == "keypoints":
            return self.head(self.keypoints(maps))  # (B, 2*c3) -> (B, width)
        if self.head_kind == "moments":
            return self.head(self.moments(maps))  # (B, 5*c3) -> (B, width)
        return self.head(maps.flatten(1))  # (B, c3*s*s) -> (B, width)

    def _softmax(self, maps: torch.Tensor) -> torch.Tensor:
        b, k, s, _ = maps.shape
        return torch.softmax(maps.flatten(2) / self.log_temperature.exp(), dim=-1).view(b, k, s, s)

    def keypoints(self, maps: torch.Tensor) -> torch.Tensor:
        """Spatial softmax: maps (B, K, S, S) -> (B, 2K), the expected (x, y) of each map, in [-1, 1]."""
        weights = self._softmax(maps)
        x = (weights.sum(2) * self.grid).sum(-1)  # (B, K): marginal over rows, then mean column
        y = (weights.sum(3) * self.grid).sum(-1)  # (B, K)
        return torch.cat([x, y], dim=-1)

    def moments(self, maps: torch.Tensor) -> torch.Tensor:
        """maps (B, K, S, S) -> (B, 5K): per map the expected (x, y) in [-1, 1], then var x, var y
        and cov xy under the same softmax, in cells squared (x: column, y: row)."""
        weights = self._softmax(maps)
        px, py = weights.sum(2), weights.sum(3)  # (B, K, S) marginals over rows / columns
        x, y = (px * self.grid).sum(-1), (py * self.grid).sum(-1)  # (B, K)
        dx, dy = self.grid - x[..., None], self.grid - y[..., None]  # (B, K, S) offsets from the mean
        var_x, var_y = (px * dx.square()).sum(-1), (py * dy.square()).sum(-1)
        cov = torch.einsum("bkij,bki,bkj->bk", weights, dy, dx)  # rows i carry y, columns j carry x
        spread = torch.cat([var_x, var_y, cov], dim=-1) / self.cell ** 2
        return torch.cat([x, y, spread], dim=-1)
