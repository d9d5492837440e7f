"""GradCache gives the parameter gradients and loss of full-batch backprop, dropout included (RNG replay)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

import research.training.gradcache as gc_module
from research.losses import InfoNCE
from research.training.distributed import gather_group_batch
from research.training.gradcache import GradCache, RandContext, split_batch

VOCAB, DIM, QUERIES, HARD = 50, 8, 6, 1


class Encoder(nn.Module):
    """Embedding + Linear + Dropout, mean-pooled over unmasked tokens."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb, self.proj, self.drop = nn.Embedding(VOCAB, 16), nn.Linear(16, DIM), nn.Dropout(dropout)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = self.drop(self.proj(self.emb(batch["input_ids"])))
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def tokens(rows: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (rows,), generator=g)
    return {"input_ids": torch.randint(0, VOCAB, (rows, 6), generator=g), "attention_mask": (torch.arange(6) < lengths[:, None]).long()}


def contrastive(q: Tensor, d: Tensor, scale: Tensor | float = 20.0) -> Tensor:
    """InfoNCE of each query against all docs: in-batch negatives plus HARD hard negatives per query."""
    group = gather_group_batch(q, d)
    return InfoNCE()(scale * group.queries @ group.docs.T, group.targets())


def grads(*modules: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def reference(q_enc: Encoder, d_enc: Encoder, q_chunks: list, d_chunks: list, seed: int, scale=20.0) -> Tensor:
    """Full-batch backprop on the same chunk-wise forward (same dropout masks); one graph, one backward."""
    torch.manual_seed(seed)
    loss = contrastive(torch.cat([q_enc(c) for c in q_chunks]), torch.cat([d_enc(c) for c in d_chunks]), scale)
    loss.backward()
    return loss.detach()


@pytest.fixture
def data():
    return tokens(QUERIES, 0), tokens(QUERIES * (1 + HARD), 1)


@pytest.mark.parametrize("chunk", [1, 3, QUERIES * (1 + HARD)])
@pytest.mark.parametrize("towers", [1, 2])
def test_gradcache_matches_full_batch(data, chunk, towers):
    torch.manual_seed(0)
    q_enc = Encoder().train()
    d_enc = Encoder().train() if towers == 2 else q_enc
    modules = (q_enc, d_enc) if towers == 2 else (q_enc,)
    q, d = data
    qc, dc = split_batch(q, chunk), split_batch(d, chunk)
    ref_loss = reference(q_enc, d_enc, qc, dc, seed=7)
    ref = grads(*modules)
    for m in modules:
        m.zero_grad()
    torch.manual_seed(7)
    loss = GradCache(chunk).step([(q_enc, q), (d_enc, dc)], contrastive)
    diff = max_diff(ref, grads(*modules))
    print(f"gradcache chunk={chunk} towers={towers}: loss diff {abs(loss - ref_loss).item():.2e}, max grad diff {diff:.2e}")
    assert not loss.requires_grad
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert diff < 1e-5


def test_plain_full_batch_without_dropout(data):
    """With dropout off, chunk-wise forward is irrelevant: GradCache(1) equals one unchunked forward and backward."""
    torch.manual_seed(0)
    enc = Encoder(dropout=0.0)
    q, d = data
    ref_loss = contrastive(enc(q), enc(d))
    ref_loss.backward()
    ref = grads(enc)
    enc.zero_grad()
    loss = GradCache(1).step([(enc, q), (enc, d)], contrastive)
    diff = max_diff(ref, grads(enc))
    print(f"gradcache unchunked reference: loss diff {abs(loss - ref_loss).item():.2e}, max grad diff {diff:.2e}")
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6) and diff < 1e-5


class NoReplay:
    """A RandContext that replays nothing: chunks re-run with fresh dropout masks."""

    def __init__(self, *inputs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_without_rng_replay_gradients_differ(data, monkeypatch):
    torch.manual_seed(0)
    enc = Encoder().train()
    q, d = data
    reference(enc, enc, split_batch(q, 3), split_batch(d, 3), seed=7)
    ref = grads(enc)
    enc.zero_grad()
    monkeypatch.setattr(gc_module, "RandContext", NoReplay)
    torch.manual_seed(7)
    GradCache(3).step([(enc, q), (enc, d)], contrastive)
    diff = max_diff(ref, grads(enc))
    print(f"gradcache without RNG replay: max grad diff {diff:.2e}")
    assert diff > 1e-3


def test_loss_parameters_backward_and_no_sync(data):
    """A learnable scale inside loss_fn gets its gradient; backward runs once per chunk, no_sync on all but the last."""
    torch.manual_seed(0)
    enc = Encoder().train()
    scale = nn.Parameter(torch.tensor(10.0))
    q, d = data
    reference(enc, enc, split_batch(q, 4), split_batch(d, 4), seed=3, scale=scale)
    ref = grads(enc) + [scale.grad.clone()]
    enc.zero_grad()
    scale.grad = None
    calls, synced = [], []

    @contextmanager
    def no_sync():
        synced.append(False)
        yield

    def backward(t: Tensor) -> None:
        calls.append(t.detach())
        t.backward()

    torch.manual_seed(3)
    GradCache(4).step([(enc, q), (enc, d)], lambda a, b: contrastive(a, b, scale), backward=backward, no_sync=no_sync)
    assert len(calls) == 2 + 3 and len(synced) == len(calls) - 1
    assert max_diff(ref, grads(enc) + [scale.grad]) < 1e-5


def test_autocast_bf16(data):
    """Under the caller's bf16 autocast GradCache is as close to fp32 full-batch gradients as bf16 full-batch backprop is."""
    torch.manual_seed(0)
    enc = Encoder().train()
    q, d = data
    qc, dc = split_batch(q, 2), split_batch(d, 2)
    reference(enc, enc, qc, dc, seed=5)
    fp32 = grads(enc)
    enc.zero_grad()

    def rel(a: list[Tensor]) -> float:
        return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, fp32))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(q).dtype == torch.bfloat16
        ref_loss = reference(enc, enc, qc, dc, seed=5)
        ref = grads(enc)
        enc.zero_grad()
        torch.manual_seed(5)
        loss = GradCache(2).step([(enc, q), (enc, dc)], contrastive)
    print(f"gradcache bf16 autocast: loss diff {abs(loss - ref_loss).item():.2e}, rel grad error vs fp32 {rel(grads(enc)):.3f} (bf16 full batch {rel(ref):.3f})")
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert rel(grads(enc)) < max(1.5 * rel(ref), 1e-2) < 0.1


def test_rand_context_replays_and_restores():
    torch.manual_seed(1)
    rng = RandContext()
    first = torch.rand(3)
    after = torch.get_rng_state()
    with rng:
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_split_batch():
    batch = tokens(7, 2) | {"name": "x"}
    chunks = split_batch(batch, 3)
    assert [c["input_ids"].shape[0] for c in chunks] == [3, 3, 1] and chunks[0]["name"] == "x"
    assert torch.equal(torch.cat([c["attention_mask"] for c in chunks]), batch["attention_mask"])
    with pytest.raises(ValueError):
        split_batch({"a": torch.zeros(2), "b": torch.zeros(3)}, 1)
