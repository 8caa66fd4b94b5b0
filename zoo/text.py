"""Text front-ends on the shared backbone: a BERT-style encoder and a GPT-style decoder.

    model = zoo.create_model("bert_base")                 # masked-LM head, as BertForMaskedLM
    logits = model(input_ids, attention_mask=mask)        # (B, S, vocab)
    gpt = zoo.create_model("gpt_nano", attn_backend="sdpa")
    out = gpt.generate(prompt_ids, attention_mask=left_padded_mask, max_new_tokens=20)

forward returns logits, or (logits, loss) when labels are given (-100 = ignored).
Padding is a (B, S) attention_mask, 1 = real token, handed to the backbone as a
key-padding mask: the attention kernels read it per key block, never as S x S.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import KVCache, Transformer
from .config import TransformerConfig, check_bool_fields, is_finite_number, is_int
from .generation import TokenIds, check_max_new_tokens, check_sampling, decode, suppress_index
from .layers import KERNEL_DTYPES, fused_linear_gelu, make_norm, token_cross_entropy, vocab_logits
from .registry import build_config, register_model

IGNORE_INDEX = -100


def check_token_ids(ids: Tensor, vocab_size: int, name: str = "input_ids") -> Tensor:
    """Validates (B, S) integer token ids below vocab_size; returns them as int64 or int32 (the
    dtypes an embedding takes: uint8 or int16 ids are widened). Raises TypeError / ValueError
    naming `name`."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq_len), got {tuple(ids.shape)}")
    # On CPU one reduction per call buys a readable error instead of an index error deep in
    # the embedding. On an accelerator it would cost a host sync every step; there the
    # embedding's own device-side check reports bad ids.
    if not torch.compiler.is_compiling() and ids.numel() and ids.device.type == "cpu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must be in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return ids if ids.dtype in (torch.long, torch.int32) else ids.long()


