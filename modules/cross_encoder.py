"""LightningModule that trains a cross-encoder with any ranking loss and evaluates it by re-ranking candidates."""

from __future__ import annotations

from torch import Tensor

from modules.base import RankingModule, ScoredPairs
from research.data.batches import PairBatch, PairGroupBatch
from research.data.candidates import pairs_to_run
from research.data.trec import Run
from research.eval.metrics import DEFAULT_METRICS
from research.losses import ListwiseSoftmaxCE, RankingLoss
from research.models.compile import compile_in_place
from research.models.cross_encoder import CrossEncoder
from research.models.fast_dropout import use_fast_dropout


class CrossEncoderModule(RankingModule):
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

    def configure_model(self) -> None:
        if self.hparams.torch_compile:
            compile_in_place(self.cross_encoder.model)

    def score_batch(self, batch: PairGroupBatch) -> Tensor:
        """Scores ``[Q, G]`` of the batch's groups, 0 at masked (padding) positions; only real pairs are scored."""
        return self.score_groups(batch, lambda queries, documents: self.cross_encoder(queries, documents).float())

    # evaluation: score the candidate pairs in steps; the run is built and scored at epoch end
    def evaluation_step(self, batch: PairBatch) -> ScoredPairs:
        return batch.query_ids, batch.doc_ids, self.cross_encoder(batch.queries, batch.documents).float().cpu()

    def evaluation_runs(self, collected: list[ScoredPairs]) -> dict[str, Run]:
        pairs, scores = self.scored_pairs(collected)
        return {self.main_run: pairs_to_run(pairs, scores.tolist())}

    def save_pretrained(self, directory) -> None:
        self.cross_encoder.save_pretrained(directory)
