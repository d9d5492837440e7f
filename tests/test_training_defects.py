"""Training on the right targets (issue 17, section 4): distillation with in-batch negatives against a per-row brute
force, GISTEmbed's guide mask against a brute force over every in-batch pair, and listwise groups that would train on
the evaluation split's queries."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_tiny_model_dir
from test_reranking_data import EVAL, write_beir, write_jsonl

from datamodules.reranking import ListwiseDataModule
from research.data.batches import GroupBatch
from research.errors import DataFormatError
from research.losses import GISTEmbedLoss, InfoNCE, KLDistillation, MarginMSE
from research.models.bi_encoder import BiEncoder

QUERIES = ["rocket orbit", "moon star launch", "whale reef", "bread cheese soup"]
GROUPS = [["d_space_1", "d_food_0", "d_music_2"], ["d_space_4", "d_music_2", "d_ocean_0"],
          ["d_ocean_3", "d_food_0", "d_sport_1"], ["d_food_5", "d_space_1", "d_medicine_2"]]
TEACHER = [[4.0, 1.0, -2.0], [3.5, 2.5, 0.5], [5.0, -1.0, 1.5], [2.0, 3.0, -0.5]]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("student"), seed=0)


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("guide"), seed=5)


def text(doc_id: str) -> str:
    return "the " + doc_id.replace("_", " ")


def batch(positives: list[frozenset[str]] | None = None) -> GroupBatch:
    positives = positives or [frozenset({group[0]}) for group in GROUPS]
    return GroupBatch(
        query_ids=[f"q{i}" for i in range(len(QUERIES))], queries=list(QUERIES), doc_ids=[list(g) for g in GROUPS],
        documents=[[text(d) for d in g] for g in GROUPS], targets=torch.tensor([[1.0, 0.0, 0.0]] * len(QUERIES)),
        positive_ids=positives, teacher_scores=torch.tensor(TEACHER),
    )


def module(model_dir, **kwargs):
    from modules.bi_encoder import BiEncoderModule

    return BiEncoderModule(model=str(model_dir), temperature=0.5, **kwargs).eval()


def one_by_one(encoder: BiEncoder, texts: list[str], is_query: bool) -> list[torch.Tensor]:
    """Each text embedded alone (no padding, no batching): the brute-force side."""
    with torch.no_grad():
        return [encoder([t], is_query)[0].double() for t in texts]


# ------------------------------------------------------------------ 1. distillation with in-batch negatives
def brute_force_distillation(model_dir, loss_name: str) -> float:
    """Row by row: the student's scores of the query's own group (the only documents the teacher scored) against
    the teacher's, MarginMSE anchored at the row's positive, or the KL of the row's softmaxes."""
    encoder = BiEncoder.from_pretrained(model_dir).eval()
    terms, rows = [], []
    for query, group, teacher in zip(QUERIES, GROUPS, TEACHER):
        q = one_by_one(encoder, [query], True)[0]
        s = [float(q @ d) * 2.0 for d in one_by_one(encoder, [text(d) for d in group], False)]  # 1 / temperature 0.5
        if loss_name == "MarginMSE":
            terms += [((s[0] - s[j]) - (teacher[0] - teacher[j])) ** 2 for j in range(1, len(s))]
        else:
            p = torch.softmax(torch.tensor(teacher, dtype=torch.float64), 0)
            log_q = torch.log_softmax(torch.tensor(s, dtype=torch.float64), 0)
            rows.append(float((p * (p.log() - log_q)).sum()))
    return math.fsum(terms) / len(terms) if loss_name == "MarginMSE" else math.fsum(rows) / len(rows)


