"""What every converter shares: reading a source state dict key by key, and loading the
result into a zoo model only when every tensor has found its place."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from torch import Tensor, nn


def warn_not_reproduced(source: str, what: str) -> None:
    """Warns that a training-only option of the source (a dropout) has no place in the zoo model:
    outputs in eval mode are unaffected; training mode differs from the source's."""
    warnings.warn(f"{source} import: {what} is not reproduced; eval-mode outputs are the same, "
                  f"training-mode regularization differs", UserWarning, stacklevel=3)


def warn_dropped(source: str, what: str, keys: Iterable[str]) -> None:
    """Warns that source tensors with no counterpart in the zoo model (a head it does not have)
    are left out, naming them."""
    keys = sorted(keys)
    warnings.warn(f"{source} import: {what} ({', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}) has no "
                  f"counterpart in the zoo model and is not imported", UserWarning, stacklevel=3)


def unwrap_compiled(source: Any) -> Any:
    """The module `torch.compile` wrapped (its `_orig_mod`), else `source`."""
    return getattr(source, "_orig_mod", source) if isinstance(source, nn.Module) else source


def like_source(model: nn.Module, source: Any) -> nn.Module:
    """`model` on the device and in the floating dtype of a source module's parameters (when they
    all share one), as the source was; a state dict or folder gives float32 on the CPU."""
    if not isinstance(source, nn.Module):
        return model
    params = [p for p in source.parameters() if p.is_floating_point()]
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) == 1 and len(devices) == 1 and next(iter(devices)).type != "meta":
        model = model.to(device=next(iter(devices)), dtype=next(iter(dtypes)))
    return model


class StateReader:
    """Hands out source tensors by key and remembers which were used."""

    def __init__(self, state_dict: dict[str, Tensor], prefix: str = ""):
        self.state, self.prefix, self.used = state_dict, prefix, set()

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds prefix + key."""
        return self.prefix + key in self.state

    def take(self, key: str, prefix: str | None = None) -> Tensor:
        """The tensor at prefix + key (the reader's prefix unless given), marked used; ValueError if absent."""
        full = (self.prefix if prefix is None else prefix) + key
        if full not in self.state:
            raise ValueError(f"checkpoint has no {full!r}")
        self.used.add(full)
        return self.state[full]

    def check_all_used(self, ignored_suffixes: Iterable[str] = ()) -> None:
        """Raises ValueError naming the source keys no zoo parameter took."""
        left = sorted(k for k in self.state if k not in self.used and not k.endswith(tuple(ignored_suffixes)))
        if left:
            raise ValueError(f"{len(left)} checkpoint tensor(s) have no place in the zoo model: {', '.join(left[:8])}"
                             + (" ..." if len(left) > 8 else ""))


def load_exactly(model: nn.Module, state: dict[str, Tensor], source: str,
                 keep_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Copies `state` (zoo names) into model: every entry must be used and every model tensor set,
    with equal shapes; entries under `keep_prefixes` (computed buffers, a fresh head) may stay
    as initialized. Raises ValueError listing what does not fit."""
    target = model.state_dict()
    missing = sorted(k for k in set(target) - set(state) if not k.startswith(keep_prefixes))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in sorted(set(state) & set(target))
             if state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(items)}" for label, items in
                    (("not in the source", missing), ("no place in the zoo model", unexpected),
                     ("shape (source vs zoo)", wrong)) if items]
        raise ValueError(f"cannot load {source} weights into {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=not keep_prefixes)
    return model
