"""Reading a relevance score out of an LLM's hidden state: the answer-token scoring rules and the per-layer heads.

A rule turns the logits of the answer tokens ("Yes", and "No" for the log-odds) into one score; a head maps one
layer's last-token state onto those logits. Readouts run in float32 with autocast off, whatever the backbone's
precision, because the heads are kept in float32.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class YesLogit:
    """Score = the logit of the "Yes" token."""

    name = "yes"

    def tokens(self, yes: str, no: str) -> list[str]:
        return [yes]

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits[..., n_tokens]`` (answer-token logits) -> scores ``[...]``."""
        return logits[..., 0]


class YesNoLogOdds:
    """Score = ``logit(Yes) - logit(No)``, i.e. ``log p(Yes) - log p(No)`` under the LM's softmax (the partition cancels)."""

    name = "yes_no"

    def tokens(self, yes: str, no: str) -> list[str]:
        return [yes, no]

    def __call__(self, logits: Tensor) -> Tensor:
        return logits[..., 0] - logits[..., 1]


SCORINGS = {rule.name: rule for rule in (YesLogit, YesNoLogOdds)}
READOUTS = ("heads", "lm_head")


class LayerHeads(nn.Module):
    """Per scored layer: a copy of the final norm and a linear map onto the answer tokens, kept in float32.

    Initialised from the backbone: ``head_l(h) = W_answer @ norm(h) (+ b)`` with the LM head's answer rows, so each head
    starts as the LM-head readout of the normalised state, and the last layer's head reproduces the LM's logits.
    """

    def __init__(self, layers: list[int], final_norm: nn.Module, answer_weight: Tensor, answer_bias: Tensor | None) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({str(l): copy.deepcopy(final_norm).float() for l in layers})
        self.projections = nn.ModuleDict()
        for layer in layers:
            projection = nn.Linear(answer_weight.shape[1], answer_weight.shape[0], bias=answer_bias is not None)
            with torch.no_grad():
                projection.weight.copy_(answer_weight.float())
                if answer_bias is not None:
                    projection.bias.copy_(answer_bias.float())
            self.projections[str(layer)] = projection.float()
        for parameter in self.parameters():
            parameter.requires_grad_(True)

    def forward(self, layer: int, state: Tensor) -> Tensor:
        return self.projections[str(layer)](self.norms[str(layer)](state))


def autocast_off(device: torch.device):
    device_type = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)
