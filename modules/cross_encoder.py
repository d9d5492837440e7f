"""LightningModule that trains a cross-encoder with any ranking loss and evaluates it by re-ranking candidates."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from research.data.batches import PairBatch, PairGroupBatch
from research.eval.evaluation import DEFAULT_METRICS, Evaluation, evaluate_run
from research.losses import ListwiseSoftmaxCE, RankingLoss
from research.models.compile import compile_in_place
from research.models.cross_encoder import CrossEncoder
from research.models.fast_dropout import use_fast_dropout
from research.retrieval.rerank import CandidatePair, pairs_to_run


class CrossEncoderModule(L.LightningModule):
    """Trains a :class:`CrossEncoder` on grouped batches; validation/test re-rank the datamodule's candidates.

    Scores ``[Q, G]`` (one logit per query-document pair) go to ``loss`` with the batch's targets and mask: labels,
    graded labels, teacher scores or pairwise preferences, whichever the datamodule provides.

    Args:
        model: local dir, packaged model name or hub id; an encoder without a classification head gets a random one.
        loss: any :class:`RankingLoss` (e.g. ``ListwiseSoftmaxCE``, ``RankNet``, ``PointwiseBCE``, ``LambdaLoss``,
            ``CombinedLoss``, whose terms are logged one by one); default ``ListwiseSoftmaxCE``.
        max_length, query_max_length: override the saved pair / query token limits.
        fast_dropout: CPU training speed: cheaper dropout masks, same dropout rates
            (:func:`research.models.fast_dropout.use_fast_dropout`; evaluation outputs are unchanged).
        torch_compile: ``torch.compile`` the backbone in place (dynamic shapes); off by default (slower on a 2-core CPU).
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        loss: RankingLoss | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        max_length: int | None = None,
        query_max_length: int | None = None,
        metrics: tuple[str, ...] = DEFAULT_METRICS,
        trust_remote_code: bool = False,
        fast_dropout: bool = False,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        self.cross_encoder = CrossEncoder.from_pretrained(model, trust_remote_code=trust_remote_code, max_length=max_length,
                                                          query_max_length=query_max_length)
        if fast_dropout:
            use_fast_dropout(self.cross_encoder.model)
        self.cross_encoder.train()  # from_pretrained returns eval mode (no dropout); Lightning switches modes for evaluation
        self.loss = loss if loss is not None else ListwiseSoftmaxCE()
        self._scored: list[tuple[list[str], list[str], Tensor]] = []
        self.last_evaluation: Evaluation | None = None

    def configure_model(self) -> None:
        if self.hparams.torch_compile:
            compile_in_place(self.cross_encoder.model)

    def score_batch(self, batch: PairGroupBatch) -> Tensor:
        """Scores ``[Q, G]`` of the batch's groups, 0 at masked (padding) positions; only real pairs are scored."""
        queries = [q for q, docs in zip(batch.queries, batch.documents) for _ in docs]
        documents = [d for docs in batch.documents for d in docs]
        logits = self.cross_encoder(queries, documents).float()
        mask = batch.mask.to(self.device)
        return torch.zeros(mask.shape, device=self.device, dtype=logits.dtype).masked_scatter(mask, logits)

    def training_step(self, batch: PairGroupBatch, batch_idx: int) -> Tensor:
        scores = self.score_batch(batch)
        targets, mask = batch.targets.to(self.device), batch.mask.to(self.device)
        terms = self.loss.terms(scores, targets, mask)
        loss = torch.stack(list(terms.values())).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if len(terms) > 1:
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(batch))
        return loss

    # evaluation: score the candidate pairs in steps, build the run and its metrics at epoch end
    def _score_step(self, batch: PairBatch) -> None:
        self._scored.append((batch.query_ids, batch.doc_ids, self.cross_encoder(batch.queries, batch.documents).float().cpu()))

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        self._score_step(batch)

    def test_step(self, batch: PairBatch, batch_idx: int) -> None:
        self._score_step(batch)

    def _evaluate(self, stage: str) -> None:
        scored, self._scored = self._scored, []
        if not scored:
            return
        datamodule = self.trainer.datamodule
        pairs = [CandidatePair(q, d) for query_ids, doc_ids, _ in scored for q, d in zip(query_ids, doc_ids)]
        run = pairs_to_run(pairs, torch.cat([scores for _, _, scores in scored]).tolist())
        self.last_evaluation = evaluate_run(run, datamodule.eval_data.qrels, self.hparams.metrics, datamodule.hparams.relevance_level)
        self.log_dict({f"{stage}/{k}": v for k, v in self.last_evaluation.metrics.aggregate.items()}, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 or "LayerNorm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def save_pretrained(self, directory) -> None:
        self.cross_encoder.save_pretrained(directory)
