"""StructuredOBS: Optimal Brain Surgeon pruning of a weight to a scope pattern.

Semantics follow SparseKit's ``StructuredOBS`` (the peer users migrate from); the
algorithms are re-derived here, not copied.

Notation: ``W`` is ``(M, K)`` (out x in features), ``H = X^T X`` is ``(K, K)`` and
``C = (H + damp I)^-1`` (``damp < 1``: relative to the mean of ``diag(H)``; ``>= 1``:
absolute). Pruning a set ``P`` of a row's weights with OBS compensation moves the row
to ``w - C[:, P] C[P, P]^-1 w_P`` and downdates the row's inverse to
``C - C[:, P] C[P, P]^-1 C[P, :]``.

``prune_true_obs`` never stores or updates a K x K matrix per row. The downdates of
one row compose: after pruning ``P`` (the union of everything pruned so far),
``C_row = C - U U^T`` with ``U = C[:, P] L^-T`` and ``L L^T = C[P, P]`` (a Cholesky
factor grown block by block as batches are pruned), and the compensated weights are
``w - U z`` with ``z = L^-1 w_P``. A batch therefore only needs ``U`` on the columns
still to be scored, the per-batch work is two small GEMMs and a triangular solve, and
the final weights come from one ``(K x |P|)`` product with the original ``C``. The
result equals the Schur-downdate recursion in exact arithmetic (tests check it against a
float64 reference that runs the recursion literally) and is better conditioned than
accumulating K x K downdates in fp16.
"""
from __future__ import annotations

import math
import numbers
import time
from itertools import combinations
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor

from gradkit import ops
from gradkit._rules import FLOATS, all_finite, flag, int_arg
from gradkit.obs.layout import ObsLayout, obs_layout
from gradkit.obs.baselines import _dead_inputs
from gradkit.obs.metrics import dead_diagonal
from gradkit.obs.metrics import _check_symmetric, cast_finite

__all__ = ["StructuredOBS", "compute_inverse", "MAX_SUBSETS"]

MAX_SUBSETS = 20000  # joint scoring enumerates C(gs, gs - nnz) subsets per scope; refuse beyond this
_SCORE_EPS = 1e-8  # added to diag(C) when scoring (as the peer does), in units of mean(diag(C)): see StructuredOBS
_REFINE_STEPS = 3  # iterative refinement steps of the final weights with a half-precision factor
_BLOCK_EPS = 1e-4  # ridge on C[b, b] when scoring whole blocks of a row-coupled scope (as the peer does; absolute)


# --------------------------------------------------------------------------- checks


def _check_matrix(h, k: Optional[int], what: str) -> Tensor:
    if not isinstance(h, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(h).__name__}")
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{what}: expected a square (K, K) matrix, got shape {tuple(h.shape)}")
    if k is not None and h.shape[0] != k:
        raise ValueError(f"{what}: is {h.shape[0]} x {h.shape[1]} but the scope's weight has {k} columns "
                         f"(in features)")
    if h.dtype not in FLOATS:
        # session 43: a float8 matrix passed is_floating_point() and then failed in the symmetry check with torch's
        # NotImplementedError ("aminmax_cpu" not implemented for 'Float8_e4m3fn'), naming no argument
        raise TypeError(f"{what}: expected a floating dtype (fp16/bf16/fp32/fp64), got {h.dtype}")
    if h.device.type == "meta":  # every check below reads values (torch: "Tensor.item() cannot be called ...")
        raise ValueError(f"{what}: is a meta tensor (no data); pass the materialised matrix")
    if not all_finite(h):
        raise ValueError(f"{what}: contains NaN or Inf")
    # an inverse from an LU solve (e.g. SparseKit's inv_h) carries more round-off asymmetry than X^T X
    _check_symmetric(h, what, 1e-2 if what == "inv_h" else 1e-3)
    return h


def _check_nnz(nnz, gs: int) -> int:
    # numpy integers (and 0-d integer tensors) too, as ScopeSpec.get_masks / hard_threshold, the baselines and the
    # SparseKit peer take them; the baselines' rule and messages (gradkit._rules.int_arg)
    return int_arg(nnz, "nnz", "an int (blocks kept per scope)", 0, "blocks kept per scope")


def _damp_value(h: Tensor, damp: float) -> float:
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):  # as gradkit.obs.metrics' rule
        raise TypeError(f"damp: expected a real number, got {type(damp).__name__}")
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp: expected a finite number >= 0, got {damp!r}")
    if damp >= 1.0:
        return float(damp)
    return float(damp) * float(torch.diagonal(h.detach()).double().mean()) if h.shape[0] else 0.0


def compute_inverse(hessian: Tensor, damp: float = 1e-4) -> Tensor:
    """``(H + d I)^-1`` with ``d = damp * mean(diag(H))`` for ``damp < 1``, else ``d = damp``.

    Cholesky (never an LU inverse: batched/large ``linalg.inv`` is unreliable on some oneMKL
    builds) in the Hessian's precision (float64 for float64, else float32, as the peer's inverse). Dead inputs
    (``H[j, j] == 0``) are decoupled first, as every gradkit OBS routine does (``gradkit.obs.metrics``), so
    ``damp=0`` works on a layer fed by a dead unit. Raises when the damped matrix is not positive definite."""
    _check_matrix(hessian, None, "hessian")
    d = _damp_value(hessian, damp)
    dt = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    h = hessian.to(dt, copy=True)
    dead = h.diagonal() == 0  # an input that is always zero: decoupled as in gradkit.obs.metrics.damped_hessian
    if bool(dead.any()):
        h.diagonal()[dead] = dead_diagonal(h.diagonal(), dead)
    h.diagonal().add_(d)
    L, info = torch.linalg.cholesky_ex(h)  # reads the lower triangle only
    if int(info) != 0:
        raise ValueError(f"hessian: not positive definite even after damping (damp={damp!r} -> {d:.3g} added to "
                         f"the diagonal; leading minor {int(info)} fails); raise damp")
    return torch.cholesky_inverse(L)


def _check_inv_h(inv_h, k: int) -> Tensor:
    """A user's ``(H + damp I)^-1``: square, finite, symmetric and positive definite. An indefinite matrix
    would otherwise be used silently (its pruned sub-blocks can each be positive definite, so every method
    ran and compensated with it); one Cholesky, a third of the inversion it replaces."""
    _check_matrix(inv_h, k, "inv_h")
    dt = torch.float64 if inv_h.dtype == torch.float64 else torch.float32
    _, info = torch.linalg.cholesky_ex(inv_h.detach().to(dt))
    if int(info) != 0:
        raise ValueError(f"inv_h: is not positive definite (leading minor {int(info)} fails); expected the damped "
                         f"inverse Hessian (H + damp I)^-1, e.g. StructuredOBS.compute_inverse(H, damp)")
    return inv_h


def _check_progress(progress, what: str):
    """``progress`` / ``progress_fn`` as None, a Python bool or a callable(str): a bool or numpy's ``bool_``
    (:func:`gradkit._rules.flag`'s rule) becomes a bool; anything else (a string, a number) used to open a tqdm
    bar because it was truthy, and is a TypeError naming ``what``."""
    if progress is None or callable(progress):
        return progress
    try:
        return flag(progress, what)
    except TypeError:
        raise TypeError(f"{what}: expected None, a bool or a callable(str), got {type(progress).__name__}") from None


def _progress(progress, total: int, desc: str):
    """(update(n, msg), close()) for progress=None/False, True (tqdm) or a callable(str)."""
    if progress is None or progress is False:
        return (lambda n=1, msg="": None), (lambda: None)
    if callable(progress):
        state = {"i": 0}

        def upd(n=1, msg=""):
            state["i"] += n
            progress(f"{desc} {state['i']}/{total}" + (f" ({msg})" if msg else ""))

        return upd, (lambda: progress(""))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    return (lambda n=1, msg="": bar.update(n)), bar.close


def _map_chunks(fn, items, device):
    """fn over items in order. On CPU with T > 1 intra-op threads, T chunks run at once on Python
    threads, each op single-threaded: the per-chunk ops are small batched factorisations and GEMMs
    whose intra-op parallelism costs more in synchronisation than it gains (measured 4x slower at
    2 threads on this machine), while independent chunks scale."""
    nt = torch.get_num_threads()
    if device.type != "cpu" or nt <= 1 or len(items) <= 1:
        for it in items:
            yield fn(it)
        return
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=nt) as ex:
            futs = [ex.submit(fn, it) for it in items]
            try:
                for f in futs:
                    yield f.result()
            finally:
                for f in futs:
                    f.cancel()
    finally:
        torch.set_num_threads(nt)


