"""The demo's synthetic task: answer "name some colors" with a short list of words. A rule scores
an answer (the fraction of colour words, with a penalty outside 3 to 5 words), so the rounds can
show the policy improving without a reward model.

The starting policy is a tiny Llama briefly fine-tuned (plain torch, under a minute on CPU) to
answer with 3 to 5 random words of a small vocabulary: it has the format but not the preference,
so its samples mix good and bad answers, the signal AIPO learns from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from aipo_mp.testing.synthetic import WORDS

COLORS = {"green", "silver", "orange", "yellow", "purple"}
ASKS = ("Name some colors.", "List a few colors.", "Which colors do you like?", "Say some colors.",
        "Tell me colors.", "Give me a list of colors.")


def make_prompt(rng: random.Random) -> str:
    return rng.choice(ASKS) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))


def reward(prompt, response: str) -> float:
    """Fraction of colour words, minus 0.25 per word below 3 or above 5; 1.0 is best."""
    words = response.split()
    if not words:
        return -1.0
    share = sum(w in COLORS for w in words) / len(words)
    return share - 0.25 * (max(0, 3 - len(words)) + max(0, len(words) - 5))


def write_prompts(path: Path, n: int, seed: int) -> Path:
    from aipo_mp.runtime.files import atomic_write_text

    rng = random.Random(seed)
    lines = [json.dumps({"id": i, "prompt": [{"role": "user", "content": make_prompt(rng).strip()}]})
             for i in range(n)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def pretrain(model_dir: Path, steps: int = 150, seed: int = 0) -> None:
    """Brief supervised fine-tuning of the HF model in `model_dir` (in place): answers are 3 to 5
    words drawn uniformly, so the starting policy is indifferent to colours."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, labels = [], []
        for _ in range(16):
            p = tok.apply_chat_template([{"role": "user", "content": make_prompt(rng).strip()}],
                                        add_generation_prompt=True, tokenize=True)
            p = list(p["input_ids"] if hasattr(p, "keys") else p)
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
            a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(x) for x in ids)
        batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        lab = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=batch, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir, safe_serialization=True)


def train_pairwise_ranker(model_dir: Path, template: str, steps: int = 150, seed: int = 0) -> None:
    """Teach a tiny one-label classifier (in place) to compare two answers by the rule: the target
    is P(A better than B) = 1 when reward(A) > reward(B), 0 when lower, 0.5 on ties; each pair is
    shown in both orders. Plain torch, about a minute on CPU."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    colors = sorted(COLORS)
    for _ in range(steps):
        texts, targets = [], []
        for _ in range(8):
            prompt = make_prompt(rng).strip()
            a, b = (" ".join(rng.choice(colors if rng.random() < 0.5 else WORDS) for _ in range(rng.randint(2, 6)))
                    for _ in range(2))
            ra, rb = reward(prompt, a), reward(prompt, b)
            target = 1.0 if ra > rb else 0.0 if ra < rb else 0.5
            texts += [template.format(prompt=prompt, a=a, b=b), template.format(prompt=prompt, a=b, b=a)]
            targets += [target, 1.0 - target]
        batch = tok(texts, padding=True, return_tensors="pt")
        logits = model(**batch).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir, safe_serialization=True)
