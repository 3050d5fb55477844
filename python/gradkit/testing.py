"""Small, download-free models and data for tests, examples and benchmarks.

``tiny_gpt`` builds a GPT-2-style causal transformer in plain torch whose parameter names follow
Hugging Face's GPT-2 layout, so name-pattern code written for real checkpoints (``*.attn.*``,
``transformer.h.<i>.``, ``lm_head.weight``) works on it unchanged::

    transformer.wte.weight            (vocab, d_model)     token embedding
    transformer.wpe.weight            (n_ctx, d_model)     learned positions
    transformer.h.<i>.ln_1.{weight,bias}
    transformer.h.<i>.attn.c_attn.{weight,bias}   (3*d_model, d_model)   fused q, k, v (nn.Linear layout)
    transformer.h.<i>.attn.c_proj.{weight,bias}   (d_model, d_model)
    transformer.h.<i>.ln_2.{weight,bias}
    transformer.h.<i>.mlp.c_fc.{weight,bias}      (4*d_model, d_model)
    transformer.h.<i>.mlp.c_proj.{weight,bias}    (d_model, 4*d_model)
    transformer.ln_f.{weight,bias}
    lm_head.weight                    (vocab, d_model)     not tied to wte

Linear weights are ``nn.Linear`` (out, in), not GPT-2's transposed ``Conv1D``. There is no dropout,
so train and eval mode compute the same function.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _int(v, what: str, lo: int) -> int:
    """``v`` as an int >= ``lo`` (numpy integers too), else TypeError / ValueError naming ``what`` (a float, a bool
    or a string reached torch's constructors and failed there without naming the argument)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{what}: must be >= {lo}, got {v}")
    return v


def _seed(v) -> int:
    """A seed torch.Generator.manual_seed takes (any int in [-2^63, 2^64)), named when it is not."""
    v = _int(v, "seed", -(1 << 63))
    if v >= 1 << 64:
        raise ValueError(f"seed: must be < 2^64, got {v}")
    return v


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = _MLP(d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT-2-style pre-LayerNorm causal transformer (see the module docstring for parameter names).

    ``forward(input_ids (B, T) int, attention_mask (B, T) 0/1 or bool = None) -> logits (B, T, vocab)``
    in the parameters' dtype. Query ``t`` attends to keys ``<= t`` whose attention_mask is set, and
    always to itself (so padded positions give finite, meaningless logits instead of NaN).
    """

    def __init__(self, vocab: int, n_layer: int, d_model: int, n_head: int, n_ctx: int) -> None:
        super().__init__()
        vocab, n_layer = _int(vocab, "vocab", 1), _int(n_layer, "n_layer", 0)
        d_model, n_head, n_ctx = _int(d_model, "d_model", 1), _int(n_head, "n_head", 1), _int(n_ctx, "n_ctx", 1)
        if d_model % n_head:
            raise ValueError(f"n_head: must divide d_model={d_model}, got {n_head}")
        self.vocab = vocab
        self.n_ctx = n_ctx
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d_model),
            wpe=nn.Embedding(n_ctx, d_model),
            h=nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(d_model),
        ))
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, T), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t > self.n_ctx:
            raise ValueError(f"input_ids: sequence length {t} exceeds n_ctx={self.n_ctx}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab:  # torch's embedding: "index out of range in self" (CPU), a device assert
                raise ValueError(f"input_ids: token ids must be in [0, vocab={self.vocab}), got values in [{lo}, {hi}]")
        dev = input_ids.device
        allowed = torch.ones(t, t, dtype=torch.bool, device=dev).tril().expand(b, 1, t, t)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            keys = attention_mask.to(device=dev, dtype=torch.bool)[:, None, None, :]
            allowed = (allowed & keys) | torch.eye(t, dtype=torch.bool, device=dev)
        tr = self.transformer
        x = tr.wte(input_ids) + tr.wpe(torch.arange(t, device=dev))
        for block in tr.h:
            x = block(x, allowed)
        return self.lm_head(tr.ln_f(x))


def tiny_gpt(vocab: int = 97, n_layer: int = 4, d_model: int = 32, n_head: int = 4, n_ctx: int = 64,
             seed: int = 0, init_std: Optional[float] = None) -> TinyGPT:
    """A randomly initialised :class:`TinyGPT` (CPU, fp32), identical for identical arguments.

    Linear and embedding weights ~ N(0, init_std^2) (default ``d_model ** -0.5``, so activations
    and logits are O(1) and the output distributions are far from uniform); the residual output
    projections (``attn.c_proj``, ``mlp.c_proj``) are further scaled by ``1/sqrt(2 * n_layer)``
    as in GPT-2; biases are 0; LayerNorms are (1, 0). The global RNG is left untouched.
    """
    seed = _seed(seed)
    if init_std is not None:
        if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) or not math.isfinite(init_std) \
                or init_std < 0:
            raise ValueError(f"init_std: expected None or a finite number >= 0, got {init_std!r}")
    # torch's own initialisation in the layers' constructors draws from the global RNG (and is then overwritten):
    # its state is restored, so that building a model does not change what the caller's later random calls give
    state = torch.get_rng_state()
    try:
        model = TinyGPT(vocab, n_layer, d_model, n_head, n_ctx)
    finally:
        torch.set_rng_state(state)
    std = d_model ** -0.5 if init_std is None else float(init_std)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def random_batches(n: int, batch: int = 2, seq: int = 16, vocab: int = 97, seed: int = 0,
                   pad_id: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``n`` batches ``{"input_ids": (batch, seq) int64, "attention_mask": (batch, seq) int64}``.

    Token ids are uniform in ``[1, vocab)``; padded positions hold ``pad_id``. Row 0 of every
    batch is unpadded; every other row is right-padded to a random length in ``[seq // 2, seq]``
    (at least 2 real tokens), with ``pad_id`` tokens and attention_mask 0 after its length.
    A list, so it can be iterated more than once; identical for identical arguments.
    """
    n, batch, seq, vocab = _int(n, "n", 0), _int(batch, "batch", 1), _int(seq, "seq", 2), _int(vocab, "vocab", 2)
    seed, pad_id = _seed(seed), _int(pad_id, "pad_id", -(1 << 63))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=gen)
        lengths = torch.randint(max(2, seq // 2), seq + 1, (batch,), generator=gen)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask})
    return out