@pytest.mark.parametrize("loss", [MarginMSE(), KLDistillation()], ids=lambda loss: loss.name)
def test_distillation_with_in_batch_negatives_equals_per_row_brute_force(student_dir, loss):
    trained = module(student_dir, loss=loss, distill=True, in_batch_negatives=True)
    scores, targets, mask = trained.score_batch(batch())
    group = len(GROUPS[0])
    assert scores.shape == (len(QUERIES), len(QUERIES) * group)
    assert mask[:, :group].all() and not mask[:, group:].any()  # other rows' documents: no teacher score
    torch.testing.assert_close(targets[:, :group], torch.tensor(TEACHER))
    value = trained.loss(scores, targets, mask).item()
    assert value == pytest.approx(brute_force_distillation(student_dir, loss.name), rel=1e-4)
    plain = module(student_dir, loss=loss, distill=True, in_batch_negatives=False)
    assert value == pytest.approx(plain.loss(*plain.score_batch(batch())).item(), rel=1e-5)


# ------------------------------------------------------------------ 2. GISTEmbed with a guide model
def brute_force_gist(student_dir, guide_dir, margin: float, positives: list[frozenset[str]]):
    """Every in-batch candidate of query i, in the module's column order (every document of the batch, every query,
    every group's positive), kept unless the guide scores it above the guide's score of i's positive minus ``margin``,
    or it is i itself (query or positive), or another copy of one of i's positives; and InfoNCE over what is kept."""
    student, guide = BiEncoder.from_pretrained(student_dir).eval(), BiEncoder.from_pretrained(guide_dir).eval()
    docs = [d for group in GROUPS for d in group]
    sq, sd = one_by_one(student, QUERIES, True), one_by_one(student, [text(d) for d in docs], False)
    gq, gd = one_by_one(guide, QUERIES, True), one_by_one(guide, [text(d) for d in docs], False)
    group, rows, masks = len(GROUPS[0]), [], []
    for i in range(len(QUERIES)):
        own = i * group
        threshold = float(gq[i] @ gd[own]) - margin
        candidates = []  # (student score, guide score, kept by identity, is the positive)
        for c, doc in enumerate(docs):
            other_copy = doc in positives[i] and not own <= c < own + group
            candidates.append((float(sq[i] @ sd[c]) * 2.0, float(gq[i] @ gd[c]), not other_copy, c == own))
        for j in range(len(QUERIES)):
            candidates.append((float(sq[i] @ sq[j]) * 2.0, float(gq[i] @ gq[j]), j != i, False))
        for j in range(len(QUERIES)):
            positive_copy = docs[j * group] in positives[i] and j != i
            candidates.append((float(sd[own] @ sd[j * group]) * 2.0, float(gd[own] @ gd[j * group]),
                               j != i and not positive_copy, False))
        kept = [positive or (keep and g <= threshold) for _, g, keep, positive in candidates]
        masks.append(kept)
        scores = torch.tensor([s for s, *_ in candidates], dtype=torch.float64)
        log_p = torch.log_softmax(scores.masked_fill(~torch.tensor(kept), -math.inf), 0)
        rows.append(-float(log_p[own]))
    return torch.tensor(masks), math.fsum(rows) / len(rows)


class Recording(GISTEmbedLoss):
    """GISTEmbedLoss that keeps the mask it trained with."""

    def compute(self, scores, targets, mask):
        self.seen = mask
        return super().compute(scores, targets, mask)


@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_gist_guide_mask_and_loss_equal_brute_force(student_dir, guide_dir, margin):
    positives = [frozenset({GROUPS[0][0]}), frozenset({GROUPS[1][0], GROUPS[0][0]}), frozenset({GROUPS[2][0]}),
                 frozenset({GROUPS[3][0]})]
    loss = Recording(margin=margin)
    trained = module(student_dir, loss=loss, guide_model=str(guide_dir))
    value, terms = trained._loss(batch(positives), *trained.embed(batch(positives)))
    expected_mask, expected = brute_force_gist(student_dir, guide_dir, margin, positives)
    assert torch.equal(loss.seen.cpu(), expected_mask)
    assert value.item() == pytest.approx(expected, rel=1e-4) and set(terms) == {"Recording"}
    assert not expected_mask.all()  # the guide did drop candidates (beyond the identities)
    guide_parameters = list(trained.guide.parameters())
    assert all(not p.requires_grad for p in guide_parameters) and not trained.guide.training
    assert not any(name.startswith("guide") for name in trained.state_dict())  # checkpoints hold the trained model only
    value.backward()
    assert all(p.grad is None for p in guide_parameters)


