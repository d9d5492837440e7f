"""Adaptive early exit of the layer-wise LLM reranker: each pair stops at the first scored layer whose calibrated
score is confident enough, so that easy documents pay for fewer decoder blocks.

Rule. At each scored layer ``l`` up to the exit layer, the pair's score ``s_l`` is calibrated to a log-odds of
relevance, ``c_l = scale_l * s_l + bias_l`` (the config's ``calibration``, fitted on labelled pairs by
:func:`fit_calibration`; without one, ``c_l = s_l``, the yes-vs-no log-odds). The pair exits at the first layer with
``|c_l| >= threshold`` (always at the exit layer) and is scored ``c_l`` there: calibrated scores of different layers
share one scale, so pairs that stopped at different depths rank against each other. Threshold 0 exits every pair at
the first scored layer, ``inf`` at the exit layer.

Cost. The decoder runs segment by segment (blocks ``a+1..b`` between consecutive scored layers, fed the hidden
states of block ``a``); after each segment the pairs that exit leave the batch and the trailing padding the rest do
not need is dropped (right padding: no real token attends to a later position), so a batch costs the blocks its
remaining pairs need. Each segment's output equals the full forward's (tested against :meth:`score_layers`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def decoder_slice(reranker, start: int, stop: int) -> Iterator[None]:
    """For the block, the decoder runs blocks ``start+1..stop`` (1-based) only: its ``layers`` list is cut, and so is
    the config's per-layer ``layer_types`` (which Qwen2 indexes by position in that list); both restored after."""
    decoder = reranker.decoder
    full = decoder.layers
    if start == 0 and stop >= len(full):
        yield
        return
    config = decoder.config
    types = getattr(config, "layer_types", None)
    decoder.layers = nn.ModuleList(list(full)[start:stop])
    if isinstance(types, list):
        config.layer_types = types[start:stop]
    try:
        yield
    finally:
        decoder.layers = full
        if isinstance(types, list):
            config.layer_types = types


def calibrate(reranker, layer: int, scores: Tensor) -> Tensor:
    """``scale * scores + bias`` with the config's calibration of ``layer`` (identity without a calibration)."""
    calibration = reranker.config.calibration
    if not calibration:
        return scores
    if str(layer) not in calibration:
        raise ValueError(f"the calibration has no layer {layer} (it has {sorted(calibration, key=int)})")
    scale, bias = calibration[str(layer)]
    return scores * scale + bias


@torch.no_grad()
def adaptive_batch(reranker, input_ids: Tensor, attention_mask: Tensor, threshold: float,
                   exit_layer: int) -> tuple[Tensor, Tensor]:
    """Calibrated scores ``[B]`` (float32) and the layer each pair exited at ``[B]`` for one right-padded batch."""
    if not threshold >= 0:
        raise ValueError(f"adaptive exit threshold must be >= 0, got {threshold}")
    layers = [layer for layer in reranker.layers if layer < exit_layer] + [exit_layer]
    device = reranker.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    scores = torch.empty(input_ids.shape[0])
    exits = torch.empty(input_ids.shape[0], dtype=torch.long)
    rows = torch.arange(input_ids.shape[0])
    hidden, done_layers = None, 0
    for layer in layers:
        captured: list[Tensor] = []
        block = reranker.decoder.layers[layer - 1]
        handle = block.register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        try:
            with decoder_slice(reranker, done_layers, layer):
                if hidden is None:
                    reranker.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                else:
                    reranker.decoder(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        hidden, done_layers = captured[-1], layer
        last = attention_mask.sum(1) - 1
        state = hidden[torch.arange(hidden.shape[0], device=device), last]
        calibrated = calibrate(reranker, layer, reranker.scoring(reranker.readout(layer, state))).float().cpu()
        stop = calibrated.abs() >= threshold if layer != exit_layer else torch.ones_like(calibrated, dtype=torch.bool)
        scores[rows[stop]] = calibrated[stop]
        exits[rows[stop]] = layer
        keep = ~stop
        if not keep.any():
            break
        rows = rows[keep]
        keep = keep.to(device)
        width = int(attention_mask[keep].sum(1).max())
        hidden, attention_mask = hidden[keep, :width], attention_mask[keep, :width]
    return scores, exits


def fit_calibration(scores: Tensor, labels: Tensor, layers: list[int], steps: int = 100) -> dict[str, list[float]]:
    """Per layer, the logistic regression ``P(relevant) = sigmoid(scale * s + bias)`` of binary ``labels [N]`` on the
    layer's scores (column ``i`` of ``scores [N, len(layers)]``), fitted by L-BFGS in float64:
    ``{str(layer): [scale, bias]}``, the config's ``calibration``."""
    if scores.shape != (labels.shape[0], len(layers)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {labels.shape[0]} labels x {len(layers)} layers")
    labels = labels.double()
    if not 0 < float(labels.sum()) < len(labels):
        raise ValueError("calibration needs both relevant and non-relevant pairs")
    calibration = {}
    for i, layer in enumerate(layers):
        column = scores[:, i].double()
        params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(params[0] * column + params[1], labels)
            loss.backward()
            return loss

        optimizer.step(closure)
        scale, bias = (float(v) for v in params.detach())
        if not (math.isfinite(scale) and math.isfinite(bias)):
            raise ValueError(f"calibration of layer {layer} did not converge (scale {scale}, bias {bias})")
        calibration[str(layer)] = [scale, bias]
    return calibration
