"""Decoding helpers shared by every decoder: logit filters, token choice, stop tokens, the loop.

A model's generate() prefills its cache, then hands `decode` a `step` function that
feeds the chosen tokens back in and returns the next logits. Greedy, temperature,
top-k and top-p sampling follow Hugging Face's order (temperature, then top-k, then
top-p), so a seeded run is comparable with theirs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .config import is_finite_number

TokenIds = Union[int, Sequence[int], None]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """logits (..., V) with all but the k largest of each row set to -inf.

    Ties with the k-th largest value are kept. Raises ValueError unless k is a positive int.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """logits (..., V) keeping, per row, the smallest set of tokens whose probability mass is >= p.

    Tokens are taken from the most likely down; the most likely token is always kept
    (nucleus sampling). Raises ValueError unless 0 < p <= 1.
    """
    if not is_finite_number(p) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A token is needed while the mass of the more likely ones is still short of p.
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Validates sampling options up front, before a prefill is spent on them.

    Greedy decoding (do_sample=False) ignores them. With sampling, raises ValueError for
    a non-positive temperature, a top_k that is not a positive int, or a top_p outside (0, 1].
    """
    if not do_sample:
        return
    # `not x > 0` rather than `x <= 0`: NaN fails every comparison and would reach the sampler.
    if not is_finite_number(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not is_finite_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Raises ValueError unless max_new_tokens is an int >= 0."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")


def choose_tokens(logits: Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token of each row, (B,) int64, from next-token logits (B, V).

    Greedy (argmax) unless do_sample; sampling divides by temperature, then applies
    top_k and top_p filters, then draws from the softmax with `generator` (seeded
    runs are reproducible). Raises ValueError for bad sampling options (see check_sampling).
    """
    check_sampling(do_sample, temperature, top_k, top_p)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shifted by the row's largest logit first: the same softmax, and a tiny temperature then sends
    # the others to -inf (greedy in the limit) rather than every logit to +-inf (NaN).
    top = logits.amax(dim=-1, keepdim=True)
    logits = (logits - torch.where(top.isfinite(), top, torch.zeros_like(top))) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_tensor(eos_token_id: TokenIds, device) -> Optional[Tensor]:
    """eos_token_id (an int, a list of ints or None) as a 1-D int64 tensor, or None.

    None and an empty list both mean "no stop token" (GPT.generate reads an empty list as
    "none for this call", overriding the config's). Raises TypeError for anything else.
    """
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, (str, bytes)) or not isinstance(eos_token_id, (int, list, tuple)):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def suppress_index(suppress_tokens: Optional[Sequence[int]], vocab_size: int, device) -> Optional[Tensor]:
    """suppress_tokens (ids never to be generated, as Hugging Face's option) as an int64 index, or None.

    Raises TypeError for a non-int id and ValueError for one outside [0, vocab_size) or
    for a list that covers the whole vocabulary (nothing would be left to generate).
    """
    if suppress_tokens is None:
        return None
    ids = list(suppress_tokens)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"suppress_tokens must be a sequence of ints, got {suppress_tokens!r}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"suppress_tokens holds {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
    if len(set(ids)) == vocab_size:
        raise ValueError(f"suppress_tokens covers all {vocab_size} ids: nothing is left to generate")
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def suppress(logits: Tensor, index: Optional[Tensor]) -> Tensor:
    """logits (..., V) with the ids of `index` at -inf (unchanged when index is None)."""
    return logits if index is None else logits.index_fill(-1, index, float("-inf"))


def resolve_pad_token(pad_token_id: Optional[int], eos: Optional[Tensor]) -> Optional[int]:
    """The id finished rows emit: pad_token_id, else the first stop token (as Hugging Face), else None.

    Raises TypeError for a pad_token_id that is not an int."""
    if pad_token_id is not None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):  # int(1.5) would be a silent 1
            raise TypeError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
        return int(pad_token_id)
    return int(eos[0]) if eos is not None else None


def decode(step: Callable[[Tensor], Tensor], logits: Tensor, *, max_new_tokens: int, do_sample: bool = False,
           temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None, suppress_tokens: Optional[Sequence[int]] = None) -> Tensor:
    """Autoregressive decoding: the new tokens (B, n), n <= max_new_tokens.

    logits (B, V): next-token logits after the prompt (the prefill's last position).
    step(tokens (B,)) -> (B, V): feeds the chosen tokens to the model (with its cache)
    and returns the following logits; it is not called after the last token. A row
    that emits one of eos_token_id is finished and emits pad_token_id (default: the
    first stop token) from then on; decoding ends early once every row is finished.
    The ids of suppress_tokens are never chosen. Raises ValueError for max_new_tokens < 0,
    bad sampling options, bad suppress_tokens (see suppress_index), or a stop or pad token
    outside the vocabulary.
    """
    check_max_new_tokens(max_new_tokens)
    check_sampling(do_sample, temperature, top_k, top_p)
    banned = suppress_index(suppress_tokens, logits.shape[-1], logits.device)
    eos = stop_token_tensor(eos_token_id, logits.device)
    pad = resolve_pad_token(pad_token_id, eos)
    vocab = logits.shape[-1]
    outside = [] if eos is None else [i for i in eos.tolist() if not 0 <= i < vocab]
    if outside:  # a stop token the model cannot emit would never stop anything
        raise ValueError(f"eos_token_id holds {outside[0]}, outside the model's vocabulary [0, {vocab})")
    if pad is not None and not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id {pad} is outside the model's vocabulary [0, {vocab})")
    B = logits.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    new_tokens = []
    for i in range(max_new_tokens):
        tokens = choose_tokens(suppress(logits, banned), do_sample=do_sample, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator)
        if eos is not None:
            tokens = tokens.masked_fill(finished, pad)
            finished = finished | torch.isin(tokens, eos)
        new_tokens.append(tokens)
        if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
            break
        logits = step(tokens)
    if not new_tokens:
        return logits.new_zeros((B, 0), dtype=torch.long)
    return torch.stack(new_tokens, dim=1)
