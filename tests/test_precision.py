import pytest
import torch

from research.models.runtime import PRECISIONS, inference_autocast


def test_bf16_mixed_autocasts_matmuls_and_32_true_does_not():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with inference_autocast("bf16-mixed", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with inference_autocast("32-true", "cpu"):
        assert (a @ b).dtype == torch.float32
    assert set(PRECISIONS) == {"32-true", "bf16-mixed"}


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="16-mixed"):
        inference_autocast("16-mixed", "cpu")
