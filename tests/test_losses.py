"""Loss library: each loss against an independent plain-Python reference, gradcheck, bf16 safety and masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from research.losses import (
    CombinedLoss,
    GISTEmbedLoss,
    InfoNCE,
    KLDistillation,
    LambdaLoss,
    ListMLE,
    ListNet,
    ListwiseSoftmaxCE,
    MarginMSE,
    PointwiseBCE,
    PointwiseMSE,
    RankingLoss,
    RankNet,
    SymmetricInfoNCE,
    TripletLoss,
    in_batch_targets,
)

# A hand-made batch: 5 queries x 5 candidates. Row 0 has a second (masked) positive, row 2 no binary positive,
# row 3 a single candidate, row 4 nothing unmasked. Graded labels contain ties (ListMLE tie-breaking).
SCORES = [
    [2.0, 0.5, -1.0, 1.5, 0.1],
    [0.3, 1.2, 0.7, -0.4, -1.3],
    [-0.5, 0.1, 0.9, 0.2, 1.7],
    [0.4, -0.2, 0.8, 1.1, 0.0],
    [0.6, -0.9, 0.35, 1.3, -0.6],
]
MASK = [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
BINARY = [[1, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
GRADED = [[2, 0, 1, 1, 0], [0, 1, 0, 2, 1], [1, 0, 3, 0, 0], [1, 0, 0, 0, 0], [1, 2, 0, 0, 1]]
TEACHER = [
    [3.0, -1.0, 0.5, 2.0, -0.2],
    [-0.7, 1.4, 0.2, 2.5, 0.9],
    [0.6, -1.5, 2.2, 0.3, -0.1],
    [1.0, 0.2, -0.3, 0.4, 0.5],
    [0.1, 0.2, 0.3, 0.4, 0.5],
]
GUIDE = [
    [0.9, 0.95, 0.2, 0.1, 0.85],
    [0.1, 0.3, 0.75, 0.7, 0.2],
    [0.5, 0.4, 0.3, 0.2, 0.1],
    [0.2, 0.3, 0.4, 0.5, 0.6],
    [0.1, 0.2, 0.3, 0.4, 0.5],
]
TARGETS = {"binary": BINARY, "graded": GRADED, "normalised": [[g / 3 for g in row] for row in GRADED], "teacher": TEACHER}


# --- independent references: plain Python over the unmasked entries -------------------------------------------------


def _valid(mask_row):
    return [j for j, keep in enumerate(mask_row) if keep]


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softmax(values):
    lse = _lse(values)
    return [math.exp(v - lse) for v in values]


def _transpose(matrix):
    return [list(column) for column in zip(*matrix)]


def ref_info_nce(S, T, M):
    rows = []
    for s, t, m in zip(S, T, M):
        valid = _valid(m)
        positives = [j for j in valid if t[j] > 0]
        if positives:
            lse = _lse([s[j] for j in valid])
            rows.append(_mean([lse - s[j] for j in positives]))
    return _mean(rows)


def ref_symmetric(S, T, M):
    return (ref_info_nce(S, T, M) + ref_info_nce(_transpose(S), _transpose(T), _transpose(M))) / 2


def ref_gist(S, T, M, G, margin):
    kept = []
    for t, m, g in zip(T, M, G):
        positives = [j for j in _valid(m) if t[j] > 0]
        threshold = min(g[j] for j in positives) - margin if positives else math.inf
        kept.append([bool(m[j]) and (t[j] > 0 or g[j] <= threshold) for j in range(len(m))])
    return ref_info_nce(S, T, kept)


def ref_triplet(S, T, M, margin=1.0):
    return _mean(
        [
            max(0.0, margin - s[p] + s[n])
            for s, t, m in zip(S, T, M)
            for p in _valid(m)
            if t[p] > 0
            for n in _valid(m)
            if t[n] <= 0
        ]
    )


def ref_bce(S, T, M):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return _mean([-(t[j] * math.log(sig(s[j])) + (1 - t[j]) * math.log(1 - sig(s[j]))) for s, t, m in zip(S, T, M) for j in _valid(m)])


def ref_mse(S, T, M):
    return _mean([(s[j] - t[j]) ** 2 for s, t, m in zip(S, T, M) for j in _valid(m)])


def ref_margin_mse(S, T, M):
    return _mean([((s[0] - s[j]) - (t[0] - t[j])) ** 2 for s, t, m in zip(S, T, M) if m[0] for j in _valid(m) if j > 0])


def ref_kl(S, T, M, temperature=2.0):
    rows = []
    for s, t, m in zip(S, T, M):
        valid = _valid(m)
        if len(valid) > 1:
            p = _softmax([t[j] / temperature for j in valid])
            q = _softmax([s[j] / temperature for j in valid])
            rows.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    return temperature ** 2 * _mean(rows)  # Hinton et al.'s T^2 factor


def ref_ranknet(S, T, M):
    return _mean([math.log1p(math.exp(s[j] - s[i])) for s, t, m in zip(S, T, M) for i in _valid(m) for j in _valid(m) if t[i] > t[j]])


def ref_listwise_ce(S, T, M):
    rows = []
    for s, t, m in zip(S, T, M):
        valid = _valid(m)
        weights = {j: max(t[j], 0.0) for j in valid}
        if valid and sum(weights.values()) > 0:
            lse = _lse([s[j] for j in valid])
            rows.append(sum(w * (lse - s[j]) for j, w in weights.items()) / sum(weights.values()))
    return _mean(rows)


def ref_listnet(S, T, M):
    rows = []
    for s, t, m in zip(S, T, M):
        valid = _valid(m)
        if len(valid) > 1:
            p = _softmax([t[j] for j in valid])
            lse = _lse([s[j] for j in valid])
            rows.append(sum(pj * (lse - s[j]) for pj, j in zip(p, valid)))
    return _mean(rows)


def ref_listmle(S, T, M):
    rows = []
    for s, t, m in zip(S, T, M):
        order = sorted(_valid(m), key=lambda j: (-t[j], j))
        if len(order) > 1:
            rows.append(sum(_lse([s[j] for j in order[i:]]) - s[order[i]] for i in range(len(order))))
    return _mean(rows)


def ref_lambda(S, T, M, mu=10.0, sigma=1.0, k=None):
    rows = []
    for s, t, m in zip(S, T, M):
        valid = _valid(m)
        rank = {j: r + 1 for r, j in enumerate(sorted(valid, key=lambda j: (-s[j], j)))}
        cut = k or len(s)
        gain = {j: 2.0 ** max(t[j], 0.0) - 1.0 for j in valid}
        ideal = sorted(gain.values(), reverse=True)[:cut]
        idcg = sum(g / math.log2(2 + i) for i, g in enumerate(ideal))
        total, pairs = 0.0, 0
        for a in valid:
            for b in valid:
                if t[a] > t[b] and rank[a] <= cut and rank[b] <= cut:
                    ra, rb = rank[a], rank[b]
                    d = abs(ra - rb)
                    ndcg2 = 1 / math.log2(1 + d) - 1 / math.log2(2 + d)
                    lambdarank = abs(1 / math.log2(1 + ra) - 1 / math.log2(1 + rb))
                    weight = (mu * ndcg2 + lambdarank) * abs(gain[a] - gain[b]) / idcg
                    total += weight * math.log1p(math.exp(-sigma * (s[a] - s[b])))
                    pairs += 1
        if pairs:
            rows.append(total)
    return _mean(rows)


# name: (loss factory, target kind, reference)
CASES = {
    "InfoNCE": (InfoNCE, "binary", ref_info_nce),
    "SymmetricInfoNCE": (SymmetricInfoNCE, "binary", ref_symmetric),
    "TripletLoss": (lambda: TripletLoss(margin=1.0), "binary", ref_triplet),
    "MarginMSE": (MarginMSE, "teacher", ref_margin_mse),
    "KLDistillation": (lambda: KLDistillation(temperature=2.0), "teacher", ref_kl),
    "PointwiseBCE": (PointwiseBCE, "normalised", ref_bce),
    "PointwiseMSE": (PointwiseMSE, "graded", ref_mse),
    "RankNet": (RankNet, "graded", ref_ranknet),
    "ListwiseSoftmaxCE": (ListwiseSoftmaxCE, "graded", ref_listwise_ce),
    "ListNet": (ListNet, "teacher", ref_listnet),
    "ListMLE": (ListMLE, "graded", ref_listmle),
    "LambdaLoss": (LambdaLoss, "graded", ref_lambda),
    "LambdaLoss@2": (lambda: LambdaLoss(mu=5.0, sigma=0.5, k=2), "graded", lambda S, T, M: ref_lambda(S, T, M, 5.0, 0.5, 2)),
}
parametrize = pytest.mark.parametrize("case", list(CASES))


def _inputs(kind, dtype=torch.float32):
    return torch.tensor(SCORES, dtype=dtype), torch.tensor(TARGETS[kind], dtype=dtype), torch.tensor(MASK, dtype=torch.bool)


@parametrize
def test_matches_reference(case):
    make, kind, reference = CASES[case]
    scores, targets, mask = _inputs(kind)
    expected = reference(SCORES, TARGETS[kind], MASK)
    assert expected > 0
    assert make()(scores, targets, mask).item() == pytest.approx(expected, rel=1e-5)


@parametrize
def test_gradcheck_float64(case):
    make, kind, _ = CASES[case]
    scores, targets, mask = _inputs(kind, torch.float64)
    loss = make()
    assert torch.autograd.gradcheck(lambda s: loss.compute(s, targets, mask), (scores.requires_grad_(),))


@parametrize
def test_bf16_autocast_large_scores(case):
    make, kind, _ = CASES[case]
    scores, targets, mask = _inputs(kind)
    scores = (scores * 1e4).bfloat16().requires_grad_()
    targets = (targets * 1e4 if kind == "teacher" else targets).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = make()(scores, targets, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(scores.grad).all()


@parametrize
def test_masked_entries_change_nothing(case):
    make, kind, _ = CASES[case]
    scores, targets, mask = _inputs(kind)
    junk = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan")]).repeat(5)[: int((~mask).sum())]
    results = []
    for s, t in ((scores, targets), (scores.masked_scatter(~mask, junk), targets.masked_scatter(~mask, junk.flip(0)))):
        s = s.clone().requires_grad_()
        loss = make()(s, t, mask)
        loss.backward()
        results.append((loss.detach(), s.grad))
    (clean, clean_grad), (dirty, dirty_grad) = results
    assert torch.equal(clean, dirty) and torch.equal(clean_grad, dirty_grad)
    assert (dirty_grad[~mask] == 0).all()


@parametrize
def test_empty_batch_is_connected_zero(case):
    make, kind, _ = CASES[case]
    scores, targets, _ = _inputs(kind)
    empties = [torch.zeros_like(scores, dtype=torch.bool)]
    if case in ("InfoNCE", "SymmetricInfoNCE", "TripletLoss"):  # also: no positive anywhere
        targets = torch.zeros_like(targets)
        empties.append(torch.ones_like(scores, dtype=torch.bool))
    for mask in empties:
        s = scores.clone().requires_grad_()
        loss = make()(s, targets, mask)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert (s.grad == 0).all()


def test_losses_are_parameter_free_and_named():
    for name, (make, _, _) in CASES.items():
        loss = make()
        assert isinstance(loss, RankingLoss) and not list(loss.parameters())
        assert loss.name == name.split("@")[0]
    assert InfoNCE(name="contrastive").name == "contrastive"


def test_info_nce_equals_cross_entropy_for_single_positive():
    scores = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 6, 2])
    assert torch.allclose(InfoNCE()(scores, F.one_hot(labels, 7).float()), F.cross_entropy(scores, labels))


def test_info_nce_masked_duplicate_positive_is_excluded():
    scores = torch.tensor([[1.0, -0.5, 1.0, 0.3]])  # column 2 duplicates the positive in column 0
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False, True]])
    expected = F.cross_entropy(scores[:, [0, 1, 3]], torch.tensor([0]))
    assert torch.allclose(InfoNCE()(scores, targets, mask), expected)
    assert not torch.allclose(InfoNCE()(scores, targets), expected)


def test_symmetric_info_nce_in_batch_layout():
    batch, group = 3, 3  # [B, B * (1 + n)] with n = 2 hard negatives per query
    scores = torch.randn(batch, batch * group, generator=torch.Generator().manual_seed(1))
    targets = in_batch_targets(batch, group)
    positives = torch.arange(batch) * group
    assert torch.equal(targets.argmax(-1), positives) and targets.sum() == batch
    expected = (F.cross_entropy(scores, positives) + F.cross_entropy(scores[:, positives].T, torch.arange(batch))) / 2
    assert torch.allclose(SymmetricInfoNCE()(scores, targets), expected)


def test_list_mle_breaks_ties_by_index():
    scores = torch.tensor([[0.2, 1.0, -0.3]])
    expected = (_lse([0.2, 1.0, -0.3]) - 0.2) + (_lse([1.0, -0.3]) - 1.0)  # tie (columns 0, 1): column 0 first
    assert ListMLE()(scores, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-6)


def test_one_dimensional_input_is_one_query():
    scores, targets = torch.tensor(SCORES[1]), torch.tensor(GRADED[1], dtype=torch.float32)
    assert LambdaLoss()(scores, targets).item() == pytest.approx(ref_lambda([SCORES[1]], [GRADED[1]], [[1] * 5]), rel=1e-5)


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_gist_embed(margin):
    scores, targets, mask = _inputs("binary")
    guide = torch.tensor(GUIDE)
    loss = GISTEmbedLoss(margin=margin)
    expected = ref_gist(SCORES, BINARY, MASK, GUIDE, margin)
    assert loss(scores, targets, mask, guide_scores=guide).item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(ref_info_nce(SCORES, BINARY, MASK))  # the guide did drop a negative
    assert loss.terms(scores, targets, mask, guide_scores=guide)["GISTEmbedLoss"].item() == pytest.approx(expected, rel=1e-5)
    # a guide that ranks every positive first changes nothing: plain InfoNCE
    assert torch.allclose(loss(scores, targets, mask, guide_scores=targets - 1.0 - margin), InfoNCE()(scores, targets, mask))
    scores64 = scores.double().requires_grad_()
    kept = loss.guide_mask(guide, targets, mask)
    assert torch.autograd.gradcheck(lambda s: loss.compute(s, targets.double(), kept), (scores64,))
    big = (scores * 1e4).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(big, targets.bfloat16(), mask, guide_scores=guide.bfloat16())
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out) and torch.isfinite(big.grad).all()
    with pytest.raises(ValueError):
        loss(scores, targets, mask, guide_scores=guide[:, :3])


def test_combined_loss_terms_sum_and_names():
    scores, targets, mask = _inputs("teacher")
    parts = [KLDistillation(), MarginMSE(), KLDistillation(temperature=3.0), RankNet(name="pairs")]
    combined = CombinedLoss(parts, [1.0, 0.5, 2.0, 0.25])
    terms = combined.terms(scores, targets, mask)
    assert list(terms) == ["KLDistillation", "MarginMSE", "KLDistillation_2", "pairs"]
    for (name, value), part, weight in zip(terms.items(), parts, [1.0, 0.5, 2.0, 0.25]):
        assert torch.allclose(value, weight * part(scores, targets, mask)), name
    assert torch.allclose(combined(scores, targets, mask), sum(terms.values()))
    with pytest.raises(ValueError):
        CombinedLoss([InfoNCE()], [1.0, 2.0])


def test_combined_loss_from_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--loss", type=RankingLoss)
    config = parser.parse_object(
        {
            "loss": {
                "class_path": "research.losses.CombinedLoss",
                "init_args": {
                    "losses": [
                        {"class_path": "research.losses.InfoNCE"},
                        {"class_path": "research.losses.TripletLoss", "init_args": {"margin": 0.2}},
                    ],
                    "weights": [1.0, 0.5],
                },
            }
        }
    )
    loss = parser.instantiate_classes(config).loss
    assert isinstance(loss, CombinedLoss) and loss.losses[1].margin == 0.2 and loss.weights == [1.0, 0.5]
    scores, targets, mask = _inputs("binary")
    expected = ref_info_nce(SCORES, BINARY, MASK) + 0.5 * ref_triplet(SCORES, BINARY, MASK, 0.2)
    assert loss(scores, targets, mask).item() == pytest.approx(expected, rel=1e-5)


def test_kl_distillation_carries_hintons_t_squared_factor():
    """At T = 2 the loss is 4x the plain KL of the softened distributions (hand-computed), at T = 1 the plain KL."""
    scores, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]])

    def plain_kl(temperature: float) -> float:
        p = torch.softmax(teacher / temperature, -1)
        q = torch.softmax(scores / temperature, -1)
        return float((p * (p.log() - q.log())).sum())

    assert KLDistillation(temperature=2.0)(scores, teacher).item() == pytest.approx(4 * plain_kl(2.0), rel=1e-5)
    assert KLDistillation(temperature=1.0)(scores, teacher).item() == pytest.approx(plain_kl(1.0), rel=1e-5)


def test_lambda_loss_scale_against_allranks_binary_log_sum():
    """allRank's defaults (log2, sum over the batch) give this loss times (queries with a pair) / ln 2."""
    S, T, M = SCORES[:3], GRADED[:3], [[1] * len(SCORES[0])] * 3
    ours = LambdaLoss()(torch.tensor(S), torch.tensor(T)).item()
    queries = sum(1 for t in T if len(set(t)) > 1)
    # allRank: per query the sum of log2 terms, summed over the batch
    allrank = sum(ref_lambda([s], [t], [m]) / math.log(2) for s, t, m in zip(S, T, M))
    assert ours * queries / math.log(2) == pytest.approx(allrank, rel=1e-5)
