"""An OpenAI-compatible chat model as a zELO judge: "which of two documents is more relevant, A or B?".

``POST {base_url}/chat/completions`` through the standard library (no extra dependency). The API key is read at
request time from the environment variable NAMED by ``api_key_env``; the key itself is never stored on the judge,
written to a file or put in an error message. Each pair is shown in a seeded random order (the same pair always
in the same order), and the answer is mapped back, so a model's position bias cancels over the pairs instead of
favouring ``doc_a``. With ``logprobs=True`` the probability comes from the top log-probabilities of the tokens
"A" and "B" when the server returns them, else from the answer letter (1 or 0).

Transient failures (connection errors, timeouts, HTTP 408/409/429/5xx, unparsable answers) are retried with
exponential backoff; after ``retries`` retries a :class:`~research.zelo.judges.base.JudgeError` is raised. Votes
already collected by :func:`research.zelo.pipeline.collect_votes` are on disk by then, so a re-run resumes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from research.seeds import key_seed
from research.zelo.judges.base import Judge, JudgeError, check_lengths

SYSTEM_PROMPT = ("You are a relevance judge for a search engine. You are given a query and two documents, A and B. "
                 "Answer with a single letter: A if Document A is more relevant to the query, B if Document B is.")
USER_PROMPT = ("Query: {query}\n\nDocument A:\n{doc_a}\n\nDocument B:\n{doc_b}\n\n"
               "Which document is more relevant to the query? Answer A or B.")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_LETTER = re.compile(r"(?<![A-Za-z])([AB])(?![A-Za-z])")


class _Retryable(Exception):
    pass


class ChatJudge(Judge):
    """A chat-completions endpoint as a pairwise judge.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the model name the server expects.
        api_key_env: NAME of the environment variable holding the key (``None``: send no Authorization header).
        timeout: seconds per request; retries: retries after the first attempt; backoff: first wait in seconds,
            doubled each retry up to ``max_backoff``.
        seed: seeds the per-pair presentation order; logprobs: ask for token log-probabilities.
        max_chars: each document is cut to this many characters; workers: concurrent requests.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, name: str | None = None,
                 timeout: float = 30.0, retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 seed: int = 0, logprobs: bool = False, max_chars: int = 2000, workers: int = 1,
                 temperature: float = 0.0, max_tokens: int = 1,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise JudgeError(f"llm judge: base_url must start with http:// or https://, got {base_url!r}")
        if retries < 0 or timeout <= 0 or workers < 1:
            raise ValueError("llm judge: need retries >= 0, timeout > 0 and workers >= 1")
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.api_key_env = str(base_url), str(model), api_key_env or None
        self.name = name or f"llm:{model}"
        self.timeout, self.retries, self.backoff, self.max_backoff = float(timeout), int(retries), float(backoff), float(max_backoff)
        self.seed, self.logprobs, self.max_chars, self.workers = int(seed), bool(logprobs), int(max_chars), int(workers)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.sleep = sleep
        self.requests = 0  # attempts sent (for tests and logs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "seed": self.seed, "logprobs": self.logprobs, "max_chars": self.max_chars}

    # ------------------------------------------------------------ order
    def swapped(self, query: str, doc_a: str, doc_b: str) -> bool:
        """Whether the pair is shown as (doc_b, doc_a): a seeded coin per (query, unordered pair)."""
        first, second = sorted((doc_a, doc_b))
        coin = key_seed(self.seed, f"{query}\x1f{first}\x1f{second}") & 1
        return bool(coin) != (first != doc_a)  # the same unordered pair shows the same document first either way

    def messages(self, query: str, shown_a: str, shown_b: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_PROMPT.format(query=query, doc_a=shown_a[:self.max_chars],
                                                               doc_b=shown_b[:self.max_chars])}]

    # ------------------------------------------------------------ requests
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise JudgeError(f"llm judge {self.name}: environment variable {self.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=self._headers(),
                                         method="POST")
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = self._scrub(err.read()[:200].decode("utf-8", "replace")) if err.fp else ""
            if err.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {err.code}") from None
            raise JudgeError(f"llm judge {self.name}: {self.url} answered HTTP {err.code} {detail}".rstrip()) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            raise _Retryable(self._scrub(f"{type(err).__name__}: {getattr(err, 'reason', err)}")) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable("response is not JSON") from None

    def parse(self, response: dict[str, Any]) -> float:
        """P(shown document A wins) from a chat-completions response; raises ``ValueError`` if there is no answer."""
        try:
            choice = response["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices in the response") from None
        if self.logprobs:
            p = _letter_probability(choice.get("logprobs"))
            if p is not None:
                return p
        content = ((choice.get("message") or {}).get("content") or choice.get("text") or "").strip()
        match = _LETTER.search(content.replace("*", " "))
        if match is None:
            raise ValueError(f"answer {content[:40]!r} names neither A nor B")
        return 1.0 if match.group(1) == "A" else 0.0

    def _ask(self, query: str, shown_a: str, shown_b: str) -> float:
        payload: dict[str, Any] = {"model": self.model, "messages": self.messages(query, shown_a, shown_b),
                                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.logprobs:
            payload.update(logprobs=True, top_logprobs=5)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                return self.parse(self._post(payload))
            except _Retryable as err:
                last = str(err)
            except ValueError as err:
                last = f"unusable answer: {err}"
        raise JudgeError(f"llm judge {self.name}: {self.url} failed {self.retries + 1} times (last: {last})")

    def judge_one(self, query: str, doc_a: str, doc_b: str) -> float:
        if self.swapped(query, doc_a, doc_b):
            return 1.0 - self._ask(query, doc_b, doc_a)
        return self._ask(query, doc_a, doc_b)

    def judge_pairs(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> list[float]:
        check_lengths(queries, docs_a, docs_b)
        if self.workers == 1 or len(queries) < 2:
            return [self.judge_one(q, a, b) for q, a, b in zip(queries, docs_a, docs_b)]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.judge_one, queries, docs_a, docs_b))


def _letter_probability(logprobs: Any) -> float | None:
    """P(A) / (P(A) + P(B)) from the first answer token's top log-probabilities, if both letters are there."""
    try:
        for token in logprobs["content"]:
            mass = {"A": 0.0, "B": 0.0}
            for entry in token.get("top_logprobs") or [token]:
                letter = str(entry.get("token", "")).strip().strip("*").upper()
                if letter in mass:
                    mass[letter] += math.exp(float(entry["logprob"]))
            if mass["A"] + mass["B"] > 0:
                return mass["A"] / (mass["A"] + mass["B"])
    except (KeyError, TypeError, ValueError):
        return None
    return None
