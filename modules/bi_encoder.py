"""LightningModule that trains and evaluates a dense bi-encoder."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from functools import partial

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from modules.base import RankingModule
from research.data.batches import EncodeBatch, GroupBatch
from research.data.trec import Run
from research.eval.metrics import DEFAULT_METRICS
from research.losses import GISTEmbedLoss, InfoNCE, RankingLoss
from research.models.bi_encoder import BiEncoder
from research.models.compile import compile_in_place
from research.models.fast_dropout import use_fast_dropout
from research.retrieval.dense import dense_search
from research.retrieval.index.encode import ShardBatch, document_embedder
from research.retrieval.index.search import ShardedIndex, search_index
from research.training.distributed import (
    all_gather_rows,
    gather_group_batch,
    id_hashes,
    is_distributed,
    world_size,
)
from research.training.embedding_cache import encode_corpus, release
from research.training.gradcache import GradCache
from research.training.sharding import (
    data_parallel_mesh,
    full_state_dicts,
    fully_shard_towers,
    no_gradient_sync,
)

Encoded = tuple[bool, list[str], Tensor]  # one eval batch: is_query, its ids, their embeddings (CPU)


class BiEncoderModule(RankingModule):
    """Contrastive training of a :class:`BiEncoder`; evaluation by exact faiss search over the eval split.

    Args:
        model: local dir, packaged model name or hub id.
        loss: any :class:`RankingLoss`; default InfoNCE over in-batch and hard negatives.
        temperature: scores are ``similarity / temperature``; ``learn_temperature`` makes it a parameter.
        in_batch_negatives: score each query against every document of the batch (else only its own group).
        distill: use the batch's teacher scores as targets (MarginMSE, KL), instead of labels. With in-batch negatives
            each row of ``[B, B*(1+n)]`` holds its own group first (its positive at column 0, MarginMSE's anchor) and
            then the other rows' documents, masked: the teacher scored only each query's own group, so in-batch
            documents have no target and add no term to a distillation loss.
        guide_model: a frozen bi-encoder (directory or name) for :class:`~research.losses.GISTEmbedLoss`, which needs
            one (and only it takes one): no gradient, eval mode, the batch's texts. With in-batch negatives the loss
            sees query-document ``[B, B*(1+n)]``, query-query ``[B, B]`` and positive-positive ``[B, B]`` pairs (a
            row's own query and positive masked), and drops every candidate the guide scores above the row's positive
            (GISTEmbed, Solatorio 2024); without, the own group's negatives. Not with ``distill`` nor with
            ``gather_across_devices`` under several processes.
        pooling, normalize, prefixes, max lengths, shared_towers: override what the model directory says.
        gather_across_devices: with in-batch negatives under a multi-process strategy, score each rank's queries
            against the documents of ALL ranks (gathered with gradient, :mod:`research.training.distributed`), so the loss and
            gradients equal one process on the concatenated global batch. Off: each rank sees only its own documents.
            No effect without in-batch negatives (each query's own group is already complete on its rank).
        gradcache_chunk_size: train with GradCache (:mod:`research.training.gradcache`): embed the batch in chunks of this many
            texts without a graph, take the loss gradient w.r.t. the embeddings, then re-embed and backpropagate chunk
            by chunk. Same gradients as full-batch backprop, activation memory of one chunk. Switches the module to
            manual optimisation (it steps optimizer and LR scheduler itself, clips with ``Trainer(gradient_clip_val)``);
            ``accumulate_grad_batches`` must stay 1. Supported on one device, ``ddp`` and fully_shard
            (``ModelParallelStrategy``); refused under DeepSpeed and Lightning's ``fsdp`` (not verified there).
        cache_corpus_embeddings: keep the eval corpus's index directory (:mod:`research.training.embedding_cache`)
            and reuse it while weights, settings, precision and corpus are unchanged (the key hashes every parameter).
            Either way each rank encodes only its share of the corpus shards and every rank searches them all.
        gradient_checkpointing: activation checkpointing in the backbone(s) (transformers'
            ``activation_checkpointing_enable``, non-reentrant): recompute layer activations in backward.
        fast_dropout: CPU training speed: cheaper dropout masks, same dropout rates
            (:func:`research.models.fast_dropout.use_fast_dropout`; evaluation outputs are unchanged).
        torch_compile: ``torch.compile`` each tower in place (dynamic shapes), after sharding if any. Off by default:
            on a 2-core CPU it measured 0.94x after a 74 s first step (``benchmarks/train_throughput.py``, docs/speed.md).

    Gradient accumulation (``Trainer(accumulate_grad_batches=k)``) is NOT a larger contrastive batch: each micro-batch
    still sees only its own in-batch negatives, so the loss is the average of k small-batch losses. To train with the
    negatives of a large batch use ``gradcache_chunk_size`` (one device) and/or ``gather_across_devices`` (many).
    """

    corpus_in_eval_batches = False  # each rank encodes its share of the corpus shards at the start of the epoch

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
        gather_across_devices: bool = False,
        gradcache_chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
        cache_corpus_embeddings: bool = True,
        fast_dropout: bool = False,
        torch_compile: bool = False,
        guide_model: str | None = None,
    ) -> None:
        super().__init__()
        if gradcache_chunk_size is not None and gradcache_chunk_size < 1:
            raise ValueError(f"gradcache_chunk_size must be >= 1 (or None), got {gradcache_chunk_size}")
        if isinstance(loss, GISTEmbedLoss) != (guide_model is not None):
            raise ValueError("GISTEmbedLoss needs a guide_model (a bi-encoder directory or name), and only it takes one: "
                             f"got loss {type(loss).__name__} and guide_model {guide_model!r}")
        if guide_model is not None and distill:
            raise ValueError("guide_model (GISTEmbedLoss) trains on labels: it does not combine with distill=True")
        self.save_hyperparameters(ignore=["loss"])
        self.encoder = self._load_encoder()
        if shared_towers is False and self.encoder.document_encoder is None:
            raise ValueError("shared_towers=False needs a model saved with separate towers")
        self.loss = loss if loss is not None else InfoNCE()
        self.guide: BiEncoder | None = None
        if guide_model is not None:
            guide = BiEncoder.from_pretrained(guide_model, trust_remote_code=trust_remote_code).eval().requires_grad_(False)
            # not a registered child: frozen weights stay out of state_dict (checkpoints), DDP and the optimizer
            object.__setattr__(self, "guide", guide)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self._index_dir = None  # this evaluation's corpus index (research.training.embedding_cache)
        self._full_state: dict[str, dict[str, Tensor]] | None = None  # gathered weights of sharded towers, for saving
        if gradient_checkpointing:  # non-reentrant: safe with DDP, FSDP and several backward passes (GradCache)
            for tower in self.towers():
                if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5
                    tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fast_dropout:
            for tower in self.towers():
                use_fast_dropout(tower)

    def _load_encoder(self) -> BiEncoder:
        hp = self.hparams
        return BiEncoder.from_pretrained(
            hp.model, trust_remote_code=hp.trust_remote_code, pooling=hp.pooling, normalize=hp.normalize,
            query_prefix=hp.query_prefix, document_prefix=hp.document_prefix, query_max_length=hp.query_max_length,
            document_max_length=hp.document_max_length, shared_towers=hp.shared_towers,
        )

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def towers(self) -> list[nn.Module]:
        """The backbone(s): the query tower, and the document tower when the towers are separate."""
        return [self.encoder.query_encoder] + ([self.encoder.document_encoder] if self.encoder.document_encoder is not None else [])

    # ------------------------------------------------------------------ scoring: one path for every mode
    def embed(self, batch: GroupBatch) -> tuple[Tensor, Tensor]:
        """Query embeddings ``[B, D]`` and document embeddings ``[B*(1+n), D]`` (query i's group at rows i*(1+n)...)."""
        queries = self.encoder(batch.queries, is_query=True)
        documents = self.encoder([d for group in batch.documents for d in group], is_query=False)
        return queries, documents

    def score_batch(self, batch: GroupBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Scores, targets and mask for the loss: ``[B, B*(1+n)]`` with in-batch negatives, else ``[B, 1+n]``
        (``[B, W*B*(1+n)]``, all ranks' documents, with ``gather_across_devices`` under W processes)."""
        return self.score_embeddings(batch, *self.embed(batch))

    def score_embeddings(self, batch: GroupBatch, queries: Tensor, documents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`score_batch` from embeddings already computed (by :meth:`embed`, or chunk-wise by GradCache)."""
        return self._score(batch, queries, documents)[:3]

    def _score(self, batch: GroupBatch, queries: Tensor, documents: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """Scores, targets, mask and the factor (W * B_r / N, 1 for equal local batches) that makes DDP's gradient
        average over ranks the gradient of the global mean loss."""
        size, group = len(batch), batch.group_size
        targets = batch.teacher_scores if self.hparams.distill else batch.targets
        if targets is None:
            raise ValueError("distill=True needs teacher scores in the training groups")
        targets = targets.to(device=queries.device, dtype=torch.float32)
        known = torch.isfinite(targets)  # teacher scores: NaN where the teacher never scored the document
        if not self.hparams.in_batch_negatives:
            scores = torch.einsum("bd,bnd->bn", queries, documents.view(size, group, -1)) * self.scale
            return scores, targets.masked_fill(~known, 0.0), known, 1.0
        if not known.all():
            raise ValueError("distill=True with in_batch_negatives=True needs a teacher score for every document of "
                             "every group (set in_batch_negatives: false to distil over the scored documents only)")
        doc_keys = id_hashes([d for ids in batch.doc_ids for d in ids], queries.device)
        offset, loss_scale = 0, 1.0
        if self.hparams.gather_across_devices and is_distributed():
            gathered = gather_group_batch(queries, documents)  # local queries x every rank's documents
            documents, offset, loss_scale = gathered.docs, gathered.doc_offset, gathered.loss_scale
            doc_keys = all_gather_rows(doc_keys, gathered.doc_sizes)
        scores = queries @ documents.T * self.scale
        own = offset + torch.arange(size, device=scores.device)[:, None] * group + torch.arange(group, device=scores.device)
        full_targets = torch.zeros(scores.shape, device=scores.device).scatter_(1, own, targets)
        in_own_group = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, own, True)
        if self.hparams.distill:
            # MarginMSE anchors at column 0 and the teacher scored the own group only: own group first, others masked
            columns = torch.arange(scores.shape[1], device=scores.device)
            order = torch.where(in_own_group, columns - own[:, :1], group + columns).argsort(dim=1)
            return scores.gather(1, order), full_targets.gather(1, order), in_own_group.gather(1, order), loss_scale
        # another row's copy of one of my positives (on any rank) is no negative: compare hashed ids
        positives = [sorted(p) for p in batch.positive_ids]
        width = max(1, max(map(len, positives)))
        positive_keys = torch.zeros(size, width, dtype=torch.long, device=scores.device)
        positive_valid = torch.zeros(size, width, dtype=torch.bool, device=scores.device)
        for i, ids in enumerate(positives):
            if ids:
                positive_keys[i, : len(ids)] = id_hashes(ids, scores.device)
                positive_valid[i, : len(ids)] = True
        is_positive = ((doc_keys[None, :, None] == positive_keys[:, None, :]) & positive_valid[:, None, :]).any(-1)
        return scores, full_targets, ~(is_positive & ~in_own_group), loss_scale

    def _loss(self, batch: GroupBatch, queries: Tensor, documents: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to backpropagate (local mean times the rank scale) and its named terms (unscaled, for logging)."""
        scores, targets, mask, loss_scale = self._score(batch, queries, documents)
        if self.guide is None:
            terms = self.loss_terms(scores, targets, mask)
        else:
            scores, targets, mask, guide_scores = self._guided(batch, queries, documents, scores, targets, mask)
            terms = self.loss.terms(scores, targets, mask, guide_scores=guide_scores)
        loss = self.total(terms)
        return loss * loss_scale if loss_scale != 1.0 else loss, terms

    def _guided(self, batch: GroupBatch, queries: Tensor, documents: Tensor, scores: Tensor, targets: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """GISTEmbed's candidates and the guide's scores of them (see ``guide_model``): with in-batch negatives
        ``[query-document | query-query | positive-positive]``, each group's first document being its positive."""
        if self.hparams.gather_across_devices and is_distributed():
            raise ValueError("guide_model with gather_across_devices: the query-query and positive-positive pairs "
                             "would need every rank's queries; not supported")
        size, group = len(batch), batch.group_size
        guide = self.guide.to(queries.device).eval()  # Lightning neither moves nor switches an unregistered module
        with torch.no_grad():
            guide_q = guide(batch.queries, is_query=True).float()
            guide_d = guide([d for docs in batch.documents for d in docs], is_query=False).float()
        if not self.hparams.in_batch_negatives:
            return scores, targets, mask, torch.einsum("bd,bnd->bn", guide_q, guide_d.view(size, group, -1))
        positive = torch.arange(size, device=queries.device) * group
        itself = torch.eye(size, dtype=torch.bool, device=scores.device)
        scores = torch.cat([scores, queries @ queries.T * self.scale,
                            documents[positive] @ documents[positive].T * self.scale], 1)
        guide_scores = torch.cat([guide_q @ guide_d.T, guide_q @ guide_q.T, guide_d[positive] @ guide_d[positive].T], 1)
        # positive-positive: another row's positive that is one of mine is masked as in the query-document part
        mask = torch.cat([mask, ~itself, mask[:, positive] & ~itself], 1)
        return scores, torch.cat([targets, targets.new_zeros(size, 2 * size)], 1), mask, guide_scores

    def log_training(self, terms: dict[str, Tensor], batch_size: int) -> None:
        super().log_training(terms, batch_size)
        if self.hparams.learn_temperature:
            self.log("train/temperature", 1.0 / self.scale.detach(), batch_size=batch_size)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: GroupBatch, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:
            return self._gradcache_step(batch)
        loss, terms = self._loss(batch, *self.embed(batch))
        self.log_training(terms, len(batch))
        return loss

    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.hparams.gradcache_chunk_size:
            return
        strategy = self.trainer.strategy
        if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
            raise ValueError(f"gradcache_chunk_size is not verified under {type(strategy).__name__}: use ddp or "
                             "fully_shard (experiments/strategies/model_parallel_fully_shard.yaml)")
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("gradcache_chunk_size replaces gradient accumulation: set accumulate_grad_batches=1 and "
                             "raise the batch size instead (GradCache keeps the memory of one chunk)")
        # Manual optimisation is switched on here rather than in __init__: Lightning's configuration check (before
        # setup) forbids Trainer(gradient_clip_val=...) with manual optimisation, and we honour it ourselves.
        self.automatic_optimization = False

    def on_train_start(self) -> None:
        self.encoder.train()  # from_pretrained returns the backbone in eval mode: dropout on for training
        model = self.trainer.strategy.model
        if (not self.automatic_optimization and self.encoder.document_encoder is not None
                and isinstance(model, nn.parallel.DistributedDataParallel) and not model.find_unused_parameters):
            raise ValueError("GradCache with separate towers under DDP: the synchronised backward (the last document "
                             "chunk) does not reach the query tower; use DDPStrategy(find_unused_parameters=True)")

    def _gradcache_step(self, batch: GroupBatch) -> None:
        """One optimizer step with GradCache: chunked embedding, cached embedding gradients, chunked backward."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad()
        queries = {k: v.to(self.device) for k, v in self.encoder.tokenize(batch.queries, is_query=True).items()}
        flat_docs = [d for group in batch.documents for d in group]
        documents = {k: v.to(self.device) for k, v in self.encoder.tokenize(flat_docs, is_query=False).items()}
        logged: dict[str, dict[str, Tensor]] = {}

        def loss_fn(q: Tensor, d: Tensor) -> Tensor:
            loss, logged["terms"] = self._loss(batch, q, d)
            return loss

        GradCache(self.hparams.gradcache_chunk_size).step(
            [(partial(self._encode_chunk, is_query=True), queries), (partial(self._encode_chunk, is_query=False), documents)],
            loss_fn, backward=self.manual_backward, no_sync=self._no_sync,
        )
        optimizer.step()  # runs on_before_optimizer_step (clipping) after precision unscaling
        if scheduler is not None:
            scheduler.step()
        self.log_training(logged["terms"], len(batch))

    def _encode_chunk(self, inputs: dict[str, Tensor], is_query: bool) -> Tensor:
        """Embed one chunk of a batch tokenized as a whole, without the padding columns it does not need."""
        if self.encoder.tokenizer.padding_side == "right":
            length = int(inputs["attention_mask"].sum(1).max())
            inputs = {k: v[:, :length] for k, v in inputs.items()}
        return self.encoder.encode(inputs, is_query)

    def _no_sync(self) -> AbstractContextManager[None]:
        """No gradient synchronisation for a GradCache chunk's backward (the last chunk syncs the accumulated sum):
        :func:`research.training.sharding.no_gradient_sync` under this trainer's strategy."""
        return no_gradient_sync(self, self.trainer.strategy)

    def on_before_optimizer_step(self, optimizer) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and self.log_scale.grad is not None and is_distributed():
            # log_scale lives outside the fully_shard-ed backbone: average its gradient over ranks as DDP would
            dist.all_reduce(self.log_scale.grad)
            self.log_scale.grad /= world_size()
        if not self.automatic_optimization:  # Lightning clips only in automatic optimisation
            self.clip_gradients(optimizer)

    # ------------------------------------------------------------------ sharding (ModelParallelStrategy: fully_shard)
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (e.g. ``research.training.strategies.FullyShardStrategy``): FSDP2 ``fully_shard``
        each transformer block (the backbone's ``_no_split_modules``) and then each tower, over the data-parallel mesh.
        Then, with ``torch_compile``, compile each tower."""
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            fully_shard_towers(self.towers(), data_parallel_mesh(self.device_mesh, "BiEncoderModule"))
        if self.hparams.torch_compile:
            for tower in self.towers():
                compile_in_place(tower)

    # evaluation: each rank encodes its share of the corpus shards at the start, queries in steps, search at the end
    def embed_documents(self, texts: list[str]) -> Tensor:
        """Document embeddings of one corpus batch (without the token cache, whose memory grows with the corpus)."""
        return document_embedder(self.encoder)(texts)

    def predict_step(self, batch: ShardBatch) -> Tensor:
        """``research index``: one shard batch's embeddings, which ``ShardWriter`` (research.training) writes."""
        return self.embed_documents(batch.texts).float().cpu()

    def _embed_through_strategy(self, texts: list[str]) -> Tensor:
        strategy = self.trainer.strategy
        if strategy.model is not None and strategy.model is not self:  # a DDP/FSDP/DeepSpeed wrapper: its forward
            return strategy._forward_redirection(strategy.model, self, "embed_documents", texts)
        return self.embed_documents(texts)

    def _start_evaluation(self, stage: str) -> None:
        """Encode the missing shards of the stage's corpus, this rank's share (none when the cache has them all)."""
        self._index_dir = None
        data = getattr(self.trainer, "datamodule", None)
        split = getattr(data, "val_data" if stage == "val" and hasattr(data, "val_data") else "eval_data", None)
        if split is None:
            return  # a DataModule without val_data/eval_data: the corpus comes in the eval batches
        with self.trainer.precision_plugin.forward_context():
            self._index_dir = encode_corpus(
                self.encoder, split.corpus, self._embed_through_strategy, model_name=str(self.hparams.model),
                precision=str(self.trainer.precision), batch_size=int(getattr(data, "hparams", {}).get("eval_batch_size", 128)),
                device_type=self.device.type, cached=self.hparams.cache_corpus_embeddings)

    def on_validation_start(self) -> None:
        self._start_evaluation("val")

    def on_test_start(self) -> None:
        self._start_evaluation("test")

    def evaluation_step(self, batch: EncodeBatch) -> Encoded | None:
        if not batch.is_query and self._index_dir is not None:
            return None  # encoded shard by shard at the start of the epoch
        return batch.is_query, batch.ids, self.encoder(batch.texts, batch.is_query).float().cpu()

    def evaluation_runs(self, collected: list[Encoded]) -> dict[str, Run]:
        """Exact inner-product search of the queries over the corpus shards (or the corpus batches collected)."""
        queries = [(ids, emb) for is_query, ids, emb in collected if is_query]
        if not queries:
            return {}
        query_ids, query_emb = [i for ids, _ in queries for i in ids], torch.cat([emb for _, emb in queries])
        if self._index_dir is None:
            documents = [(ids, emb) for is_query, ids, emb in collected if not is_query]
            if not documents:
                return {}
            doc_ids, doc_emb = [i for ids, _ in documents for i in ids], torch.cat([emb for _, emb in documents])
            return {self.main_run: dense_search(query_emb, doc_emb, query_ids, doc_ids, k=self.hparams.eval_top_k)}
        run, _ = search_index(ShardedIndex(self._index_dir), query_ids, query_emb.numpy(), k=self.hparams.eval_top_k)
        release(self._index_dir, self.hparams.cache_corpus_embeddings)
        return {self.main_run: run}

    def on_fit_end(self) -> None:
        """Under fully_shard the towers hold shards: gather full weights now, while every rank takes part, so that
        rank 0 alone can ``save_pretrained`` afterwards (the CLI saves on rank 0 only)."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or not is_distributed():
            return
        self._full_state = full_state_dicts({name: getattr(self.encoder, name) for name in ("query_encoder", "document_encoder")
                                             if getattr(self.encoder, name) is not None})

    def save_pretrained(self, directory) -> None:
        if self._full_state is None:
            self.encoder.save_pretrained(directory)
            return
        plain = self._load_encoder()  # unsharded copy with the gathered weights
        for name, state in self._full_state.items():
            getattr(plain, name).load_state_dict(state)
        plain.save_pretrained(directory)
