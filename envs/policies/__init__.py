"""Scripted data policies: `make_policy(env_name, policy_name, env, noise, seed)`.

Example:
    >>> import envs
    >>> from envs.policies import make_policy
    >>> env = envs.make_batch("tworoom", num_envs=8, resolution=64)
    >>> obs = env.reset(seed=0)
    >>> policy = make_policy("tworoom", "expert", env, noise=2.0, seed=0)
    >>> policy.reset(env); actions = policy.act(env)  # (8, 2) in [-1, 1]
"""
from __future__ import annotations

POLICIES = {"tworoom": ("expert", "random"), "pusht": ("contact", "pusher", "random", "mix")}


def make_policy(env_name: str, policy_name: str, env, noise: float | None = None, seed: int = 0, **kwargs):
    """Build a data policy for a batched env. `noise=None` takes the policy's default."""
    if env_name not in POLICIES:
        raise ValueError(f"unknown env {env_name!r}: choose one of {', '.join(POLICIES)}")
    if policy_name not in POLICIES[env_name]:
        raise ValueError(
            f"unknown policy {policy_name!r} for {env_name}: choose one of {', '.join(POLICIES[env_name])}"
        )
    if env_name == "tworoom":
        from envs.policies.two_room import make_two_room_policy

        return make_two_room_policy(policy_name, env, noise=noise, seed=seed, **kwargs)
    from envs.policies.push_t import make_push_t_policy

    return make_push_t_policy(policy_name, env, noise=noise, seed=seed, **kwargs)


def action_noise(policy) -> float | dict | None:
    """The action-noise std a built policy adds: a number, None for a policy that adds none (uniform
    random actions), or name -> that for a policy that mixes sub-policies. This resolves `noise=None`
    to the policy's own default, so that a dataset can record what its actions were drawn with."""
    if hasattr(policy, "policies") and hasattr(policy, "names"):
        return {name: action_noise(sub) for name, sub in zip(policy.names, policy.policies)}
    noise = getattr(policy, "noise", None)
    return None if noise is None else float(noise)
