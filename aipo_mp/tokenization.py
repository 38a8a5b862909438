"""The one prompt/response tokenization contract: how a prompt (a string or chat messages) and a
response become token ids. Sampling (vLLM prompts), the rankers and the trainer all use these
functions, so the prompt tokens the policy was sampled on are the tokens it is trained on."""

from __future__ import annotations

from aipo_mp.errors import ConfigError, DataError


def as_token_list(encoded) -> list[int]:
    """apply_chat_template returns a BatchEncoding in transformers 5, a list in 4.x."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt, chat_template: bool = True, what: str = "prompt") -> tuple[list[int], bool]:
    """(prompt token ids, chat_format) exactly as the trainer tokenizes the pair's prompt."""
    if isinstance(prompt, str) and not (chat_template and has_chat_template(tokenizer)):
        return list(tokenizer(prompt).input_ids), False
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not has_chat_template(tokenizer):
        raise ConfigError(f"{what} is a list of chat messages but the model's tokenizer has no chat template; "
                          "give string prompts or use a tokenizer with a chat_template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template that rejects the roles, for instance
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what}: the tokenizer's chat template failed ({reason}); fix the messages' roles "
                          "or the template") from None
    return as_token_list(ids), True


def training_prompt(record: dict):
    """The prompt as the trainer must see it to reproduce the sampled prompt tokens."""
    prompt = record["prompt"]
    if record.get("chat_format") and isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def encode_prompts(prompts: list, tokenizer) -> list[list[int]]:
    """Chat prompts through the chat template, string prompts in one batched call."""
    encoded: list = [None] * len(prompts)
    string_positions = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    if string_positions:
        batch = tokenizer([prompts[i] for i in string_positions])["input_ids"]
        for i, ids in zip(string_positions, batch):
            encoded[i] = list(ids)
    for i, prompt in enumerate(prompts):
        if encoded[i] is None:
            encoded[i] = encode_chat_prompt(prompt, tokenizer, i)
    return encoded


def encode_chat_prompt(messages: list[dict], tokenizer, position: int) -> list[int]:
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a missing template or a template that rejects the roles
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data.train pair {position}: the tokenizer's chat template failed on a message prompt "
                        f"({reason}); use string prompts or a tokenizer with a suitable chat_template") from None
    return as_token_list(encoded)


def encode_responses(responses: list[str], tokenizer, eos_id: int) -> list[list[int]]:
    if not responses:
        return []
    batch = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos_id] for ids in batch]
