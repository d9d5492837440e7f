"""The judge registry: one table of judge types behind parsing, reading and building specs, and its one-line errors."""

from __future__ import annotations

import pytest

from research.errors import ResearchError
from research.zelo.judges import (
    JUDGES,
    ChatJudge,
    build_ensemble,
    build_judge,
    parse_judge_spec,
    read_judge_specs,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import make_tiny_beir

    from research.data.beir import load_dataset

    return load_dataset(make_tiny_beir(tmp_path_factory.mktemp("registry_beir") / "tiny"), "train")


def test_an_unknown_parameter_names_the_judge_and_its_valid_parameters(tmp_path):
    valid = ", ".join(JUDGES["bm25"].valid)
    with pytest.raises(ResearchError) as err:
        parse_judge_spec("bm25:temprature=1.0")
    assert str(err.value) == ("judge spec 'bm25:temprature=1.0': unknown parameter 'temprature' for judge 'bm25' "
                              f"(valid: {valid})")
    assert "temperature" in valid and "k1" in valid and "weight" in valid
    (tmp_path / "j.yaml").write_text("judges:\n  - {type: model, path: d, temprature: 0.5}\n")
    with pytest.raises(ResearchError, match=r"j\.yaml: judge 0: unknown parameter 'temprature' for judge 'model' "
                                            r"\(valid: batch_size, device, "):
        read_judge_specs(tmp_path / "j.yaml")
    with pytest.raises(ResearchError, match=r"unknown parameter 'sleep' for judge 'llm' \(valid: api_key_env, "):
        build_judge({"type": "llm", "base_url": "http://h/v1", "model": "m", "sleep": 1})


def test_an_unknown_type_lists_the_valid_types():
    with pytest.raises(ResearchError, match=r"unknown judge type 'bm52' \(choose from bm25, model, llm\)"):
        parse_judge_spec("bm52:temperature=1")
    with pytest.raises(ResearchError, match=r"unknown judge type 'bm52' \(choose from bm25, model, llm\)"):
        build_judge({"type": "bm52"})


def test_required_fields_and_keys():
    with pytest.raises(ResearchError, match="judge 'model' needs path"):
        build_judge({"type": "model", "temperature": 1.0})
    with pytest.raises(ResearchError, match="api_key_env") as err:
        parse_judge_spec("llm:http://h/v1:m::api_key=sk-secret")
    assert "sk-secret" not in str(err.value)


def test_every_parameter_the_registry_lists_reaches_the_judge(data):
    spec = parse_judge_spec("llm:http://127.0.0.1:9/v1:qwen::timeout=5:workers=2:logprobs=true:name=q:weight=2")
    judge, weight = build_judge(spec)
    assert isinstance(judge, ChatJudge) and weight == 2.0
    assert (judge.url, judge.model, judge.api_key_env, judge.timeout, judge.workers, judge.logprobs, judge.name) == (
        "http://127.0.0.1:9/v1/chat/completions", "qwen", None, 5.0, 2, True, "q")
    ensemble = build_ensemble([parse_judge_spec("bm25:k1=1.2:b=0.5:stopwords=none:temperature=2"), {"type": "bm25"}],
                              data)
    tuned, default = ensemble.judges
    assert (tuned.name, default.name, tuned.temperature) == ("bm25", "bm25#2", 2.0)
    assert (tuned.scorer.config.k1, tuned.scorer.config.b, tuned.scorer.config.stopwords) == (1.2, 0.5, None)
    assert default.scorer.config.k1 == 1.5
    with pytest.raises(ResearchError, match="needs the dataset's corpus"):
        build_judge({"type": "bm25"})