def padding_mask(mask: Optional[Tensor], shape: tuple[int, int], name: str = "attention_mask") -> Optional[Tensor]:
    """A (B, S) mask with 1/True = real token as bool, or None; raises on a wrong type or shape."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _activation(kind: str):
    """The elementwise activation of an MLP type (a gated type: its gate's)."""
    return {"gelu": F.gelu, "geglu": F.gelu, "relu": F.relu, "swiglu": F.silu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[kind]


def _positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value <= 0:
            raise ValueError(f"{type(config).__name__}: {name} must be a positive int, got {value!r}")


def _with_backend(model: nn.Module, backend: str) -> None:
    model.backbone.set_attn_backend(backend)
    model.cfg = dataclasses.replace(model.cfg, backbone=model.backbone.cfg)


# --------------------------------------------------------------------------------------
# BERT
# --------------------------------------------------------------------------------------


def bert_backbone(dim: int = 768, depth: int = 12, heads: int = 12, **changes) -> TransformerConfig:
    """BERT's block: post-norm, exact GELU, LayerNorm eps 1e-12 over the embeddings too, 4x FFN."""
    values = dict(dim=dim, depth=depth, heads=heads, mlp="gelu", mlp_hidden=4 * dim, norm_eps=1e-12,
                  prenorm=False, final_norm=False, input_norm=True, positions="learned", max_seq_len=512,
                  causal=False, dropout=0.1, attn_dropout=0.1)
    return TransformerConfig(**{**values, **changes})


@dataclass
class BertConfig:
    """A BERT-style encoder: embeddings, a post-norm backbone and an optional pooler / head."""

    backbone: TransformerConfig = field(default_factory=bert_backbone)  # BERT-base blocks
    vocab_size: int = 30522  # word-piece vocabulary
    type_vocab_size: int = 2  # token types (segments A / B)
    pad_token_id: Optional[int] = 0  # its embedding row gets no gradient (None: none)
    pooler: bool = False  # dense + tanh over the first token ([CLS])
    mlm_head: bool = True  # masked-LM head tied to the word embeddings (BertForMaskedLM)
    num_classes: int = 0  # > 0: a sequence classifier on the pooled first token instead
    classifier_dropout: float = 0.1  # dropout before the classifier

    def __post_init__(self):
        check_bool_fields(self)
        _positive(self, "vocab_size", "type_vocab_size")
        if self.backbone.causal or self.backbone.cross_attention:
            raise ValueError("BertConfig: backbone must be bidirectional self-attention (causal=False, "
                             "cross_attention=False)")
        pad = self.pad_token_id
        if pad is not None and not (is_int(pad) and 0 <= pad < self.vocab_size):
            raise ValueError(f"BertConfig: pad_token_id must be an int in [0, {self.vocab_size}) or None, "
                             f"got {self.pad_token_id!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"BertConfig: num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.num_classes and self.mlm_head:
            raise ValueError("BertConfig: choose one head: mlm_head=True or num_classes > 0, not both")
        if not (is_finite_number(self.classifier_dropout) and 0.0 <= self.classifier_dropout < 1.0):
            raise ValueError(f"BertConfig: classifier_dropout must be in [0, 1), got {self.classifier_dropout!r}")


class MaskedLMHead(nn.Module):
    """dense -> activation -> norm -> logits over the vocabulary with the (tied) word embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.backbone.dim, cfg.backbone.dim)
        self.act = _activation(cfg.backbone.mlp)
        # The GELU kernel (dense's bias fused) for the GELU family; SiLU and ReLU stay torch's.
        self.kernel_gelu = None
        if cfg.backbone.kernel_ops and cfg.backbone.mlp in ("gelu", "geglu", "gelu_tanh"):
            self.kernel_gelu = "tanh" if cfg.backbone.mlp == "gelu_tanh" else "none"
        self.norm = make_norm(cfg.backbone)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x (B, S, dim), embedding (vocab, dim) -> logits (B, S, vocab)."""
        if self.kernel_gelu is not None and x.dtype in KERNEL_DTYPES:
            h = fused_linear_gelu(x, self.dense, self.kernel_gelu)
        else:
            h = self.act(self.dense(x))
        return vocab_logits(self.norm(h), embedding, self.bias)


class BertModel(nn.Module):
    """BERT-style encoder. Heads by config: masked LM (default), sequence classifier, or none.

    forward(input_ids (B, S), attention_mask (B, S) 1 = real, token_type_ids (B, S), labels):
    - mlm_head: logits (B, S, vocab); labels (B, S) with -100 = not masked.
    - num_classes > 0: logits (B, num_classes); labels (B,).
    - neither: the pooled first token (B, dim) if pooler, else hidden states (B, S, dim).
    With labels, returns (logits, cross-entropy loss).
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.backbone.dim
        self.token_embed = nn.Embedding(cfg.vocab_size, dim, padding_idx=cfg.pad_token_id)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, dim)
        self.backbone = Transformer(cfg.backbone)
        self.pooler = nn.Linear(dim, dim) if cfg.pooler or cfg.num_classes else None
        self.mlm = MaskedLMHead(cfg) if cfg.mlm_head else None
        self.classifier = None
        if cfg.num_classes:
            self.classifier = nn.Sequential(nn.Dropout(cfg.classifier_dropout), nn.Linear(dim, cfg.num_classes))
        for module in (self.token_embed, self.type_embed, self.pooler, self.mlm, self.classifier):
            if module is not None:
                _init_normal(module)

    def set_attn_backend(self, backend: str) -> None:
        """Switches the backbone's attention to "triton", "sdpa" or "eager"."""
        _with_backend(self, backend)

    def forward_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         token_type_ids: Optional[Tensor] = None) -> Tensor:
        """Hidden states (B, S, dim) of the last block. Raises ValueError / TypeError for bad inputs
        (ids out of range, shapes that disagree, sequences longer than max_seq_len)."""
        ids = check_token_ids(input_ids, self.cfg.vocab_size)
        mask = padding_mask(attention_mask, ids.shape)
        x = self.token_embed(ids)
        if token_type_ids is not None:
            types = check_token_ids(token_type_ids, self.cfg.type_vocab_size, "token_type_ids")
            if types.shape != ids.shape:
                raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(ids.shape)}, "
                                 f"got {tuple(types.shape)}")
            x = x + self.type_embed(types)
        else:
            x = x + self.type_embed.weight[0]  # every token in segment A
        return self.backbone(x, key_padding_mask=mask)

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, S, dim) hidden states -> (B, dim): tanh(dense(first token)). Raises ValueError without a pooler."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (build it with pooler=True)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """The head's logits, or (logits, loss) with labels; see the class docstring for shapes.
        Raises ValueError for labels of the wrong shape or labels without a head."""
        hidden = self.forward_features(input_ids, attention_mask, token_type_ids)
        if self.mlm is not None:
            logits = self.mlm(hidden, self.token_embed.weight)
        elif self.classifier is not None:
            logits = self.classifier(self.pool(hidden))
        else:
            if labels is not None:
                raise ValueError("labels need a head: build the model with mlm_head=True or num_classes > 0")
            return self.pool(hidden) if self.pooler is not None else hidden
        if labels is None:
            return logits
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
        loss = token_cross_entropy(logits.flatten(0, -2), labels.flatten(), self.cfg.backbone.kernel_ops, IGNORE_INDEX)
        return logits, loss


def _init_normal(module: nn.Module) -> None:
    """The backbone's init for front-end layers: N(0, 0.02) weights, zero biases, zero pad row."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()


@register_model
def bert_tiny(**overrides) -> BertModel:
    """BERT-Tiny (Turc et al. 2019): 2 layers, width 128, 2 heads, masked-LM head."""
    return BertModel(build_config(BertConfig, bert_backbone(128, 2, 2), overrides))


