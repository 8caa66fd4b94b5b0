"""Encoder-decoder transformer (the 2017 Transformer / T5 shape) with greedy and beam search.

    model = zoo.create_model("seq2seq_tiny", attn_backend="sdpa")
    logits, loss = model(src_ids, tgt_ids, labels=labels)
    out = model.generate(src_ids, max_new_tokens=20, num_beams=4)

The encoder and the decoder are two instances of the shared backbone: the encoder
bidirectional with a source key-padding mask, the decoder causal with cross-attention to
the encoder output (the source mask is its memory_padding_mask).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import KVCache, Transformer
from .config import TransformerConfig, check_bool_fields, is_finite_number, is_int
from .generation import check_sampling, decode, suppress, suppress_index
from .layers import token_cross_entropy, vocab_logits
from .registry import register_model
from .text import padding_mask


@dataclass
class Seq2SeqConfig:
    """An encoder-decoder: two backbones, two vocabularies, special token ids."""

    src_vocab_size: int = 128  # source vocabulary
    tgt_vocab_size: int = 128  # target vocabulary
    share_embeddings: bool = False  # one table for source and target tokens (needs equal vocab sizes)
    tie_lm_head: bool = True  # the LM head reuses the target embedding matrix
    scale_embeddings: bool = True  # multiply embeddings by sqrt(dim), as the 2017 paper
    pad_id: int = 0  # padding token (also what finished rows emit while others decode)
    bos_id: int = 1  # first decoder input token
    eos_id: int = 2  # end of a target sequence
    encoder: TransformerConfig = field(default_factory=TransformerConfig)  # bidirectional stack
    decoder: TransformerConfig = field(  # causal stack with cross-attention
        default_factory=lambda: TransformerConfig(causal=True, cross_attention=True))

    def __post_init__(self):
        check_bool_fields(self)
        for name in ("src_vocab_size", "tgt_vocab_size"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"Seq2SeqConfig: {name} must be a positive int, got {value!r}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"Seq2SeqConfig: {name} must be a token id in [0, {self.tgt_vocab_size}), "
                                 f"got {value!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"Seq2SeqConfig: share_embeddings needs src_vocab_size == tgt_vocab_size, got "
                             f"{self.src_vocab_size} and {self.tgt_vocab_size}")
        if self.encoder.causal or self.encoder.cross_attention:
            raise ValueError("Seq2SeqConfig: the encoder must have causal=False and cross_attention=False")
        if not (self.decoder.causal and self.decoder.cross_attention):
            raise ValueError("Seq2SeqConfig: the decoder must have causal=True and cross_attention=True")
        if self.encoder.dim != self.decoder.dim:
            raise ValueError(f"Seq2SeqConfig: encoder.dim ({self.encoder.dim}) must equal decoder.dim "
                             f"({self.decoder.dim}): cross-attention reads the encoder output")


def build_seq2seq_config(encoder: TransformerConfig, decoder: TransformerConfig, overrides: dict,
                         **preset) -> Seq2SeqConfig:
    """A Seq2SeqConfig from a preset's two backbones and flat overrides.

    The two-backbone counterpart of zoo.registry.build_config. An override may name:
    a Seq2SeqConfig field (``tgt_vocab_size=1000``); ``encoder=`` / ``decoder=`` a whole
    TransformerConfig; ``encoder_<field>`` / ``decoder_<field>`` a backbone field of one
    side (``decoder_depth=2``); or a plain backbone field, applied to both sides
    (``attn_backend="sdpa"``, ``dim=256``). Unknown names raise TypeError with close matches.
    """
    model_fields = {f.name for f in dataclasses.fields(Seq2SeqConfig)} - {"encoder", "decoder"}
    backbone_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    sides = {"encoder": encoder, "decoder": decoder}
    changes: dict[str, dict] = {"encoder": {}, "decoder": {}}
    model_values = dict(preset)
    for key, value in overrides.items():
        side, _, name = key.partition("_")
        if key in sides:
            if not isinstance(value, TransformerConfig):
                raise TypeError(f"{key} must be a TransformerConfig, got {type(value).__name__}")
            sides[key] = value
        elif key in model_fields:
            model_values[key] = value
        elif key in backbone_fields:  # both sides, unless a side's own override says otherwise (below)
            for part in ("encoder", "decoder"):
                changes[part].setdefault(key, value)
        elif side in sides and name in backbone_fields:
            changes[side][name] = value  # the more specific override wins, whatever the order
        else:
            known = sorted(model_fields | backbone_fields | {f"{s}_{n}" for s in sides for n in backbone_fields})
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"Seq2SeqConfig has no option {key!r}{hint}")
    built = {s: sides[s].replace(**changes[s]) if changes[s] else sides[s] for s in sides}
    return Seq2SeqConfig(**built, **model_values)


def shift_tokens_right(labels: Tensor, bos_id: int, pad_id: int) -> Tensor:
    """Teacher-forcing decoder inputs (B, S) from labels (B, S): bos, then labels[:, :-1].

    Ignored label positions (-100) become pad_id.
    """
    inputs = labels.new_full(labels.shape, pad_id)
    inputs[:, 0] = bos_id
    inputs[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return inputs


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not is_int(value) or value < 1:  # not a bool: True would decode one token
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class Seq2SeqTransformer(nn.Module):
    """Token embeddings -> encoder backbone; token embeddings -> decoder backbone -> LM head."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder.dim
        self.src_embed = nn.Embedding(cfg.src_vocab_size, dim)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, dim)
        self.encoder = Transformer(cfg.encoder)
        self.decoder = Transformer(cfg.decoder)
        self.lm_head = nn.Linear(dim, cfg.tgt_vocab_size, bias=False)
        # Scaled embeddings start at std dim**-0.5 so that after * sqrt(dim) they have unit
        # scale, the size of the sinusoidal positions they are added to (fairseq's choice).
        std = dim ** -0.5 if cfg.scale_embeddings else 0.02
        nn.init.normal_(self.src_embed.weight, std=std)
        if not cfg.share_embeddings:
            nn.init.normal_(self.tgt_embed.weight, std=std)
        if cfg.tie_lm_head:
            self.lm_head.weight = self.tgt_embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        self.embed_scale = math.sqrt(dim) if cfg.scale_embeddings else 1.0

    def set_attn_backend(self, backend: str) -> None:
        """Switches both stacks to "triton", "sdpa" or "eager"."""
        self.encoder.set_attn_backend(backend)
        self.decoder.set_attn_backend(backend)
        self.cfg = dataclasses.replace(self.cfg, encoder=self.encoder.cfg, decoder=self.decoder.cfg)

    def _check_ids(self, ids: Tensor, name: str, vocab: int) -> Tensor:
        """ids (B, S) of any integer dtype, returned as int64 or int32 (uint8/int16 widened, as
        GPT's); raises TypeError / ValueError naming `name`."""
        integer = isinstance(ids, Tensor) and not (ids.dtype.is_floating_point or ids.dtype.is_complex
                                                    or ids.dtype == torch.bool)
        if not integer or ids.dim() != 2:
            raise TypeError(f"{name} must be an integer tensor of shape (B, S), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        # Value check on CPU only: on an accelerator it would be a host sync per step, and the
        # embedding's device-side check reports bad ids there.
        if (ids.numel() and ids.device.type == "cpu" and not torch.compiler.is_compiling()
                and (int(ids.min()) < 0 or int(ids.max()) >= vocab)):
            raise ValueError(f"{name} holds ids outside [0, {vocab})")
        return ids if ids.dtype in (torch.long, torch.int32) else ids.long()

    def encode(self, src_ids: Tensor, src_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Encoder states (B, Ss, dim) and the source mask used (B, Ss) bool.

        src_mask marks real tokens (True); when None it is `src_ids != pad_id`.
        Raises TypeError/ValueError for malformed ids or a mask of the wrong shape.
        """
        src_ids = self._check_ids(src_ids, "src_ids", self.cfg.src_vocab_size)
        # Kept even when nothing is padded: testing for that would cost a host sync per step
        # and a graph break under torch.compile.
        src_mask = src_ids != self.cfg.pad_id if src_mask is None else padding_mask(src_mask, src_ids.shape, "src_mask")
        x = self.src_embed(src_ids) * self.embed_scale
        return self.encoder(x, key_padding_mask=src_mask), src_mask

    def _encode_sources(self, src_ids: Tensor, src_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """encode() for decoding, which needs a real token in every source (ValueError naming the row)."""
        memory, src_mask = self.encode(src_ids, src_mask)
        empty = (~src_mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"every source must hold at least one real token (row {empty[0]} has none: "
                             f"{'no source positions' if src_ids.shape[-1] == 0 else 'all masked or pad_id'}); "
                             f"its target would be decoded from no source at all")
        return memory, src_mask

    def decode_step(self, tgt_ids: Tensor, memory: Tensor, src_mask: Optional[Tensor] = None,
                    cache: Optional[KVCache] = None, tgt_mask: Optional[Tensor] = None) -> Tensor:
        """Decoder logits (B, St, tgt_vocab) for tgt_ids (B, St) attending to memory (B, Ss, dim).

        With a cache (`model.decoder.new_cache()`), tgt_ids are the new tokens only and
        positions continue from the cache; tgt_mask (1/True = real token, any integer or bool
        dtype) then covers all decoder keys so far. Raises TypeError / ValueError for
        malformed ids or a tgt_mask of the wrong type or shape.
        """
        tgt_ids = self._check_ids(tgt_ids, "tgt_ids", self.cfg.tgt_vocab_size)
        past = cache.offset if cache is not None else 0
        tgt_mask = padding_mask(tgt_mask, (tgt_ids.shape[0], past + tgt_ids.shape[1]), "tgt_mask")
        x = self.tgt_embed(tgt_ids) * self.embed_scale
        h = self.decoder(x, key_padding_mask=tgt_mask, memory=memory, memory_padding_mask=src_mask, cache=cache)
        return vocab_logits(h, self.lm_head.weight)

    def forward_features(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Optional[Tensor] = None,
                         tgt_mask: Optional[Tensor] = None) -> Tensor:
        """Decoder hidden states (B, St, dim), before the LM head.

        src_mask (B, Ss) and tgt_mask (B, St) mark real tokens (1/True; any integer or bool
        dtype, as Hugging Face's attention masks). Raises TypeError / ValueError for malformed
        ids or masks of the wrong type or shape.
        """
        memory, src_mask = self.encode(src_ids, src_mask)
        tgt_ids = self._check_ids(tgt_ids, "tgt_ids", self.cfg.tgt_vocab_size)
        tgt_mask = padding_mask(tgt_mask, tuple(tgt_ids.shape), "tgt_mask")
        x = self.tgt_embed(tgt_ids) * self.embed_scale
        return self.decoder(x, key_padding_mask=tgt_mask, memory=memory, memory_padding_mask=src_mask)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """Teacher-forced logits (B, St, tgt_vocab); with labels (B, St), (logits, loss).

        tgt_ids are the decoder inputs (bos + target[:-1], see shift_tokens_right) and
        labels the tokens to predict at the same positions; label -100 is ignored.
        tgt_mask (B, St) marks real decoder tokens; right padding needs none (the causal
        mask already hides later positions and the loss ignores -100).
        """
        logits = vocab_logits(self.forward_features(src_ids, tgt_ids, src_mask, tgt_mask), self.lm_head.weight)
        if labels is None:
            return logits
        if labels.shape != tgt_ids.shape:
            raise ValueError(f"labels must have the shape of tgt_ids {tuple(tgt_ids.shape)}, got {tuple(labels.shape)}")
        loss = token_cross_entropy(logits.flatten(0, 1), labels.flatten(), self.cfg.decoder.kernel_ops)
        return logits, loss

    @torch.no_grad()
    def generate(self, src_ids: Tensor, src_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
                 num_beams: int = 1, length_penalty: float = 1.0, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, suppress_tokens: Optional[Sequence[int]] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Decodes target sequences (B, 1 + n): bos, the tokens, eos, then pad_id to the longest.

        num_beams=1 is greedy, or with do_sample draws each token from the softmax of its
        logits / temperature, filtered by top_k and top_p, with `generator` (as GPT.generate,
        through zoo.generation.decode); a finished row emits pad_id until all rows finish.
        More beams is beam_search, which does not sample. Both run the encoder once and the
        decoder one token at a time with its KV cache; the ids of suppress_tokens are never
        generated. bos_id / eos_id default to the config's; a negative eos_id means no stop
        token. Raises ValueError for a source without a real token, max_new_tokens < 1,
        num_beams < 1 (or not an int), do_sample, top_k or top_p with num_beams > 1, bad
        sampling options, bad suppress_tokens, bos_id or eos_id outside the target vocabulary
        (TypeError if not an int), or past what the decoder's learned/sinusoidal positions
        reach (all checked before decoding).
        """
        _check_positive(num_beams=num_beams)
        if num_beams != 1:
            if top_k is not None or top_p is not None:
                raise ValueError(f"top_k and top_p filter sampling; beam search (num_beams={num_beams}) does not "
                                 f"sample: leave them None")
            if do_sample:
                raise ValueError(f"do_sample=True needs num_beams=1 (beam search does not sample), got "
                                 f"num_beams={num_beams!r}")
            return self.beam_search(src_ids, src_mask, max_new_tokens, num_beams, length_penalty, bos_id, eos_id,
                                    suppress_tokens)
        _check_positive(max_new_tokens=max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        self._check_length(max_new_tokens)
        suppress_index(suppress_tokens, self.cfg.tgt_vocab_size, src_ids.device)  # checked before encoding
        bos, eos = self._special_ids(bos_id, eos_id)
        memory, src_mask = self._encode_sources(src_ids, src_mask)
        cache = self.decoder.new_cache(capacity=1 + max_new_tokens)
        start = torch.full((memory.shape[0], 1), bos, dtype=torch.long, device=memory.device)

        def step(tokens: Tensor) -> Tensor:
            return self.decode_step(tokens[:, None], memory, src_mask, cache)[:, -1]

        new = decode(step, step(start[:, 0]), max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos if eos >= 0 else None,
                     pad_token_id=self.cfg.pad_id, generator=generator, suppress_tokens=suppress_tokens)
        return torch.cat([start, new], dim=1)

    def _special_ids(self, bos_id: Optional[int], eos_id: Optional[int]) -> tuple[int, int]:
        """(bos, eos) of a generate call: the arguments, else the config's.

        bos must be a target id; a negative eos means no stop token (every row decodes
        max_new_tokens). Raises TypeError for a non-int (one stop token only, not a list)
        and ValueError for an id past the target vocabulary (it could never be emitted, so
        decoding would silently never stop).
        """
        bos = self.cfg.bos_id if bos_id is None else bos_id
        eos = self.cfg.eos_id if eos_id is None else eos_id
        vocab = self.cfg.tgt_vocab_size
        for name, value in (("bos_id", bos), ("eos_id", eos)):
            if not is_int(value):
                raise TypeError(f"{name} must be an int (one token id), got {value!r}")
        if not 0 <= bos < vocab:
            raise ValueError(f"bos_id {bos} is outside the target vocabulary [0, {vocab})")
        if eos >= vocab:
            raise ValueError(f"eos_id {eos} is outside the target vocabulary [0, {vocab}) (a negative eos_id "
                             f"means no stop token)")
        return bos, eos

    def _check_length(self, max_new_tokens: int) -> None:
        # The decoder sees bos and every new token but the last: max_new_tokens positions.
        dec = self.cfg.decoder
        if dec.positions in ("learned", "sinusoidal") and max_new_tokens > dec.max_seq_len:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) is past the decoder's max_seq_len = "
                             f"{dec.max_seq_len} (it sees bos and every new token but the last)")

    @torch.no_grad()
    def beam_search(self, src_ids: Tensor, src_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
                    num_beams: int = 4, length_penalty: float = 1.0, bos_id: Optional[int] = None,
                    eos_id: Optional[int] = None, suppress_tokens: Optional[Sequence[int]] = None) -> Tensor:
        """Each row's best hypothesis (B, 1 + n) under beam search, laid out as generate's.

        A hypothesis scores sum(log p) / len**length_penalty, len counting generated
        tokens (eos included, bos not). As in Hugging Face and fairseq, an eos candidate
        becomes a finished hypothesis only when it ranks in the top num_beams of its step,
        and a row stops once it holds num_beams finished hypotheses and its best live beam,
        normalized at its current length, cannot beat the worst of them (with one beam
        this is exactly greedy). Beams still live after max_new_tokens finish there. The ids
        of suppress_tokens are never generated. Raises ValueError for max_new_tokens < 1,
        num_beams < 1, a length_penalty that is not a finite number, bad suppress_tokens, or
        bos_id / eos_id as generate does.
        """
        _check_positive(max_new_tokens=max_new_tokens, num_beams=num_beams)
        if not is_finite_number(length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        self._check_length(max_new_tokens)
        banned = suppress_index(suppress_tokens, self.cfg.tgt_vocab_size, src_ids.device)
        bos, eos = self._special_ids(bos_id, eos_id)
        K, alpha = num_beams, length_penalty
        memory, src_mask = self._encode_sources(src_ids, src_mask)
        B, device = memory.shape[0], memory.device
        memory = memory.repeat_interleave(K, dim=0)
        src_mask = src_mask.repeat_interleave(K, dim=0) if src_mask is not None else None
        cache = self.decoder.new_cache(capacity=1 + max_new_tokens)
        seqs = torch.full((B * K, 1), bos, dtype=torch.long, device=device)
        # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
        scores = torch.full((B, K), -math.inf, dtype=torch.float32, device=device)  # whatever the default dtype
        scores[:, 0] = 0.0
        hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B

        def add(b: int, score: float, tokens: list[int]) -> None:
            hyps[b].append((score / len(tokens) ** alpha, tokens))
            hyps[b].sort(key=lambda h: h[0], reverse=True)
            del hyps[b][K:]

        for step in range(max_new_tokens):
            logits = self.decode_step(seqs[:, -1:], memory, src_mask, cache)[:, -1]
            V = logits.shape[-1]
            log_probs = suppress(F.log_softmax(logits.float(), dim=-1), banned)
            candidates = (scores.view(-1, 1) + log_probs).view(B, K * V)
            # At most K of the top 2K are eos (one per beam), so K live candidates remain.
            top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=1)
            next_beam = torch.arange(K, device=device).repeat(B, 1)
            next_token = torch.full((B, K), self.cfg.pad_id, dtype=torch.long, device=device)
            next_scores = torch.full((B, K), -math.inf, dtype=torch.float32, device=device)
            for b in range(B):
                if done[b]:
                    continue
                k = 0
                for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                    beam, token = divmod(index, V)
                    if token == eos:
                        if rank < K and score > -math.inf:
                            add(b, score, seqs[b * K + beam, 1:].tolist() + [eos])
                        continue
                    next_beam[b, k], next_token[b, k], next_scores[b, k] = beam, token, score
                    k += 1
                    if k == K:
                        break
                best_live = float(next_scores[b].max()) / (step + 1) ** alpha
                done[b] = len(hyps[b]) == K and best_live <= hyps[b][-1][0]
            if all(done):
                break
            index = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)
            seqs = torch.cat([seqs[index], next_token.view(-1, 1)], dim=1)
            cache.reorder(index)
            scores = next_scores
        else:
            for b in range(B):
                if not done[b]:
                    for k in range(K):
                        if scores[b, k] > -math.inf:
                            add(b, float(scores[b, k]), seqs[b * K + k, 1:].tolist())
        best = [hyps[b][0][1] for b in range(B)]
        out = torch.full((B, 1 + max(len(t) for t in best)), self.cfg.pad_id, dtype=torch.long, device=device)
        out[:, 0] = bos
        for b, tokens in enumerate(best):
            out[b, 1:1 + len(tokens)] = torch.tensor(tokens, device=device)
        return out


@register_model
def seq2seq_tiny(**overrides) -> Seq2SeqTransformer:
    """A CPU-sized encoder-decoder: 2 + 2 pre-norm layers, width 128, 4 heads, vocab 128."""
    backbone = TransformerConfig(dim=128, depth=2, heads=4, mlp="relu", mlp_ratio=4.0, positions="sinusoidal",
                                 max_seq_len=256)
    return Seq2SeqTransformer(build_seq2seq_config(
        backbone, backbone.replace(causal=True, cross_attention=True), overrides,
        src_vocab_size=128, tgt_vocab_size=128))


@register_model
def transformer_base(**overrides) -> Seq2SeqTransformer:
    """The base Transformer of "Attention Is All You Need": 6 + 6 layers, 512 wide, 8 heads, FFN 2048.

    ReLU FFN, sinusoidal positions, dropout 0.1, a 37000-token shared source/target
    vocabulary (the paper's WMT EN-DE BPE) with embeddings and softmax tied.
    """
    # Pre-norm rather than the paper's post-norm: it trains stably without a tuned
    # warm-up (Xiong et al. 2020) and is what tensor2tensor and fairseq later defaulted
    # to. It adds one final LayerNorm per stack; prenorm=False, final_norm=False gives
    # the 2017 layout.
    backbone = TransformerConfig(dim=512, depth=6, heads=8, mlp="relu", mlp_hidden=2048, positions="sinusoidal",
                                 max_seq_len=1024, dropout=0.1)
    return Seq2SeqTransformer(build_seq2seq_config(
        backbone, backbone.replace(causal=True, cross_attention=True), overrides,
        src_vocab_size=37000, tgt_vocab_size=37000, share_embeddings=True))