def _rowmin(x: Tensor) -> Tensor:
    """Row minimum of an (S, e) integer tensor (torch's integer amin over a short inner dim is ~100x
    slower than elementwise minimum over its columns)."""
    if x.shape[1] > 64:
        return x.min(1).values
    out = x[:, 0].clone()
    for j in range(1, x.shape[1]):
        torch.minimum(out, x[:, j], out=out)
    return out


# --------------------------------------------------------------------------- structure


class _Plan:
    """Row groups and the shared column template a scope induces on its weight.

    Rows are grouped so that every scope lies inside one group (a group is one row unless
    scopes couple rows). Every row must see the same sequence of columns, scope by scope
    (true for N:M, column-paired and row-coupled patterns): ``keys`` lists each scope slot's
    columns in the template, and ``slot_scopes[g, q]`` is the scope id of slot ``q`` in group
    ``g``.
    """

    def __init__(self, lay: ObsLayout):
        self.lay = lay
        elems, K = lay.elems, lay.K
        S = lay.S
        dev = elems.device
        self.coupled = lay.row_coupled
        if S and (S * lay.gs * lay.bk) == lay.M * K and K % (lay.gs * lay.bk) == 0 and torch.equal(
                elems.view(-1), torch.arange(lay.M * K, device=dev)):
            # row-major runs of whole scopes (N:M, 1 x b blocks): the plan is a reshape
            Q = K // (lay.gs * lay.bk)
            self.G, self.R, self.Q = lay.M, 1, Q
            self.group_rows = torch.arange(lay.M, device=dev)[:, None]
            self.slot_scopes = torch.arange(S, device=dev).view(lay.M, Q)
            self.t_col = torch.arange(K, device=dev).view(Q, lay.gs, lay.bk)
            self.t_lrow = torch.zeros_like(self.t_col)
            self.block_single_row = True
            self.row_major = True  # each row: Q consecutive scopes of gs * bk columns (the fused kernels' layout)
            return
        self.row_major = False
        rows, cols = elems // K, elems % K
        # --- row groups: connected components of rows through scopes (label propagation)
        r_flat = rows.reshape(S, -1)
        lab = torch.arange(lay.M, device=dev)
        for _ in range(64 if lay.row_coupled else 0):
            smin = _rowmin(lab[r_flat])
            new = lab.clone()
            new.scatter_reduce_(0, r_flat.reshape(-1), smin[:, None].expand_as(r_flat).reshape(-1), "amin")
            new = new[new]  # pointer jumping
            if torch.equal(new, lab):
                break
            lab = new
        scope_group_row = lab[r_flat[:, 0]]
        used_rows = torch.nonzero(torch.bincount(r_flat.reshape(-1), minlength=lay.M)).squeeze(1)
        glabels, group_of_row = torch.unique(lab[used_rows], return_inverse=True)
        G = glabels.numel()
        # rows of each group, ascending
        order = torch.argsort(group_of_row * lay.M + used_rows)
        rows_sorted = used_rows[order]
        counts = torch.bincount(group_of_row, minlength=G)
        R = int(counts[0])
        if not bool((counts == R).all()):
            raise NotImplementedError("scope: row groups of different sizes (scopes couple different numbers of "
                                      "rows); not supported")
        self.group_rows = rows_sorted.view(G, R)  # (G, R)
        self.G, self.R = G, R
        # --- slots: scopes of each group ordered by their first column
        g_of_scope = torch.searchsorted(glabels, scope_group_row)
        first_col = _rowmin(cols.reshape(S, -1))
        sorder = torch.argsort(g_of_scope * (K + 1) + first_col, stable=True)
        per_g = torch.bincount(g_of_scope, minlength=G)
        Q = int(per_g[0])
        if not bool((per_g == Q).all()):
            raise NotImplementedError("scope: row groups hold different numbers of scopes; not supported")
        self.slot_scopes = sorder.view(G, Q)
        self.Q = Q
        # local row of every element (position of its row within its group)
        local = torch.empty(lay.M, dtype=torch.long, device=dev)
        local[self.group_rows.reshape(-1)] = torch.arange(R, device=dev).repeat(G)
        ss = self.slot_scopes
        self.elem_lrow = local[rows[ss]]  # (G, Q, gs, bk)
        self.elem_col = cols[ss]  # (G, Q, gs, bk)
        if G > 1 and not (bool((self.elem_col == self.elem_col[:1]).all())
                          and bool((self.elem_lrow == self.elem_lrow[:1]).all())):
            raise NotImplementedError("scope: row groups see different column layouts; not supported")
        self.t_col = self.elem_col[0]  # (Q, gs, bk) template columns
        self.t_lrow = self.elem_lrow[0]  # (Q, gs, bk) template local rows
        # a block may span rows; blocks whose elements share a row score as one block-piece
        blk_rows = self.t_lrow.reshape(Q, lay.gs, lay.bk)
        self.block_single_row = bool((blk_rows == blk_rows[..., :1]).all())


# --------------------------------------------------------------------------- the pruner


def _true_obs_options(ng: Optional[int] = 64, chunk_size: int = 16, order: str = "left_to_right",
                     scoring: str = "independent", c_dtype: Optional[torch.dtype] = None,
                     progress_fn: Union[None, bool, Callable[[str], None]] = None, progress=None, mode: str = "obs",
                     return_mask: bool = False):
    """:meth:`StructuredOBS.prune_true_obs`'s options, checked (its defaults): also what ``prune_model`` checks of
    ``method_kwargs`` before any work. Returns ``(ng, chunk_size, return_mask, progress_fn, progress)``."""
    if mode not in ("obs", "resolve"):
        raise ValueError(f"mode: expected 'obs' or 'resolve', got {mode!r}")
    if order not in ("left_to_right", "largest_first"):
        raise ValueError(f"order: expected 'left_to_right' or 'largest_first', got {order!r}")
    if scoring not in ("independent", "joint"):
        raise ValueError(f"scoring: expected 'independent' or 'joint', got {scoring!r}")
    # the factor buffer is what gradkit.ops.obs_schur_extend_ writes: float32 / bfloat16 / float16 (session 43: float64
    # passed this check and was refused by the op part-way through the pruning, as "ut: expected ...")
    if c_dtype is not None and c_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"c_dtype: expected float32, bfloat16 or float16, got {c_dtype}")
    # numpy integers too (as nnz); a float or a bool is a TypeError, < 1 a ValueError
    chunk_size = int_arg(chunk_size, "chunk_size", "an int >= 1", 1)
    ng = None if ng is None else int_arg(ng, "ng", "an int >= 1 or None", 1)
    return_mask = flag(return_mask, "return_mask")
    return (ng, chunk_size, return_mask, _check_progress(progress_fn, "progress_fn"),
            _check_progress(progress, "progress"))


def _prune_options(block_size: int = 2048, compensate: str = "local", n_splits: int = 1, return_mask: bool = False):
    """:meth:`StructuredOBS.prune`'s options, checked (its defaults): also what ``prune_model`` checks of
    ``method_kwargs`` before any work. Returns ``(block_size, n_splits, return_mask)``."""
    if compensate not in ("local", "full", "split", "interleaved"):
        raise ValueError(f"compensate: expected 'local', 'full', 'split' or 'interleaved', got {compensate!r}")
    n_splits = int_arg(n_splits, "n_splits", "an int >= 1", 1)
    block_size = int_arg(block_size, "block_size", "an int >= 1", 1)
    return block_size, n_splits, flag(return_mask, "return_mask")


