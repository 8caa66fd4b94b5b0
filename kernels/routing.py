"""Route a whole model's scaled_dot_product_attention calls through the kernels, and say what happened.

    handle = kernels.triton_attention(model)     # any nn.Module: timm, Hugging Face, hand-written
    loss = model(x).sum(); loss.backward()
    print(handle.report())                       # {"served": 24, "fell_back": 0, "fallback_reasons": {}}
    handle.remove()

While the module runs its forward, torch.nn.functional.scaled_dot_product_attention is
patched (kernels.patch_sdpa); each call is served by the Triton kernel or falls back to
torch's own function, and the handle counts both, with the reasons for falling back.
The Lightning callback (kernels.lightning.TritonAttention) does the same for a run.
"""

from __future__ import annotations

import collections

from torch import nn

from . import sdpa


class AttentionRouting:
    """The hooks that patch SDPA around a module's forward; counts calls by outcome."""

    def __init__(self, module: nn.Module):
        self.counter: collections.Counter = collections.Counter()
        self._scopes = []
        # always_call: the patch ends with the forward even when the forward raises.
        self._handles = [module.register_forward_pre_hook(self._enter),
                         module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module, args):
        patch, record = sdpa.patch_sdpa(), sdpa.record_routing()
        patch.__enter__()
        counter = record.__enter__()
        self._scopes.append((patch, record, counter))

    def _exit(self, module, args, output):
        patch, record, counter = self._scopes.pop()
        record.__exit__(None, None, None)
        patch.__exit__(None, None, None)
        self.counter.update(counter)

    def report(self) -> dict:
        """{"served": n, "fell_back": m, "fallback_reasons": {reason: count}} since attaching."""
        return sdpa.routing_report(self.counter)

    def remove(self) -> None:
        """Detaches the hooks; the module runs torch's SDPA again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        while self._scopes:  # a forward still running (this is called from inside it)
            self._exit(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def triton_attention(module: nn.Module) -> AttentionRouting:
    """Routes the scaled_dot_product_attention calls made in module's forward through the kernels.

    Returns a handle with report() and remove() (also a context manager). The patch lasts
    exactly as long as each forward, also when the forward raises.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"triton_attention takes an nn.Module, got {type(module).__name__}")
    return AttentionRouting(module)
