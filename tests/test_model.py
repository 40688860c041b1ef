"""Tests of leworld.model: shapes, parameter count, AdaLN-zero, causality, rollout, errors.

Run: pytest tests/test_model.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from leworld.model import LeWMConfig, LeWorldModel
from leworld.model.cnn import CNN

B, S, D = 2, 3, 32


def tiny(**overrides) -> LeWMConfig:
    kw = dict(
        image_size=32, patch_size=8, enc_width=64, enc_depth=2, enc_heads=2, enc_mlp=128,
        cnn_channels=(8, 16, 32), embed_dim=D, proj_hidden=64, history=3, pred_depth=2,
        pred_heads=4, pred_head_dim=8, pred_mlp=64, action_hidden=32,
    )
    kw.update(overrides)
    return LeWMConfig(**kw)


def perturb_adaln(model: LeWorldModel, std: float = 0.2) -> None:
    """Give the AdaLN-zero layers non-zero weights so that blocks (and actions) do something."""
    torch.manual_seed(1)
    for block in model.predictor.blocks:
        nn.init.normal_(block.adaLN[-1].weight, std=std)
        nn.init.normal_(block.adaLN[-1].bias, std=std)


def make(encoder: str = "vit", perturbed: bool = True, **overrides) -> LeWorldModel:
    if encoder.startswith("cnn-"):  # the CNN with another head: cnn-keypoints, cnn-hybrid, cnn-moments
        encoder, overrides = "cnn", {"cnn_head": encoder[4:], **overrides}
    torch.manual_seed(0)
    model = LeWorldModel(tiny(encoder=encoder, **overrides))
    if perturbed:
        perturb_adaln(model)
    return model.eval()


def blocks(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, 10)  # frameskip 5 x action_dim 2


@pytest.mark.parametrize("encoder", ["vit", "cnn", "cnn-keypoints", "cnn-hybrid", "cnn-moments"])
def test_shapes(encoder):
    model = make(encoder)
    pixels = torch.randint(0, 256, (B, 3, 3, 32, 32), dtype=torch.uint8)
    emb = model.encode(pixels)
    assert emb.shape == (B, 3, D)
    act = model.encode_actions(blocks(B, 3))
    assert act.shape == (B, 3, D)
    assert model.predict(emb, act).shape == (B, 3, D)
    assert model.rollout(emb, blocks(B, S, 5)).shape == (B, S, 5, D)
    assert model.rollout(emb[:, -1:], blocks(B, S, 2)).shape == (B, S, 2, D)  # one context frame


def test_paper_config_parameter_count():
    with torch.device("meta"):  # count without allocating or initialising
        model = LeWorldModel(LeWMConfig())
    counts = model.parameter_counts()
    print("paper config parameters:", counts)
    assert abs(counts["total"] - 18.0e6) / 18.0e6 < 0.01
    assert abs(counts["encoder"] - 5.50e6) / 5.50e6 < 0.01
    assert abs(counts["predictor"] - 10.8e6) / 10.8e6 < 0.01


def test_adaln_zero_predictor_ignores_actions_at_init():
    model = make(perturbed=False)
    emb = torch.randn(B, 3, D)
    out1 = model.predict(emb, model.encode_actions(blocks(B, 3)))
    out2 = model.predict(emb, model.encode_actions(blocks(B, 3)))
    assert torch.equal(out1, out2)


def test_actions_matter_after_perturbing_adaln():
    model = make()
    emb = torch.randn(B, 3, D)
    out1 = model.predict(emb, model.encode_actions(blocks(B, 3)))
    out2 = model.predict(emb, model.encode_actions(blocks(B, 3)))
    assert (out1 - out2).abs().max() > 1e-3


def test_predictor_is_causal():
    model = make()
    emb, act = torch.randn(B, 3, D), model.encode_actions(blocks(B, 3))
    out = model.predict(emb, act)
    emb2, act2 = emb.clone(), act.clone()
    emb2[:, 2] += 1.0
    act2[:, 2] += 1.0
    out2 = model.predict(emb2, act2)
    torch.testing.assert_close(out2[:, :2], out[:, :2], rtol=0, atol=1e-6)
    assert (out2[:, 2] - out[:, 2]).abs().max() > 1e-3
    act3 = act.clone()
    act3[:, 1] += 1.0  # an action changes its own position's prediction
    assert (model.predict(emb, act3)[:, 1] - out[:, 1]).abs().max() > 1e-3


def manual_rollout(model, context, future, context_actions):
    """Step-by-step reference: one (row, sample) at a time, full `predict` on the window."""
    W = model.config.history
    Bn, Sn, T, _ = future.shape
    out = torch.zeros(Bn, Sn, T, context.shape[-1])
    for b in range(Bn):
        for s in range(Sn):
            frames = list(context[b])
            acts = list(context_actions[b]) + list(future[b, s])
            for t in range(T):
                n = len(frames)
                window = torch.stack(frames[-W:])[None]  # (1, <=W, D)
                act_window = model.encode_actions(torch.stack(acts[max(0, n - W):n]))[None]
                frames.append(model.predict(window, act_window)[0, -1])
                out[b, s, t] = frames[-1]
    return out


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("H", [1, 3, 4])
def test_rollout_matches_step_by_step_predict(H, share):
    model = make()
    context, future, ctx_act = torch.randn(B, H, D), blocks(B, S, 5), blocks(B, H - 1)
    with torch.no_grad():
        got = model.rollout(context, future, ctx_act, share_context=share)
        want = manual_rollout(model, context, future, ctx_act)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rollout_with_and_without_shared_context_agree_in_float64():
    """Computing the observed tokens once per row or once per sample gives the same numbers."""
    model = make().double()
    for m in model.modules():  # nonzero AdaLN so the actions matter
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.1)
    context, future, ctx_act = torch.randn(B, 3, D).double(), blocks(B, S, 5).double(), blocks(B, 2).double()
    with torch.no_grad():
        shared = model.rollout(context, future, ctx_act, share_context=True)
        each = model.rollout(context, future, ctx_act, share_context=False)
    assert shared.std() > 0.1
    torch.testing.assert_close(shared, each, rtol=1e-12, atol=1e-12)


def test_rollout_default_context_actions_are_zeros():
    model = make()
    context, future = torch.randn(B, 3, D), blocks(B, S, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.rollout(context, future), model.rollout(context, future, torch.zeros(B, 2, 10)))


def test_rollout_is_differentiable_in_actions():
    model = make()
    future = blocks(B, S, 4).requires_grad_()
    model.rollout(torch.randn(B, 3, D), future).square().sum().backward()
    assert future.grad is not None and future.grad.abs().sum() > 0


@pytest.mark.parametrize("encoder", ["vit", "cnn", "cnn-keypoints", "cnn-hybrid", "cnn-moments"])
def test_uint8_and_float_pixels_encode_the_same(encoder):
    model = make(encoder)
    pixels = torch.randint(0, 256, (B, 2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(pixels), model.encode(pixels.float() / 255))


def test_encode_normalises_pixels_with_the_imagenet_statistics():
    """encode = projector(encoder((pixels / 255 - mean) / std)), with the ImageNet mean and std
    per channel written out here, frame by frame."""
    model = make("cnn").double()
    pixels = torch.randint(0, 256, (B, 2, 3, 32, 32), dtype=torch.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float32).double().tolist()  # stored as float32 buffers
                 for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    with torch.no_grad():
        got = model.encode(pixels)  # (B, 2, D)
        for b in range(B):
            for t in range(2):
                x = torch.stack([(pixels[b, t, c].double() / 255 - mean[c]) / std[c] for c in range(3)])
                want = model.projector(model.encoder(x[None]))[0]  # (D,)
                torch.testing.assert_close(got[b, t], want, rtol=1e-12, atol=1e-12)


def hand_layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """(..., D) -> normalised over D with the population variance."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def hand_block(block, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """One AdaLN-zero block from its definition, token by token and head by head (float64):
    h = x + g_a * Attn(LN(x) * (1 + s_a) + b_a); out = h + g_m * MLP(LN(h) * (1 + s_m) + b_m),
    Attn causal softmax(q k^T / sqrt(hs)) v per head, MLP Linear-GELU(erf)-Linear."""
    Bn, T, Dm = x.shape
    nh, hs = block.attn.heads, block.attn.head_dim
    b_a, s_a, g_a, b_m, s_m, g_m = (mod[..., i * Dm:(i + 1) * Dm] for i in range(6))
    a = hand_layer_norm(x, 1e-6) * (1 + s_a) + b_a
    wq, wk, wv = block.attn.qkv.weight.split(nh * hs)
    bq, bk, bv = block.attn.qkv.bias.split(nh * hs)
    q, k, v = a @ wq.T + bq, a @ wk.T + bk, a @ wv.T + bv  # (B, T, nh*hs)
    heads_out = torch.zeros(Bn, T, nh * hs, dtype=x.dtype)
    for n in range(Bn):
        for h in range(nh):
            sl = slice(h * hs, (h + 1) * hs)
            for i in range(T):
                scores = [float(q[n, i, sl] @ k[n, j, sl]) / math.sqrt(hs) for j in range(i + 1)]  # keys j <= i
                top = max(scores)
                w = [math.exp(c - top) for c in scores]
                heads_out[n, i, sl] = sum(wj / math.fsum(w) * v[n, j, sl] for j, wj in enumerate(w))
    hidden = x + g_a * (heads_out @ block.attn.proj.weight.T + block.attn.proj.bias)
    m = hand_layer_norm(hidden, 1e-6) * (1 + s_m) + b_m
    up, down = block.mlp[0], block.mlp[3]
    u = m @ up.weight.T + up.bias
    gelu = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    return hidden + g_m * (gelu @ down.weight.T + down.bias)


@pytest.mark.parametrize("T", [3, 12])  # 12 > SHORT: the fused attention kernel
def test_predictor_matches_a_hand_written_float64_predictor(T):
    """Positions, every block (modulation from the condition) and the final LayerNorm against
    `hand_block`; T above the short-attention limit takes the fused kernel."""
    model = make("cnn", history=T).double().eval()
    perturb_adaln(model)
    pred = model.predictor
    emb, cond = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        got = pred(emb, cond)
        x = emb + pred.pos_embed[:, :T]
        for block in pred.blocks:
            c = cond * torch.sigmoid(cond)  # SiLU
            mod = c @ block.adaLN[1].weight.T + block.adaLN[1].bias  # (B, T, 6D)
            assert mod.abs().max() > 0.1  # the blocks are not the identity
            x = hand_block(block, x, mod)
        want = hand_layer_norm(x, pred.norm.eps, pred.norm.weight, pred.norm.bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def hand_vit(vit, image: torch.Tensor) -> torch.Tensor:
    """The ViT from its definition for one image (C, H, W) in float64: patches in row-major order,
    each flattened (channel, row, column) and projected; CLS first; learned positions; pre-LN blocks
    with softmax attention over all tokens, head by head; final LayerNorm of the CLS token."""
    C, H, W = image.shape
    p = vit.patch_embed.kernel_size[0]
    w_patch = vit.patch_embed.weight.reshape(vit.width, -1)  # (width, C*p*p)
    tokens = [vit.cls_token[0, 0]]
    for r in range(H // p):
        for c in range(W // p):
            patch = image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)  # (C*p*p,)
            tokens.append(w_patch @ patch + vit.patch_embed.bias)
    x = torch.stack(tokens) + vit.pos_embed[0]  # (N+1, width)
    for block in vit.blocks:
        a = hand_layer_norm(x, block.norm1.eps, block.norm1.weight, block.norm1.bias)
        nh = block.attn.heads
        hs = vit.width // nh
        q, k, v = (a @ w.T + b for w, b in zip(block.attn.qkv.weight.split(vit.width),
                                                block.attn.qkv.bias.split(vit.width)))
        out = torch.zeros_like(x)
        for h in range(nh):
            sl = slice(h * hs, (h + 1) * hs)
            for i in range(len(x)):
                scores = [float(q[i, sl] @ k[j, sl]) / math.sqrt(hs) for j in range(len(x))]  # every token
                top = max(scores)
                w = [math.exp(c - top) for c in scores]
                out[i, sl] = sum(wj / math.fsum(w) * v[j, sl] for j, wj in enumerate(w))
        x = x + out @ block.attn.proj.weight.T + block.attn.proj.bias
        m = hand_layer_norm(x, block.norm2.eps, block.norm2.weight, block.norm2.bias)
        up, down = block.mlp[0], block.mlp[2]
        u = m @ up.weight.T + up.bias
        x = x + (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ down.weight.T + down.bias
    return hand_layer_norm(x[0], vit.norm.eps, vit.norm.weight, vit.norm.bias)


def test_vit_matches_a_hand_written_float64_vit():
    """Every parameter random (LayerNorms included, so that swapping them shows), two images."""
    from leworld.model.vit import ViT

    torch.manual_seed(0)
    vit = ViT(image_size=16, patch_size=8, width=8, depth=2, heads=2, mlp=16).double().eval()
    with torch.no_grad():
        for param in vit.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        got = vit(images)
        want = torch.stack([hand_vit(vit, im) for im in images])
        assert not torch.allclose(want[0], want[1], atol=1e-3)  # the CLS token sees the image
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_projector_and_flatten_cnn_match_hand_written_float64():
    """Projector: Linear, BatchNorm (batch statistics in training, running ones in eval), GELU,
    Linear; the flatten CNN: three convolutions with GELU after each, then a linear head."""
    import torch.nn.functional as F

    from leworld.model.lewm import Projector

    torch.manual_seed(0)
    proj = Projector(6, 10, 4).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)  # (B, T, in): normalised over all B*T rows
    lin1, bn, _, lin2 = proj.net
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
        h = x.reshape(15, 6) @ lin1.weight.T + lin1.bias  # (15, 10)
        for train in (True, False):
            proj.train(train)
            mean, var = (h.mean(0), h.var(0, unbiased=False)) if train else (bn.running_mean, bn.running_var)
            z = (h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
            want = ((0.5 * z * (1 + torch.erf(z / math.sqrt(2)))) @ lin2.weight.T + lin2.bias).view(3, 5, 4)
            running = bn.running_mean.clone()
            torch.testing.assert_close(proj(x), want, rtol=1e-12, atol=1e-12)
            if train:
                bn.running_mean.copy_(running)  # undo the update of the running statistics

    cnn = CNN(image_size=32, channels=(4, 6, 8), width=5).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y = images
        for conv in (cnn.convs[0], cnn.convs[2], cnn.convs[4]):
            y = F.conv2d(y, conv.weight, conv.bias, conv.stride, conv.padding)
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        want = y.reshape(2, -1) @ cnn.head.weight.T + cnn.head.bias
        torch.testing.assert_close(cnn(images), want, rtol=1e-12, atol=1e-12)


def test_wrong_shapes_give_clear_errors():
    model = make()
    with pytest.raises(ValueError, match="unsqueeze"):
        model.encode(torch.zeros(B, 3, 32, 32))
    with pytest.raises(ValueError, match="permute"):
        model.encode(torch.zeros(B, 1, 32, 32, 3))
    with pytest.raises(ValueError, match="32x32"):
        model.encode(torch.zeros(B, 1, 3, 64, 64))
    with pytest.raises(TypeError, match="uint8"):
        model.encode(torch.zeros(B, 1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="frameskip"):
        model.encode_actions(torch.zeros(B, 3, 7))
    with pytest.raises(ValueError, match="history=3"):
        model.predict(torch.zeros(B, 4, D), torch.zeros(B, 4, D))
    with pytest.raises(ValueError, match="unsqueeze"):
        model.rollout(torch.zeros(B, 3, D), blocks(B, 5))
    with pytest.raises(ValueError, match="context_actions"):
        model.rollout(torch.zeros(B, 3, D), blocks(B, S, 5), blocks(B, 3))


def test_numpy_inputs_are_refused_by_name():
    model = make()
    pixels = np.zeros((B, 1, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(TypeError, match=r"encode expects pixels as a torch.Tensor, got numpy.ndarray.*torch.as_tensor"):
        model.encode(pixels)
    emb = torch.zeros(B, 3, D)
    with pytest.raises(TypeError, match="predict expects act_emb"):
        model.predict(emb, emb.numpy())
    with pytest.raises(TypeError, match="rollout expects action_blocks"):
        model.rollout(emb, blocks(B, S, 5).numpy())
    with pytest.raises(TypeError, match="rollout expects context_actions"):
        model.rollout(emb, blocks(B, S, 5), blocks(B, 2).tolist())
    with pytest.raises(TypeError, match="encode_actions expects blocks"):
        model.encode_actions(blocks(B, 3).numpy())
    with pytest.raises(TypeError, match="normalize_actions expects a"):
        model.normalize_actions(np.zeros((B, 2), dtype=np.float32))


def test_config_validation_and_round_trip():
    cfg = tiny(encoder="cnn")
    assert LeWMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown LeWMConfig keys"):
        LeWMConfig.from_dict({**cfg.to_dict(), "embed_size": 3})
    with pytest.raises(ValueError, match="patch"):
        LeWMConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="embed_dim"):
        LeWMConfig(embed_dim=0)
    with pytest.raises(ValueError, match="encoder"):
        LeWMConfig(encoder="resnet")
    with pytest.raises(ValueError, match="cnn_head"):
        LeWMConfig(encoder="cnn", cnn_head="pool")


def test_keypoints_are_the_expected_positions_under_a_spatial_softmax():
    """The CNN's keypoint head against a float64 sum over every cell, and a single sharp peak
    lands on its cell's centre."""
    cnn = make("cnn-keypoints").encoder.double()
    with torch.no_grad():
        cnn.log_temperature.fill_(-0.7)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 8, 8, generator=g, dtype=torch.float64)
    got = cnn.keypoints(maps)
    want = torch.empty(3, 10, dtype=torch.float64)
    centre = [(j + 0.5) / 8 * 2 - 1 for j in range(8)]
    for b in range(3):
        for k in range(5):
            w = torch.exp(maps[b, k] / torch.exp(torch.tensor(-0.7, dtype=torch.float64)))
            w = w / w.sum()
            want[b, k] = sum(w[i, j] * centre[j] for i in range(8) for j in range(8))  # x: the column
            want[b, 5 + k] = sum(w[i, j] * centre[i] for i in range(8) for j in range(8))  # y: the row
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    peak = torch.full((1, 1, 8, 8), -1e4, dtype=torch.float64)
    peak[0, 0, 2, 6] = 0.0  # row 2, column 6
    torch.testing.assert_close(cnn.keypoints(peak), torch.tensor([[centre[6], centre[2]]], dtype=torch.float64))


