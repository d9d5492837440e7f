"""FastDropout against nn.Dropout's semantics; the fast-dropout attention against sdpa and a hand-written reference;
``use_fast_dropout`` on tiny BERTs, the bi-encoder and cross-encoder modules, and the saved directory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, tiny_bert
from torch import nn

from datamodules.retrieval import RetrievalDataModule
from research.models.fast_dropout import (
    ATTENTION_NAME,
    FastDropout,
    fast_dropout,
    keep_mask,
    sdpa_fast_dropout_attention,
    use_fast_dropout,
)

TEXTS = ["rocket orbit", "the moon and the star", "bread and cheese soup recipe", "whale"]


# ------------------------------------------------------------------ dropout semantics
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_is_within_six_sigma(p):
    torch.manual_seed(0)
    n = 1_000_000
    kept = int(keep_mask((n,), p).sum())
    assert abs(kept - n * (1 - p)) <= 6 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.25])
def test_kept_values_are_scaled_and_dropped_values_are_zero(p):
    x = torch.rand(4, 7, 33) + 0.5  # no zeros: a zero output is a dropped element
    torch.manual_seed(1)
    out = FastDropout(p).train()(x)
    torch.manual_seed(1)
    mask = keep_mask(x.shape, p)
    assert torch.equal(out != 0, mask)
    assert torch.equal(out[mask], x[mask] * (1 / (1 - p)))
    assert bool((out[~mask] == 0).all())


def test_eval_mode_and_p_zero_are_identity_and_p_one_gives_zeros():
    x = torch.randn(3, 5)
    assert torch.equal(FastDropout(0.3).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(fast_dropout(x, 0.3, training=False), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_invalid_p_raises(p):
    with pytest.raises(ValueError, match="between 0 and 1"):
        FastDropout(p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fast_dropout(torch.ones(3), p, training=True)


def test_gradient_is_mask_over_keep_rate():
    x = torch.randn(6, 50, requires_grad=True)
    torch.manual_seed(2)
    fast_dropout(x, 0.2, training=True).sum().backward()
    torch.manual_seed(2)
    assert torch.equal(x.grad, keep_mask(x.shape, 0.2).float() * (1 / 0.8))


def test_same_seed_gives_the_same_mask_and_a_new_draw_another():
    torch.manual_seed(3)
    first, second = keep_mask((1001,), 0.3), keep_mask((1001,), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1001,), 0.3), first)
    assert not torch.equal(first, second)


# ------------------------------------------------------------------ attention function
class _Attention(nn.Module):
    is_causal = False


def _qkv_and_padding(dtype=torch.float64):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=dtype) for _ in range(3))
    lengths = torch.tensor([9, 5])
    keep = torch.arange(9)[None, :] < lengths[:, None]  # key padding
    return q, k, v, keep[:, None, None, :].expand(2, 1, 9, 9)


def test_attention_without_dropout_is_transformers_and_torch_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = _qkv_and_padding()
    out, weights = sdpa_fast_dropout_attention(_Attention(), q, k, v, mask, dropout=0.0, scaling=0.3)
    reference, _ = sdpa_attention_forward(_Attention(), q, k, v, mask, dropout=0.0, scaling=0.3)
    assert weights is None and out.shape == (2, 9, 3, 8)
    assert torch.equal(out, reference)
    torch_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, torch_sdpa, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "causal"])
def test_attention_with_dropout_is_math_attention_with_the_same_mask(mask_kind):
    q, k, v, keep = _qkv_and_padding()
    module = _Attention()
    if mask_kind == "bool":
        mask, additive = keep, torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    elif mask_kind == "additive":
        mask = additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, -1e4)
    else:
        module.is_causal, mask = True, None
        additive = torch.zeros(9, 9, dtype=q.dtype).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf)
    torch.manual_seed(5)
    out, _ = sdpa_fast_dropout_attention(module, q, k, v, mask, dropout=0.25, scaling=0.3)
    torch.manual_seed(5)
    probs = (q @ k.transpose(-2, -1) * 0.3 + additive).softmax(-1)
    reference = (probs * keep_mask(probs.shape, 0.25) / 0.75) @ v
    assert out.shape == (2, 9, 3, 8)
    torch.testing.assert_close(out, reference.transpose(1, 2), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ use_fast_dropout on models
def test_nothing_is_registered_at_import():
    code = ("import research.models.fast_dropout as f; from transformers import AttentionInterface; "
            "from transformers.masking_utils import AttentionMaskInterface; "
            "assert f.ATTENTION_NAME not in AttentionInterface() and f.ATTENTION_NAME not in AttentionMaskInterface()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _bert_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(6)
    input_ids = torch.randint(5, len(VOCAB), (3, 12))
    attention_mask = (torch.arange(12)[None, :] < torch.tensor([[12], [7], [3]])).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_bert_eval_outputs_are_unchanged():
    model, inputs = tiny_bert(), _bert_inputs()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        assert use_fast_dropout(use_fast_dropout(model)) is model  # idempotent
        after = model(**inputs).last_hidden_state
    assert model.config._attn_implementation == ATTENTION_NAME
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, FastDropout)] == [0.1] * 7  # embeddings + 3 per layer
    assert torch.equal(before, after)


def _bf16_train_step(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(**inputs).last_hidden_state
    hidden.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    return hidden.detach().float()


def test_bert_trains_under_bf16_autocast_with_dropout(monkeypatch):
    from transformers import AttentionInterface

    model, inputs = use_fast_dropout(tiny_bert(with_pooler=False)), _bert_inputs()
    calls: list[tuple[float, torch.dtype | None]] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((kwargs["dropout"], None if attention_mask is None else attention_mask.dtype))
        return sdpa_fast_dropout_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME, recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.eval()(**inputs).last_hidden_state.float()
    model.train()
    first, again = _bf16_train_step(model, inputs, 7), _bf16_train_step(model, inputs, 7)
    assert torch.equal(first, again)  # same seed, same masks
    assert not torch.allclose(first, reference, atol=0.05)  # dropout is on
    assert calls == [(0.0, torch.bool)] * 2 + [(0.1, torch.bool)] * 4  # BERT passes sdpa's boolean mask


def test_bi_encoder_module_trains_and_saves_a_standard_directory(tiny_model_dir, tiny_beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from modules.bi_encoder import BiEncoderModule

    L.seed_everything(0, verbose=False)
    module = BiEncoderModule(model=str(tiny_model_dir), lr=2e-3, warmup_ratio=0.0, fast_dropout=True)
    assert module.encoder.query_encoder.config._attn_implementation == ATTENTION_NAME
    start = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    data = RetrievalDataModule(str(tiny_beir_dir), train_split="train", eval_split=None, num_negatives=1, batch_size=8, seed=0)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    assert module.trainer.global_step == 1
    assert any(not torch.equal(v, start[k]) for k, v in module.encoder.state_dict().items())
    module.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert ATTENTION_NAME not in json.dumps(config) and "_attn_implementation" not in config
    module.encoder.eval()
    ours = module.encoder.encode_texts(TEXTS, is_query=False)
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    theirs = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True).cpu()
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    backbone = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert backbone.config._attn_implementation == "sdpa"
    inputs = AutoTokenizer.from_pretrained(tmp_path / "model")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = backbone(**inputs).last_hidden_state
    weights = inputs["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1), ours, atol=1e-5, rtol=1e-5)


def test_cross_encoder_module_uses_fast_dropout(tiny_model_dir):
    from modules.cross_encoder import CrossEncoderModule

    module = CrossEncoderModule(model=str(tiny_model_dir), fast_dropout=True)
    model = module.cross_encoder.model
    assert model.config._attn_implementation == ATTENTION_NAME
    assert not any(type(m) is nn.Dropout for m in model.modules())
    module.cross_encoder(TEXTS, TEXTS[::-1]).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