class StructuredOBS:
    """OBS pruner for one 2-D weight and its scope pattern (blocks compete inside each scope).

    Args:
        scope: ``gradkit.scope.ScopeSpec`` over one ``BlockSpec`` of a 2-D weight ``(M, K)``.
        hessian: ``(K, K)`` symmetric PSD (``X^T X`` of the layer inputs).
        damp: ridge added to ``H`` before inverting (``< 1``: relative to ``mean(diag(H))``).
        inv_h: a precomputed ``(H + damp I)^-1`` (skips the inversion; refused unless symmetric positive
            definite, checked by one Cholesky: SparseKit uses an indefinite one silently).

    Every method prunes into a float32 copy and writes the weight back only when it
    succeeds (a non-finite result, or one that overflows an fp16 / bf16 weight's dtype, raises
    RuntimeError naming the layer and leaves the weight untouched, as ``prune_model`` does);
    ``nnz >= blocks per scope`` is a documented no-op, and so is any ``nnz`` on a weight with 0 rows or
    0 columns (SparseKit raises IndexError). ``nnz`` (and every other int argument) may be a numpy integer, as
    for ``ScopeSpec``.

    Dead inputs (``H[j, j] == 0``: the input was always 0 in calibration) make their weights free to prune: every
    method (each compensation mode, true OBS in either scoring) scores them 0, as if ``W[:, j]`` were 0 (SparseGPT's
    rule), so within the pattern they are pruned first; those the pattern keeps keep their value, and nothing is
    compensated into or out of them. The inverse still decouples the dead diagonal as ``compute_inverse`` does
    (SparseKit scores them against that diagonal and keeps them).

    Scale: every method works with ``C / mean(diag(C))``, so the scoring epsilon the peer adds (``1e-8`` to
    ``diag(C)`` and to ``C[P, P]``, and to the determinant of the closed form for two pruned elements) is relative
    to the scale of ``C``, and masks and weights are invariant to a positive scale of ``H``, as the rest of
    :mod:`gradkit.obs` is. The peer adds it to ``C`` itself, sized for its ``H = X^T X / N``; with the unnormalised
    ``X^T X`` that :func:`gradkit.obs.collect_hessians` returns (``N`` times larger, ``C`` ``N`` times smaller) the
    absolute epsilon outweighed ``C``: ``scoring="joint"`` with two pruned elements per scope then ranked subsets by
    ``w^T adj(C_PP) w`` and chose a non-optimal one (1.2x to 9x the optimal OBS cost) in 9 of 16 rows of an 8-input
    layer whose ``H`` summed 262k tokens. On ``H / N`` of unit-scale inputs the two agree. One exception: the
    row-coupled block ridge (``1e-4``, the peer's, ``scoring="independent"`` on row-coupled scopes) stays absolute in
    ``C``, so those masks still depend on the scale of ``H`` (as the peer's do).
    """

    def __init__(self, scope, hessian: Tensor, damp: float = 1e-4, inv_h: Optional[Tensor] = None):
        self.scope = scope
        self.layout = obs_layout(scope)  # an empty weight: S = 0 scopes, every method a no-op
        lay = self.layout
        if lay.weight.dtype not in FLOATS:
            # session 42: an integer weight was pruned with its compensated values truncated on the write back
            # (the baselines refuse it with this message)
            raise TypeError(f"scope: the pruned weight must be floating, got {lay.weight.dtype}")
        self.block = scope.block
        self.hessian = _check_matrix(hessian, lay.K, "hessian")
        self.damp = damp
        _damp_value(hessian, damp)
        self.W = lay.weight
        self.M, self.num_cols, self.bk = lay.M, lay.K, lay.bk
        self.blocks_per_scope = lay.gs
        self.row_coupled = lay.row_coupled
        if inv_h is not None:
            self.inv_hessian = _check_inv_h(inv_h, lay.K)
        else:
            self.inv_hessian = self.compute_inverse(hessian.detach(), damp)  # never differentiated here
        # (K,) bool on the weight's device, or None: the inputs that were always 0 in calibration (H[j, j] == 0 in
        # the inverse's precision, as compute_inverse decides, and the whole row 0)
        self._dead = _dead_inputs(hessian, self.W.device,
                                  torch.float64 if hessian.dtype == torch.float64 else torch.float32)
        # the unit every method works in: C / mean(diag(C)) (see the class docstring)
        cs = float(torch.diagonal(self.inv_hessian.detach()).double().mean()) if lay.K else 1.0
        self._cs = cs if math.isfinite(cs) and cs > 0 else 1.0
        self._plan: Optional[_Plan] = None

    compute_inverse = staticmethod(compute_inverse)

    @property
    def plan(self) -> _Plan:
        if self._plan is None:
            self._plan = _Plan(self.layout)
        return self._plan

    # ------------------------------------------------------------------ shared pieces
    def _start(self, nnz) -> Optional[int]:
        """Validates; returns the number of blocks pruned per scope (None: nothing to do)."""
        nnz = _check_nnz(nnz, self.blocks_per_scope)
        # every method writes the weight back: an inference tensor is refused outside inference mode before any work
        # (session 43: the write-back's copy_ wrote it and then raised torch's RuntimeError, after the whole pruning)
        ops._check_not_inference((self.W,), "weight (the scope's parameter)")
        if nnz >= self.blocks_per_scope or self.W.numel() == 0:  # nothing to prune (an empty weight: no scope)
            return None
        w = self.W.detach()
        if not all_finite(w):
            raise ValueError("weight: contains NaN or Inf")
        return self.blocks_per_scope - nnz

    def _write_back(self, w: Tensor, method: str) -> None:
        """The pruned float32 weights into the model's weight, or a RuntimeError with the weight untouched:
        the rule of ``gradkit.obs.driver.prune_model`` (which checks each layer before writing it), so a
        direct call is as safe: the result must be finite, and stay finite once rounded to the weight's
        dtype (an fp16 / bf16 weight whose compensated entries exceed its range would become inf)."""
        what = self._what()
        if not all_finite(w):
            raise RuntimeError(f"{method} produced non-finite weights for {what}")
        final = cast_finite(w.view_as(self.W), self.W.dtype,
                            f"{method}: the pruned weights of {what} overflow the weight's dtype")
        # an in-place copy under no_grad, not through .data: it bumps the version counter, so an
        # autograd graph that saved the dense weight raises on backward instead of using the pruned one
        with torch.no_grad():
            self.W.copy_(final)

    def _what(self) -> str:
        """The pruned weight in messages: the scope's (or its BlockSpec's) name when it has one."""
        name = getattr(self.scope, "name", None) or getattr(self.block, "name", None)
        return f"layer {name!r}" if name else f"the scope's weight (shape {tuple(self.W.shape)})"

    def _c32(self) -> Tensor:
        """C in float32 on the weight's device, divided by ``mean(diag(C))`` (``self._cs``): the scoring epsilons
        are then relative, and every mask and weight is invariant to a positive scale of H (compensation and
        downdates are homogeneous in C)."""
        return self.inv_hessian.to(device=self.W.device, dtype=torch.float32) / self._cs

    def _zero_dead(self, W: Tensor) -> Optional[Tensor]:
        """Weights on dead inputs cost nothing to prune (their input is always 0): zeroed in the working copy ``W``
        (as SparseGPT does), they score 0 in every method and are pruned first within the pattern. ``C`` has the dead
        rows and columns decoupled (``C[j, i] = 0``), so nothing compensates into or out of them. Returns their
        values (``None`` when no input is dead), for :meth:`_restore_dead`."""
        if self._dead is None:
            return None
        saved = W[:, self._dead]
        W[:, self._dead] = 0.0
        return saved

    def _restore_dead(self, W: Tensor, keep: Tensor, saved: Optional[Tensor]) -> None:
        """Dead-input weights the pattern keeps keep their value (as ``metrics.resolve`` keeps them)."""
        if saved is not None:
            W[:, self._dead] = saved.masked_fill_(~keep[:, self._dead], 0.0)

    # ------------------------------------------------------------------ true OBS
    @torch.no_grad()
    def prune_true_obs(self, nnz: int, ng: Optional[int] = 64, chunk_size: int = 16, order: str = "left_to_right",
                       scoring: str = "independent", c_dtype: Optional[torch.dtype] = None,
                       progress_fn: Union[None, bool, Callable[[str], None]] = None, *, progress=None,
                       mode: str = "obs", return_mask: bool = False):
        """Per-row OBS with Schur downdates: each row keeps its own inverse, updated after every batch.

        Args:
            nnz: blocks kept per scope.
            ng: scopes decided per batch (from the inverse as it stands when the batch starts).
                For row-coupled scopes the peer decides one column slot at a time; ``ng=None``
                gives 64 for ordinary scopes and 1 for row-coupled ones.
            chunk_size: rows processed together (whole row groups).
            order: ``"left_to_right"`` or ``"largest_first"`` (slots with the largest OBS cost
                under the undowndated inverse first).
            scoring: ``"independent"``: each block on its own, ``w^2 / diag(C)`` summed over the
                block (row-coupled: the block's own OBS cost ``w_b^T C[b,b]^-1 w_b``), lowest
                pruned; ``"joint"``: the exact OBS cost of every prune subset of the scope
                (``C(gs, gs-nnz)`` subsets; refused above ``MAX_SUBSETS``).
            c_dtype: storage of the per-row factors (float32 default; bfloat16 / float16 halve
                the memory; arithmetic is float32 either way). With a half-precision factor the final
                weights are refined against the float32 C (up to ``_REFINE_STEPS`` steps of iterative
                refinement, each kept per row only while it lowers the estimated loss): at the documented
                damping they are the exact re-solve on the chosen support to 1e-3.
            progress_fn / progress: ``True`` for a tqdm bar, or a callable receiving messages.
            mode: ``"obs"`` (above) or ``"resolve"``: SparseGPT's mask, then the exact
                least-squares re-solve of every row on it, ``w - C[:, P] C[P, P]^-1 w_P``, computed
                by the same factor machinery with P fixed to the mask (no scoring; ``ng``,
                ``chunk_size`` and ``c_dtype`` apply; row-coupled scopes use one batched Cholesky
                per row instead). It has a lower error than true OBS and is about 5x faster than
                SparseKit's true OBS, but it costs SparseGPT plus the factor, so on a 2-thread CPU it
                is not faster than gradkit's own ``"obs"`` mode (benchmarks/results/obs-cpu-2t.md).
            return_mask: also return the parameter-shaped bool keep mask.
        """
        ng, chunk_size, return_mask, progress_fn, progress = _true_obs_options(
            ng, chunk_size, order, scoring, c_dtype, progress_fn, progress, mode, return_mask)
        num_prune = self._start(nnz)
        if num_prune is None:
            return self._keep_all() if return_mask else None
        plan = self.plan
        gs, bk = self.blocks_per_scope, self.bk
        fixed_all = None
        if mode == "resolve":
            if plan.coupled:  # the generic batched-Cholesky re-solve
                return self._resolve_mode(nnz, return_mask)
            # SparseGPT's mask, then the factor machinery below with P fixed to it: its final weights
            # w - C[:, P] C[P, P]^-1 w_P are the exact least-squares re-solve on the kept support, and
            # the factor is built from GEMMs instead of one K/2 x K/2 Cholesky per row
            from gradkit.obs import baselines

            keep_sg = baselines.sparsegpt_mask(self.scope, self.hessian, nnz, damp=self.damp)
            fixed_all = ~keep_sg.reshape(self.M, self.num_cols).to(self.W.device)
            order, scoring = "left_to_right", "independent"
        if scoring == "joint":
            n_sub = math.comb(gs, num_prune)
            if n_sub > MAX_SUBSETS:
                raise ValueError(f"scoring='joint': {n_sub} prune subsets per scope (C({gs}, {num_prune})) is more "
                                 f"than MAX_SUBSETS={MAX_SUBSETS}; use scoring='independent'")
            if plan.coupled:
                raise NotImplementedError("scoring='joint' with row-coupled scopes is not supported; use "
                                          "scoring='independent' (the peer does the same)")
        if plan.coupled and not plan.block_single_row:
            raise NotImplementedError("row-coupled scopes whose blocks span several rows are not supported")
        if ng is None:
            ng = 1 if plan.coupled else 64
        C = self._c32()
        W = self.W.detach().to(torch.float32).reshape(self.M, self.num_cols).clone()
        dead_w = self._zero_dead(W)
        slot_order = self._slot_order(W, C, num_prune, order)
        keep = torch.ones(self.M, self.num_cols, dtype=torch.bool, device=W.device)
        rows_per_chunk = max(1, chunk_size // plan.R) * plan.R
        groups_per_chunk = rows_per_chunk // plan.R
        n_chunks = (plan.G + groups_per_chunk - 1) // groups_per_chunk
        ctx = _TrueObsContext(C, plan, slot_order, ng, _BLOCK_EPS / self._cs)
        upd, close = _progress(progress if progress is not None else progress_fn, n_chunks, "true OBS")
        starts = list(range(0, plan.G, groups_per_chunk))
        cdt = c_dtype or torch.float32

        def one(c0):
            grows = plan.group_rows[c0:c0 + groups_per_chunk].reshape(-1)
            fx = None if fixed_all is None else fixed_all[grows].index_select(1, ctx.seq)
            return grows, _true_obs_chunk(W[grows], C, ctx, plan, num_prune, scoring, cdt, fx)

        try:
            for grows, (w_new, pruned) in _map_chunks(one, starts, W.device):
                W[grows] = w_new
                keep[grows] = ~pruned
                upd(1)
        finally:
            close()
        self._restore_dead(W, keep, dead_w)
        self._write_back(W, "prune_true_obs")
        return keep if return_mask else None

    def _keep_all(self) -> Tensor:
        return torch.ones(self.M, self.num_cols, dtype=torch.bool, device=self.W.device)

    def _slot_order(self, W: Tensor, C: Tensor, num_prune: int, order: str) -> Tensor:
        plan = self.plan
        Q = plan.Q
        if order == "left_to_right":
            return torch.arange(Q, device=W.device)
        # largest_first: per slot, the best prune subset's OBS cost under the undowndated inverse, summed
        # over rows (the peer's rule); past MAX_SUBSETS subsets, the per-block diagonal estimate
        if math.comb(self.blocks_per_scope, num_prune) <= MAX_SUBSETS:
            best = _select_shared(W, C, plan, num_prune, torch.arange(Q, device=W.device))["cost"]  # (G, Q)
            return torch.argsort(best.sum(0), descending=True, stable=True)
        cols, lrow = plan.t_col, plan.t_lrow  # (Q, gs, bk)
        d = torch.diagonal(C)[cols] + _SCORE_EPS  # (Q, gs, bk)
        rows = plan.group_rows[:, lrow.reshape(-1)].reshape(plan.G, Q, self.blocks_per_scope, self.bk)
        w = W[rows, cols.unsqueeze(0).expand_as(rows)]
        cost = (w * w / d).sum(-1)  # (G, Q, gs)
        best = cost.topk(num_prune, dim=-1, largest=False).values.sum(-1)  # (G, Q)
        return torch.argsort(best.sum(0), descending=True, stable=True)

    def _resolve_mode(self, nnz: int, return_mask: bool):
        from gradkit.obs import baselines, metrics

        keep = baselines.sparsegpt_mask(self.scope, self.hessian, nnz, damp=self.damp)
        keep = keep.reshape(self.M, self.num_cols)
        w = metrics.resolve(self.W.detach().float().reshape(self.M, self.num_cols), self.hessian, keep,
                            damp=self.damp)
        self._write_back(w, "prune_true_obs")
        return keep if return_mask else None

    # ------------------------------------------------------------------ shared-inverse OBS
    @torch.no_grad()
    def prune(self, nnz: int, block_size: int = 2048, compensate: str = "local", n_splits: int = 1,
              return_mask: bool = False):
        """OBS with one shared inverse C for every row (cheaper than ``prune_true_obs``).

        Each (row, scope) prunes the subset of ``gs - nnz`` blocks with the lowest OBS cost
        ``w_P^T C[P,P]^-1 w_P`` (all subsets are scored: ``C(gs, gs-nnz)`` must stay below
        ``MAX_SUBSETS``). Compensation:

        * ``"local"``: inside the scope only, ``w_K -= C[K,P] C[P,P]^-1 w_P``;
        * ``"full"``: scope slots left to right, each compensating every column with the
          original C (already pruned columns stay 0);
        * ``"split"``: like full, but C is recomputed from H on the columns not yet frozen
          at each of ``n_splits`` column splits (columns of earlier splits freeze);
        * ``"interleaved"``: like split, and each split also re-selects its masks with the
          recomputed C and the updated weights.

        Row-coupled scopes are decided jointly across their rows (the peer's ``prune``
        ignores the coupling and breaks such patterns). ``block_size`` is accepted for
        compatibility (the selection is vectorised over all scopes at once).
        """
        block_size, n_splits, return_mask = _prune_options(block_size, compensate, n_splits, return_mask)
        num_prune = self._start(nnz)
        if num_prune is None:
            return self._keep_all() if return_mask else None
        gs = self.blocks_per_scope
        if math.comb(gs, num_prune) > MAX_SUBSETS:
            raise ValueError(f"prune: {math.comb(gs, num_prune)} prune subsets per scope (C({gs}, {num_prune})) is "
                             f"more than MAX_SUBSETS={MAX_SUBSETS}; use prune_true_obs(scoring='independent')")
        plan = self.plan
        W = self.W.detach().to(torch.float32).reshape(self.M, self.num_cols).clone()
        dead_w = self._zero_dead(W)
        C = self._c32()
        if compensate == "local" and plan.row_major and num_prune * self.bk <= ops.SHARED_MAX_P and \
                math.comb(gs, num_prune) * (num_prune * self.bk) ** 2 * plan.Q <= _FUSED_CINV_MAX:
            W, keep = _local_fused(W, C, plan, num_prune)
        elif compensate in ("local", "full"):
            sel = _select_shared(W, C, plan, num_prune, torch.arange(plan.Q, device=W.device))
            if compensate == "local":
                W = _compensate_local(W, C, plan, sel)
            else:
                W = _compensate_full(W, C, plan, sel, torch.arange(plan.Q, device=W.device), None)
            keep = _keep_from(torch.ones(W.shape, dtype=torch.bool, device=W.device), plan, sel)
        else:
            W, keep = self._split(W, plan, num_prune, n_splits, reselect=compensate == "interleaved")
        W = W.masked_fill(~keep, 0.0)
        self._restore_dead(W, keep, dead_w)
        self._write_back(W, "prune")
        return keep if return_mask else None

    def _split(self, W: Tensor, plan: _Plan, num_prune: int, n_splits: int, reselect: bool):
        Q = plan.Q
        per = (Q + n_splits - 1) // n_splits
        frozen = torch.zeros(self.num_cols, dtype=torch.bool, device=W.device)
        keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
        sel_all = None if reselect else _select_shared(W, self._c32(), plan, num_prune,
                                                        torch.arange(Q, device=W.device))
        for k in range(n_splits):
            q0, q1 = k * per, min(Q, (k + 1) * per)
            if q0 >= Q:
                break
            slots = torch.arange(q0, q1, device=W.device)
            if k == 0:
                C, active = self._c32(), None
            else:  # C over the columns not frozen by earlier splits, zero elsewhere
                C, active = _active_inverse(self.hessian, frozen, self.damp, W.device)
                C = C / self._cs  # the unit of _c32
            sel = _select_shared(W, C, plan, num_prune, slots) if reselect else _slice_sel(sel_all, q0, q1)
            W = _compensate_full(W, C, plan, sel, slots, active)
            keep = _keep_from(keep, plan, sel)
            frozen[plan.t_col[q0:q1].reshape(-1)] = True
        return W, keep

def _active_inverse(hessian: Tensor, frozen: Tensor, damp: float, device):
    """``(C, active)`` for a split: ``C`` (K, K) float32 on ``device``, the damped inverse of ``H`` restricted to the
    columns not ``frozen`` and zero elsewhere, and ``active`` (those columns, on ``device``). The inverse is taken
    where ``hessian`` lives (as the first one, :func:`compute_inverse`), indexed there: a CPU Hessian with a CUDA
    weight raised a device mismatch part-way through the splits."""
    k = hessian.shape[0]
    active_h = torch.nonzero(~frozen.to(hessian.device)).squeeze(1)
    Ca = compute_inverse(hessian.index_select(0, active_h).index_select(1, active_h).float(), damp)
    active = active_h.to(device)
    C = torch.zeros(k, k, dtype=torch.float32, device=device)
    C[active[:, None], active[None, :]] = Ca.to(C)
    return C, active


# --------------------------------------------------------------------------- the batched kernel


class _TrueObsContext:
    """What every chunk of rows shares: the processing order of the columns and C in that order."""

    def __init__(self, C: Tensor, plan: _Plan, slot_order: Tensor, ng: int, block_eps: float = _BLOCK_EPS):
        dev = C.device
        self.block_eps = block_eps  # _BLOCK_EPS in the unit of C (absolute in the user's H: the peer's rule)
        K = C.shape[0]
        R = plan.R
        self.t_col = t_col = plan.t_col[slot_order]  # (Q, gs, bk) template columns, processing order
        self.t_lrow = t_lrow = plan.t_lrow[slot_order]
        # each local row of a group owns the template elements in its row; all must see one sequence
        per_row_cols = [t_col[t_lrow == r] for r in range(R)]
        if any(c.numel() != per_row_cols[0].numel() for c in per_row_cols):
            raise NotImplementedError("scope: rows of a group own different numbers of elements; not supported")
        col_seq = torch.stack(per_row_cols)  # (R, Kp)
        if R > 1 and not bool((col_seq == col_seq[:1]).all()):
            raise NotImplementedError("scope: rows of a group see different column sequences; not supported")
        self.seq = seq = col_seq[0]  # processed columns in order; columns outside every scope are never scored
        self.Kp = Kp = seq.numel()
        if torch.unique(seq).numel() != Kp:
            raise ValueError("scope: a column appears in more than one block of a row")
        pos_of_col = torch.full((K,), -1, dtype=torch.long, device=dev)
        pos_of_col[seq] = torch.arange(Kp, device=dev)
        self.t_pos = pos_of_col[t_col]  # (Q, gs, bk) processing positions
        # C in processing order; index_select copies whole rows (advanced indexing is ~20x slower)
        Cp = C.index_select(0, seq).index_select(1, seq)
        self.cdiag = torch.diagonal(Cp).clone()
        self.Cp = Cp
        # per batch of ng slots: its span [s, e) of positions and C[:, s:] (rows gathered per chunk)
        self.batches = []
        Q = t_col.shape[0]
        for q0 in range(0, Q, ng):
            q1 = min(Q, q0 + ng)
            bpos = self.t_pos[q0:q1]
            s0, e0 = int(bpos.min()), int(bpos.max()) + 1
            if (e0 - s0) * R != bpos.numel():
                raise NotImplementedError("scope: a batch of scopes does not cover a contiguous run of columns")
            self.batches.append((q0, q1, s0, e0, Cp[:, s0:].contiguous()))


def _true_obs_chunk(w: Tensor, C: Tensor, ctx: _TrueObsContext, plan: _Plan, num_prune: int, scoring: str,
                    c_dtype: torch.dtype, fixed: Optional[Tensor] = None):
    """True OBS for one chunk of whole row groups. w: (n, K) fp32 rows (group-major). Returns (w', pruned).

    ``fixed`` (n, Kp) bool, processing order: prune exactly these positions (no scoring). The result is
    then ``w - C[:, P] C[P, P]^-1 w_P`` for the given P, i.e. the exact least-squares re-solve of the
    kept weights (the downdates only serve scoring, so batching does not change it)."""
    dev = w.device
    n, K = w.shape
    R = plan.R
    ngrp = n // R
    gs, bk = plan.lay.gs, plan.lay.bk
    Q = plan.Q
    seq, Kp, t_pos, t_lrow, Cp, cdiag = ctx.seq, ctx.Kp, ctx.t_pos, ctx.t_lrow, ctx.Cp, ctx.cdiag
    wp = w.index_select(1, seq)  # (n, Kp)
    # per row of the chunk, group base
    base = (torch.arange(ngrp, device=dev) * R)  # row offset of each group in the chunk
    z_parts: List[Tensor] = []
    l_rows: List = []  # per batch: (U[P_t, :cnt], L_t^-1), the block Cholesky factor of C[P, P]
    p_parts: List[Tensor] = []  # per batch: (n, m) pruned positions (pad: -1)
    cnt = 0
    # The factor U (one row per processed position, one column per pruned position) is kept transposed in
    # one buffer Ut (n, cap, Kp), c_dtype: Ut[:, j, f] = U[f, j]. Column j (pruned in batch t) is written
    # only on the positions after batch t (f >= e_t); only positions not yet scored are ever read (every
    # read is at f >= the current batch's start >= e_t), so the rest is never initialised.
    Ut = torch.empty(n, max(1, -(-Q * num_prune * bk // R)), Kp, dtype=c_dtype, device=dev)

    def fac(a: int, b: int) -> Tensor:  # U[a:b, :cnt]^T as (n, cnt, b - a), float32
        return Ut[:, :cnt, a:b].float()

    def fac_at(rows: Tensor, pos: Tensor) -> Tensor:  # U[pos, :cnt]^T for per-item rows: (N, cnt, len)
        return Ut[rows[:, None, None], torch.arange(cnt, device=dev)[None, :, None], pos[:, None, :]].float()
    for q0, q1, s, e, CpS in ctx.batches:
        bpos = t_pos[q0:q1]  # (nq, gs, bk) processing positions
        blrow = t_lrow[q0:q1]
        nb = e - s
        Ub = fac(s, e) if cnt else None  # (n, cnt, nb)
        zc = torch.cat(z_parts, 1) if z_parts else w.new_zeros(n, 0)
        w_b = torch.baddbmm(wp[:, None, s:e], zc.unsqueeze(1), Ub, alpha=-1.0).squeeze(1) if cnt else wp[:, s:e]
        # ---- scoring -> pruned positions per chunk row
        nq = q1 - q0
        if fixed is not None:
            pm = fixed[:, s:e]
            cnt_r = pm.sum(1)
            m = int(cnt_r.max()) if n else 0
            if m == 0:
                continue
            order = torch.argsort((~pm).to(torch.int8), dim=1, stable=True)[:, :m]  # pruned first, ascending
            valid = torch.arange(m, device=dev) < cnt_r[:, None]
            P = torch.where(valid, order + s, torch.full_like(order, s))  # pads point at a valid column
            padded = not bool(valid.all())
        elif scoring == "independent" and not plan.coupled:
            # one fused kernel: block costs sum w^2 / (diag(C_row) + eps), the num_prune lowest per
            # scope (ties: lower block), positions ascending. One-row groups: batch positions are
            # (slot, block, element) in order, so the layout is the op's.
            dg = cdiag[s:e].expand(n, nb) - (Ub * Ub).sum(1) if cnt else cdiag[s:e].expand(n, nb)
            P = ops.obs_select(w_b, dg, gs, bk, num_prune, _SCORE_EPS) + s
            m = P.shape[1]
            valid = torch.ones(n, m, dtype=torch.bool, device=dev)
            padded = False
        else:
            rows_idx = (base[:, None, None, None] + blrow[None]).expand(ngrp, nq, gs, bk)  # chunk rows
            loc = (bpos - s)[None].expand(ngrp, nq, gs, bk)
            wel = w_b[rows_idx, loc]  # (ngrp, nq, gs, bk)
            if scoring == "independent":  # row-coupled: each block's own OBS cost in its row
                cost = _block_costs(wel, rows_idx, loc, Cp, fac_at, s, cnt, ctx.block_eps)
                # lowest costs first, equal costs: lower block first (topk's tie order is unspecified
                # and differs between backends); NaN sorts last, as obs_select ranks it
                prune_blk = torch.sort(cost, dim=-1, stable=True).indices[..., :num_prune]
            else:
                prune_blk = _joint_choice(wel, rows_idx, loc, Cp, fac_at, s, cnt, gs, bk, num_prune)
            # pruned positions per chunk row (padded to the batch maximum)
            pe_loc = torch.gather(loc, 2, prune_blk[..., None].expand(-1, -1, -1, bk))  # (ngrp, nq, np, bk)
            pe_row = torch.gather(rows_idx, 2, prune_blk[..., None].expand(-1, -1, -1, bk))
            key = (pe_row * nb + pe_loc).reshape(-1)
            key, _ = torch.sort(key)
            prow = key // nb
            ploc = key % nb
            per = torch.bincount(prow, minlength=n)
            m = int(per.max())
            start = torch.cumsum(per, 0) - per
            slot = torch.arange(key.numel(), device=dev) - start[prow]
            P = torch.full((n, m), s, dtype=torch.long, device=dev)  # pads point at a valid column
            valid = torch.zeros(n, m, dtype=torch.bool, device=dev)
            P[prow, slot] = ploc + s
            valid[prow, slot] = True
            padded = m * n != key.numel()
        # ---- extend the factor: X = C_row[:, P] on future columns and on P itself
        F0 = e
        # U[P, :cnt] as (n, m, cnt); pads zeroed
        if cnt:
            UP = torch.gather(Ut[:, :cnt], 2, P[:, None, :].expand(n, cnt, m)).float().transpose(1, 2)
            if padded:
                UP = UP * valid[..., None]
        else:
            UP = w.new_zeros(n, m, 0)
        Crow = CpS.index_select(0, P.reshape(-1)).view(n, m, Kp - s)  # C[P, s:] (C symmetric)
        XP = torch.gather(Crow, 2, (P - s)[:, None, :].expand(n, m, m))  # (n, m, m)
        if cnt:
            XP = torch.baddbmm(XP, UP, UP.transpose(1, 2), alpha=-1.0)
        if padded:  # pad rows/columns become identity: they factor to 1 and touch nothing else
            vv = valid[:, :, None] & valid[:, None, :]
            XP = torch.where(vv, XP, torch.eye(m, device=dev, dtype=XP.dtype)[None])
        L, info = torch.linalg.cholesky_ex(XP)
        if bool((info != 0).any()):
            raise ValueError("hessian: the downdated inverse lost positive definiteness (ill-conditioned H); "
                             "raise damp")
        wP = torch.gather(w_b, 1, P - s)
        if padded:
            wP = wP * valid
        # L^-1 = L^T (L L^T)^-1: potri plus one GEMM. Applying it is a GEMM; torch's batched trsm on
        # CPU is ~10x slower than both together (and LU inverses are off limits on oneMKL builds).
        Linv = torch.bmm(L.transpose(1, 2), torch.cholesky_inverse(L))
        zt = torch.bmm(Linv, wP.unsqueeze(2)).squeeze(2)
        if F0 < Kp:
            XF = Crow[:, :, F0 - s:]  # (n, m, F)
            if padded:
                XF = XF * valid[..., None]
            if cnt + m > Ut.shape[1]:  # row-coupled scopes: a row pruned more than its share so far
                grown = torch.empty(n, min(Kp, max(2 * Ut.shape[1], cnt + m)), Kp, dtype=c_dtype, device=dev)
                grown[:, :cnt] = Ut[:, :cnt]
                Ut = grown
            # the factor's new columns on the future positions: L^-1 (C[P, F] - U[P, :cnt] U[F, :cnt]^T)
            ops.obs_schur_extend_(Ut, XF, UP, Linv, cnt)
        l_rows.append((UP, Linv))
        z_parts.append(zt)
        p_parts.append(torch.where(valid, P, torch.full_like(P, -1)))
        cnt += m
    # ---- final weights: w - C[:, P] C[P,P]^-1 w_P. The factor rows on P form a block lower-triangular
    # Cholesky factor of C[P, P] (block t: [U[P_t, :cnt_t], L_t]); v = C[P,P]^-1 w_P = L^-T z by block
    # back-substitution, each diagonal block applied through its stored inverse.
    offs = [0]
    for _, li in l_rows:
        offs.append(offs[-1] + li.shape[1])

    def back(zs: List[Tensor]) -> Tensor:  # L^-T z by block back-substitution: (n, cnt)
        acc = w.new_zeros(n, cnt)
        v_parts: List[Tensor] = [None] * len(l_rows)  # type: ignore[list-item]
        for t in range(len(l_rows) - 1, -1, -1):
            up, li = l_rows[t]
            vt = torch.bmm(li.transpose(1, 2), (zs[t] - acc[:, offs[t]:offs[t + 1]]).unsqueeze(2))  # (n, m, 1)
            v_parts[t] = vt.squeeze(2)
            if up.shape[2]:
                acc[:, :up.shape[2]] += torch.bmm(up.transpose(1, 2), vt).squeeze(2)
        return torch.cat(v_parts, 1)

    Pall = torch.cat(p_parts, 1)  # (n, cnt) processing positions, -1 pad
    okp = Pall >= 0
    Porig = seq[Pall.clamp(min=0)]  # original columns
    v = back(z_parts) * okp
    V = w.new_zeros(n, K)
    V.scatter_add_(1, Porig, v)  # pads carry v = 0
    w_out = torch.addmm(w, V, C, alpha=-1.0)  # one GEMM instead of gathering C[P, :] per row
    if c_dtype != torch.float32 and cnt and _REFINE_STEPS:
        # A half-precision factor is the Cholesky factor of C[P, P] perturbed by its rounding (~4e-3 relative for
        # bfloat16), so v solves the perturbed system, and the kept weights missed the least-squares re-solve on the
        # chosen support: 1.37x its loss at the default damp=1e-4 on cond(H) = 1e8, 8x at damp=1e-6 (session 44).
        # Iterative refinement against the float32 C: the residual r = w_P - C[P, P] v is what w_out holds on P
        # (before it is zeroed); z = L~^-1 r (forward substitution through the same factor) gives the step L~^-T z
        # and ||z||^2 estimates the loss the residual costs (r^T C[P, P]^-1 r). Each row keeps the step only while
        # that estimate falls: where the rounding is too large for refinement to converge, a row keeps what it had.
        def forward(r: Tensor) -> List[Tensor]:
            zs: List[Tensor] = []
            for t, (up, li) in enumerate(l_rows):
                rt = r[:, offs[t]:offs[t + 1]]
                if up.shape[2]:
                    rt = rt - torch.bmm(up, torch.cat(zs, 1)[:, :up.shape[2], None]).squeeze(2)
                zs.append(torch.bmm(li, rt.unsqueeze(2)).squeeze(2))
            return zs

        zs = forward(torch.gather(w_out, 1, Porig) * okp)
        est = torch.cat(zs, 1).square().sum(1)
        for _ in range(_REFINE_STEPS):
            v_new = v + back(zs) * okp
            V_new = w.new_zeros(n, K).scatter_add_(1, Porig, v_new)
            w_new = torch.addmm(w, V_new, C, alpha=-1.0)
            zs_new = forward(torch.gather(w_new, 1, Porig) * okp)
            est_new = torch.cat(zs_new, 1).square().sum(1)
            better = est_new < est  # NaN (a step that overflowed) is never better
            if not bool(better.any()):
                break
            b = better[:, None]
            v, w_out, est = torch.where(b, v_new, v), torch.where(b, w_new, w_out), torch.where(better, est_new, est)
            zs = [torch.where(b, zn, zo) for zn, zo in zip(zs_new, zs)]
    # pads point at a real column: count, so a pad never clears a pruned entry
    pruned = torch.zeros(n, K, dtype=torch.int32, device=dev).scatter_add_(1, Porig, okp.int()) > 0
    w_out = w_out.masked_fill(pruned, 0.0)
    return w_out, pruned


def _block_costs(wel, rows_idx, loc, Cp, fac_at, s, cnt, eps=_BLOCK_EPS):
    """Row-coupled independent scoring: w_b^T (C_row[b, b] + eps I)^-1 w_b per block (one row each)."""
    ngrp, nq, gs, bk = wel.shape
    pos = (loc + s).reshape(-1, bk)  # (nblk, bk)
    rws = rows_idx[..., 0].reshape(-1)  # (nblk,)
    Cb = Cp[pos[:, :, None], pos[:, None, :]]  # (nblk, bk, bk)
    if cnt:
        Ub = fac_at(rws, pos)
        Cb = Cb - torch.bmm(Ub.transpose(1, 2), Ub)
    Cb = Cb + eps * torch.eye(bk, device=Cb.device)
    L, info = torch.linalg.cholesky_ex(0.5 * (Cb + Cb.transpose(1, 2)))
    y = torch.linalg.solve_triangular(L, wel.reshape(-1, bk, 1), upper=False)
    return (y * y).sum((1, 2)).view(ngrp, nq, gs)


def _joint_choice(wel, rows_idx, loc, Cp, fac_at, s, cnt, gs, bk, num_prune):
    """Exact OBS cost of every prune subset of each (row, scope); returns the best subset's blocks."""
    ngrp, nq, _, _ = wel.shape
    e = gs * bk
    pos = (loc + s).reshape(ngrp * nq, e)
    rws = rows_idx.reshape(ngrp * nq, e)[:, 0]
    Cs = Cp[pos[:, :, None], pos[:, None, :]]  # (N, e, e)
    if cnt:
        Us = fac_at(rws, pos)
        Cs = Cs - torch.bmm(Us.transpose(1, 2), Us)
    ws = wel.reshape(ngrp * nq, e)
    subs = torch.tensor(list(combinations(range(gs), num_prune)), device=wel.device, dtype=torch.long)
    cols = (subs[:, :, None] * bk + torch.arange(bk, device=wel.device)).reshape(subs.shape[0], -1)  # (ns, p)
    p = cols.shape[1]
    Csub = Cs[:, cols[:, :, None], cols[:, None, :]]  # (N, ns, p, p)
    wsub = ws[:, cols]  # (N, ns, p)
    if p == 1:
        cost = wsub[..., 0] ** 2 / (Csub[..., 0, 0] + _SCORE_EPS)
    elif p == 2:
        a, b, d = Csub[..., 0, 0], Csub[..., 0, 1], Csub[..., 1, 1]
        w0, w1 = wsub[..., 0], wsub[..., 1]
        cost = (w0 * w0 * d - 2 * w0 * w1 * b + w1 * w1 * a) / (a * d - b * b + _SCORE_EPS)
    else:
        Csub = Csub + _SCORE_EPS * torch.eye(p, device=wel.device)
        L, info = torch.linalg.cholesky_ex(Csub)
        y = torch.linalg.solve_triangular(L, wsub.unsqueeze(-1), upper=False)
        cost = (y * y).sum((-1, -2))
    best = cost.argmin(-1)  # (N,)
    return subs[best].view(ngrp, nq, num_prune)


# --------------------------------------------------------------------------- shared-inverse OBS pieces


def _subset_table(plan: _Plan, num_prune: int, slots: Tensor):
    """Per (slot, subset, local row): the pruned columns of that row (padded) and the kept ones.

    Returns subs (ns, np), pcol (nq, ns, R, pm), pval, kcol (nq, ns, R, km), kval."""
    dev = slots.device
    gs, bk, R = plan.lay.gs, plan.lay.bk, plan.R
    subs = torch.tensor(list(combinations(range(gs), num_prune)), dtype=torch.long, device=dev)
    ns = subs.shape[0]
    is_p = torch.zeros(ns, gs, dtype=torch.bool, device=dev).scatter_(1, subs, True)  # (ns, gs)
    tc, tr = plan.t_col[slots], plan.t_lrow[slots]  # (nq, gs, bk)
    nq = tc.shape[0]
    ecol = tc.reshape(nq, 1, gs * bk).expand(nq, ns, gs * bk)
    erow = tr.reshape(nq, 1, gs * bk).expand(nq, ns, gs * bk)
    eprn = is_p[:, :, None].expand(ns, gs, bk).reshape(1, ns, gs * bk).expand(nq, ns, gs * bk)

    def pack(want):  # (nq, ns, R, cap) columns where `want` and row r, padded with the first column
        out_c, out_v = [], []
        for r in range(R):
            sel = want & (erow == r)
            cnt = sel.sum(-1)
            cap = max(int(cnt.max()), 1)
            order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :cap]
            c = torch.gather(ecol, 2, order)
            v = torch.arange(cap, device=dev)[None, None, :] < cnt[..., None]
            out_c.append(torch.where(v, c, ecol[..., :1]))
            out_v.append(v)
        cap = max(c.shape[-1] for c in out_c)
        pad = lambda t, fill: torch.nn.functional.pad(t, (0, cap - t.shape[-1]), value=fill)  # noqa: E731
        return (torch.stack([pad(c, 0) for c in out_c], 2), torch.stack([pad(v, False) for v in out_v], 2))

    pcol, pval = pack(eprn)
    kcol, kval = pack(~eprn)
    return subs, pcol, pval, kcol, kval


def _take(t: Tensor, flat_idx: Tensor) -> Tensor:
    """t.flatten()[flat_idx] through index_select (advanced indexing is an order of magnitude slower)."""
    return t.reshape(-1).index_select(0, flat_idx.reshape(-1)).view(flat_idx.shape)


def _sub_inverse(C: Tensor, cols: Tensor, val: Tensor, eps: float) -> Tensor:
    """(C[cols, cols] + eps I)^-1 with pad rows/columns as identity; cols (..., p). Cholesky-based."""
    Cs = _take(C, cols[..., :, None] * C.shape[1] + cols[..., None, :])
    vv = val[..., :, None] & val[..., None, :]
    eye = torch.eye(cols.shape[-1], device=C.device, dtype=C.dtype)
    Cs = torch.where(vv, Cs + eps * eye, eye)
    L, info = torch.linalg.cholesky_ex(Cs)
    if bool((info != 0).any()):
        raise ValueError("hessian: a pruned sub-block of the inverse Hessian is not positive definite; raise damp")
    return torch.cholesky_inverse(L)


def _rows_of(plan: _Plan):
    """Weight rows of every (group, local row): (G, R)."""
    return plan.group_rows


def _select_shared(W: Tensor, C: Tensor, plan: _Plan, num_prune: int, slots: Tensor) -> dict:
    """Best prune subset per (group, slot) under the shared inverse C: min sum over rows of w_P^T C_PP^-1 w_P."""
    subs, pcol, pval, kcol, kval = _subset_table(plan, num_prune, slots)
    Cinv = _sub_inverse(C, pcol, pval, _SCORE_EPS)  # (nq, ns, R, pm, pm)
    rows = plan.group_rows  # (G, R)
    G = rows.shape[0]
    nq, ns, R, pm = pcol.shape
    if R == 1 and pm <= 2 and bool(pval.all()):
        # one row per scope, no pads: gather the slots' columns once, pick subsets on the last dim
        e = plan.lay.gs * plan.lay.bk
        wt = W.index_select(0, rows[:, 0]).index_select(1, plan.t_col[slots].reshape(-1)).view(G, nq, e)
        # local element index of each subset's pruned columns (same for every slot: blocks in order)
        sub_e = (sel_subs_elems(plan, num_prune))  # (ns, pm)
        w0 = wt[..., sub_e[:, 0]]  # (G, nq, ns)
        if pm == 1:
            cost = w0 * w0 * Cinv[None, :, :, 0, 0, 0]
        else:
            w1 = wt[..., sub_e[:, 1]]
            c = Cinv[:, :, 0]  # (nq, ns, 2, 2)
            cost = w0 * w0 * c[..., 0, 0] + 2 * w0 * w1 * c[..., 0, 1] + w1 * w1 * c[..., 1, 1]
    else:
        wp = _take(W, rows[:, None, None, :, None] * W.shape[1] + pcol[None]) * pval[None]  # (G, nq, ns, R, pm)
        cost = torch.einsum("gqsrp,qsrpk,gqsrk->gqs", wp, Cinv, wp)
    best, sub = cost.min(-1)  # (G, nq) lowest cost; ties: lowest subset index
    return {"cost": best, "slots": slots, "sub": sub, "subs": subs, "pcol": pcol, "pval": pval, "kcol": kcol, "kval": kval,
            "Cinv": Cinv}


def sel_subs_elems(plan: _Plan, num_prune: int) -> Tensor:
    """(ns, np * bk) in-scope element indices (block-major) of each prune subset's elements."""
    bk = plan.lay.bk
    subs = torch.tensor(list(combinations(range(plan.lay.gs), num_prune)), dtype=torch.long)
    return (subs[:, :, None] * bk + torch.arange(bk)).reshape(subs.shape[0], -1).to(plan.t_col.device)


def _slice_sel(sel: dict, q0: int, q1: int) -> dict:
    out = {k: v[q0:q1] for k, v in sel.items() if k in ("slots", "pcol", "pval", "kcol", "kval", "Cinv")}
    out["sub"], out["subs"] = sel["sub"][:, q0:q1], sel["subs"]
    out["cost"] = sel["cost"][:, q0:q1]
    return out


def _chosen(sel: dict, key: str) -> Tensor:
    """Per (group, slot, local row) entry of table `key` for the chosen subset: (G, nq, R, ...)."""
    t = sel[key]  # (nq, ns, R, ...)
    sub = sel["sub"]  # (G, nq)
    G, nq = sub.shape
    ns = t.shape[1]
    flat = torch.arange(nq, device=sub.device)[None, :] * ns + sub
    return t.reshape(nq * ns, -1).index_select(0, flat.reshape(-1)).view(G, nq, *t.shape[2:])


def _keep_from(keep: Tensor, plan: _Plan, sel: dict) -> Tensor:
    pc, pv = _chosen(sel, "pcol"), _chosen(sel, "pval")  # (G, nq, R, pm)
    flat = plan.group_rows[:, None, :, None] * keep.shape[1] + pc
    keep.view(-1).index_fill_(0, flat[pv] if not bool(pv.all()) else flat.reshape(-1), False)
    return keep


_FUSED_CINV_MAX = 1 << 26  # floats of the (Q, ns, p, p) sub-inverse table the fused local path may build


def _local_fused(W: Tensor, C: Tensor, plan: _Plan, num_prune: int):
    """``prune(compensate="local")`` for row-major scopes in one fused pass (``ops.obs_shared_prune``):
    the (slot, subset) sub-inverses are built once, batched (Cholesky); then every (row, scope) picks
    its lowest-cost subset, compensates its kept elements and zeroes the pruned ones. Same choice and
    weights as ``_select_shared`` + ``_compensate_local``, up to fp32 rounding."""
    gs, bk, Q = plan.lay.gs, plan.lay.bk, plan.Q
    E = gs * bk
    pidx = sel_subs_elems(plan, num_prune)  # (ns, p) ascending in-scope elements of each subset
    cols = torch.arange(Q, device=W.device)[:, None, None] * E + pidx[None]  # (Q, ns, p)
    val = torch.ones(cols.shape, dtype=torch.bool, device=W.device)
    cinv = _sub_inverse(C, cols, val, _SCORE_EPS).contiguous()
    out, sub = ops.obs_shared_prune(W.contiguous(), C.contiguous(), cinv, pidx, E, True)
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    keep.view(W.shape[0], Q, E).scatter_(2, pidx[sub], False)
    return out, keep


def _compensate_local(W: Tensor, C: Tensor, plan: _Plan, sel: dict) -> Tensor:
    """Inside each scope: w_K -= C[K,P] C[P,P]^-1 w_P (per row of the scope), then w_P = 0."""
    pc, pv, kc, kv = (_chosen(sel, k) for k in ("pcol", "pval", "kcol", "kval"))  # (G, nq, R, *)
    Cinv = _chosen(sel, "Cinv")  # (G, nq, R, pm, pm)
    K = W.shape[1]
    base = plan.group_rows[:, None, :, None] * K
    fp, fk = base + pc, base + kc
    wp = _take(W, fp) * pv
    y = torch.matmul(Cinv, wp.unsqueeze(-1))  # C_PP^-1 w_P: (G, nq, R, pm, 1)
    CKP = _take(C, kc[..., :, None] * K + pc[..., None, :])  # (G, nq, R, km, pm)
    delta = torch.matmul(CKP, y).squeeze(-1) * kv
    W = W.clone()
    Wf = W.view(-1)
    Wf.index_add_(0, fk.reshape(-1), -delta.reshape(-1))  # pads carry 0
    Wf.index_fill_(0, fp[pv] if not bool(pv.all()) else fp.reshape(-1), 0.0)
    return W


def _compensate_full(W: Tensor, C: Tensor, plan: _Plan, sel: dict, slots: Tensor, active: Optional[Tensor],
                     chunk: int = 16) -> Tensor:
    """Slots in order, each compensating every (active) column with C:
    y_q = w^(q)_P C_PP^-1, w -= y_q C[P, :]. Within a chunk of slots the recursion is a block-triangular
    solve per row on C restricted to the chunk's columns; the rest of the row gets one GEMM per chunk."""
    pc, pv = _chosen(sel, "pcol"), _chosen(sel, "pval")  # (G, nq, R, pm)
    G, nq, R, pm = pc.shape
    M = G * R
    rows = plan.group_rows.reshape(-1)  # chunk rows in group-major order
    Wg = W[rows]  # (M, K)
    # per row: (nq, pm) pruned columns per slot
    pcr = pc.permute(0, 2, 1, 3).reshape(M, nq, pm)
    pvr = pv.permute(0, 2, 1, 3).reshape(M, nq, pm)
    dev = W.device
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        nqc = c1 - c0
        N = nqc * pm
        P = pcr[:, c0:c1].reshape(M, N)
        V = pvr[:, c0:c1].reshape(M, N)
        # chunk columns (shared) and C on them
        ccols = torch.unique(plan.t_col[slots[c0:c1]].reshape(-1))
        loc = torch.full((W.shape[1],), -1, dtype=torch.long, device=dev)
        loc[ccols] = torch.arange(ccols.numel(), device=dev)
        Cc = C.index_select(0, ccols).index_select(1, ccols)
        lp = loc[P]  # (M, N)
        T = _take(Cc, lp[:, :, None] * Cc.shape[1] + lp[:, None, :])  # (M, N, N): C[P_h, P_q]
        blk = torch.arange(N, device=dev) // pm
        upper = blk[:, None] <= blk[None, :]  # block upper triangle incl. diagonal
        vv = V[:, :, None] & V[:, None, :]
        T = torch.where(upper[None] & vv, T, torch.zeros((), device=dev))
        T = T + torch.diag_embed((~V).to(T.dtype))  # pads: identity
        wP = torch.gather(Wg, 1, P) * V
        # Y T = w_P with T block upper triangular: T = D (I + D^-1 S), D block diagonal
        Db = T.view(M, nqc, pm, nqc, pm).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (M, nqc, pm, pm)
        Dinv = torch.linalg.inv_ex(Db)[0] if pm <= 16 else torch.cholesky_inverse(torch.linalg.cholesky(Db))
        DinvB = torch.zeros(M, N, N, device=dev, dtype=T.dtype)
        idx = torch.arange(nqc, device=dev)
        DinvB.view(M, nqc, pm, nqc, pm)[:, idx, :, idx, :] = Dinv.permute(1, 0, 2, 3)
        A = torch.bmm(DinvB, T)  # I + D^-1 S: unit upper triangular
        # Y T = w_P with T = D A  =>  (Y D) A = w_P: a unit upper-triangular solve, then Y = (Y D) D^-1
        YD = torch.linalg.solve_triangular(A, wP.unsqueeze(1), upper=True, left=False, unitriangular=True)
        Y = torch.bmm(YD, DinvB).squeeze(1) * V  # (M, N)
        Yd = Wg.new_zeros(M, ccols.numel()).scatter_add_(1, lp, Y)
        Wg = torch.addmm(Wg, Yd, C.index_select(0, ccols), alpha=-1.0)
    # (with `active`, C is zero outside the active columns, so frozen columns were never touched)
    W = W.clone()
    W[rows] = Wg
    return W