@register_model
def bert_mini(**overrides) -> BertModel:
    """BERT-Mini: 4 layers, width 256, 4 heads, masked-LM head."""
    return BertModel(build_config(BertConfig, bert_backbone(256, 4, 4), overrides))


@register_model
def bert_base(**overrides) -> BertModel:
    """BERT-base: 12 layers, width 768, 12 heads, FFN 3072, masked-LM head (as BertForMaskedLM)."""
    return BertModel(build_config(BertConfig, bert_backbone(768, 12, 12), overrides))


# --------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------


def gpt_backbone(dim: int = 768, depth: int = 12, heads: int = 12, **changes) -> TransformerConfig:
    """GPT-2's block: pre-norm, causal, tanh-GELU 4x MLP, learned positions, final LayerNorm."""
    values = dict(dim=dim, depth=depth, heads=heads, mlp="gelu_tanh", norm_eps=1e-5, prenorm=True,
                  final_norm=True, positions="learned", max_seq_len=1024, causal=True, dropout=0.1,
                  attn_dropout=0.1)
    return TransformerConfig(**{**values, **changes})


@dataclass
class GPTConfig:
    """A GPT-style decoder: token embedding, a causal backbone, an LM head."""

    backbone: TransformerConfig = field(default_factory=gpt_backbone)  # GPT-2 small blocks
    vocab_size: int = 50257  # GPT-2's byte-level BPE
    pad_token_id: Optional[int] = None  # what finished rows emit in generate() (None: the stop token)
    eos_token_id: Optional[Union[int, list[int]]] = None  # generate()'s stop token(s) when the call names none
    tie_embeddings: bool = True  # LM head shares the token embedding matrix

    def __post_init__(self):
        check_bool_fields(self)
        _positive(self, "vocab_size")
        if not self.backbone.causal or self.backbone.cross_attention:
            raise ValueError("GPTConfig: backbone must be causal self-attention (causal=True, cross_attention=False)")

        def token(value):
            return is_int(value) and 0 <= value < self.vocab_size

        if self.pad_token_id is not None and not token(self.pad_token_id):
            raise ValueError(f"GPTConfig: pad_token_id must be an int in [0, {self.vocab_size}) or None, "
                             f"got {self.pad_token_id!r}")
        eos = self.eos_token_id
        if eos is not None and not (token(eos) or (isinstance(eos, list) and eos and all(map(token, eos)))):
            raise ValueError(f"GPTConfig: eos_token_id must be an int in [0, {self.vocab_size}), a non-empty list "
                             f"of them, or None, got {eos!r}")


