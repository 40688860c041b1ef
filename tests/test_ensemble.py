"""Model ensembles: each member's rollout on its own slice, the cost is the sum of the members'
costs (checked against each model alone in float64), plans equal to one model's when the members
are that model twice, clear errors for members that do not act alike."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leworld.model import LeWMConfig, LeWorldModel, ModelEnsemble
from leworld.planning import CEM, LatentProblem, MPCPolicy, latent_cost


def member(seed: int, **overrides) -> LeWorldModel:
    kw = dict(encoder="cnn", image_size=32, cnn_channels=(8, 8, 8), enc_width=32, embed_dim=16, proj_hidden=32,
              history=3, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32, action_hidden=16)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LeWorldModel(LeWMConfig(**kw))
    for block in model.predictor.blocks:  # AdaLN-zero starts action-blind: give the actions an effect
        nn.init.normal_(block.adaLN[-1].weight, std=0.2)
        nn.init.normal_(block.adaLN[-1].bias, std=0.2)
    return model.eval()


def pixels(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_ensemble_rolls_each_member_out_on_its_own_slice_and_sums_their_costs():
    # members differ in embedding size, history and head; the ensemble keeps the longest history
    a, b = member(0), member(1, embed_dim=24, history=1, cnn_head="keypoints")
    a, b = a.double(), b.double()
    ens = ModelEnsemble([a, b])
    assert ens.config.history == 3 and ens.config.embed_dim == 40 and ens.dims == [16, 24]
    frames, goal_frames = pixels(2, 3), pixels(2, 1, seed=1)
    g = torch.Generator().manual_seed(2)
    actions = torch.randn(2, 7, 4, 10, generator=g, dtype=torch.float64)  # (B, S, T, frameskip*A)
    ctx_actions = torch.randn(2, 2, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        emb = ens.encode(frames)
        assert torch.equal(emb, torch.cat([a.encode(frames), b.encode(frames)], -1))
        pred = ens.rollout(emb, actions, ctx_actions)  # (B, S, T, 40)
        goal = ens.encode(goal_frames)[:, 0]
        # each model alone, on only what it can see: a reads 3 frames and 2 blocks, b (history 1) the last frame
        pred_a = a.rollout(a.encode(frames), actions, ctx_actions)
        pred_b = b.rollout(b.encode(frames)[:, -1:], actions)
        assert torch.allclose(pred, torch.cat([pred_a, pred_b], -1), atol=1e-12)
        cost = latent_cost(pred, goal, "terminal")
        expected = (latent_cost(pred_a, a.encode(goal_frames)[:, 0]) + latent_cost(pred_b, b.encode(goal_frames)[:, 0]))
        assert torch.allclose(cost, expected, rtol=1e-12)
        assert torch.allclose(ens.member_costs(pred[..., -1, :], goal[:, None]).sum(-1), expected, rtol=1e-12)


def test_an_ensemble_of_one_model_twice_plans_exactly_like_the_model():
    # twice the same member doubles every cost: the same elites, so the very same plans
    model = member(0)
    ens = ModelEnsemble([model, model])
    frames, goal_frames = pixels(3, 3), pixels(3, 1, seed=1)
    plans = []
    for m in (model, ens):
        with torch.no_grad():
            problem = LatentProblem(m, m.encode(frames), m.encode(goal_frames)[:, 0], horizon=4)
            plans.append(CEM(num_samples=64, topk=8, iterations=4, seed=3).plan(problem))
    assert torch.equal(plans[0], plans[1])


def test_mpc_drives_an_ensemble_like_a_model():
    from envs import make_batch

    a, b = member(0, image_size=64), member(1, image_size=64, history=2)
    ens = ModelEnsemble([a, b])
    env = make_batch("tworoom", 2, resolution=64, seed=0)
    obs = env.reset(seed=0)
    policy = MPCPolicy(ens, CEM(num_samples=16, topk=4, iterations=2), horizon=2, receding_horizon=1)
    policy.reset(env)
    assert policy.goal.shape == (2, 32)
    for _ in range(12):
        action = policy.act(env, obs)
        assert action.shape == (2, 2) and abs(action).max() <= 1.0
        obs = env.step(action)
    assert len(policy.frames) == 3 and policy.plans == 2 * 3  # 12 steps = 3 kept frames, a plan at each


def test_members_that_do_not_act_alike_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 2 models"):
        ModelEnsemble([member(0)])
    with pytest.raises(ValueError, match="frameskip=4"):
        ModelEnsemble([member(0), member(1, frameskip=4)])
    with pytest.raises(ValueError, match="image_size=64"):
        ModelEnsemble([member(0), member(1, image_size=64)])
    other = member(1)
    other.set_action_stats(torch.tensor([0.5, 0.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="same dataset"):
        ModelEnsemble([member(0), other])
    for mean, std in (([0.0, 0.0], [1.0, 1.5]), ([0.0, 0.01], [1.0, 1.0])):  # one statistic differs
        base, odd = member(0), member(1)
        base.set_action_stats(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
        odd.set_action_stats(torch.tensor(mean), torch.tensor(std))
        with pytest.raises(ValueError, match="same dataset"):
            ModelEnsemble([base, odd])
    ens = ModelEnsemble([member(0), member(1)])
    with pytest.raises(ValueError, match="16 \\+ 16"):
        ens.split(torch.zeros(2, 16))


def test_ensemble_z_scores_actions_with_the_members_shared_statistics_and_back():
    a, b = member(0), member(1)
    for m in (a, b):
        m.set_action_stats(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.1]))
    ens = ModelEnsemble([a, b])
    g = torch.Generator().manual_seed(0)
    for raw in (torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 10, generator=g)):  # steps and blocks
        steps = raw.shape[-1] // 2  # a block is frameskip steps: the statistics tiled
        mean, std = torch.tensor([0.5, -1.0]).repeat(steps), torch.tensor([2.0, 0.1]).repeat(steps)
        torch.testing.assert_close(ens.normalize_actions(raw), (raw - mean) / std)
        torch.testing.assert_close(ens.denormalize_actions(raw), raw * std + mean)
        torch.testing.assert_close(ens.denormalize_actions(ens.normalize_actions(raw)), raw)
        assert torch.equal(ens.denormalize_actions(raw), a.denormalize_actions(raw))


def test_members_with_another_action_size_are_refused_naming_action_dim():
    # with one action number per step, the statistics (0,) and (0, 0) would broadcast as equal
    with pytest.raises(ValueError, match="member 1 has action_dim=1, member 0 has 2"):
        ModelEnsemble([member(0), member(1, action_dim=1)])
