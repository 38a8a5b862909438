"""Pairwise judgments through an OpenAI-compatible chat endpoint (`aipo-mp eval --judge-url`).

Standard library only (urllib). What it guarantees:
- **both orders**: every (question, answer, baseline answer) is judged with the answer shown
  first (order "ab") and second ("ba"); the answer's win is the mean of the two verdicts from its
  side, so a judge's position bias cancels.
- **verdicts**: the prompt asks for one letter, A or B. `parse_verdict` takes a reply that is
  that letter (quotes, brackets, "Answer:" and trailing punctuation allowed), else the first
  `[[A]]`/`[[B]]`, else "answer/response/assistant A|B"; anything else is *invalid*: it counts
  as a tie (0.5) for that order and is counted in the results (`invalid`).
- **resumable cache**: an append-only JSONL, one line per finished request, keyed by
  (question, pair, order, judge model) and checked against a hash of the prompt and the extra
  request fields (changed answers are judged again); a torn last line from a kill is ignored. A
  rerun sends only what is missing.
- `extra_body`: JSON fields added to every request, e.g. a vLLM server's constrained decoding
  `{"structured_outputs": {"choice": ["A", "B"]}}` for a small local judge.
- **retries** with exponential backoff (1, 2, 4 ... s, at most 30 s; a Retry-After header is
  honoured) on connection errors, HTTP 429 and 5xx; other HTTP errors end at once with one line.
- **bounded rate**: at most `rps` requests started per second (one at a time).
- the API key comes from an environment variable and goes only into the Authorization header:
  never into files, logs or error lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from aipo_mp.errors import ConfigError, UserError

ORDERS = ("ab", "ba")
JUDGE_PROMPT = (
    "You are comparing two answers to the same user question. Judge which answer is more helpful, "
    "correct and clear. Do not prefer an answer for being longer.\n\n"
    "[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Which answer is better? Reply with a single letter: A or B."
)
MAX_BACKOFF_S = 30.0


class JudgeUnavailable(UserError):
    """The endpoint did not answer after every retry (the cache keeps what was judged)."""


def parse_verdict(text: str) -> Optional[str]:
    """'A', 'B' or None (invalid) from the judge's reply; see the module docstring."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    bare = re.sub(r"^(?:the\s+)?(?:better\s+)?(?:answer|verdict|response)?\s*(?:is)?\s*[:\-]?\s*", "", s,
                  flags=re.IGNORECASE)
    m = re.fullmatch(r"[\s\"'`*\[\(]*([AB])[\s\"'`*\]\)\.!,;:]*", bare)
    if m:
        return m.group(1)
    m = re.search(r"\[\[([AB])\]\]", s)
    if m:
        return m.group(1)
    m = re.search(r"\b(?:answer|response|assistant)\s+([AB])\b", s, flags=re.IGNORECASE)
    return m.group(1).upper() if m else None


def order_win(verdict: Optional[str], order: str) -> float:
    """The judged answer's win in one order: it is A in "ab" and B in "ba"; invalid is a tie."""
    if verdict is None:
        return 0.5
    mine = "A" if order == "ab" else "B"
    return 1.0 if verdict == mine else 0.0


