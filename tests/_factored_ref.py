"""The explicit float64 reference for factored projection that the projection audits share (sessions 33, 40, 43).

G_bt = g_bt [a_bt, 1]^T is formed per token in float64, normalised as the README documents (bergson's
formulas: Adam divides by sqrt(v) + eps; Adafactor adds eps to the row / column factors first, then scales by
sqrt(mean(row) / (row col))), then projected as L G R^T, summed over tokens unless ``per_token``.
"""
import torch

from gradkit import projection as P


def factored_ref(a, g, p, seed=0, name="", kind="rademacher", mask=None, bias=False, per_token=False, norm=None,
                 with_scale=False):
    """vec(L G R^T) per example (B, p*p), or per token (B, T, p*p); with ``with_scale``, also the same sum with
    every term's absolute value (the scale float32 summation error is measured against)."""
    if a.dim() == 2:
        a, g = a[:, None], g[:, None]
        mask = None if mask is None else mask.reshape(-1, 1)
    a, g = a.double(), g.double()
    B, T, I = a.shape
    O = g.shape[-1]
    if mask is not None:
        a = torch.where(mask[..., None], a, 0.0)
        g = torch.where(mask[..., None], g, 0.0)
    L = P.projection_matrix(p, O, P.derive_seed(seed, name, "left"), kind, dtype=torch.float64)
    R = P.projection_matrix(p, I + int(bias), P.derive_seed(seed, name, "right"), kind, dtype=torch.float64)
    if bias:
        ones = torch.ones(B, T, 1, dtype=torch.float64) if mask is None else mask[..., None].double()
        a = torch.cat([a, ones], -1)
    G = torch.einsum("bto,bti->btoi", g, a)
    if isinstance(norm, P.AdamNormalizer):
        G[..., :I] = G[..., :I] / (norm.v.double().sqrt() + norm.eps)
        if bias and norm.bias_avg_sq is not None:
            G[..., I] = G[..., I] / (norm.bias_avg_sq.double().sqrt() + norm.eps)
    elif isinstance(norm, P.AdafactorNormalizer):
        r, c = norm.row.double() + norm.eps, norm.col.double() + norm.eps
        G[..., :I] = G[..., :I] * (r.mean().sqrt() / r.sqrt())[:, None] / c.sqrt()[None, :]
        if bias and norm.bias_avg_sq is not None:
            G[..., I] = G[..., I] / (norm.bias_avg_sq.double() + norm.bias_eps).sqrt()
    eq = "po,btoi,qi->btpq" if per_token else "po,btoi,qi->bpq"
    shape = (B, T, p * p) if per_token else (B, p * p)
    val = torch.einsum(eq, L, G, R).reshape(shape)
    if not with_scale:
        return val
    return val, torch.einsum(eq, L.abs(), G.abs(), R.abs()).reshape(shape)
