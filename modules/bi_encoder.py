"""LightningModule that trains and evaluates a dense bi-encoder."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor, nn
from transformers import get_linear_schedule_with_warmup

from datamodules.batches import EncodeBatch, GroupBatch
from research.evaluation import DEFAULT_METRICS, Evaluation, dense_search, evaluate_run
from research.losses import InfoNCE, RankingLoss
from research.models.bi_encoder import BiEncoder


class BiEncoderModule(L.LightningModule):
    """Contrastive training of a :class:`BiEncoder`; evaluation by exact faiss search over the eval split.

    Args:
        model: local dir, packaged model name or hub id.
        loss: any :class:`RankingLoss`; default InfoNCE over in-batch and hard negatives.
        temperature: scores are ``similarity / temperature``; ``learn_temperature`` makes it a parameter.
        in_batch_negatives: score each query against every document of the batch (else only its own group).
        distill: use the batch's teacher scores as targets (MarginMSE, KL), instead of labels.
        pooling, normalize, prefixes, max lengths, shared_towers: override what the model directory says.
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        loss: RankingLoss | None = None,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        in_batch_negatives: bool = True,
        distill: bool = False,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        query_max_length: int | None = None,
        document_max_length: int | None = None,
        shared_towers: bool | None = None,
        eval_top_k: int = 100,
        metrics: tuple[str, ...] = DEFAULT_METRICS,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        self.encoder = BiEncoder.from_pretrained(
            model, trust_remote_code=trust_remote_code, pooling=pooling, normalize=normalize,
            query_prefix=query_prefix, document_prefix=document_prefix, query_max_length=query_max_length,
            document_max_length=document_max_length, shared_towers=shared_towers,
        )
        if shared_towers is False and self.encoder.document_encoder is None:
            raise ValueError("shared_towers=False needs a model saved with separate towers")
        self.loss = loss if loss is not None else InfoNCE()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self._encoded: dict[bool, tuple[list[str], list[Tensor]]] = {}
        self.last_evaluation: Evaluation | None = None

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def score_batch(self, batch: GroupBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Scores, targets and mask for the loss: ``[B, B*(1+n)]`` with in-batch negatives, else ``[B, 1+n]``."""
        queries = self.encoder(batch.queries, is_query=True)
        flat_docs = [d for group in batch.documents for d in group]
        documents = self.encoder(flat_docs, is_query=False)
        size, group = len(batch), batch.group_size
        targets = batch.teacher_scores if self.hparams.distill else batch.targets
        if targets is None:
            raise ValueError("distill=True needs teacher scores in the training groups")
        targets = targets.to(self.device)
        if not self.hparams.in_batch_negatives:
            scores = torch.einsum("bd,bnd->bn", queries, documents.view(size, group, -1)) * self.scale
            return scores, targets, torch.ones_like(scores, dtype=torch.bool)
        scores = queries @ documents.T * self.scale
        full_targets = torch.zeros_like(scores)
        mask = torch.ones_like(scores, dtype=torch.bool)
        flat_ids = [d for ids in batch.doc_ids for d in ids]
        for i in range(size):
            own = slice(i * group, (i + 1) * group)
            full_targets[i, own] = targets[i]
            for j, doc_id in enumerate(flat_ids):  # another row's copy of one of my positives is no negative
                if doc_id in batch.positive_ids[i] and not (own.start <= j < own.stop):
                    mask[i, j] = False
        return scores, full_targets, mask

    def training_step(self, batch: GroupBatch, batch_idx: int) -> Tensor:
        scores, targets, mask = self.score_batch(batch)
        terms = self.loss.terms(scores, targets, mask)
        loss = torch.stack(list(terms.values())).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if len(terms) > 1:
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(batch))
        if self.hparams.learn_temperature:
            self.log("train/temperature", 1.0 / self.scale, batch_size=len(batch))
        return loss

    # evaluation: encode queries and corpus in steps, search and score at epoch end
    def _encode_step(self, batch: EncodeBatch) -> None:
        ids, embeddings = self._encoded.setdefault(batch.is_query, ([], []))
        ids.extend(batch.ids)
        embeddings.append(self.encoder(batch.texts, batch.is_query).float().cpu())

    def validation_step(self, batch: EncodeBatch, batch_idx: int) -> None:
        self._encode_step(batch)

    def test_step(self, batch: EncodeBatch, batch_idx: int) -> None:
        self._encode_step(batch)

    def _evaluate(self, stage: str) -> None:
        encoded, self._encoded = self._encoded, {}
        if True not in encoded or False not in encoded:
            return
        datamodule = self.trainer.datamodule
        query_ids, query_emb = encoded[True][0], torch.cat(encoded[True][1])
        doc_ids, doc_emb = encoded[False][0], torch.cat(encoded[False][1])
        run = dense_search(query_emb, doc_emb, query_ids, doc_ids, k=self.hparams.eval_top_k)
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
                (no_decay if param.dim() < 2 or "LayerNorm" in name or name == "log_scale" else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def save_pretrained(self, directory) -> None:
        self.encoder.save_pretrained(directory)