def test_guide_model_needs_gist_and_gist_needs_a_guide(student_dir, guide_dir):
    with pytest.raises(ValueError, match="guide_model"):
        module(student_dir, loss=GISTEmbedLoss())
    with pytest.raises(ValueError, match="GISTEmbedLoss"):
        module(student_dir, loss=InfoNCE(), guide_model=str(guide_dir))
    with pytest.raises(ValueError, match="distill"):
        module(student_dir, loss=GISTEmbedLoss(), guide_model=str(guide_dir), distill=True)


def test_gist_without_in_batch_negatives_filters_the_own_group(student_dir, guide_dir):
    loss = Recording(margin=0.0)
    trained = module(student_dir, loss=loss, guide_model=str(guide_dir), in_batch_negatives=False)
    trained._loss(batch(), *trained.embed(batch()))
    guide = BiEncoder.from_pretrained(guide_dir).eval()
    for i, (query, group) in enumerate(zip(QUERIES, GROUPS)):
        g_q = one_by_one(guide, [query], True)[0]
        g = [float(g_q @ d) for d in one_by_one(guide, [text(d) for d in group], False)]
        assert loss.seen[i].tolist() == [True] + [score <= g[0] for score in g[1:]]


# ------------------------------------------------------------------ 9. listwise groups on evaluation queries
def test_listwise_groups_with_evaluation_queries_are_refused(tmp_path):
    beir = write_beir(tmp_path / "tiny")
    groups = write_jsonl(tmp_path / "groups.jsonl", [
        {"query_id": "q1", "doc_ids": ["d11", "d1"], "labels": [0, 1]},
        {"query_id": "q8", "doc_ids": ["d12", "d2"], "labels": [0, 1]},  # in queries.jsonl, judged in no split
        {"query_id": "q6", "doc_ids": ["d8", "d13"], "labels": [1, 0]},  # judged in the test split
    ])
    with pytest.raises(DataFormatError) as error:
        ListwiseDataModule(str(beir), str(groups), batch_size=2, **EVAL).setup("fit")
    assert (error.value.path, error.value.line, error.value.field) == (str(groups), 3, "query_id")
    assert "q6" in str(error.value) and "test" in str(error.value) and "allow_eval_queries" in str(error.value)
    allowed = ListwiseDataModule(str(beir), str(groups), batch_size=3, allow_eval_queries=True, **EVAL)
    allowed.setup("fit")
    assert sorted(next(iter(allowed.train_dataloader())).query_ids) == ["q1", "q6", "q8"]
    no_eval = ListwiseDataModule(str(beir), str(groups), batch_size=3, **{**EVAL, "eval_split": None})
    no_eval.setup("fit")  # nothing is evaluated: nothing to leak into


def test_listwise_groups_with_validation_queries_are_refused(tmp_path):
    """Checkpoints chosen on a dev split the student trained on are not chosen on held-out queries."""
    beir = write_beir(tmp_path / "tiny")
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq8\td12\t1\n")
    groups = write_jsonl(tmp_path / "groups.jsonl", [
        {"query_id": "q1", "doc_ids": ["d11", "d1"], "labels": [0, 1]},
        {"query_id": "q8", "doc_ids": ["d12", "d2"], "labels": [1, 0]},  # judged in dev, the validation split
    ])
    settings = {**EVAL, "eval_split": None, "val_split": "dev"}
    with pytest.raises(DataFormatError) as error:
        ListwiseDataModule(str(beir), str(groups), batch_size=2, **settings).setup("fit")
    assert (error.value.line, error.value.field) == (2, "query_id")
    assert "q8" in str(error.value) and "validation split 'dev'" in str(error.value) and "selected" in str(error.value)
    ListwiseDataModule(str(beir), str(groups), batch_size=2, allow_eval_queries=True, **settings).setup("fit")
