"""A tiny sentencepiece tokenizer built offline, for tests and smoke runs with tiny models.

`build_tiny_tokenizer` trains a byte-fallback BPE model on a deterministic synthetic corpus and
saves it as a Hugging Face fast tokenizer (`AutoTokenizer.from_pretrained(out_dir)` loads it
without remote code). Its length is exactly `vocab_size`, so a model with that vocabulary can
use it: bos/eos/pad/unk and the chat role markers are pieces of the sentencepiece vocabulary,
not tokens added on top of it.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

from aipo_mp.runtime.files import atomic_directory

STAMP_NAME = "aipo_tiny_tokenizer.json"
BUILD_VERSION = 1  # bump when the corpus, training options or template change
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # ids 0..3

# Every turn is `<|role|>\ncontent\n`; assistant turns end with EOS, as the trainer's responses do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

COMMON_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find answer question "
    "please thanks sure help explain why because example code list step model data here think"
).split()
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "el", "or", "ing", "tion",
             "er", "st", "qu", "th", "ph", "ve", "za", "bu", "gre", "dy", "ox")
OPENERS = ("Sure!", "Thanks.", "Hmm, okay:", "Good question.", "Here is an example:", "Step 1:",
           "Q:", "A:", "Note -", "(see below)", "\"Yes,\" she said;", "Well...")


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train, convert and save the tiny tokenizer into `out_dir` (cached by a stamp file)."""
    out_dir = Path(out_dir)
    stamp = {"builder": "aipo_mp.testing.tiny", "version": BUILD_VERSION, "vocab_size": vocab_size, "seed": seed}
    if read_stamp(out_dir) == stamp:
        return out_dir
    tokenizer = hf_tokenizer_from_spm(train_sentencepiece(vocab_size, seed))
    if len(tokenizer) != vocab_size:  # the model's embedding size depends on it
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    with atomic_directory(out_dir, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the final directory should be shareable
        tokenizer.save_pretrained(str(tmp))
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    return out_dir


def read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def synthetic_corpus(num_lines: int, lexicon_size: int, seed: int) -> list[str]:
    """English-ish lines: common words, made-up words (so larger vocabularies have something to
    merge), numbers, punctuation and chat-like openers. Deterministic for a given seed."""
    rng = random.Random(seed)
    pseudo_words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(lexicon_size)]
    return [synthetic_line(rng, pseudo_words) for _ in range(num_lines)]


def synthetic_line(rng: random.Random, pseudo_words: list[str]) -> str:
    words = [rng.choice(COMMON_WORDS) if rng.random() < 0.6 else rng.choice(pseudo_words)
             for _ in range(rng.randint(3, 20))]
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 6))))
    line = " ".join(words).capitalize() + rng.choice(".?!,;:")
    if rng.random() < 0.3:
        line = f"{rng.choice(OPENERS)} {line}"
    if rng.random() < 0.1:
        line = f"{rng.choice(ROLE_MARKERS)} {line}"
    return line


def train_sentencepiece(vocab_size: int, seed: int) -> bytes:
    """Serialized sentencepiece BPE model proto. Byte fallback makes any text encodable."""
    import sentencepiece as spm

    # The corpus grows with the vocabulary: BPE stops with an error when it runs out of merges.
    lines = synthetic_corpus(max(2000, 2 * vocab_size), max(3000, vocab_size), seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=list(ROLE_MARKERS),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=SPECIAL_PIECES["unk"],
        bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"], pad_piece=SPECIAL_PIECES["pad"],
        num_threads=1, minloglevel=2,  # one thread: deterministic and quiet
    )
    return model.getvalue()


def hf_tokenizer_from_spm(model_proto: bytes):
    """A LlamaTokenizer (the fast, `tokenizers`-backed class in transformers 5) with the spm
    model's vocabulary and merges; it prepends BOS, never appends EOS."""
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    with tempfile.TemporaryDirectory() as tmp:  # the extractor reads a file
        path = Path(tmp) / "tokenizer.model"
        path.write_bytes(model_proto)
        extracted = SentencePieceExtractor(str(path)).extract(BPE)
    return LlamaTokenizer(
        vocab=extracted["vocab"], merges=extracted["merges"],
        # Role markers map onto their existing ids; listing them keeps them atomic when encoding.
        additional_special_tokens=extracted["additional_special_tokens"],
        bos_token=SPECIAL_PIECES["bos"], eos_token=SPECIAL_PIECES["eos"],
        unk_token=SPECIAL_PIECES["unk"], pad_token=SPECIAL_PIECES["pad"],
        add_bos_token=True, add_eos_token=False, chat_template=CHAT_TEMPLATE,
    )


def build_tiny_classifier(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, num_layers: int = 2) -> Path:
    """A one-label LlamaForSequenceClassification with random weights (head_dim 32, so vLLM's CPU
    build can serve it too) and the tokenizer of `tokenizer_dir`: a tiny reward model or pairwise
    ranker (P(A better than B) = sigmoid of its output) for tests and the demo."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "score" in name else 0.05)  # outputs of order 1
    with atomic_directory(out_dir, overwrite=True) as tmp:
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
