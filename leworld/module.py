"""The LightningModule: loss = pred_loss + lambda_sigreg * sigreg, nothing else.

Example:
    python train.py fit --config configs/tworoom_tiny.yaml

From Python:
    >>> from leworld.model import LeWMConfig
    >>> from leworld.module import LeWMModule
    >>> module = LeWMModule(LeWMConfig(encoder="cnn", image_size=64, history=1))

Teacher-forced next-embedding prediction on clips of T frames: the encoder embeds every
frame, the predictor predicts z_2..z_T from z_1..z_{T-1} and the action blocks, and SIGReg
pushes the embeddings of each time step towards an isotropic Gaussian. No stop-gradient and
no EMA target: gradients flow through prediction and target alike.

With `open_loop_frames` = k the prediction term also scores the clip's last k frames predicted
open loop, as a planner predicts them: from the first T-k frames and the recorded action blocks,
each prediction fed back in as the next step's input (`LeWorldModel.rollout`). The term is then the
mean squared error over the T-1 teacher-forced and the k open-loop predictions together; the loss
still has its two terms.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from leworld.model import LeWMConfig, LeWorldModel
from leworld.sigreg import directions_agree, sigreg


def effective_rank(emb: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of centred embeddings (N, D): D when
    every direction is used equally, 1 when the embedding has collapsed onto a line."""
    return _rank_of_singular_values(torch.linalg.svdvals(emb.float() - emb.float().mean(0)))


