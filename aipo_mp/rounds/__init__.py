"""One round of `aipo-mp run` (run.py: the state machine and its stage table): vLLM engines
(engines.py), sampling, rewards and rankers, self-instruct prompts, preference pairs, the report,
and where each stage runs (placement, shards, launchers). vLLM is imported only when an engine
starts, so importing these modules is cheap.

    samples = sample(policy_dir, read_prompts("prompts.jsonl"), SamplingConfig(n=5), "r0/samples.jsonl")
    scored = score_with_model(samples, reward_dir, "r0/scored.jsonl")   # or score_with_rule(...)
    pairs, stats = build_pairs(scored, min_gap=0.1, out_dir="r0")        # pairs.jsonl, pairs_stats.json
"""
