"""RankingModule: what the LightningModules of every model family share (optimiser and LR schedule, training-loss
logging, evaluation of the scores collected over the eval batches as runs and metrics), so that each family's
module is its scoring."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from research.data.batches import PairGroupBatch
from research.data.candidates import CandidatePair
from research.data.trec import Qrels, Run
from research.eval.evaluation import Evaluation, evaluate_run
from research.training.sharding import offloads_optimizer

ScoredPairs = tuple[list[str], list[str], Tensor]  # one eval batch of a pair scorer: query ids, doc ids, scores


class EvaluationTarget(Protocol):
    """What a DataModule's ``evaluation_target(stage)`` returns (``datamodules.retrieval.EvaluationTarget``): the
    qrels of the split that stage ``val`` or ``test`` evaluates on, the lowest grade that counts as relevant, and
    whether queries without a relevant document count (``research.eval.metrics``: ``exclude`` or ``trec_eval``).
    Named here as a Protocol because modules and datamodules are independent layers (import-linter,
    pyproject.toml): neither may import the other."""

    @property
    def qrels(self) -> Qrels: ...

    @property
    def relevance_level(self) -> int: ...

    @property
    def queries_without_relevant(self) -> str: ...


class RankingModule(L.LightningModule):
    """Base of the ranking LightningModules: subclasses score, this class trains, optimises and evaluates.

    - Training: the default :meth:`training_step` (for :class:`PairGroupBatch`-like batches) gives ``score_batch``'s
      scores ``[Q, G, ...]`` and the batch's targets and mask to :meth:`loss_terms`, returns :meth:`total` and logs
      it with :meth:`log_training`.
    - Optimisation: AdamW over :meth:`parameter_groups` (DeepSpeed's CPU AdamW, the same update, when DeepSpeed
      offloads the optimizer), linear warmup over ``warmup_ratio`` of the estimated steps, then linear decay to 0,
      stepped every optimizer step.
    - Evaluation: validation and test steps keep what :meth:`evaluation_step` returns per batch; at the end of the
      epoch :meth:`evaluation_runs` turns it into runs, which are scored against the DataModule's
      ``evaluation_target(stage)`` (:class:`EvaluationTarget`) with the ``metrics`` hyper-parameter. The run named
      :attr:`main_run` becomes :attr:`last_evaluation` and is logged as ``{stage}/{metric}``; every run with a
      non-empty name is also logged as ``{stage}/{metric}/{name}``.

    Subclasses save the hyper-parameters ``lr``, ``weight_decay``, ``warmup_ratio`` and ``metrics``, and set
    ``self.loss`` (a :class:`~research.losses.RankingLoss`) for the default :meth:`loss_terms`.
    """

    main_run = ""  # the key of evaluation_runs() whose evaluation is last_evaluation
    log_every_term = False  # log train/{term} for a one-term loss too (it equals train/loss)
    #: whether validation/test need the corpus as batches; a module that encodes the corpus itself (shard by shard,
    #: at the start of the epoch) says False, and the DataModule leaves the corpus out of its evaluation batches
    corpus_in_eval_batches = True

    def __init__(self) -> None:
        super().__init__()
        self._collected: list[Any] = []
        self._evaluations: dict[str, Evaluation] = {}

    # ------------------------------------------------------------------ what subclasses implement
    def score_batch(self, batch: Any) -> Any:
        """The model's scores of a training batch; for the default :meth:`training_step`, a tensor ``[Q, G, ...]``
        aligned with the batch's ``targets`` and ``mask``."""
        raise NotImplementedError

    def evaluation_step(self, batch: Any) -> Any | None:
        """What to keep of one validation/test batch for :meth:`evaluation_runs` (``None``: nothing)."""
        raise NotImplementedError

    def evaluation_runs(self, collected: list[Any]) -> dict[str, Run]:
        """The runs, by name, that the epoch's :meth:`evaluation_step` outputs make (empty: nothing to score)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def loss_terms(self, scores: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The named loss terms of a batch's scores: ``self.loss``'s."""
        return self.loss.terms(scores, targets, mask)

    @staticmethod
    def total(terms: dict[str, Tensor]) -> Tensor:
        """The loss to backpropagate: the sum of the terms."""
        return torch.stack(list(terms.values())).sum()

    def training_step(self, batch: PairGroupBatch, batch_idx: int) -> Tensor:
        scores = self.score_batch(batch)
        terms = self.loss_terms(scores, batch.targets.to(scores.device), batch.mask.to(scores.device))
        self.log_training(terms, len(batch))
        return self.total(terms)

    def log_training(self, terms: dict[str, Tensor], batch_size: int) -> None:
        """``train/loss`` (:meth:`total` of the terms, on the progress bar) and ``train/{term}`` for each term when
        there are several (or always, with :attr:`log_every_term`)."""
        detached = {name: term.detach() for name, term in terms.items()}
        self.log("train/loss", self.total(detached), prog_bar=True, batch_size=batch_size)
        if len(detached) > 1 or self.log_every_term:
            self.log_dict({f"train/{name}": term for name, term in detached.items()}, batch_size=batch_size)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode backbones (and a test before fit restores that mode); Lightning looks for
        # eval-mode submodules before on_train_start, so train mode is set here, where the check does not see eval
        self.train()

    # ------------------------------------------------------------------ optimisation
    def no_weight_decay(self, name: str, param: Tensor) -> bool:
        """Biases, norm weights and scalars (such as a learned temperature) are not decayed."""
        return param.dim() < 2 or "LayerNorm" in name

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: :meth:`weight_decay_groups` of every trainable parameter."""
        return self.weight_decay_groups((name, p) for name, p in self.named_parameters() if p.requires_grad)

    def weight_decay_groups(self, named: Iterable[tuple[str, Tensor]]) -> list[dict]:
        """Two groups of the given parameters: with ``weight_decay``, and without (:meth:`no_weight_decay`)."""
        decay, no_decay = [], []
        for name, param in named:
            (no_decay if self.no_weight_decay(name, param) else decay).append(param)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        groups = self.parameter_groups()
        if offloads_optimizer(self._trainer.strategy if self._trainer is not None else None):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.hparams.lr, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    @property
    def last_evaluation(self) -> Evaluation | None:
        """The main run and its metrics from the latest validation or test epoch, ``None`` before one has ended:
        what ``research fit|test`` save into the run directory (``eval``, ``eval_before``, ``eval_after``)."""
        return self._evaluations.get(self.main_run)

    @property
    def evaluations(self) -> dict[str, Evaluation]:
        """Every run of the latest validation or test epoch with its metrics, by :meth:`evaluation_runs` name."""
        return self._evaluations

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _collect(self, batch: Any) -> None:
        kept = self.evaluation_step(batch)
        if kept is not None:
            self._collected.append(kept)

    def _evaluate(self, stage: str) -> None:
        collected, self._collected = self._collected, []
        runs = self.evaluation_runs(collected) if collected else {}
        if not runs:
            return
        target: EvaluationTarget = self.trainer.datamodule.evaluation_target(stage)  # val: the val split's qrels
        self._evaluations = {name: evaluate_run(run, target.qrels, self.hparams.metrics, target.relevance_level,
                                                target.queries_without_relevant) for name, run in runs.items()}
        self.log_dict({f"{stage}/{k}": v for k, v in self._evaluations[self.main_run].metrics.aggregate.items()},
                      sync_dist=False)
        for name, evaluation in self._evaluations.items():
            if name:
                self.log_dict({f"{stage}/{k}/{name}": v for k, v in evaluation.metrics.aggregate.items()}, sync_dist=False)

    # ------------------------------------------------------------------ helpers for pair scorers (cross-encoder, LLM)
    @staticmethod
    def score_groups(batch: PairGroupBatch, score_pairs: Callable[[list[str], list[str]], Tensor]) -> Tensor:
        """Scores ``[Q, G, ...]`` of the batch's groups from one ``score_pairs(queries, documents)`` call on the real
        (query, document) pairs, flattened group by group; 0 at masked (padding) positions."""
        queries = [q for q, docs in zip(batch.queries, batch.documents) for _ in docs]
        documents = [d for docs in batch.documents for d in docs]
        scores = score_pairs(queries, documents)
        mask = batch.mask.to(scores.device)
        grouped = scores.new_zeros(*mask.shape, *scores.shape[1:])
        grouped[mask] = scores
        return grouped

    @staticmethod
    def scored_pairs(collected: list[ScoredPairs]) -> tuple[list[CandidatePair], Tensor]:
        """The epoch's (query, document) pairs and their scores (rows in the same order), from per-batch triples."""
        pairs = [CandidatePair(q, d) for query_ids, doc_ids, _ in collected for q, d in zip(query_ids, doc_ids)]
        return pairs, torch.cat([scores for _, _, scores in collected])