def _rank_of_singular_values(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of singular values s normalised to sum to one."""
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def batch_monitors(emb: torch.Tensor, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step's monitors of the global batch: `means` (batch means, such as the losses) averaged
    over every process's rows, and the embedding's per-dimension std (mean and min) and effective
    rank over all of them, as one process holding the whole batch would compute them.

    emb (B, T, D) is this process's share. Each process sums, in float64, its row count, its
    rows times each mean, and the first and second moments of its (B*T, D) embeddings, and one
    all-reduce adds them up (none without a process group of several ranks). The centred scatter
    matrix of the whole batch follows, its diagonal gives the unbiased stds and its eigenvalues
    the squared singular values that `effective_rank` takes. Returns 0-d float32 tensors, in the
    order of `means`, then emb_std_mean, emb_std_min, effective_rank."""
    flat = emb.detach().flatten(0, 1)
    if flat.device.type == "mps":  # no float64 there; the values are read back to log them anyway
        flat = flat.cpu()
    flat = flat.double()
    n, dim = flat.new_tensor([float(len(emb))]), flat.shape[1]
    packed = torch.cat([n, *(n * m.detach().to(flat).reshape(1) for m in means.values()),
                        flat.new_tensor([float(len(flat))]), flat.sum(0), (flat.T @ flat).flatten()])
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    k = len(means)
    out = dict(zip(means, packed[1 : k + 1] / packed[0]))
    rows, total, second = packed[k + 1], packed[k + 2 : k + 2 + dim], packed[k + 2 + dim :].view(dim, dim)
    scatter = second - torch.outer(total, total) / rows  # sum over rows of (x - mean)(x - mean)^T
    std = (scatter.diagonal().clamp_min(0) / (rows - 1)).sqrt()
    finite = torch.isfinite(scatter).all()  # a non-finite embedding gives NaN, not a solver error (no sync)
    s = torch.linalg.eigvalsh(torch.where(finite, scatter, 0.0)).clamp_min(0).sqrt()  # the centred rows' s.v.
    rank = _rank_of_singular_values(s)
    out.update(emb_std_mean=std.mean(), emb_std_min=std.min(), effective_rank=torch.where(finite, rank, torch.nan))
    return {name: value.float() for name, value in out.items()}


def recalibrate_batchnorm(model: nn.Module, forward: Callable[[object], object], batches: Iterable) -> int:
    """Re-estimate every BatchNorm's running statistics of `model` with its current weights:
    each becomes the plain average of the batch means and (unbiased) batch variances over
    `batches`, each passed through `forward`. Everything else runs in evaluation mode (no
    dropout), and no weight changes. Returns the number of batches used.

    During training the running statistics are an exponential average over the last few
    steps, taken while the weights moved. Where a hidden unit varies little within a batch,
    that lag is large against its spread, and evaluation mode, which uses the running
    statistics, can then disagree with training mode far more than the data do.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    kept = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]  # the statistics so far
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
                count += 1
    finally:
        for m, momentum, state in zip(norms, momenta, kept):
            m.momentum = momentum
            if count == 0:  # no batch came (or the first failed): keep the statistics it had
                m.load_state_dict(state)
        model.train(was_training)
    return count


class LeWMModule(L.LightningModule):
    def __init__(self, model: LeWMConfig = LeWMConfig(), lambda_sigreg: float = 0.09, lr: float = 5e-5,
                 weight_decay: float = 1e-3, warmup_fraction: float = 0.01, num_directions: int = 1024,
                 num_knots: int = 17, t_max: float = 3.0, sigreg_seed: int = 0,
                 collapse_rank_fraction: float = 0.05, collapse_warmup_steps: int = 500,
                 compile: bool | str = False,
                 lambda_schedule: list[tuple[int, float]] | None = None, fused: bool | None = None,
                 bn_recalibration_batches: int = 0, open_loop_frames: int = 0):
        """
        Args:
            model: architecture of the world model (defaults: the paper's ViT-Tiny LeWM).
            lambda_sigreg: weight of SIGReg (paper 0.1, reference code 0.09).
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            warmup_fraction: fraction of optimiser steps of linear warm-up before the cosine decay to 0.
            num_directions: K, random directions of SIGReg per step.
            num_knots: quadrature knots of the Epps-Pulley integral on [0, t_max].
            t_max: upper end of the integration range (the integrand is even; weights are doubled).
            sigreg_seed: seed of the SIGReg directions (combined with the global step).
            collapse_rank_fraction: warn when the effective rank of batch embeddings falls below this
                fraction of the embedding dimension.
            collapse_warmup_steps: the collapse warning is not raised before this optimiser step. A
                freshly initialised network can start below the threshold and leave it within a few
                hundred steps: on Push-T (`configs/pusht_tiny_10k.yaml`) the rank starts at 3.6 of 192
                and passes 5% of D at step 250 (18.6 at step 500), so without a warm-up every healthy
                run would be told to raise lambda_sigreg. 0: check from the first logged step.
            compile: torch.compile the network's parts (encoder, projector, action encoder,
                predictor and its projector) in place when training starts: True, or a mode such as
                "max-autotune-no-cudagraphs". In place means the same parameter names, so checkpoints
                and exported models are those of an uncompiled run. SIGReg stays eager. On an H100
                at paper config, compiling the loss as one function made the step 1.8x faster
                (docs/benchmarks.md; `bench/train_throughput.py --compile-parts` measures this
                option itself). The first steps wait for the compiler.
            lambda_schedule: changes of the SIGReg weight during training, as (global step, weight)
                pairs with increasing steps: from each step on, that weight replaces `lambda_sigreg`.
                For example [[6000, 0.003]] trains with `lambda_sigreg` for 6,000 optimiser steps and
                0.003 after. The loss keeps its two terms; only their balance moves. None: constant.
            fused: AdamW's fused kernel (one kernel for all parameters). None: on CUDA, unless a
                float16 gradient scaler is in use (then gradients are clipped before they are
                unscaled, which a fused optimizer cannot allow).
            bn_recalibration_batches: when training ends, re-estimate the projectors' BatchNorm
                statistics with the final weights over this many training batches before the model
                is exported (`recalibrate_batchnorm`; averaged over ranks under DDP). 0: keep the
                running averages of training. The checkpoints keep those; the exported model has the
                re-estimated ones. It matters where the weights still move fast when training stops
                (evaluation-mode losses far above training-mode ones); after a cosine schedule has
                decayed to zero the running averages have caught up (README, "Training").
            open_loop_frames: k > 0 also predicts the last k frames of each clip open loop, from its
                first T-k frames (the predictions fed back, as in planning), and averages their
                squared errors into the prediction term with the T-1 teacher-forced ones. Needs
                1 <= k <= T-1 for clips of T frames (`data.num_frames`); k = T-1 rolls out from
                the first frame alone. k = 1 feeds nothing back (its one prediction has the inputs
                of the last teacher-forced one, so it only weighs that frame twice); forecasts are
                fed back from k = 2 on. 0: teacher forcing only (the paper).
        """
        super().__init__()
        if not (math.isfinite(lambda_sigreg) and lambda_sigreg >= 0):
            raise ValueError(f"lambda_sigreg weighs SIGReg in the loss: a finite number >= 0, got {lambda_sigreg}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction is the part of the steps spent warming up: in [0, 1), "
                             f"got {warmup_fraction}")
        if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if bn_recalibration_batches < 0:
            raise ValueError(f"bn_recalibration_batches must be >= 0, got {bn_recalibration_batches}")
        if open_loop_frames < 0:
            raise ValueError(f"open_loop_frames must be >= 0, got {open_loop_frames}")
        if collapse_warmup_steps < 0:
            raise ValueError(f"collapse_warmup_steps is the first step the collapse warning may fire: >= 0, "
                             f"got {collapse_warmup_steps}")
        if isinstance(num_directions, bool) or int(num_directions) != num_directions or num_directions < 1:
            raise ValueError(f"num_directions is the number K of SIGReg's random directions per step: an integer "
                             f">= 1 (the paper: 1024), got {num_directions}")
        if int(num_knots) != num_knots or num_knots < 2 or not (math.isfinite(t_max) and t_max > 0):
            raise ValueError(f"SIGReg integrates over num_knots >= 2 knots on [0, t_max], t_max > 0 (the paper: 17 "
                             f"and 3.0), got num_knots={num_knots}, t_max={t_max}")
        if isinstance(compile, str):
            from torch._inductor import list_mode_options

            if compile not in list_mode_options():
                raise ValueError(f"unknown compile mode {compile!r}: choose one of {', '.join(list_mode_options())}, "
                                 "or true (the default mode) or false")
        self._lambda_steps, self._lambda_values = _check_lambda_schedule(lambda_schedule)
        self.config = model if isinstance(model, LeWMConfig) else LeWMConfig.from_dict(model)
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = self.config.to_dict()  # plain data: checkpoints load without unpickling objects
        self.model = LeWorldModel(self.config)
        self._collapse_warned = False
        self._open_loop_mse = None  # the open-loop part of the last prediction term (open_loop_frames)
        self._bad_step = self._bad_values = self._grad_norm = None
        self._directions_device = None  # SIGReg directions drawn on the embeddings' device (`on_fit_start`)
        self._streams_restored = False  # this rank's random streams came from a checkpoint (`on_load_checkpoint`)
        # Check for a NaN loss after every step (True), only on logging steps and before a
        # checkpoint or the export (False), or None: every step on the CPU, where the check costs
        # nothing, and on logging steps elsewhere, where it would stall the device.
        self.check_finite_every_step: bool | None = None

    def configure_callbacks(self):
        """On Ctrl-C, say which checkpoint the run can resume from (`leworld.callbacks`)."""
        from leworld.callbacks import InterruptNote

        return [InterruptNote()]

    def configure_model(self) -> None:
        """Compile the network in place if asked (`compile`); Lightning calls this before training."""
        mode = self.hparams.compile
        if not mode or getattr(self, "_compiled", False):
            return
        kwargs = {} if mode is True else {"mode": str(mode)}
        for part in (self.model.encoder, self.model.projector, self.model.action_encoder, self.model.predictor,
                     self.model.pred_proj):
            part.compile(**kwargs)  # nn.Module.compile: wraps the call, keeps the state-dict keys
        self._compiled = True

    # ---------------------------------------------------------------- data hand-off
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or getattr(dm, "action_mean", None) is None:
            return
        c, hp = self.config, dm.hparams
        block = hp.frameskip * dm.action_dim
        problems = []
        if dm.action_dim != c.action_dim or hp.frameskip != c.frameskip:
            problems.append(f"data actions are {dm.action_dim}-d with frameskip {hp.frameskip}, the model expects "
                            f"{c.action_dim}-d with frameskip {c.frameskip} (block {block} vs "
                            f"{c.action_dim * c.frameskip}): set model.action_dim / model.frameskip")
        if dm.resolution != c.image_size:
            problems.append(f"data frames are {dm.resolution} px, the model expects {c.image_size} px: "
                            f"set model.image_size or collect at that resolution")
        if hp.num_frames - 1 != c.history:  # shorter clips would leave the last positions untrained, yet
            # rollouts and planning use all `history` of them
            problems.append(f"clips of {hp.num_frames} frames train a history of {hp.num_frames - 1}, the model has "
                            f"{c.history}: set data.num_frames = model.history + 1")
        k = self.hparams.get("open_loop_frames", 0)
        if k > hp.num_frames - 1:
            problems.append(f"open_loop_frames {k} needs clips of at least {k + 1} frames, data.num_frames is "
                            f"{hp.num_frames}: lower model.open_loop_frames or raise data.num_frames")
        if problems:
            raise ValueError("config does not match the dataset:\n  " + "\n  ".join(problems))
        if stage == "fit":  # a resumed run restores its checkpoint after this hook, whose statistics then win
            # (`trainer.ckpt_path` cannot tell: during setup it still holds an earlier call's path)
            self.model.set_action_stats(dm.action_mean, dm.action_std)

    # ---------------------------------------------------------------- the method
    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = batch["pixels"].permute(0, 1, 4, 2, 3)  # (B, T, Hp, Wp, C) -> (B, T, C, Hp, Wp) uint8
        B, T = pixels.shape[:2]
        if self.training and (B * (T - 1) < 2 or (self.hparams.get("open_loop_frames", 0) and B < 2)):
            raise ValueError(f"a training batch of {B} clip(s) of {T} frames: the predictor's projector normalises "
                             "its batch with BatchNorm, which needs at least 2 rows per step; train with "
                             "data.batch_size >= 2 (per process under DDP)")
        actions = self.model.normalize_actions(batch["action"].float())  # (B, T-1, frameskip*A)
        emb = self.model.encode(pixels)  # (B, T, D)
        pred = self.model.predict(emb[:, :-1], self.model.encode_actions(actions))  # (B, T-1, D)
        target = emb[:, 1:]
        self._open_loop_mse = None
        k = self.hparams.get("open_loop_frames", 0)
        if k:
            T = emb.shape[1]
            if not 1 <= k <= T - 1:
                raise ValueError(f"open_loop_frames {k} needs clips of at least {k + 1} frames, got {T}: "
                                 f"lower model.open_loop_frames or raise data.num_frames")
            c = T - k  # context frames of the open-loop rollout
            rolled = self.model.rollout(emb[:, :c], actions[:, None, c - 1:],
                                        actions[:, : c - 1] if c > 1 else None)[:, 0]  # (B, k, D)
            self._open_loop_mse = F.mse_loss(rolled.float(), emb[:, c:].float()).detach()
            pred, target = torch.cat([pred, rolled], 1), torch.cat([target, emb[:, c:]], 1)
        pred_loss = F.mse_loss(pred.float(), target.float())
        reg = sigreg(emb, step=self.global_step, num_directions=self.hparams.num_directions,
                     num_knots=self.hparams.num_knots, t_max=self.hparams.t_max, seed=self.hparams.sigreg_seed,
                     directions_device=self._directions_device)
        return pred_loss, reg, emb

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred_loss, reg, emb = self.losses(batch)
        weight = self.lambda_at(self.global_step)
        loss = pred_loss + weight * reg
        self._track_nonfinite(loss, pred_loss, reg)
        if self._log_step():
            self._raise_if_nonfinite()
            self._log_train(loss, pred_loss, reg, emb, weight)
        elif self.check_finite_every_step or (self.check_finite_every_step is None and self.device.type == "cpu"):
            self._raise_if_nonfinite()
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred_loss, reg, emb = self.losses(batch)
        self._log_val(pred_loss + self.lambda_at(self.global_step) * reg, pred_loss, reg, emb)

    def lambda_at(self, step: int) -> float:
        """The SIGReg weight in force at optimiser step `step` (`lambda_sigreg`, then `lambda_schedule`)."""
        weight = float(self.hparams.lambda_sigreg)
        for start, value in zip(self._lambda_steps, self._lambda_values):
            if step < start:
                break
            weight = value
        return weight

    # ---------------------------------------------------------------- monitoring
    # A training step reads nothing back from the device: on a GPU every read (`.item()`, a
    # Python `if` on a tensor, an SVD, a progress-bar value held on the device) waits for all
    # queued work and stalls the pipeline. The diagnostics are computed on the steps Lightning
    # writes to the logger, and read back there in one copy; the values logged are CPU tensors,
    # so the progress bar never reads the device either.
    def _log_step(self) -> bool:
        """Whether Lightning writes this optimiser step's metrics (every `log_every_n_steps`)."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _monitors(self, loss, pred_loss, reg, emb) -> dict[str, torch.Tensor]:
        """The step's monitors of the global batch (`batch_monitors`): under DDP one all-reduce,
        on the steps that log, so that they read as one process's on the whole batch would."""
        means = {"loss": loss, "pred_loss": pred_loss, "sigreg": reg}
        if self._open_loop_mse is not None:
            means["pred_loss_open_loop"] = self._open_loop_mse
        return batch_monitors(emb, means)

    def _log_train(self, loss, pred_loss, reg, emb, weight: float) -> None:
        monitors = self._monitors(loss, pred_loss, reg, emb)
        values = torch.stack(list(monitors.values())).cpu()
        logged = dict(zip(monitors, values))
        logged["lr"] = torch.tensor(self.lr_schedulers().get_last_lr()[0])
        if self._lambda_steps:
            logged["lambda_sigreg"] = torch.tensor(weight)
        for name, value in logged.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "effective_rank"), on_step=True,
                     on_epoch=False, batch_size=len(emb))
        rank, dim = float(logged["effective_rank"]), emb.shape[-1]
        if (not self._collapse_warned and self.global_step >= self.hparams.collapse_warmup_steps
                and rank < self.hparams.collapse_rank_fraction * dim):
            self._collapse_warned = True
            rank_zero_warn(f"embedding collapse: effective rank {rank:.1f} of {dim} at step {self.global_step} "
                           f"(per-dimension std min {float(logged['emb_std_min']):.2e}); raise lambda_sigreg")

    def _log_val(self, loss, pred_loss, reg, emb) -> None:
        for name, value in self._monitors(loss, pred_loss, reg, emb).items():
            self.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(emb))

    def _track_nonfinite(self, loss=None, pred_loss=None, reg=None, grad_norm=None) -> None:
        """Remembers, on the device, the first step whose loss (or, given instead, gradient norm) was not
        finite: checked later, without a sync. Values kept: loss, pred_loss, sigreg, gradient norm."""
        device = (loss if grad_norm is None else grad_norm).device
        if self._bad_step is None or self._bad_step.device != device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
            self._bad_values = torch.full((4,), float("nan"), device=device)
            self._last_losses = torch.full((3,), float("nan"), device=device)
        if grad_norm is None:  # the step's losses; its gradient norm is not known yet
            self._last_losses = torch.stack([loss.detach().float(), pred_loss.detach().float(), reg.detach().float()])
            record = torch.cat([self._last_losses, self._last_losses.new_full((1,), float("nan"))])
            bad = ~torch.isfinite(record[0])
        else:
            record = torch.cat([self._last_losses, grad_norm.detach().float().reshape(1)])
            bad = ~torch.isfinite(record[3])
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_values = torch.where(first, record, self._bad_values)

    def _raise_if_nonfinite(self) -> None:
        """Stops training if a step since the last check had a NaN or infinite loss or gradient (one
        device read). Under several processes every rank stops: a NaN on one spoils the weights of
        all through the gradient all-reduce, so the flag is reduced over the ranks (each rank calls
        this at the same points: the same steps, every checkpoint, the end of training)."""
        world = self._trainer.world_size if self._trainer is not None else 1
        if self._bad_step is None and world == 1:
            return
        own = self._bad_step if self._bad_step is not None else torch.full((), -1, dtype=torch.long,
                                                                           device=self.device)
        step = int(self.trainer.strategy.reduce(own.clone(), reduce_op="max") if world > 1 else own)
        if step < 0:
            return
        if int(own) != step:
            raise FloatingPointError(f"another process had a non-finite loss or gradient at step {step} (found at "
                                     f"step {self.global_step}): its error names the values")
        loss, pred_loss, reg, grad_norm = self._bad_values.tolist()
        what = (f"loss is {loss}" if not math.isfinite(loss)
                else f"the gradient norm is {grad_norm} (loss {loss:.4g})")
        raise FloatingPointError(
            f"{what} at step {step} (pred_loss {pred_loss:.4g}, sigreg {reg:.4g}; found at step "
            f"{self.global_step}): lower the learning rate or check the data for NaN actions"
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        """The total gradient norm, before clipping (on the device, no sync): checked for NaN and
        infinity like the loss (a non-finite gradient with a finite loss would still spoil every
        weight in the optimiser step), logged on logging steps, and reused by the clipping below.
        A float16 gradient scaler handles infinite gradients itself (it skips those steps)."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._grad_norm = None
        log = self._log_step()
        if grads and (log or self._scaler() is None):
            self._grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)
            if self._scaler() is None:
                self._track_nonfinite(grad_norm=self._grad_norm)
            if log:
                self.log("train/grad_norm", self._grad_norm.detach().float().cpu(), on_step=True, on_epoch=False)

    # ---------------------------------------------------------------- optimisation
    def _scaler(self):
        """The float16 gradient scaler of the precision plugin, or None (float32, bfloat16)."""
        trainer = self._trainer
        return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the gradients as the Trainer's `gradient_clip_val` asks, also with a fused AdamW.

        Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales its own
        gradients (a fused AdamW), since under a float16 scaler they would still be scaled here.
        Without a scaler (bf16-mixed, the GPU default, or float32) they are the true gradients, so
        they are clipped directly; with one, the optimizer is not fused and Lightning clips.
        """
        if not gradient_clip_val or self._scaler() is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif self._grad_norm is not None:  # computed in on_before_optimizer_step
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        fused = self.hparams.get("fused")
        if fused is None:
            fused = self.device.type == "cuda" and self._scaler() is None
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                fused=fused)
        estimated = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError("the learning-rate schedule (warm-up, then cosine to 0) needs the run's length: set "
                             "trainer.max_steps or trainer.max_epochs (trainer.max_time alone stops a run but does "
                             "not say how long it is)")
        total = max(1, int(estimated))
        warmup = max(1, round(self.hparams.warmup_fraction * total))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save the random streams dropout draws from: the CPU's and, where this process trains on
        a GPU, that GPU's. Under several processes this hook runs on every rank and rank 0 writes
        the file, so every rank's streams are gathered into it (`rng_state["ranks"]`)."""
        self._raise_if_nonfinite()  # never write weights that a NaN step has already spoiled
        state = {"torch": torch.get_rng_state()}  # dropout continues identically on resume
        device = self._cuda_device()
        if device is not None:  # not every device's: under DDP the other GPUs are other processes'
            state["cuda_device"] = torch.cuda.get_rng_state(device)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            # one tensor per rank, each its own storage (rows of one tensor would load as views into a
            # shared storage, and torch.set_rng_state crashes the process on a view with an offset)
            state["ranks"] = {k: [row.clone() for row in self._gather(v)] for k, v in state.items()}
        checkpoint["rng_state"] = state

    def _gather(self, state: torch.Tensor) -> torch.Tensor:
        """A uint8 random-stream state of every rank, (world, n), on the CPU (gathered on the device,
        as NCCL needs)."""
        strategy = self.trainer.strategy
        return strategy.all_gather(state.to(strategy.root_device)).cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore this rank's random streams. A checkpoint of another number of processes (or of
        an earlier version, which saved rank 0's alone) has none for this rank: the ranks then go
        on from rank 0's, forked in `on_fit_start`, and dropout no longer follows the interrupted run."""
        state = checkpoint.get("rng_state") or {}
        trainer = getattr(self, "_trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        ranks = state.get("ranks") or {}
        if len(ranks.get("torch", ())) == world:
            state = {k: v[rank].clone() for k, v in ranks.items()}  # its own storage, not a view (see above)
        elif world > 1 and "torch" in state:
            rank_zero_warn(f"the checkpoint holds the random streams of {len(ranks.get('torch', ())) or 1} "
                           f"process(es), this run has {world}: dropout goes on from new streams, not as the "
                           "interrupted run's would have")
            state = {k: v for k, v in state.items() if k != "ranks"}
        self._streams_restored = world == 1 or len(ranks.get("torch", ())) == world
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        device = self._cuda_device()
        if device is not None and "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"], device)
        elif "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])  # a checkpoint of an earlier version: every device's

    def _fork_streams(self) -> None:
        """Give every rank its own random streams. Every process is seeded alike (the run's one
        seed), so without this each rank would drop the same units of its clips, and DDP over N ranks
        would not draw the independent dropout of one process with N times the batch. The new seed
        is drawn from the common stream, so the run's seed still reproduces it."""
        base = int(torch.randint(0, 2**62, (1,)))  # the same on every rank
        torch.manual_seed(base + self.trainer.global_rank)  # the CPU and every GPU

    def _cuda_device(self) -> torch.device | None:
        """The CUDA device this process trains on (the strategy's, also before the module is moved
        there, as when a checkpoint is restored), or None."""
        trainer = getattr(self, "_trainer", None)
        device = trainer.strategy.root_device if trainer is not None else self.device
        return device if device.type == "cuda" else None

    def _export_dir(self) -> Path:
        # log_dir is a collective: every rank asks. A logger without a directory gives None: then the
        # Trainer's default_root_dir, never the working directory.
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "model"

    def on_fit_start(self) -> None:
        """Refuse, before any step, a run whose export would replace another run's model: without a
        versioning logger (`logger: false`) every run exports to `<default_root_dir>/model`. A run
        resumed from a checkpoint may replace it (it continues the run that wrote it).

        Under several processes, also check that every rank draws the same SIGReg directions on
        its device (ranks on different GPU models may not); if not, draw them on the CPU, which is
        the same everywhere, so that SIGReg stays exact across ranks."""
        from leworld.checkpoint import WEIGHTS_NAME

        self._directions_device = None
        if self.trainer.world_size > 1 and not directions_agree(
                self.config.embed_dim, self.hparams.num_directions, self.hparams.sigreg_seed, self.device):
            self._directions_device = "cpu"
            rank_zero_warn(f"the ranks' {self.device.type} devices draw different SIGReg directions from the same "
                           "seed (different GPU models?): drawing them on the CPU instead, copied to the device "
                           "every step")

        if self.trainer.world_size > 1 and not self._streams_restored:
            self._fork_streams()
        self._streams_restored = False

        directory = self._export_dir()
        if (directory / WEIGHTS_NAME).exists() and self.trainer.ckpt_path is None:
            raise FileExistsError(
                f"{directory} already holds the exported model of an earlier run, and this run would replace it "
                "when it ends: give it another trainer.default_root_dir, keep the logger on (it versions runs as "
                "<name>/version_N), or move that model away first")

    def on_train_start(self) -> None:
        """A resumed run trains its first step at its own schedule's rate: the restored optimiser
        holds the rate the checkpoint's schedule gave for that step, which differs when the run's
        length (`max_steps`) or `warmup_fraction` changed."""
        if self.trainer.ckpt_path is None:
            return
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)
                sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def on_train_end(self) -> None:
        self._raise_if_nonfinite()
        if self.hparams.get("bn_recalibration_batches", 0):
            self._recalibrate_batchnorm(self.hparams.bn_recalibration_batches)
        self._export(self._export_dir())

    def _recalibrate_batchnorm(self, num_batches: int) -> None:
        """`recalibrate_batchnorm` over the first `num_batches` training batches (the loader's
        first epoch order), moved and prepared as in training; under DDP the statistics are then
        averaged over the ranks, so every rank exports the same."""
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        loader = dm.train_dataloader(from_start=True) if dm is not None else trainer.train_dataloader

        def batches():
            for i, batch in enumerate(loader):
                if i == num_batches:
                    return
                batch = move_data_to_device(batch, self.device)
                yield dm.on_after_batch_transfer(batch, 0) if dm is not None else batch

        # eager even when the parts are compiled: a few forward passes in another mode are not
        # worth a recompilation
        with trainer.precision_plugin.forward_context(), torch.compiler.set_stance("force_eager"):
            used = recalibrate_batchnorm(self.model, self.losses, batches())
        if trainer.world_size > 1:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
                    m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
        if used == 0:
            rank_zero_warn("bn_recalibration_batches: the training loader gave no batch, so the BatchNorm "
                           "statistics are the ones training kept")
            return
        self.print(f"re-estimated the BatchNorm statistics over {used} training batches")

    @rank_zero_only
    def _export(self, directory: Path) -> None:
        from leworld.checkpoint import export_model

        dm = getattr(self.trainer, "datamodule", None)
        extra = {"global_step": int(self.global_step), "epoch": int(self.current_epoch),
                 "hparams": {k: v for k, v in self.hparams.items() if k != "model" and not k.startswith("_")},
                 "dataset": getattr(dm, "metadata", None), "data": _data_settings(dm)}
        export_model(self.model, directory, extra=extra)
        print(f"exported the model to {directory}")


def _check_lambda_schedule(schedule) -> tuple[list[int], list[float]]:
    """Validates the SIGReg weight schedule; returns the change steps and weights."""
    if schedule is None:
        return [], []
    steps, values = [], []
    for item in schedule:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"lambda_schedule entries are [step, weight] pairs, got {item!r}: "
                             f"write e.g. lambda_schedule: [[6000, 0.003]]")
        step, value = item
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"lambda_schedule step must be an integer >= 0, got {step!r}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"lambda_schedule weight must be a finite number >= 0, got {value!r} at step {step}")
        if steps and step <= steps[-1]:
            raise ValueError(f"lambda_schedule steps must increase, got {step} after {steps[-1]}")
        steps.append(step)
        values.append(float(value))
    return steps, values


def _data_settings(dm) -> dict | None:
    """Where the training data is and how it was split: evaluation draws from the same validation episodes."""
    if dm is None or not hasattr(dm, "hparams"):
        return None
    from leworld.checkpoint import DATA_SETTINGS

    hp = dm.hparams
    return {k: (str(hp[k]) if k == "path" else hp[k]) for k in DATA_SETTINGS if k in hp}
