"""Two CPU ranks (gloo, loopback) with gather_with_grad reproduce the single-process full-batch loss and gradients."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from research.losses import InfoNCE
from research.training.distributed import gather_group_batch, gather_with_grad
from research.training.gradcache import GradCache

WORLD, QUERIES, GROUP, FEATURES = 2, 8, 3, 6  # GROUP = 1 positive + 2 hard negatives per query
EQUAL, UNEQUAL = [4, 4], [3, 5]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 8))


def make_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(QUERIES, FEATURES, generator=g), torch.randn(QUERIES * GROUP, FEATURES, generator=g)


def contrastive(q: Tensor, d: Tensor) -> Tensor:
    """Local queries against all ranks' docs, scaled so DDP's average is the global mean (W * B_r / N)."""
    group = gather_group_batch(q, d)
    return InfoNCE()(10.0 * group.queries @ group.docs.T, group.targets()) * group.loss_scale


def local_only(q: Tensor, d: Tensor) -> Tensor:
    """The mistake the gather fixes: in-batch negatives from this rank only."""
    targets = torch.zeros(q.shape[0], d.shape[0])
    targets[torch.arange(q.shape[0]), torch.arange(q.shape[0]) * GROUP] = 1.0
    return InfoNCE()(10.0 * q @ d.T, targets)


def full_batch() -> tuple[Tensor, list[Tensor]]:
    """The single-process reference on the concatenated batch."""
    model = make_model()
    q, d = make_data()
    loss = contrastive(model(q), model(d))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def run_scenario(name: str, rank: int) -> tuple[Tensor, list[Tensor]]:
    """This rank's share of the batch through one training step; returns the global loss and synced gradients."""
    sizes = UNEQUAL if name == "unequal" else EQUAL
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    q_all, d_all = make_data()
    q, d = q_all[lo:hi], d_all[lo * GROUP : hi * GROUP]
    model = make_model()
    if name.startswith("ddp"):
        ddp = DistributedDataParallel(model)
        if name == "ddp":
            loss = contrastive(ddp(q), ddp(d))
            loss.backward()
        else:
            loss = GradCache(2).step([(ddp, q), (ddp, d)], contrastive, no_sync=ddp.no_sync)
    else:
        if name == "gradcache":
            loss = GradCache(3).step([(model, q), (model, d)], contrastive)
        else:
            loss = (local_only if name == "local" else contrastive)(model(q), model(d))
            loss.backward()
        for p in model.parameters():  # what DDP does: average gradients over ranks
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / WORLD, [p.grad.clone() for p in model.parameters()]


SCENARIOS = ["gather", "unequal", "gradcache", "ddp", "ddp_gradcache", "local"]


def _worker(rank: int, store: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        t = torch.arange(rank + 1, dtype=torch.float, requires_grad=True)  # ranks hold 1 and 2 rows
        gathered = gather_with_grad(t)
        (gathered * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        results = {"raw": (gathered.detach(), t.grad)}
        results |= {name: run_scenario(name, rank) for name in SCENARIOS}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_gather_with_grad_unequal_sizes(ranks):
    """Rank 0 holds [0], rank 1 holds [0, 1]; each rank's loss weights the gathered rows by [1, 2, 3]: grads are summed."""
    for r, res in enumerate(ranks):
        gathered, grad = res["raw"]
        assert torch.equal(gathered, torch.tensor([0.0, 0.0, 1.0]))
        assert torch.equal(grad, WORLD * torch.tensor([[1.0], [2.0, 3.0]][r]))


@pytest.mark.parametrize("name", SCENARIOS[:-1])
def test_distributed_equals_full_batch(ranks, name):
    ref_loss, ref = full_batch()
    loss_diff = max(abs(res[name][0] - ref_loss).item() for res in ranks)
    grad_diff = max((g - r).abs().max().item() for res in ranks for g, r in zip(res[name][1], ref))
    print(f"gather[{name}] vs single process: loss diff {loss_diff:.2e}, max grad diff {grad_diff:.2e}")
    assert loss_diff < 1e-5 and grad_diff < 1e-5


def test_local_negatives_only_differ(ranks):
    ref_loss, ref = full_batch()
    loss_diff = abs(ranks[0]["local"][0] - ref_loss).item()
    grad_diff = max((g - r).abs().max().item() for g, r in zip(ranks[0]["local"][1], ref))
    print(f"local in-batch only vs single process: loss diff {loss_diff:.2e}, max grad diff {grad_diff:.2e}")
    assert loss_diff > 1e-3 and grad_diff > 1e-3
