"""LeWorldModel: encoder + projector, action encoder, causal predictor + pred_proj.

Example:
    >>> import torch
    >>> from leworld.model import LeWMConfig, LeWorldModel
    >>> cfg = LeWMConfig(image_size=32, patch_size=8, enc_width=64, enc_depth=2, enc_heads=2,
    ...                  enc_mlp=128, embed_dim=64, proj_hidden=128, pred_depth=2, pred_heads=4,
    ...                  pred_head_dim=16, pred_mlp=128, action_hidden=64)
    >>> model = LeWorldModel(cfg).eval()
    >>> pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)  # (B, T, C, Hp, Wp)
    >>> emb = model.encode(pixels)  # (B, T, D)
    >>> blocks = torch.zeros(2, 300, 5, cfg.frameskip * cfg.action_dim)  # (B, S, T, frameskip*A)
    >>> model.rollout(emb, blocks).shape  # (B, S, T, D)
    torch.Size([2, 300, 5, 64])

Action blocks: block k holds the frameskip actions executed after frame k, laid out as
block[..., i * A + j] = action i of the block, dimension j (a (frameskip, A) array flattened).
`predict`, `rollout` and `encode_actions` take blocks in normalised (z-scored) space; use
`normalize_actions` / `denormalize_actions` with the training-set statistics kept as buffers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .cnn import CNN, HEADS as CNN_HEADS
from .predictor import Predictor
from .vit import ViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require_tensor(method: str, **inputs) -> None:
    """Refuse anything but a torch.Tensor by name (numpy arrays fail late and obscurely otherwise)."""
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{method} expects {name} as a torch.Tensor, got {type(value).__module__}.{type(value).__name__}; "
                f"convert it with torch.as_tensor({name}).to(model_device)."
            )


@dataclass
class LeWMConfig:
    """Model configuration; defaults are the paper's (~18.0M parameters).

    Args:
        encoder: "vit" (ViT-Tiny in the paper) or "cnn" (patchify-stem CNN, fast on CPU).
        image_size: side of the square input frames in pixels.
        patch_size: ViT patch side; must divide image_size.
        enc_width: encoder output width (ViT token width, CNN feature size).
        enc_depth: ViT blocks.
        enc_heads: ViT attention heads.
        enc_mlp: ViT MLP hidden width.
        cnn_channels: channels of the CNN's three convolutions.
        cnn_head: how the CNN turns its maps into features: "flatten", "keypoints" (a spatial
            softmax over a quarter-resolution map), "hybrid" (both) or "moments" (the keypoints
            with each map's covariance: `leworld.model.cnn`).
        embed_dim: embedding size D of one frame (after the projector).
        proj_hidden: hidden width of the projector and pred_proj (BatchNorm inside).
        history: frames the predictor sees (and positions it learns).
        pred_depth: predictor AdaLN-zero blocks.
        pred_heads: predictor attention heads.
        pred_head_dim: width of one predictor head (inner width heads * head_dim).
        pred_mlp: predictor MLP hidden width.
        pred_dropout: predictor dropout (0.1 in the paper; its biggest single lever).
        action_dim: action size A of one env step.
        frameskip: env steps per kept frame; one action block = frameskip * action_dim numbers.
        action_hidden: hidden width of the action encoder MLP.
    """

    encoder: str = "vit"
    image_size: int = 224
    patch_size: int = 14
    enc_width: int = 192
    enc_depth: int = 12
    enc_heads: int = 3
    enc_mlp: int = 768
    cnn_channels: tuple[int, int, int] = (32, 64, 128)
    cnn_head: str = "flatten"
    embed_dim: int = 192
    proj_hidden: int = 2048
    history: int = 3
    pred_depth: int = 6
    pred_heads: int = 16
    pred_head_dim: int = 64
    pred_mlp: int = 2048
    pred_dropout: float = 0.1
    action_dim: int = 2
    frameskip: int = 5
    action_hidden: int = 768

    def __post_init__(self) -> None:
        self.cnn_channels = tuple(int(c) for c in self.cnn_channels)
        if self.encoder not in ("vit", "cnn"):
            raise ValueError(f"encoder must be 'vit' or 'cnn', got {self.encoder!r}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"LeWMConfig.{f.name} must be a positive integer, got {value!r}.")
        if self.cnn_head not in CNN_HEADS:
            raise ValueError(f"cnn_head must be one of {CNN_HEADS}, got {self.cnn_head!r}.")
        if len(self.cnn_channels) != 3 or min(self.cnn_channels) <= 0:
            raise ValueError(f"cnn_channels must be 3 positive integers, got {self.cnn_channels}.")
        if not 0.0 <= self.pred_dropout < 1.0:
            raise ValueError(f"pred_dropout must be in [0, 1), got {self.pred_dropout}.")
        if self.encoder == "vit":
            if self.image_size % self.patch_size != 0:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                    "choose a patch size that divides the image side (224 -> 14, 64 -> 8)."
                )
            if self.enc_width % self.enc_heads != 0:
                raise ValueError(f"enc_width {self.enc_width} is not divisible by enc_heads {self.enc_heads}.")
        elif self.image_size < 16:
            raise ValueError(f"the CNN encoder needs image_size >= 16, got {self.image_size}.")

    @property
    def action_block_dim(self) -> int:
        """Numbers in one action block: frameskip * action_dim."""
        return self.frameskip * self.action_dim

    def to_dict(self) -> dict:
        """JSON-serialisable dict of all fields."""
        d = dataclasses.asdict(self)
        d["cnn_channels"] = list(self.cnn_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LeWMConfig":
        """Inverse of `to_dict`; unknown keys are an error, missing keys take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown LeWMConfig keys {unknown}; known keys are {sorted(known)}. "
                "The file was probably written by a different leworld version: remove or rename them."
            )
        return cls(**d)


