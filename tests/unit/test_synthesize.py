"""Self-instruct synthesis without an engine: the parser and every filter on hand-made
completions (counted by reason), near-duplicate removal (exact ROUGE-L, prefix-filtered),
deterministic clustering, and a stage stopped midway then rerun (the vLLM generator is tested
in test_rankers_engine.py)."""

from __future__ import annotations

import json
import random

import pytest

from aipo_mp.config import SynthesizeConfig
from aipo_mp.errors import ConfigError
from aipo_mp.rounds.synthesize import (
    DROP_REASONS,
    NearDuplicateIndex,
    batch_prompts,
    cluster_prompts,
    drop_reason,
    generation_prompt,
    parse_completion,
    remove_near_duplicates,
    rouge_l,
    synthesize,
    word_count,
)


def test_generation_prompt_and_parser():
    prompt = generation_prompt(["Name a colour.", "Write a haiku\nabout rain."])
    assert prompt == "Come up with a series of tasks:\n\n1. Name a colour.\n2. Write a haiku about rain.\n3."
    completion = (" Explain how tides work.\n4. Translate 'cat' into French. Answer: chat\n5.Describe a  sunset."
                  "\nOutput: a poem\n6. List three")
    items, truncated, cut = parse_completion(completion, "stop")
    assert items == ["Explain how tides work.", "Translate 'cat' into French.", "Describe a sunset.", "List three"]
    assert (truncated, cut) == (0, 2)
    items, truncated, _ = parse_completion(completion, "length")  # the last item was cut
    assert items[-1] == "Describe a sunset." and truncated == 1


CASES = [
    ("Explain why the sky is blue during the day.", None),
    ("", "empty"),
    ("Be brief.", "too_short"),
    (" ".join(["word"] * 40), "too_long"),
    ("Describe the image below in detail please.", "unservable"),
    ("Plot the sales figures for the last year.", "unservable"),
    ("Create a flowchart of the login process steps.", "unservable"),
    ("Write a program that sorts a list of numbers.", "write_a_program"),
    ("- Summarize the following article in one line.", "leading_punctuation"),
    ("Éxplique la photosynthèse en quelques mots simples.", "non_ascii"),
    ("Give me a graphic novel recommendation for a teenager.", None),  # "graphic" is not "graph"
]


@pytest.mark.parametrize("text,reason", CASES)
def test_each_filter(text, reason):
    assert drop_reason(text, word_count, min_tokens=4, max_tokens=30) == reason


def scripted_generator(calls: list):
    """A deterministic stand-in for the policy's completions (seeded by the generation prompt):
    distinct made-up instructions, mixed with ones each filter drops and near-copies of seeds."""
    vocab = ("river mountain coffee jazz silk salt maple amber quartz tango violin harbor desert lantern orbit "
             "meadow copper falcon glacier pepper canyon ember willow prism cedar").split()
    bad = ["Write a program to count {w}.", "Draw a picture of {w}.", "!Tell me about {w} now please.", "Hi {w}.",
           "Describe the taste of coffee to someone who never had it.",  # a seed, verbatim
           "Describe the taste of {w} to someone who never had it."]  # a near-copy of a seed

    def item(rng):
        if rng.random() < 0.4:
            return rng.choice(bad).format(w=rng.choice(vocab))
        return f"Explain {' '.join(rng.sample(vocab, 4))} together."

    def generate(prompts, batch):
        calls.append(batch)
        out = []
        for p in prompts:
            rng = random.Random(p)
            items = [item(rng) for _ in range(5)]
            text = " " + items[0] + "".join(f"\n{k}. {t}" for k, t in enumerate(items[1:], start=4))
            out.append((text, "length" if rng.random() < 0.3 else "stop"))
        return out

    return generate


SEEDS = [{"id": k, "prompt": [{"role": "user", "content": t}]} for k, t in enumerate([
    "Describe the taste of coffee to someone who never had it.", "Name three rivers in Europe.",
    "Write a short poem about winter mornings.", "Explain how a bicycle gear works.",
    "List some colours of the rainbow.", "Give a recipe for pancakes with apples.",
    "Summarize the plot of a famous novel.", "Suggest names for a new bakery shop."])]


