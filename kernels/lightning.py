"""A Lightning callback that runs a LightningModule's attention on the kernels.

    trainer = L.Trainer(callbacks=[kernels.lightning.TritonAttention()])

Only this module imports Lightning; `import kernels` does not.
"""

from __future__ import annotations

import collections

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from . import sdpa


class TritonAttention(L.Callback):
    """For the whole run (fit, validate, test or predict), routes torch.nn.functional's
    scaled_dot_product_attention through the Triton kernels, wherever the module calls it
    (timm, Hugging Face, hand-written code), and reports which calls the kernels served
    and which fell back to torch, and why.

    Args:
        verbose: log the report at the end of each stage.
    After a stage, `report()` gives {"served", "fell_back", "fallback_reasons"}.
    """

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.counter: collections.Counter = collections.Counter()
        self._scope = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        patch, record = sdpa.patch_sdpa(), sdpa.record_routing()
        patch.__enter__()
        self._scope = (patch, record, record.__enter__())

    def _close(self) -> collections.Counter:
        """Restores torch's function and ends the stage's count; returns the stage's counts."""
        if self._scope is None:
            return collections.Counter()
        patch, record, counter = self._scope
        self._scope = None
        record.__exit__(None, None, None)
        patch.__exit__(None, None, None)
        self.counter.update(counter)
        return counter

    def teardown(self, trainer, pl_module, stage: str) -> None:
        counter = self._close()
        if self.verbose:
            report = sdpa.routing_report(counter)
            reasons = "; ".join(f"{n} x {r}" for r, n in report["fallback_reasons"].items()) or "none"
            rank_zero_info(f"TritonAttention ({getattr(stage, 'value', stage)}): {report['served']} attention calls "
                           f"served by the Triton kernels, {report['fell_back']} fell back to torch "
                           f"(reasons: {reasons})")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning skips teardown when a stage raises: torch must not stay patched.
        self._close()

    def report(self) -> dict:
        """{"served": n, "fell_back": m, "fallback_reasons": {reason: count}} over the stages so far."""
        return sdpa.routing_report(self.counter)
