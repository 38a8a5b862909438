"""One round's data stages: sample answers with vLLM (`sampling`), score them (`rewards`), and turn
the scores into preference pairs (`pairs_builder`). vLLM is imported only when an engine starts,
so importing this package is cheap.

    samples = sample(policy_dir, read_prompts("prompts.jsonl"), SamplingSpec(n=5), "r0/samples.jsonl")
    scored = score_with_model(samples, reward_dir, "r0/scored.jsonl")   # or score_with_rule(...)
    pairs, stats = build_pairs(scored, min_gap=0.1, out_dir="r0")        # pairs.jsonl, pairs_stats.json
"""

from aipo_mp.rounds.pairs import PAIR_DROP_REASONS, build_pairs
from aipo_mp.rounds.rewards import check_reward_model, score_with_model, score_with_rule
from aipo_mp.rounds.sampling import (
                                     SamplingSpec,
                                     logprobs_of,
                                     read_jsonl,
                                     read_prompts,
                                     reload_weights,
                                     sample,
                                     start_engine,
)

__all__ = [
    "PAIR_DROP_REASONS", "SamplingSpec", "build_pairs", "check_reward_model", "logprobs_of", "read_jsonl",
    "read_prompts", "reload_weights", "sample", "score_with_model", "score_with_rule", "start_engine",
]
