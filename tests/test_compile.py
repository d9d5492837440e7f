"""The ``torch_compile`` option: towers compiled in place at ``configure_model``, state-dict keys unchanged."""

from __future__ import annotations

from research.models.compile import compile_in_place


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_in_place_keeps_keys_and_is_idempotent(tiny_model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    keys = list(model.state_dict())
    assert not _compiled(model)
    assert compile_in_place(model) is model and _compiled(model)
    first = model._compiled_call_impl
    compile_in_place(model)
    assert model._compiled_call_impl is first
    assert list(model.state_dict()) == keys


def test_modules_compile_their_backbones_only_when_asked(tiny_model_dir):
    from modules.bi_encoder import BiEncoderModule
    from modules.cross_encoder import CrossEncoderModule

    plain = BiEncoderModule(model=str(tiny_model_dir))
    plain.configure_model()
    assert not any(_compiled(t) for t in plain.towers())
    bi = BiEncoderModule(model=str(tiny_model_dir), torch_compile=True)
    assert not any(_compiled(t) for t in bi.towers())  # compiled at configure_model, after any sharding
    bi.configure_model()
    assert all(_compiled(t) for t in bi.towers())
    ce = CrossEncoderModule(model=str(tiny_model_dir), torch_compile=True)
    ce.configure_model()
    assert _compiled(ce.cross_encoder.model)
    assert not _compiled(CrossEncoderModule(model=str(tiny_model_dir)).cross_encoder.model)
