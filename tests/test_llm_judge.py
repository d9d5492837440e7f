"""The OpenAI-compatible chat judge against a fake server on 127.0.0.1: answers, position swap, retries, the key."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from research.zelo.judges import ChatJudge, Ensemble, JudgeError, ScoreJudge

SHOWN = re.compile(r"Document A:\n(?P<a>.*)\n\nDocument B:\n(?P<b>.*)\n\nWhich", re.S)


class FakeChat:
    """State of the fake server: how it answers and what it saw."""

    def __init__(self) -> None:
        self.mode = "prefer"  # prefer: the document with "good" wins; bias: always "A"; logprobs: P(good) = 0.8
        self.fail_first = 0  # the first N requests fail
        self.failure = 503  # an HTTP status, or "timeout" (sleep past the client's timeout), or "garbage"
        self.status = None  # answer every request with this HTTP status
        self.requests = 0
        self.shown_good_first: list[bool] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()


def _handler(state: FakeChat):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests += 1
                number = state.requests
                state.auth.append(self.headers.get("Authorization"))
            if self.path != "/v1/chat/completions":
                return self._send(404, b"{}")
            if state.status is not None:
                return self._send(state.status, b'{"error": "nope"}')
            if number <= state.fail_first:
                if state.failure == "timeout":
                    time.sleep(0.6)
                    return self._send(200, b"{}")
                if state.failure == "garbage":
                    return self._send(200, b"not json")
                return self._send(state.failure, b'{"error": "busy"}')
            shown = SHOWN.search(payload["messages"][-1]["content"])
            good_first = "good" in shown["a"]
            with state.lock:
                state.shown_good_first.append(good_first)
            letter = "A" if state.mode == "bias" or good_first else "B"
            choice = {"index": 0, "message": {"role": "assistant", "content": letter}, "finish_reason": "stop"}
            if state.mode == "logprobs":
                assert payload.get("logprobs") is True
                pa = 0.8 if good_first else 0.2
                choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(max(pa, 1 - pa)), "top_logprobs": [
                    {"token": "A", "logprob": math.log(pa)}, {"token": "B", "logprob": math.log(1 - pa)}]}]}
            return self._send(200, json.dumps({"choices": [choice]}).encode())

    return Handler


@pytest.fixture()
def fake():
    state = FakeChat()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


def _pairs(n: int = 24):
    queries = [f"query {i}" for i in range(n)]
    good = [f"good document {i}" for i in range(n)]
    bad = [f"bad document {i}" for i in range(n)]
    return queries, good, bad


def _judge(fake, **kwargs) -> ChatJudge:
    sleeps: list[float] = []
    kwargs = {"timeout": 5.0, "retries": 2, "backoff": 0.01, "sleep": sleeps.append, **kwargs}
    judge = ChatJudge(fake.url, "fake-model", **kwargs)
    judge.sleeps = sleeps
    return judge


def test_answers_are_mapped_back_through_the_random_presentation_order(fake):
    judge = _judge(fake)
    queries, good, bad = _pairs()
    assert judge.judge_pairs(queries, good, bad) == [1.0] * len(queries)
    assert judge.judge_pairs(queries, bad, good) == [0.0] * len(queries)
    first = fake.shown_good_first[:len(queries)]
    assert 0 < sum(first) < len(first)  # both presentation orders were used
    assert fake.shown_good_first[len(queries):] == first  # same pair, either orientation: the same order shown
    assert judge.judge("q", "good x", "bad y") == 1.0


def test_position_bias_cancels_over_pairs_and_orders_are_seeded(fake):
    fake.mode = "bias"  # a judge that always says "A"
    queries, good, bad = _pairs(40)
    votes = _judge(fake, seed=1).judge_pairs(queries, good, bad)
    assert set(votes) == {0.0, 1.0} and 0.3 <= sum(votes) / len(votes) <= 0.7
    assert _judge(fake, seed=1).judge_pairs(queries, good, bad) == votes
    assert _judge(fake, seed=2).judge_pairs(queries, good, bad) != votes
    # the first-shown document always "wins", so p(doc_a) = 1 exactly when doc_a was shown first
    judge = _judge(fake, seed=1)
    assert votes == [0.0 if judge.swapped(q, a, b) else 1.0 for q, a, b in zip(queries, good, bad)]


def test_logprobs_give_soft_votes(fake):
    fake.mode = "logprobs"
    judge = _judge(fake, logprobs=True)
    queries, good, bad = _pairs(8)
    assert judge.judge_pairs(queries, good, bad) == pytest.approx([0.8] * 8)
    assert judge.judge_pairs(queries, bad, good) == pytest.approx([0.2] * 8)


@pytest.mark.parametrize("failure", [503, 429, "garbage", "timeout"])
def test_flaky_server_is_retried_with_exponential_backoff(fake, failure):
    fake.fail_first, fake.failure = 2, failure
    judge = _judge(fake, retries=3, backoff=0.05, timeout=0.3)
    assert judge.judge("q", "good a", "bad b") == 1.0
    assert judge.requests == 3 and fake.requests == 3
    assert judge.sleeps == pytest.approx([0.05, 0.1])


def test_gives_up_after_the_retries_and_does_not_retry_client_errors(fake):
    fake.fail_first = 100
    judge = _judge(fake, retries=2, backoff=0.01)
    with pytest.raises(JudgeError, match="failed 3 times"):
        judge.judge("q", "good a", "bad b")
    assert judge.requests == 3
    fake.status = 400
    judge = _judge(fake, retries=5)
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge.judge("q", "good a", "bad b")
    assert judge.requests == 1


def test_api_key_comes_from_the_named_variable_and_is_never_recorded(fake, monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-secret-123")
    judge = _judge(fake, api_key_env="FAKE_JUDGE_KEY")
    assert judge.judge("q", "good a", "bad b") == 1.0
    assert fake.auth[-1] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in json.dumps(judge.describe()) and judge.describe()["api_key_env"] == "FAKE_JUDGE_KEY"
    assert all("sk-secret-123" not in repr(v) for v in vars(judge).values())
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    with pytest.raises(JudgeError, match="FAKE_JUDGE_KEY is not set"):
        judge.judge("q", "good a", "bad b")
    _judge(fake).judge("q", "good a", "bad b")
    assert fake.auth[-1] is None  # no key configured: no header


def test_concurrent_workers_keep_the_input_order(fake):
    queries, good, bad = _pairs(16)
    mixed_a = [g if i % 3 else b for i, (g, b) in enumerate(zip(good, bad))]
    mixed_b = [b if i % 3 else g for i, (g, b) in enumerate(zip(good, bad))]
    expected = [1.0 if i % 3 else 0.0 for i in range(16)]
    assert _judge(fake, workers=4).judge_pairs(queries, mixed_a, mixed_b) == expected


def test_in_an_ensemble_with_a_score_judge(fake):
    class Length:
        def score_pairs(self, queries, documents, batch_size=32):
            import torch

            return torch.tensor([float(len(d)) for d in documents])

    ensemble = Ensemble([_judge(fake, name="llm"), ScoreJudge(Length(), temperature=1e-3, name="length")])
    p, votes = ensemble.judge_votes(["q", "q"], ["good a", "bad bbbbbb"], ["bad bbb", "good cc"])
    assert votes == [{"llm": 1.0, "length": pytest.approx(0.0)}, {"llm": 0.0, "length": pytest.approx(1.0)}]
    assert p == pytest.approx([0.5, 0.5])
