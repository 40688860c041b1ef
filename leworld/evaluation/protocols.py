"""Evaluation protocols as named, versioned presets; start/goal pairs sampled from a dataset.

Example:
    >>> from leworld.data.store import EpisodeStore
    >>> from leworld.evaluation.protocols import get_protocol, sample_pairs
    >>> protocol = get_protocol("paper-v3")
    >>> pairs = sample_pairs(EpisodeStore("data/tworoom_64.h5"), protocol, seed=0)
    >>> pairs.start_state.shape  # (num_episodes, S): env states to reset to
    (50, 4)

A protocol fixes everything that defines a reported success rate: how many episodes, which
dataset split the starts come from, how far ahead the goal is, and the env-step budget.
Every result file stores the protocol's name, version and all its values. Change a value and
the numbers are no longer comparable: add a new preset (or bump the version) instead.

Sampling (as in the LeWM paper's protocol): `num_episodes` dataset episodes are drawn from the split (without
replacement while there are enough), a start step uniformly among those that leave room for
the goal, and the goal is the state `goal_offset` steps later in the same episode. Seeded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from leworld.data.clips import split_episodes
from leworld.data.store import EpisodeStore


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation protocol.

    Args:
        name: the preset's name, printed with every number.
        version: bumped whenever any value of a preset changes.
        num_episodes: start/goal pairs (episodes evaluated in parallel).
        goal_offset: the goal is the dataset state this many env steps after the start.
        budget: env steps allowed to reach the goal; success if the env's test holds at any step.
        split: "val" (the model's validation episodes: never trained on) or "all" (a held-out dataset).
        description: one line for tables and result files.
        dataset: for a held-out protocol, how its dataset is collected (`leworld.data.collect.collect`
            arguments without resolution and output path: the evaluation generates it at the model's
            resolution when missing); None draws from the model's own training data.
        env: the only environment the preset is defined for ("tworoom", "pusht"); None: any. It
            restricts where the preset applies and changes none of its pairs.
    """

    name: str
    version: int
    num_episodes: int = 50
    goal_offset: int = 25
    budget: int = 50
    split: str = "val"
    description: str = ""
    dataset: dict | None = None
    env: str | None = None

    def __post_init__(self) -> None:
        for field in ("num_episodes", "goal_offset", "budget"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"protocol {self.name}: {field} must be a whole number >= 1, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "EvalProtocol":
        """A modified copy; its name gets a `+` suffix so it is never mistaken for the preset."""
        if not changes:
            return self
        suffix = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        return dataclasses.replace(self, name=f"{self.name}+{suffix}", **changes)


PROTOCOLS = {
    p.name: p
    for p in (
        EvalProtocol("paper-v3", 1, 50, 25, 50, "val",
                     "LeWM paper v3: goal 25 steps ahead in a validation episode, 50-step budget"),
        EvalProtocol("paper-v1-tworoom", 1, 50, 100, 150, "val",
                     "LeWM paper v1 for Two-Room: goal 100 steps ahead, 150-step budget", env="tworoom"),
        EvalProtocol("far-tworoom-v1", 1, 50, 25, 50, "all",
                     "held-out low-noise (0.5) expert episodes toward the other room: goal 25 steps ahead "
                     "(~80 px, over half across the wall), 50-step budget",
                     dataset={"env": "tworoom", "episodes": 200, "steps": 50, "policy": "expert", "noise": 0.5,
                              "seed": 1_000_003, "env_kwargs": {"target_mode": "other_room"}}, env="tworoom"),
    )
}


def heldout_path(protocol: EvalProtocol, resolution: int) -> str:
    """Where a held-out protocol's dataset lives for a given frame resolution."""
    base = protocol.name.split("+")[0]  # a modified copy (e.g. fewer episodes) shares its preset's data
    return f"data/eval/{base}-{resolution}px.h5"


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


@dataclass
class Pairs:
    """Start/goal pairs: dataset episode and step indices and the env states at both."""

    episode: np.ndarray  # (N,) dataset episode index
    start: np.ndarray  # (N,) step of the start within the episode
    goal: np.ndarray  # (N,) step of the goal (start + goal_offset)
    start_state: np.ndarray  # (N, S)
    goal_state: np.ndarray  # (N, S)

    def to_records(self) -> list[dict]:
        return [{"episode": int(e), "start_step": int(s), "goal_step": int(g)}
                for e, s, g in zip(self.episode, self.start, self.goal)]


def split_of(store: EpisodeStore, protocol: EvalProtocol, val_fraction: float = 0.1,
             split_seed: int = 0) -> np.ndarray:
    """The episodes the protocol draws from: the training run's validation split, or all of them."""
    if protocol.split == "all":
        return np.arange(store.num_episodes)
    if protocol.split != "val":
        raise ValueError(f"protocol split must be 'val' or 'all', got {protocol.split!r}")
    _, val = split_episodes(store.num_episodes, val_fraction, split_seed)
    if len(val) == 0:
        raise ValueError(f"{store.path} has no validation episodes with val_fraction={val_fraction}: "
                         "evaluate on a dataset with more episodes or a protocol with split='all'")
    return val


def _spread_pairs(rng: np.random.Generator, eligible: np.ndarray, room: np.ndarray, n: int, store: EpisodeStore,
                  protocol: EvalProtocol) -> tuple[np.ndarray, np.ndarray]:
    """n distinct (episode, start) pairs from fewer than n episodes, where episode i has room[i]
    possible starts: the episodes share the pairs as evenly as their starts allow (every one is
    used), and no pair repeats."""
    if room.sum() < n:
        raise ValueError(f"{store.path} has only {room.sum()} distinct start/goal pairs {protocol.goal_offset} steps "
                         f"apart in the {len(eligible)} episode(s) {protocol.name} draws from, fewer than its "
                         f"{n} episodes: lower --num-episodes, or collect more or longer episodes")
    order = rng.permutation(len(eligible))
    counts = np.zeros(len(eligible), np.int64)
    while counts.sum() < n:  # round-robin over the episodes that still have an unused start
        open_ = order[counts[order] < room[order]][: n - counts.sum()]
        counts[open_] += 1
    chosen = np.repeat(eligible[order], counts[order])
    start = np.concatenate([rng.choice(room[i], counts[i], replace=False) for i in order])
    shuffle = rng.permutation(n)
    return chosen[shuffle], start[shuffle]


def sample_pairs(store: EpisodeStore, protocol: EvalProtocol, seed: int = 0, episodes: np.ndarray | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0) -> Pairs:
    """Draw the protocol's start/goal pairs from `episodes` (default: its split of `store`)."""
    if episodes is None:
        episodes = split_of(store, protocol, val_fraction, split_seed)
    else:
        episodes = np.asarray(episodes)
        if episodes.ndim != 1 or not len(episodes) or episodes.dtype.kind not in "iu" \
                or episodes.min() < 0 or episodes.max() >= store.num_episodes:
            raise ValueError(f"episodes must be a non-empty 1-d array of episode indices in [0, "
                             f"{store.num_episodes}) of {store.path}, got {episodes!r}")
    steps = store.episode_length - 1  # (E,): an episode of L steps holds L + 1 rows
    eligible = episodes[steps[episodes] >= protocol.goal_offset]
    if len(eligible) == 0:
        raise ValueError(f"no episode in {store.path} has {protocol.goal_offset} steps for the goal offset of "
                         f"{protocol.name}; collect longer episodes (--steps)")
    rng = np.random.default_rng(seed)
    n = protocol.num_episodes
    if n <= len(eligible):  # one pair from each of n distinct episodes
        chosen = rng.choice(eligible, size=n, replace=False)  # (N,)
        start = rng.integers(0, steps[chosen] - protocol.goal_offset + 1)  # (N,): goal <= last step
    else:
        chosen, start = _spread_pairs(rng, eligible, steps[eligible] - protocol.goal_offset + 1, n, store, protocol)
    goal = start + protocol.goal_offset
    offset = store.episode_offset[chosen]
    start_state = store.read("state", offset + start)  # (N, S)
    goal_state = store.read("state", offset + goal)
    return Pairs(chosen, start, goal, start_state, goal_state)