class Projector(nn.Module):
    """Linear(in -> hidden) -> BatchNorm1d(hidden) -> GELU -> Linear(hidden -> out), on (..., in)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, x.shape[-1])).view(*lead, -1)  # BatchNorm over all leading dims


class LeWorldModel(nn.Module):
    """The LeWM world model: encode frames, encode action blocks, predict the next embedding."""

    def __init__(self, config: LeWMConfig | None = None) -> None:
        super().__init__()
        c = self.config = config if config is not None else LeWMConfig()
        if c.encoder == "vit":
            self.encoder = ViT(c.image_size, c.patch_size, c.enc_width, c.enc_depth, c.enc_heads, c.enc_mlp)
        else:
            self.encoder = CNN(c.image_size, c.cnn_channels, c.enc_width, head=c.cnn_head)
        self.projector = Projector(c.enc_width, c.proj_hidden, c.embed_dim)
        self.action_encoder = nn.Sequential(
            nn.Linear(c.action_block_dim, c.action_hidden), nn.SiLU(), nn.Linear(c.action_hidden, c.embed_dim)
        )
        self.predictor = Predictor(
            c.embed_dim, c.history, c.pred_depth, c.pred_heads, c.pred_head_dim, c.pred_mlp, c.pred_dropout
        )
        self.pred_proj = Projector(c.embed_dim, c.proj_hidden, c.embed_dim)
        self.register_buffer("action_mean", torch.zeros(c.action_dim))
        self.register_buffer("action_std", torch.ones(c.action_dim))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    # ---- actions -------------------------------------------------------------------------
    def _action_stats(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, k = self.config.action_dim, self.config.frameskip
        if a.shape[-1] == A:
            return self.action_mean, self.action_std
        if a.shape[-1] == k * A:  # a block: tile the per-step stats frameskip times
            return self.action_mean.repeat(k), self.action_std.repeat(k)
        raise ValueError(
            f"actions have last dim {a.shape[-1]}; expected action_dim={A} (one step) "
            f"or frameskip*action_dim={k * A} (one block)."
        )

    def normalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        """Raw actions (..., A) or blocks (..., frameskip*A) -> z-scored, same shape."""
        _require_tensor("normalize_actions", a=a)
        mean, std = self._action_stats(a)
        return (a - mean) / std

    def denormalize_actions(self, a: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_actions`."""
        _require_tensor("denormalize_actions", a=a)
        mean, std = self._action_stats(a)
        return a * std + mean

    def set_action_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-dimension training-set action statistics (A,) each."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.action_mean.shape or std.shape != self.action_std.shape:
            raise ValueError(
                f"action stats must have shape ({self.config.action_dim},) each, "
                f"got {tuple(mean.shape)} and {tuple(std.shape)}."
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"action stats must be finite, got mean {mean.tolist()} and std {std.tolist()}; "
                             "compute them from the training actions without their NaN rows.")
        if (std <= 0).any():
            raise ValueError(f"action std must be positive, got {std.tolist()}; clamp it (std.clamp_min(1e-6)).")
        self.action_mean.copy_(mean)
        self.action_std.copy_(std)

    def encode_actions(self, blocks: torch.Tensor) -> torch.Tensor:
        """Normalised action blocks (..., frameskip*A) -> action embeddings (..., D)."""
        _require_tensor("encode_actions", blocks=blocks)
        if blocks.shape[-1] != self.config.action_block_dim:
            raise ValueError(
                f"action blocks have last dim {blocks.shape[-1]}, expected frameskip*action_dim="
                f"{self.config.action_block_dim}; flatten each (frameskip, A) block into one row."
            )
        return self.action_encoder(blocks)

    # ---- frames ----------------------------------------------------------------------------
    def _check_batchnorm_rows(self, name: str, rows: int, what: str) -> None:
        """In training mode the projectors normalise with their batch's statistics (BatchNorm), which
        one row does not have: say so, instead of torch's error from inside the projector."""
        if self.training and rows < 2:
            raise ValueError(f"{name} got 1 of {what} while the model is in training mode, where its projector's "
                             "BatchNorm needs at least 2 to normalise with; call model.eval() to use the model "
                             "(leworld.load_model returns it in eval mode), or pass a batch of 2 or more")

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, T, C, Hp, Wp), uint8 in [0, 255] or float in [0, 1] -> embeddings (B, T, D)."""
        _require_tensor("encode", pixels=pixels)
        size = self.config.image_size
        if pixels.ndim != 5:
            raise ValueError(
                f"encode expects pixels (B, T, C, H, W), got shape {tuple(pixels.shape)}; "
                "add a time axis with pixels.unsqueeze(1)."
            )
        B, T, C, Hp, Wp = pixels.shape
        if B == 0 or T == 0:
            raise ValueError(f"encode got no frames, shape {tuple(pixels.shape)}: pass at least one")
        if C != 3:
            hint = " (channels last? use pixels.permute(0, 1, 4, 2, 3))" if pixels.shape[-1] == 3 else ""
            raise ValueError(f"encode expects 3 colour channels in dim 2, got shape {tuple(pixels.shape)}{hint}.")
        if (Hp, Wp) != (size, size):
            raise ValueError(
                f"encode expects {size}x{size} frames (config.image_size), got {Hp}x{Wp}; resize the frames."
            )
        if pixels.dtype == torch.uint8:
            x = pixels.to(self.pixel_mean.dtype) / 255.0
        elif pixels.is_floating_point():
            x = pixels.to(self.pixel_mean.dtype)
            low, high = torch.stack(torch.aminmax(x)).tolist()  # one read-back, float input only
            if not (low >= -1e-3 and high <= 1.0 + 1e-3):  # NaN fails both
                raise ValueError(f"float pixels must be in [0, 1], got values from {low:.3g} to {high:.3g}: divide "
                                 "uint8 frames by 255 (or pass them as they are), and do not centre them ([-1, 1] "
                                 "frames: (x + 1) / 2); the model normalises them itself")
        else:
            raise TypeError(f"pixels must be uint8 or floating point, got {pixels.dtype}.")
        self._check_batchnorm_rows("encode", B * T, "frames")
        x = (x.reshape(B * T, C, Hp, Wp) - self.pixel_mean) / self.pixel_std  # (B*T, C, Hp, Wp)
        features = self.encoder(x)  # (B*T, enc_width)
        return self.projector(features).view(B, T, -1)  # (B, T, D)

    # ---- dynamics --------------------------------------------------------------------------
    def predict(self, emb: torch.Tensor, act_emb: torch.Tensor) -> torch.Tensor:
        """emb (B, T, D), act_emb (B, T, D) -> predictions (B, T, D); position t predicts frame t+1."""
        _require_tensor("predict", emb=emb, act_emb=act_emb)
        if emb.ndim != 3 or emb.shape != act_emb.shape or emb.shape[-1] != self.config.embed_dim or 0 in emb.shape:
            raise ValueError(
                f"predict expects emb and act_emb of equal shape (B, T, D) with D = config.embed_dim = "
                f"{self.config.embed_dim}, got {tuple(emb.shape)} and {tuple(act_emb.shape)}."
            )
        self._check_batchnorm_rows("predict", emb.shape[0] * emb.shape[1], "positions")
        return self.pred_proj(self.predictor(emb, act_emb))  # (B, T, D)

    def rollout(
        self,
        context_emb: torch.Tensor,
        action_blocks: torch.Tensor,
        context_actions: torch.Tensor | None = None,
        share_context: bool = True,
    ) -> torch.Tensor:
        """Autoregressive prediction of T future embeddings for S action sequences per row.

        context_emb (B, H, D): embeddings of the last H observed frames.
        action_blocks (B, S, T, frameskip*A): normalised blocks; block t is executed after the
            t-th frame from the last context frame, so block 0 conditions the first prediction.
        context_actions (B, H-1, frameskip*A) or None: normalised blocks executed after each
            context frame but the last (zeros when None).
        share_context: compute the window's observed tokens, which are the same for all S samples
            of a row, once per row (fewer FLOPs: what a batch of many envs wants); False computes
            them for every sample (fewer, larger kernels: can be faster when one env's plan is a
            chain of tiny kernels). Same numbers either way.
        Returns (B, S, T, D): predicted embeddings of the T frames after the context. Only
        the last `history` frames (and their blocks) are seen at each step (sliding window).
        """
        _require_tensor("rollout", context_emb=context_emb, action_blocks=action_blocks,
                        **({} if context_actions is None else {"context_actions": context_actions}))
        W = self.config.history
        ranks_ok = context_emb.ndim == 3 and action_blocks.ndim == 4 and context_emb.shape[1] >= 1
        if not ranks_ok or action_blocks.shape[0] != context_emb.shape[0]:
            raise ValueError(
                f"rollout expects context_emb (B, H, D) and action_blocks (B, S, T, frameskip*A), got "
                f"{tuple(context_emb.shape)} and {tuple(action_blocks.shape)}; "
                "for one sequence per row use action_blocks.unsqueeze(1)."
            )
        B, H, D = context_emb.shape
        _, S, T, block_dim = action_blocks.shape
        if D != self.config.embed_dim or 0 in (B, S, T):
            raise ValueError(f"rollout expects context embeddings of width config.embed_dim = {self.config.embed_dim} "
                             f"and at least one row, sample and block; got context_emb {tuple(context_emb.shape)} "
                             f"and action_blocks {tuple(action_blocks.shape)}")
        self._check_batchnorm_rows("rollout", B * S, "rows x samples")
        if context_actions is None:
            context_actions = action_blocks.new_zeros(B, H - 1, block_dim)
        if context_actions.shape != (B, H - 1, block_dim):
            raise ValueError(
                f"context_actions must have shape (B, H-1, frameskip*A) = {(B, H - 1, block_dim)}, "
                f"got {tuple(context_actions.shape)}."
            )
        h = min(H, W)  # context frames the window can see
        ctx = context_emb[:, H - h :]  # (B, h, D)
        ctx_mods = self.predictor.modulations(self.encode_actions(context_actions[:, H - h :]))  # per block (B, h-1, 6D)
        fut_mods = self.predictor.modulations(self.encode_actions(action_blocks).reshape(B * S, T, D))  # (B*S, T, 6D)
        # modulations once per rollout, not once per step. Token j of the sequence is frame j with
        # block j; tokens j < h - 1 (context frame and context block) are the same for all S samples.
        frames = list(ctx[:, None].expand(B, S, h, D).reshape(B * S, h, D).unbind(1))  # h x (B*S, D)
        if not share_context:  # every token's modulation per sample: token j at index j
            mods = [torch.cat([c[:, None].expand(B, S, h - 1, 6 * D).reshape(B * S, h - 1, 6 * D), f], dim=1)
                    for c, f in zip(ctx_mods, fut_mods, strict=True)]  # per block (B*S, h-1+T, 6D)
            for t in range(T):
                n = h + t
                lo = max(0, n - W)
                window = torch.stack(frames[lo:n], dim=1)  # (B*S, n-lo, D)
                frames.append(self.pred_proj(self.predictor.step(window, [m[:, lo:n] for m in mods])))
            return torch.stack(frames[h:], dim=1).view(B, S, T, D)
        for t in range(T):
            n = h + t  # frames so far
            lo = max(0, n - W)  # the window is tokens lo .. n-1
            mid = max(lo, h - 1)  # tokens lo .. mid-1 are shared by the samples of a row
            prefix = (ctx[:, lo:mid], [m[:, lo:mid] for m in ctx_mods]) if mid > lo else (None, None)
            window = torch.stack(frames[mid:n], dim=1)  # (B*S, n-mid, D)
            frames.append(self.pred_proj(self.predictor.step(
                window, [m[:, mid - (h - 1) : n - (h - 1)] for m in fut_mods], *prefix)))  # (B*S, D): frame n
        return torch.stack(frames[h:], dim=1).view(B, S, T, D)  # (B, S, T, D)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part and in total."""
        parts = ["encoder", "projector", "action_encoder", "predictor", "pred_proj"]
        counts = {p: sum(x.numel() for x in getattr(self, p).parameters()) for p in parts}
        counts["total"] = sum(counts.values())
        return counts
