"""``torch.compile`` as a module option: compile a backbone's forward in place."""

from __future__ import annotations

from torch import nn


def compile_in_place(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward with ``dynamic=True`` (batches are padded per batch, so sequence lengths vary and
    a static graph would recompile for each one); in place, so state-dict keys and ``save_pretrained`` are unchanged.
    A second call is a no-op."""
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile(dynamic=True)
    return model
