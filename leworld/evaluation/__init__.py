"""Evaluation: versioned protocol presets, batched episodes, baselines and result summaries."""
from leworld.evaluation.baselines import BASELINES, make_baseline
from leworld.evaluation.evaluate import EpisodeResults, run_episodes, summarize, wilson_interval
from leworld.evaluation.protocols import PROTOCOLS, EvalProtocol, Pairs, get_protocol, sample_pairs, split_of

__all__ = ["BASELINES", "make_baseline", "EpisodeResults", "run_episodes", "summarize", "wilson_interval",
           "PROTOCOLS", "EvalProtocol", "Pairs", "get_protocol", "sample_pairs", "split_of"]