def test_moments_head_is_the_mean_and_covariance_of_each_spatial_softmax():
    """The moments head against a float64 sum over every cell, and a uniform bar's moments
    against the closed form (a line of n cells has variance (n^2 - 1) / 12 cells squared)."""
    cnn = make("cnn-moments").encoder.double()
    with torch.no_grad():
        cnn.log_temperature.fill_(0.3)
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    got = cnn.moments(maps)
    assert got.shape == (2, 15)
    centre = torch.tensor([(j + 0.5) / 8 * 2 - 1 for j in range(8)], dtype=torch.float64)
    cell = 2 / 8
    for b in range(2):
        for k in range(3):
            w = torch.softmax(maps[b, k].flatten() / torch.exp(torch.tensor(0.3, dtype=torch.float64)), 0).view(8, 8)
            x = sum(w[i, j] * centre[j] for i in range(8) for j in range(8))
            y = sum(w[i, j] * centre[i] for i in range(8) for j in range(8))
            vx = sum(w[i, j] * (centre[j] - x) ** 2 for i in range(8) for j in range(8)) / cell ** 2
            vy = sum(w[i, j] * (centre[i] - y) ** 2 for i in range(8) for j in range(8)) / cell ** 2
            cxy = sum(w[i, j] * (centre[j] - x) * (centre[i] - y) for i in range(8) for j in range(8)) / cell ** 2
            want = torch.stack([x, y, vx, vy, cxy])
            torch.testing.assert_close(got[b, k::3], want, rtol=0, atol=1e-12)
    bar = torch.full((2, 1, 8, 8), -1e4, dtype=torch.float64)
    bar[0, 0, 2, 1:6] = 0.0  # a horizontal bar of 5 cells in row 2
    for d in range(4):  # a diagonal of 4 cells, going down and right
        bar[1, 0, 3 + d, 2 + d] = 0.0
    m = cnn.moments(bar)  # (2, 5): x, y, var x, var y, cov xy
    torch.testing.assert_close(m[0, 2:], torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(m[1, 2:], torch.tensor([1.25, 1.25, 1.25], dtype=torch.float64), rtol=0, atol=1e-9)


def test_hybrid_head_is_the_keypoints_beside_a_flattened_coarse_map():
    """The hybrid head against the same layers applied by hand in float64: conv, GELU, conv,
    GELU (shared), then the keypoints of the third conv beside the two stride-2 convs, flattened."""
    cnn = make("cnn-hybrid").encoder.double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c1, c2, c3 = (m for m in cnn.convs if isinstance(m, nn.Conv2d))
    gelu = torch.nn.functional.gelu
    shared = gelu(torch.nn.functional.conv2d(gelu(torch.nn.functional.conv2d(x, c1.weight, c1.bias, stride=4)),
                                             c2.weight, c2.bias, padding=1))
    points = cnn.keypoints(torch.nn.functional.conv2d(shared, c3.weight, c3.bias, padding=1))
    d1, d2 = (m for m in cnn.coarse if isinstance(m, nn.Conv2d))
    coarse = gelu(torch.nn.functional.conv2d(gelu(torch.nn.functional.conv2d(shared, d1.weight, d1.bias, stride=2,
                                                                             padding=1)),
                                             d2.weight, d2.bias, stride=2, padding=1))
    assert coarse.shape[-1] == 32 // 16
    want = torch.cat([points, coarse.flatten(1)], dim=1) @ cnn.head.weight.T + cnn.head.bias
    torch.testing.assert_close(cnn(x), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="hybrid"):
        CNN(32, (4, 4, 4), 8, head="both")


def test_normalize_denormalize_actions_round_trip():
    model = make()
    model.set_action_stats(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.1]))
    step = torch.randn(4, 6, 2)
    block = torch.randn(4, 6, 10)
    torch.testing.assert_close(model.denormalize_actions(model.normalize_actions(step)), step)
    torch.testing.assert_close(model.denormalize_actions(model.normalize_actions(block)), block)
    # a block is frameskip steps of A: normalising it equals normalising each step
    per_step = model.normalize_actions(block.view(4, 6, 5, 2)).view(4, 6, 10)
    torch.testing.assert_close(model.normalize_actions(block), per_step)
    torch.testing.assert_close(model.normalize_actions(step)[..., 0], (step[..., 0] - 0.5) / 2.0)
    with pytest.raises(ValueError, match="action_dim"):
        model.normalize_actions(torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        model.set_action_stats(torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_short_causal_attention_equals_sdpa(T):
    from leworld.model.predictor import short_causal_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(5, 4, T, 16, generator=g, dtype=torch.float64) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(short_causal_attention(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_predictor_short_path_matches_fused_attention():
    """The predictor's output does not depend on which attention path runs (eval mode)."""
    from leworld.model import predictor as P

    pred = P.Predictor(dim=32, history=3, depth=2, heads=4, head_dim=8, mlp=64).double().eval()
    for block in pred.blocks:  # non-zero AdaLN so that attention matters
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.5)
    g = torch.Generator().manual_seed(0)
    emb, act = torch.randn(6, 3, 32, generator=g, dtype=torch.float64), torch.randn(6, 3, 32, generator=g, dtype=torch.float64)
    short = pred(emb, act)
    old = P.SHORT
    try:
        P.SHORT = 0  # every length goes to scaled_dot_product_attention
        fused = pred(emb, act)
    finally:
        P.SHORT = old
    torch.testing.assert_close(short, fused, rtol=1e-10, atol=1e-10)



@pytest.mark.parametrize("P, T", [(0, 1), (0, 3), (1, 1), (2, 1), (1, 2), (0, 12), (4, 8)])
def test_predictor_step_equals_last_row_of_forward(P, T):
    """`step` (what rollouts use) computes P shared tokens once per group of rows and only one
    query row in the final block: it must equal the last row of `forward` on the whole window,
    for short (written-out) and long (fused) windows."""
    from leworld.model.predictor import Predictor

    pred = Predictor(dim=32, history=12, depth=3, heads=4, head_dim=8, mlp=64).double().eval()
    g = torch.Generator().manual_seed(10 * P + T)
    for block in pred.blocks:  # non-zero AdaLN so that every branch matters
        with torch.no_grad():
            block.adaLN[-1].weight.copy_(torch.randn(block.adaLN[-1].weight.shape, generator=g, dtype=torch.float64) * 0.5)
    groups, per = 3, 4  # 3 groups of 4 rows; each group shares its first P tokens
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    prefix, prefix_act = rand(groups, P, 32), rand(groups, P, 32)
    emb, act = rand(groups * per, T, 32), rand(groups * per, T, 32)
    whole = torch.cat([prefix.repeat_interleave(per, 0), emb], 1)
    whole_act = torch.cat([prefix_act.repeat_interleave(per, 0), act], 1)
    want = pred(whole, whole_act)[:, -1]
    got = pred.step(emb, pred.modulations(act), prefix if P else None, pred.modulations(prefix_act) if P else None)
    assert got.shape == (groups * per, 32)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the test can fail: rows of a group differ, and a prefix of another group changes the answer
    assert (want[0] - want[1]).abs().max() > 1e-3
    if P:
        other = pred.step(emb, pred.modulations(act), prefix.roll(1, 0), pred.modulations(prefix_act.roll(1, 0)))
        assert (other - got).abs().max() > 1e-3


def test_predictor_step_rejects_bad_windows():
    from leworld.model.predictor import Predictor

    pred = Predictor(dim=16, history=3, depth=1, heads=2, head_dim=8, mlp=32)
    with pytest.raises(ValueError, match="history 3"):
        pred.step(torch.randn(4, 3, 16), pred.modulations(torch.randn(4, 3, 16)), torch.randn(2, 1, 16),
                  pred.modulations(torch.randn(2, 1, 16)))
    with pytest.raises(ValueError, match="divide"):
        pred.step(torch.randn(5, 1, 16), pred.modulations(torch.randn(5, 1, 16)), torch.randn(2, 1, 16),
                  pred.modulations(torch.randn(2, 1, 16)))


def test_float_pixels_outside_zero_one_are_refused_and_those_inside_match_uint8():
    model = LeWorldModel(tiny(encoder="cnn")).eval()
    pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    unit = pixels.float() / 255
    torch.testing.assert_close(model.encode(unit), model.encode(pixels), rtol=0, atol=1e-6)
    for bad, shown in ((unit * 2 - 1, "from -1 to 1"), (unit - 0.01, "from -0.01"),
                       (unit.masked_fill(unit > 0.5, float("nan")), "from nan")):  # centred, shifted, NaN frames
        with pytest.raises(ValueError, match=rf"float pixels must be in \[0, 1\], got values {shown}"):
            model.encode(bad)


def test_one_frame_or_row_in_training_mode_is_a_clear_error_and_fine_in_eval_mode():
    """The projectors' BatchNorm normalises a training batch with its own statistics; one row has
    none. A freshly built model is in training mode, so say to call eval()."""
    model = LeWorldModel(tiny(encoder="cnn"))
    assert model.training
    one = torch.randint(0, 256, (1, 1, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"encode got 1 of frames while the model is in training mode.*model\.eval\(\)"):
        model.encode(one)
    emb, blocks = torch.zeros(1, 1, D), torch.zeros(1, 1, 2, model.config.action_block_dim)
    with pytest.raises(ValueError, match="predict got 1 of positions while the model is in training mode"):
        model.predict(emb, emb)
    with pytest.raises(ValueError, match="rollout got 1 of rows x samples while the model is in training mode"):
        model.rollout(emb, blocks)
    assert model.encode(one.expand(2, 1, 3, 32, 32)).shape == (2, 1, D)  # two frames train
    model.eval()
    assert model.encode(one).shape == (1, 1, D) and model.rollout(emb, blocks).shape == (1, 1, 2, D)


def test_non_finite_action_statistics_are_refused():
    model = LeWorldModel(tiny(encoder="cnn"))
    A = model.config.action_dim
    for mean, std in ((torch.full((A,), float("nan")), torch.ones(A)), (torch.zeros(A), torch.full((A,), float("inf")))):
        with pytest.raises(ValueError, match="action stats must be finite"):
            model.set_action_stats(mean, std)


def test_float_pixels_above_one_and_embeddings_of_another_width_are_refused():
    model = LeWorldModel(tiny(encoder="cnn")).eval()
    pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="float pixels must be in \\[0, 1\\]"):
        model.encode(pixels.float())  # 0..255 floats: a missing division by 255
    emb = model.encode(pixels)
    wrong = torch.zeros(2, 3, D + 3)
    with pytest.raises(ValueError, match=f"config.embed_dim = {D}"):
        model.predict(wrong, wrong)
    blocks = torch.zeros(2, 4, 2, model.config.action_block_dim)
    with pytest.raises(ValueError, match=f"config.embed_dim = {D}"):
        model.rollout(wrong, blocks)
    with pytest.raises(ValueError, match="at least one row, sample and block"):
        model.rollout(emb, blocks[:, :0])
    assert model.rollout(emb, blocks).shape == (2, 4, 2, D)
    with pytest.raises(ValueError, match="encode got no frames"):
        model.encode(pixels[:, :0])
    with pytest.raises(ValueError, match="predict expects"):
        model.predict(emb[:, :0], emb[:, :0])


# ---- dropout: every test above runs in eval mode -------------------------------------------
def test_predictor_dropout_is_the_papers_0_1_and_every_dropout_uses_the_configured_rate():
    assert LeWMConfig().pred_dropout == 0.1
    with pytest.raises(ValueError, match="pred_dropout must be in \\[0, 1\\)"):
        LeWMConfig(pred_dropout=1.0)  # drops everything
    with pytest.raises(ValueError, match="pred_dropout"):
        LeWMConfig(pred_dropout=-0.1)
    from leworld.model.predictor import Predictor

    for pred, p in ((make("cnn", pred_dropout=0.3).predictor, 0.3),
                    (Predictor(dim=16, history=3, depth=2, heads=2, head_dim=8, mlp=32), 0.1)):
        rates = [m.p for m in pred.modules() if isinstance(m, nn.Dropout)]
        assert rates == [p] * (3 * len(pred.blocks))  # per block: after the projection, in and after the MLP
        assert [block.attn.dropout for block in pred.blocks] == [p] * len(pred.blocks)  # attention weights


def test_train_mode_forwards_are_random_with_dropout_and_deterministic_without():
    """Two train-mode forwards differ with the default dropout and agree with pred_dropout=0 (the
    BatchNorm of pred_proj is deterministic); in eval mode they always agree."""
    emb = torch.randn(8, 3, D)
    for p, random_in_training in ((None, True), (0.0, False)):
        model = make("cnn", **({} if p is None else {"pred_dropout": p}))
        act = model.encode_actions(blocks(8, 3))
        with torch.no_grad():
            assert torch.equal(model.predict(emb, act), model.predict(emb, act))
            model.train()
            torch.manual_seed(0)
            first, second = model.predict(emb, act), model.predict(emb, act)
        assert (not torch.equal(first, second)) == random_in_training


@pytest.mark.parametrize("Tq, Tk", [(3, 3), (1, 3), (12, 12), (2, 12)])  # written-out and fused attention paths
def test_attention_with_all_weights_dropped_in_training_is_the_projection_bias(Tq, Tk):
    from leworld.model.predictor import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=16, heads=2, head_dim=8, dropout=1.0).double()
    attn.proj_drop.p = 0.0  # only the attention weights are dropped
    nn.init.normal_(attn.proj.bias)
    x = torch.randn(3, Tk, 16, dtype=torch.float64)
    q, k, v = attn.project(x, Tk - Tq)
    with torch.no_grad():
        attn.eval()
        assert (attn.attend(q, k, v) - attn.proj.bias).abs().max() > 0.1
        attn.train()
        torch.testing.assert_close(attn.attend(q, k, v), attn.proj.bias.expand(3, Tq, 16), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [3, 12])
def test_the_attention_output_drops_the_configured_fraction_in_training(T):
    """With zero projection weights the attention output is its bias, 1 everywhere: after the output
    dropout of rate 0.5 each number is 0 or 1 / (1 - 0.5) = 2, about half of them 0."""
    from leworld.model.predictor import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(dim=16, heads=2, head_dim=8, dropout=0.5).train()
    with torch.no_grad():
        attn.proj.weight.zero_()
        attn.proj.bias.fill_(1.0)
        out = attn(torch.randn(64, T, 16))
    n = out.numel()
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs((out == 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


# ---- action encoder, BatchNorm, predict ----------------------------------------------------
def test_action_encoder_is_linear_silu_linear_in_float64():
    model = make("cnn").double()
    a = torch.randn(4, 3, 10, dtype=torch.float64)  # normalised blocks
    lin1, _, lin2 = model.action_encoder
    with torch.no_grad():
        h = a @ lin1.weight.T + lin1.bias
        want = (h / (1 + torch.exp(-h))) @ lin2.weight.T + lin2.bias  # SiLU(h) = h * sigmoid(h)
        torch.testing.assert_close(model.encode_actions(a), want, rtol=1e-12, atol=1e-12)
    assert (h < -1).any()  # a part where SiLU and ReLU differ


def test_projector_batchnorm_running_statistics_move_a_tenth_of_the_way():
    """PyTorch's and the paper's momentum 0.1: from the reset statistics (0, 1), one training
    forward gives running_mean = 0.1 * batch mean, running_var = 0.9 + 0.1 * unbiased batch var."""
    from leworld.model.lewm import Projector

    torch.manual_seed(0)
    proj = Projector(6, 10, 4).double().train()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    lin1, bn, _, _ = proj.net
    with torch.no_grad():
        h = x.reshape(15, 6) @ lin1.weight.T + lin1.bias  # (15, 10): normalised over all B*T rows
        proj(x)
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * h.var(0, unbiased=True), rtol=1e-12, atol=1e-12)


def test_predict_refuses_action_embeddings_of_another_length():
    model = make("cnn")
    emb = torch.randn(B, 3, D)
    act = model.encode_actions(blocks(B, 3))
    with pytest.raises(ValueError, match="equal shape"):
        model.predict(emb, act[:, :1])  # would broadcast over the 3 frames
    with pytest.raises(ValueError, match="equal shape"):
        model.predict(emb, act[:1])


# ---- initialisation: forward passes do not see it, training from scratch does --------------
def assert_normal_init(w: torch.Tensor, std: float) -> None:
    """Mean 0, standard deviation `std` and 68.3% within one std (a normal, not a uniform: 57.7%),
    each to 5 standard errors of its n-sample estimate."""
    w = w.detach().double().flatten()
    n = w.numel()
    assert abs(w.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(w.std().item() / std - 1) < 5 / math.sqrt(2 * n)
    within = (w.abs() < std).double().mean().item()
    assert abs(within - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)


def test_predictor_initialises_weights_0_02_biases_zero_positions_0_02_and_adaln_zero():
    from leworld.model.predictor import Predictor

    torch.manual_seed(0)
    pred = Predictor(dim=64, history=16, depth=2, heads=4, head_dim=16, mlp=128)
    adaln = {id(block.adaLN[-1]) for block in pred.blocks}
    linears = [m for m in pred.modules() if isinstance(m, nn.Linear)]
    assert_normal_init(torch.cat([m.weight.flatten() for m in linears if id(m) not in adaln]), 0.02)
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if id(m) in adaln:
            assert torch.equal(m.weight, torch.zeros_like(m.weight))
    assert_normal_init(pred.pos_embed, 0.02)  # 1024 numbers


def test_vit_initialises_linear_weights_0_02_biases_zero_and_positions_0_02():
    from leworld.model.vit import ViT

    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=4, width=64, depth=2, heads=2, mlp=128)
    linears = [m for m in vit.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8
    assert_normal_init(torch.cat([m.weight.flatten() for m in linears]), 0.02)
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert_normal_init(vit.pos_embed, 0.02)  # 65 tokens x 64
    assert 0.01 < vit.cls_token.std().item() < 0.03  # 64 numbers


@pytest.mark.parametrize("head", ["keypoints", "hybrid", "moments"])
def test_spatial_softmax_starts_at_temperature_one(head):
    assert CNN(32, (4, 4, 4), 8, head=head).log_temperature.item() == 0.0


# ---- validation ----------------------------------------------------------------------------
def test_predictor_takes_exactly_one_of_conditions_and_modulations():
    from leworld.model.predictor import Predictor

    pred = Predictor(dim=16, history=3, depth=1, heads=2, head_dim=8, mlp=32)
    emb, act = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="exactly one of act_emb and modulations"):
        pred(emb)
    with pytest.raises(ValueError, match="exactly one of act_emb and modulations"):
        pred(emb, act, modulations=pred.modulations(act))
    assert torch.equal(pred(emb, act), pred(emb, modulations=pred.modulations(act)))


def test_encoder_shapes_that_cannot_work_are_refused_when_built():
    from leworld.model.vit import ViT

    with pytest.raises(ValueError, match="ViT width 10 is not divisible by heads 3"):
        ViT(image_size=16, patch_size=8, width=10, depth=1, heads=3, mlp=16)
    with pytest.raises(ValueError, match="enc_width 10 is not divisible by enc_heads 3"):
        LeWMConfig(enc_width=10, enc_heads=3)
    for size in (8, 12, 15):
        with pytest.raises(ValueError, match="at least 16 pixels"):
            CNN(image_size=size)
        with pytest.raises(ValueError, match="image_size >= 16"):
            LeWMConfig(encoder="cnn", image_size=size)