def test_synthesize_counts_resumes_and_merges(tmp_path):
    settings = SynthesizeConfig(num_clusters=3, examples_per_prompt=3, new_per_prompt=2, total=12, min_tokens=4,
                                 max_tokens=30, max_similarity=0.7, seed_share=0.5, max_batches=6, seed=3)
    calls: list = []
    records, stats = synthesize(SEEDS, scripted_generator(calls), word_count, settings, tmp_path / "straight", 1)
    assert stats["kept"] == 12 and stats["reached_total"] and stats["batches"] == len(calls) >= 2
    assert set(stats["dropped"]) == set(DROP_REASONS)
    assert stats["parsed_instructions"] == stats["kept"] + stats["over_total"] + sum(stats["dropped"].values())
    for reason in ("truncated", "write_a_program", "unservable", "leading_punctuation", "too_short", "over_per_prompt",
                   "exact_duplicate",
                   "near_duplicate"):
        assert stats["dropped"][reason] > 0, (reason, stats)
    new = [r for r in records if str(r["id"]).startswith("r1-n")]
    assert len(new) == 12 and all(isinstance(r["prompt"], list) for r in new)
    texts = [r["prompt"][0]["content"] for r in new]
    assert all(rouge_l(a, b) < 0.7 for i, a in enumerate(texts) for b in texts[:i])
    seeds = [r for r in records if not str(r["id"]).startswith("r1-n")]
    assert 0 < len(seeds) < len(SEEDS) and stats["seed_prompts_kept"] == len(seeds)
    on_disk = [json.loads(l) for l in (tmp_path / "straight" / "prompts.jsonl").read_text().splitlines()]
    assert on_disk == records

    # Stopped during the second batch (the first is on disk), then rerun: the same prompts, and the
    # first batch is not generated again.
    stopped = tmp_path / "stopped"
    calls2: list = []
    real = scripted_generator(calls2)

    def dies_in_batch_1(prompts, batch):
        if batch == 1:
            raise KeyboardInterrupt("killed")
        return real(prompts, batch)

    with pytest.raises(KeyboardInterrupt):
        synthesize(SEEDS, dies_in_batch_1, word_count, settings, stopped, 1)
    assert (stopped / "synthesize" / "batch_000.jsonl").exists() and not (stopped / "prompts.jsonl").exists()
    calls2.clear()
    again, _ = synthesize(SEEDS, real, word_count, settings, stopped, 1)
    assert again == records and calls2 and 0 not in calls2

    with pytest.raises(ConfigError, match="max_similarity"):
        synthesize(SEEDS, real, word_count, SynthesizeConfig(max_similarity=1.5), tmp_path / "bad", 1)


def test_near_duplicates_dropped_distinct_kept():
    existing = ["Write a poem about the sea.", "Explain how photosynthesis works in plants."]
    texts = ["Write a short poem about the sea.",  # one word added: ROUGE-L 0.92
             "Write a poem about the ocean.",  # one word changed: 0.83
             "Explain how photosynthesis works in green plants.",
             "Give three tips for learning a new language.",
             "Give 3 tips for learning a new language quickly.",  # paraphrase of the previous: 0.75
             "Describe the rules of chess for a beginner.",
             "What is the capital of France?"]
    kept = remove_near_duplicates(texts, 0.7, existing)
    assert [texts[k] for k in kept] == ["Give three tips for learning a new language.",
                                        "Describe the rules of chess for a beginner.", "What is the capital of France?"]
    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("a b", "c d") == 0.0


def test_near_duplicate_index_is_exact():
    """The prefix-filtered index finds exactly the pairs a full ROUGE-L scan finds."""
    rng = random.Random(0)
    vocab = [f"w{k}" for k in range(30)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(60)]
    texts = []
    for t in base:  # plus perturbed copies (one word changed, dropped or added)
        words = t.split()
        k = rng.randrange(len(words))
        texts += [t, " ".join(words[:k] + [rng.choice(vocab)] + words[k + 1:]), " ".join(words[:k] + words[k + 1:])]
    for threshold in (0.5, 0.7, 0.9):
        index = NearDuplicateIndex(threshold)
        for k, t in enumerate(texts):
            full = max((rouge_l(t, u) for u in texts[:k]), default=0.0)
            fast = index.max_similarity(t)
            assert (fast >= threshold) == (full >= threshold), (threshold, t)
            if full >= threshold:
                assert fast == pytest.approx(full)
            index.add(t)


def test_clustering_deterministic_and_topical():
    texts = ([f"cook a {w} soup recipe with vegetables" for w in ("tomato", "onion", "carrot", "pea")]
             + [f"football match score {w} league goals" for w in ("spain", "italy", "england", "brazil")])
    a, b = cluster_prompts(texts, 2, seed=0), cluster_prompts(texts, 2, seed=0)
    assert a == b
    assert len(set(a[:4])) == 1 and len(set(a[4:])) == 1 and a[0] != a[4]
    assert cluster_prompts(texts, 100, seed=1) != [0] * len(texts)  # capped at the distinct texts
    labels = cluster_prompts(texts, 2, seed=0)
    prompts = batch_prompts(texts, labels, 5, 3, seed=0, round_idx=0, batch=0)
    assert prompts == batch_prompts(texts, labels, 5, 3, seed=0, round_idx=0, batch=0)
    for p in prompts:  # every generation prompt shows one cluster
        lines = p.split("\n")[2:-1]
        assert len(lines) == 3 and (all("soup" in l for l in lines) or all("football" in l for l in lines))
        assert p.endswith("\n4.")
