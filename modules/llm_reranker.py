"""LightningModule that trains a layer-wise LLM reranker (ranking loss + layer self-distillation) and evaluates it by
re-ranking candidates at a chosen exit layer."""

from __future__ import annotations

import torch
from torch import Tensor

from modules.base import RankingModule, ScoredPairs
from research.data.batches import PairBatch, PairGroupBatch
from research.data.candidates import pairs_to_run
from research.data.trec import Run
from research.eval.evaluation import Evaluation
from research.eval.metrics import DEFAULT_METRICS
from research.losses import KLDistillation, ListwiseSoftmaxCE, RankingLoss
from research.models.llm_config import LORA_TARGETS, LoraSettings
from research.models.llm_reranker import LayerwiseLLMReranker
from research.training.state_cache import CachedStates

LOGGED_ONLY = ("kl_layer", "rank_layer")  # per-layer terms that are logged but not summed into the loss


class LLMRerankerModule(RankingModule):
    """Trains a :class:`LayerwiseLLMReranker` on grouped batches (``datamodules.reranking``); validation/test re-rank
    the datamodule's candidates at ``exit_layer``.

    Loss: ``loss(final-layer scores [Q, G], targets, mask)`` (any :class:`RankingLoss`; default ``ListwiseSoftmaxCE``;
    with ``rank_every_layer`` the mean of that loss over every scored layer) plus ``distill_weight`` times the mean over
    the earlier scored layers of ``KLDistillation(temperature)`` from the final layer's scores (detached: the teacher
    gets no gradient from it) to that layer's scores. Logged: ``train/loss``, each ranking term,
    ``train/self_distillation``, ``train/kl_layer{l}`` per earlier layer and (``rank_every_layer``)
    ``train/rank_layer{l}`` per layer.

    Frozen backbone: ``freeze_backbone`` trains the layer heads only (no LoRA). With ``cache_states`` too, each pair's
    last-token states are computed once and kept on disk (:class:`~research.training.state_cache.CachedStates`,
    under ``state_cache_dir``), and training, validation and test read the heads' scores from them: one backbone pass
    per pair for any number of epochs.

    Evaluation: every scored layer's scores come from one pass; ``last_evaluation`` is the exit layer's (the CLI
    saves it), ``layer_evaluations`` holds every scored layer's, and ``{stage}/nDCG@10/layer{l}`` etc. are logged.

    Args:
        model: a causal LM (directory, packaged name such as ``HuggingFaceTB/SmolLM2-135M-Instruct``, hub id) or a
            saved reranker directory.
        readout: ``heads`` (per-layer heads, initialised to the LM-head readout) or ``lm_head`` (no new parameters).
        start_layer, layer_stride: the scored layers (1-based); ``None``: only the last layer (no self-distillation).
        exit_layer: the layer evaluation scores at (default: the last).
        lora_rank: LoRA rank (``None`` or 0: train all weights); lora_alpha, lora_dropout, lora_target_modules.
        lr: learning rate of the backbone / adapters; head_lr: of the layer heads (default ``lr``).
        dtype: backbone weights' type (``float32``; with ``bf16-mixed`` precision the compute is bfloat16).
        freeze_backbone: train the heads only; cache_states: read states from the cache (needs ``freeze_backbone``);
        state_cache_dir: the cache's root (default ``$RESEARCH_CACHE_DIR/llm_states``).
        rank_every_layer: the ranking loss on every scored layer (mean), not only the last.
    """

    log_every_term = True  # train/{ranking term} too when there is no self-distillation term

    def __init__(
        self,
        model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        loss: RankingLoss | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
        readout: str = "heads",
        scoring: str | None = None,
        start_layer: int | None = None,
        layer_stride: int = 1,
        exit_layer: int | None = None,
        max_length: int | None = None,
        query_max_length: int | None = None,
        instruction: str | None = None,
        question: str | None = None,
        lora_rank: int | None = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
        lr: float = 1e-4,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        metrics: tuple[str, ...] = DEFAULT_METRICS,
        trust_remote_code: bool = False,
        freeze_backbone: bool = False,
        cache_states: bool = False,
        state_cache_dir: str | None = None,
        rank_every_layer: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        if cache_states and not freeze_backbone:
            raise ValueError("cache_states needs freeze_backbone: true (a backbone that trains changes its states every step)")
        if freeze_backbone and lora_rank:
            raise ValueError("freeze_backbone trains the heads only: set lora_rank to 0 (or null)")
        if freeze_backbone and readout != "heads":
            raise ValueError("freeze_backbone trains the layer heads: it needs readout: heads")
        lora = None
        if lora_rank:
            lora = LoraSettings(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                target_modules=list(lora_target_modules or LORA_TARGETS))
        self.reranker = LayerwiseLLMReranker.from_pretrained(
            model, lora=lora, dtype=dtype, trainable_adapter=True, trust_remote_code=trust_remote_code,
            readout=readout, scoring=scoring, start_layer=start_layer, layer_stride=layer_stride, exit_layer=exit_layer,
            max_length=max_length, query_max_length=query_max_length, instruction=instruction, question=question,
        )
        self.reranker.train()  # from_pretrained gives eval mode; Lightning keeps each submodule's mode (LoRA dropout)
        if freeze_backbone:
            self.reranker.model.requires_grad_(False)
        if gradient_checkpointing:
            self.reranker.gradient_checkpointing_enable()
        self.exit_layer = exit_layer or self.reranker.config.exit_layer or self.reranker.num_layers
        self.reranker._check_exit_layer(self.exit_layer)
        self.loss = loss if loss is not None else ListwiseSoftmaxCE()
        self.distill = KLDistillation(temperature=distill_temperature, name="self_distillation")
        self.main_run = self._layer_run(self.exit_layer)
        self.state_cache = CachedStates(self.reranker, state_cache_dir) if cache_states else None

    # ------------------------------------------------------------------ training
    def score_batch(self, batch: PairGroupBatch) -> Tensor:
        """Scores ``[Q, G, L]`` of every scored layer (0 at masked positions); only the real pairs are run."""
        return self.score_groups(batch, self._score_texts)  # [N, L] float32 per pair

    def _score_texts(self, queries: list[str], documents: list[str], layers: list[int] | None = None) -> Tensor:
        if self.state_cache is not None:
            return self.state_cache.scores(queries, documents, layers)
        return self.reranker.score_texts(queries, documents, layers)

    def loss_terms(self, scores: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Ranking terms on the final layer, ``self_distillation`` (weighted mean KL) and ``kl_layer{l}`` (unweighted,
        logged only: not summed into the loss)."""
        final = scores[..., -1]
        terms = dict(self.loss.terms(final, targets, mask))
        if self.hparams.rank_every_layer and len(self.reranker.layers) > 1:
            per_layer = [dict(self.loss.terms(scores[..., i], targets, mask)) for i in range(len(self.reranker.layers))]
            terms = {name: torch.stack([t[name] for t in per_layer]).mean() for name in terms}
            terms.update({f"rank_layer{layer}": sum(t.values()).detach()
                          for layer, t in zip(self.reranker.layers, per_layer)})
        earlier = self.reranker.layers[:-1]
        if earlier and self.hparams.distill_weight > 0:
            teacher = final.detach()
            kls = [self.distill(scores[..., i], teacher, mask) for i in range(len(earlier))]
            terms["self_distillation"] = self.hparams.distill_weight * torch.stack(kls).mean()
            terms.update({f"kl_layer{layer}": kl.detach() for layer, kl in zip(earlier, kls)})
        return terms

    @staticmethod
    def total(terms: dict[str, Tensor]) -> Tensor:
        return torch.stack([v for k, v in terms.items() if not k.startswith(LOGGED_ONLY)]).sum()

    # ------------------------------------------------------------------ evaluation
    def evaluation_step(self, batch: PairBatch) -> ScoredPairs:
        scores = self._score_texts(batch.queries, batch.documents, self._eval_layers())
        return batch.query_ids, batch.doc_ids, scores.float().cpu()

    def _eval_layers(self) -> list[int]:
        """Every scored layer up to the exit layer (one pass, blocks up to the exit layer only), exit layer last."""
        return [l for l in self.reranker.layers if l < self.exit_layer] + [self.exit_layer]

    def on_train_epoch_end(self) -> None:
        self._flush_states()

    def on_validation_epoch_end(self) -> None:
        self._flush_states()
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._flush_states()
        super().on_test_epoch_end()

    def _flush_states(self) -> None:
        if self.state_cache is not None:
            self.state_cache.flush()

    @staticmethod
    def _layer_run(layer: int) -> str:
        return f"layer{layer}"

    def evaluation_runs(self, collected: list[ScoredPairs]) -> dict[str, Run]:
        """One run per layer of :meth:`_eval_layers`, from the same pass (logged as ``{stage}/{metric}/layer{l}``)."""
        pairs, scores = self.scored_pairs(collected)
        return {self._layer_run(layer): pairs_to_run(pairs, scores[:, i].tolist()) for i, layer in enumerate(self._eval_layers())}

    @property
    def layer_evaluations(self) -> dict[int, Evaluation]:
        """Every scored layer's evaluation up to the exit layer (exit layer last) from the latest validation or test."""
        return {layer: self.evaluations[self._layer_run(layer)] for layer in self._eval_layers()
                if self._layer_run(layer) in self.evaluations}

    # ------------------------------------------------------------------ optimisation, saving
    def no_weight_decay(self, name: str, param: Tensor) -> bool:
        return param.dim() < 2 or "norm" in name.lower()  # RMSNorm weights are "norm", not "LayerNorm"

    def parameter_groups(self) -> list[dict]:
        """The weight-decay groups of the backbone / adapters, and the layer heads in a group of their own
        (``head_lr``, no weight decay); empty groups are left out."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        heads = [p for name, p in trainable if name.startswith("reranker.heads.")]
        groups = self.weight_decay_groups((name, p) for name, p in trainable if not name.startswith("reranker.heads."))
        groups.append({"params": heads, "weight_decay": 0.0, "lr": self.hparams.head_lr or self.hparams.lr})
        return [g for g in groups if g["params"]]

    def save_pretrained(self, directory) -> None:
        """The reranker directory (LoRA: adapter + reference to the base), loadable by ``research rerank``."""
        self.reranker.save_pretrained(directory)