class GPT(nn.Module):
    """GPT-style decoder: (B, S) token ids -> (B, S, vocab) next-token logits.

    forward(input_ids, attention_mask=None, labels=None, position_ids=None, cache=None)
    returns logits, or (logits, loss) with labels (B, S): the loss of predicting token t+1
    from tokens <= t, -100 ignored (labels are usually input_ids). attention_mask marks
    real tokens, (B, S), or (B, cached + S) with a cache; position_ids default to 0..
    (continuing from the cache). generate() decodes with a KV cache.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.backbone.dim)
        self.backbone = Transformer(cfg.backbone)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.backbone.dim, cfg.vocab_size, bias=False)
        for module in (self.token_embed, self.lm_head):
            if module is not None:
                _init_normal(module)

    def set_attn_backend(self, backend: str) -> None:
        """Switches the backbone's attention to "triton", "sdpa" or "eager"."""
        _with_backend(self, backend)

    def new_cache(self, capacity: int = 0, leftpad: Optional[Tensor] = None) -> KVCache:
        """An empty KV cache for forward(..., cache=cache): `capacity` key slots allocated on the
        first step, `leftpad` (B,) where each left-padded row's tokens start (see zoo.KVCache)."""
        return self.backbone.new_cache(capacity, leftpad)

    def forward_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> Tensor:
        """Hidden states (B, S, dim) after the final norm. Raises ValueError / TypeError for bad inputs
        (ids out of range, a mask not covering the cached keys plus the input, positions past max_seq_len)."""
        ids = check_token_ids(input_ids, self.cfg.vocab_size)
        B, S = ids.shape
        past = cache.offset if cache is not None else 0
        mask = padding_mask(attention_mask, (B, past + S))
        if position_ids is not None and tuple(position_ids.shape) != (B, S):
            raise ValueError(f"position_ids must have shape {(B, S)}, got {tuple(position_ids.shape)}")
        return self.backbone(self.token_embed(ids), key_padding_mask=mask, position_ids=position_ids, cache=cache)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., dim) hidden states -> (..., vocab) logits."""
        return vocab_logits(hidden, self.lm_head.weight if self.lm_head is not None else self.token_embed.weight)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None):
        """Logits (B, S, vocab), or (logits, next-token loss) with labels (B, S). Appends to `cache` if given."""
        logits = self.logits(self.forward_features(input_ids, attention_mask, position_ids, cache))
        if labels is None:
            return logits
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        # Position t predicts token t + 1: the labels shift left (the last position predicts nothing),
        # not the logits, whose slice would be a (B * (S - 1), vocab) copy.
        next_tokens = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = token_cross_entropy(logits.flatten(0, 1), next_tokens.flatten(), self.cfg.backbone.kernel_ops,
                                   IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: TokenIds = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, suppress_tokens: Optional[Sequence[int]] = None
                 ) -> Tensor:
        """Continues each prompt; returns (B, P + n) ids, the prompts followed by n <= max_new_tokens new ones.

        input_ids (B, P): prompts, LEFT-padded when of different lengths, with attention_mask
        (B, P) marking the real tokens (each row's positions then start at 0). Prefills once,
        then decodes one token per step with the KV cache (on the "triton" backend, one
        kernels.flash_attn_with_kvcache call per layer and step): greedy, or sampling with
        temperature / top_k / top_p drawn from `generator`. Rows that emit a token of
        eos_token_id (int or list; default: cfg.eos_token_id; [] for none, so that every
        row gets max_new_tokens) emit pad_token_id (default: cfg.pad_token_id, else the
        first stop token) afterwards; decoding stops once all rows have. suppress_tokens:
        ids never generated (e.g. those past a tokenizer's vocabulary). Dropout stays as the
        module's mode: call eval() first. Raises ValueError for right-padded prompts, bad
        sampling options, max_new_tokens, suppress_tokens or stop/pad ids outside the
        vocabulary, or prompt + max_new_tokens - 1 past max_seq_len (the last new token is
        not fed back).
        """
        ids = check_token_ids(input_ids, self.cfg.vocab_size)
        suppress_index(suppress_tokens, self.cfg.vocab_size, ids.device)  # checked before the prefill
        B, P = ids.shape
        if P == 0:
            raise ValueError("input_ids must hold at least one prompt token per row")
        check_max_new_tokens(max_new_tokens)
        check_sampling(do_sample, temperature, top_k, top_p)
        mask = padding_mask(attention_mask, (B, P))
        leftpad = None
        longest = P
        if mask is not None:
            lengths = mask.sum(dim=1)
            leftpad = P - lengths
            if not bool((mask == (torch.arange(P, device=mask.device) >= leftpad[:, None])).all()):
                raise ValueError("generate needs LEFT-padded prompts: each row of attention_mask must be zeros "
                                 "(padding) followed by ones (the prompt)")
            if not bool((lengths > 0).all()):
                raise ValueError("every row of attention_mask must mark at least one prompt token")
            longest = int(lengths.max()) if lengths.numel() else P  # no rows: as without a mask
        limit = self.cfg.backbone.max_seq_len
        # The last new token is never fed back: the model sees prompt + max_new_tokens - 1 positions.
        if self.cfg.backbone.positions in ("learned", "sinusoidal") and longest + max_new_tokens - 1 > limit:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) - 1 is past "
                             f"max_seq_len = {limit}")
        # The cache knows the padding: keys before leftpad are never attended, and positions
        # count from it, so the steps need no mask (which the decoding kernel could not take).
        cache = self.new_cache(capacity=P + max_new_tokens, leftpad=leftpad)
        hidden = self.forward_features(ids, cache=cache)

        def step(tokens: Tensor) -> Tensor:
            return self.logits(self.forward_features(tokens[:, None], cache=cache)[:, -1])

        pad = pad_token_id if pad_token_id is not None else self.cfg.pad_token_id
        new = decode(step, self.logits(hidden[:, -1]), max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                     pad_token_id=pad, generator=generator, suppress_tokens=suppress_tokens)
        return torch.cat([ids, new.to(ids.dtype)], dim=1)


@register_model
def gpt_nano(**overrides) -> GPT:
    """A CPU-sized GPT for byte-level text: 4 layers, width 128, 4 heads, vocab 256, 256 positions."""
    return GPT(build_config(GPTConfig, gpt_backbone(128, 4, 4, max_seq_len=256, dropout=0.0, attn_dropout=0.0),
                            overrides, vocab_size=256))


@register_model
def gpt2(**overrides) -> GPT:
    """GPT-2 small (124M): 12 layers, width 768, 12 heads, vocab 50257, 1024 positions."""
    return GPT(build_config(GPTConfig, gpt_backbone(768, 12, 12), overrides))


@register_model
def gpt2_medium(**overrides) -> GPT:
    """GPT-2 medium (355M): 24 layers, width 1024, 16 heads."""
    return GPT(build_config(GPTConfig, gpt_backbone(1024, 24, 16), overrides))