def chat_url(url: str) -> str:
    """The chat-completions URL of a base URL (http://host:port, .../v1, or the full path)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class JudgeClient:
    """One request at a time, at most `rps` per second, with retries (see the module docstring).
    `sent` counts the requests that reached the endpoint and answered."""

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", rps: float = 2.0,
                 retries: int = 5, timeout_s: float = 120.0, max_tokens: int = 8,
                 extra_body: Optional[dict] = None, sleep: Callable[[float], None] = time.sleep):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--judge-url {url!r}: not an http(s) URL; give e.g. http://localhost:8000/v1")
        if rps <= 0:
            raise ConfigError(f"--judge-rps {rps}: must be > 0 (requests per second)")
        self.url, self.model = chat_url(url), model
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) or None  # kept only for the header
        self.interval, self.retries, self.timeout_s = 1.0 / rps, retries, timeout_s
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})  # e.g. a local server's constrained decoding
        self.sleep = sleep
        self.last_start = 0.0
        self.sent = 0

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def pace(self) -> None:
        wait = self.last_start + self.interval - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self.last_start = time.monotonic()

    def complete(self, prompt: str) -> str:
        """The reply text to one user message (temperature 0)."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": 0, **self.extra_body}).encode()
        last, last_retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(MAX_BACKOFF_S, float(last_retry_after or 2 ** (attempt - 1))))
            last_retry_after = None
            self.pace()
            request = urllib.request.Request(self.url, data=body, headers=self.headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read())
                self.sent += 1
                return reply_text(data, self.url)
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
                if e.code != 429 and e.code < 500:
                    raise ConfigError(f"judge endpoint {self.url} answered HTTP {e.code} ({detail}); check "
                                      f"--judge-url, --judge-model {self.model!r} and the API key in "
                                      f"${self.api_key_env}") from None
                last, last_retry_after = f"HTTP {e.code}", retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
        raise JudgeUnavailable(f"judge endpoint {self.url} did not answer after {self.retries + 1} tries "
                               f"(last: {last}); the judgment cache keeps what was judged: rerun to resume")


def retry_after(value: Optional[str]) -> Optional[float]:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def reply_text(data: dict, url: str) -> str:
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ConfigError(f"judge endpoint {url} answered without choices[0].message.content; give an "
                          "OpenAI-compatible chat-completions endpoint") from None


# ---------------------------------------------------------------------------------------------
# The judgment cache
# ---------------------------------------------------------------------------------------------


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class JudgmentCache:
    """Append-only JSONL: {"question", "pair", "order", "judge_model", "prompt_sha256",
    "reply", "verdict"} per finished request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    e = json.loads(line)
                    self.entries[self.key(e["question"], e["pair"], e["order"], e["judge_model"])] = e
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line from a kill mid-write
        self.hits = 0

    @staticmethod
    def key(question: str, pair: str, order: str, judge_model: str) -> str:
        return json.dumps([question, pair, order, judge_model])

    def get(self, question: str, pair: str, order: str, judge_model: str, prompt: str) -> Optional[dict]:
        e = self.entries.get(self.key(question, pair, order, judge_model))
        if e is not None and e.get("prompt_sha256") == prompt_hash(prompt):
            self.hits += 1
            return e
        return None

    def put(self, question: str, pair: str, order: str, judge_model: str, prompt: str, reply: str) -> dict:
        e = {"question": question, "pair": pair, "order": order, "judge_model": judge_model,
             "prompt_sha256": prompt_hash(prompt), "reply": reply, "verdict": parse_verdict(reply)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one whole line per write, flushed: a kill loses at most this one
            f.write(json.dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[self.key(question, pair, order, judge_model)] = e
        return e


def judge_pairs(items: list[dict], pair: str, client: JudgeClient, cache: JudgmentCache,
                progress: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Judge every item {"question_key", "question", "answer", "baseline"} in both orders.
    Returns judgments {"question", "win", "length", "baseline_length", "verdicts", "invalid"}
    (lengths in characters, as AlpacaEval measures them) for the length-controlled estimator."""
    out = []
    for n, item in enumerate(items):
        verdicts, wins = {}, []
        for order in ORDERS:
            a, b = (item["answer"], item["baseline"]) if order == "ab" else (item["baseline"], item["answer"])
            # The cache entry is valid for this prompt and these request settings only.
            prompt = JUDGE_PROMPT.format(question=item["question"], a=a, b=b)
            request = prompt + json.dumps(client.extra_body, sort_keys=True)
            e = cache.get(item["question_key"], pair, order, client.model, request)
            if e is None:
                e = cache.put(item["question_key"], pair, order, client.model, request, client.complete(prompt))
            verdicts[order] = e["verdict"]
            wins.append(order_win(e["verdict"], order))
        out.append({"question": item["question_key"], "win": sum(wins) / len(wins), "length": len(item["answer"]),
                    "baseline_length": len(item["baseline"]), "verdicts": verdicts,
                    "invalid": sum(v is None for v in verdicts.values())})
        if progress:
            progress(n + 1, len(items))
    return out
