"""The Triton launchers refuse what the native ops refuse. On a GPU whose extension was built without CUDA C++,
the Triton launchers are the ops' CUDA kernels (gradkit._ext.register_triton_for_cuda), reached by direct
``torch.ops.gradkit.*`` calls that skip the Python wrappers. Until session 28 the projection, search, golden and
AdamW launchers checked little and the parammap ones nothing (factored_project did not compare lt with g's
columns nor look at rb / mask; score_topk and masked_adamw_ checked nothing, and masked_adamw_'s kernel reads
every tensor by address and numel), the scope launchers indexed past a short block_shape, and the obs ones
named other arguments: a bad call read or wrote out of bounds, or raised something else, where the C++ kernels
raise. Each registered kernel now runs its op's check_* function first (the wrapper's own:
gradkit.kernels.triton.cuda_kernel). Here every bad call is made both ways, the native CPU op and the launcher
(on CPU tensors, Triton's interpreter), and both must raise the same exception class with a message naming the
same argument, before anything is written."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from gradkit import _ext  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")

F32 = torch.float32


def _factored(a=None, g=None, lt=None, rt=None, rb=None, mask=None, T=2):
    gen = torch.Generator().manual_seed(0)
    base = dict(a=torch.randn(8, 6, generator=gen), g=torch.randn(8, 5, generator=gen),
                lt=torch.randn(5, 4, generator=gen), rt=torch.randn(6, 4, generator=gen))
    given = dict(a=a, g=g, lt=lt, rt=rt)
    t = {k: base[k] if v is None else v(base) for k, v in given.items()}
    return (t["a"], t["g"], t["lt"], t["rt"], rb, mask, T)


def _topk(queries=None, keys=None, k=3, key_scale=None, scores_in=None, idx_in=None, base=0):
    q = torch.randn(4, 6) if queries is None else queries
    kk = torch.randn(10, 6) if keys is None else keys
    return (q, kk, k, True, key_scale, scores_in, idx_in, base)


def _adamw(n=2, **over):
    p = [torch.randn(5), torch.randn(3)][:n]
    args = dict(params=p, grads=[t.clone() for t in p], exp_avgs=[torch.zeros_like(t) for t in p],
                exp_avg_sqs=[torch.zeros_like(t) for t in p], bits=[None] * n, masked_lr=1e-3, unmasked_lr=0.0,
                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=[0.1] * n,
                bias_correction2_sqrt=[0.1] * n, maximize=False)
    args.update(over)
    return tuple(args.values())


def _bits(n):
    return torch.zeros((n + 7) // 8, dtype=torch.uint8)


# (op, family, args, the argument the message must start with)
CASES = [
    ("factored_project", "projection", _factored(lt=lambda b: b["lt"][:-1]), "lt:"),
    ("factored_project", "projection", _factored(g=lambda b: b["g"][:-2]), "g:"),
    ("factored_project", "projection", _factored(g=lambda b: b["g"].double()), "g:"),
    ("factored_project", "projection", _factored(rt=lambda b: b["rt"][:, :-1]), "rt:"),
    ("factored_project", "projection", _factored() [:4] + (torch.zeros(3), None, 2), "rb:"),
    ("factored_project", "projection", _factored()[:4] + (None, torch.ones(8, dtype=torch.bool)[:7], 2), "mask:"),
    ("factored_project", "projection", _factored()[:4] + (None, torch.ones(8), 2), "mask:"),
    ("factored_project", "projection", _factored()[:6] + (3,), "T:"),
    ("project_flat", "projection", (torch.randn(2, 3, 4), 8, 0, 0, 0), "x:"),
    ("project_flat", "projection", (torch.ones(2, 3, dtype=torch.int32), 8, 0, 0, 0), "x:"),
    ("project_flat", "projection", (torch.randn(2, 3), 0, 0, 0, 0), "k:"),
    ("project_flat", "projection", (torch.randn(2, 3), 8, -1, 0, 0), "seed:"),
    ("project_flat", "projection", (torch.randn(2, 3), 8, 0, 2, 0), "kind:"),
    ("project_flat", "projection", (torch.randn(2, 3), 8, 0, 0, -1), "col0:"),
    ("projection_matrix_", "projection", (torch.empty(4), 0, 0, 8, 0, 0), "out:"),
    ("projection_matrix_", "projection", (torch.empty(2, 2, dtype=torch.int32), 0, 0, 8, 0, 0), "out:"),
    ("projection_matrix_", "projection", (torch.empty(2, 2), 0, 0, 0, 0, 0), "k:"),
    ("projection_matrix_", "projection", (torch.empty(2, 2), 0, 3, 8, 0, 0), "kind:"),
    ("projection_matrix_", "projection", (torch.empty(2, 2), 0, 0, 8, -1, 0), "row0:"),
    ("score_topk", "search", _topk(queries=torch.randn(4, 6).double()), "queries:"),
    ("score_topk", "search", _topk(keys=torch.ones(10, 6, dtype=torch.int32)), "keys:"),
    ("score_topk", "search", _topk(keys=torch.randn(10, 5)), "keys:"),
    ("score_topk", "search", _topk(k=-1), "k:"),
    ("score_topk", "search", _topk(base=-1), "base:"),
    ("score_topk", "search", _topk(key_scale=torch.ones(9)), "key_scale:"),
    ("score_topk", "search", _topk(scores_in=torch.zeros(3, 2), idx_in=torch.zeros(3, 2, dtype=torch.int64)),
     "scores_in:"),
    ("score_topk", "search", _topk(scores_in=torch.zeros(4, 2), idx_in=torch.zeros(4, 3, dtype=torch.int64)),
     "idx_in:"),
    ("golden_topk_and_", "golden", (torch.ones(10, dtype=torch.int32), _bits(10), None, 3, True), "g:"),
    ("golden_topk_and_", "golden", (torch.randn(10), _bits(20), None, 3, True), "bits:"),
    ("golden_topk_and_", "golden", (torch.randn(10), _bits(10), torch.zeros(10), 3, True), "counts:"),
    ("golden_topk_and_", "golden", (torch.randn(10), _bits(10), None, 11, True), "k:"),
    ("bitmask_binary", "golden", ([_bits(16)], [_bits(16), _bits(8)], 0), "b:"),
    ("bitmask_binary", "golden", ([_bits(16)], [_bits(24)], 0), "b[0]:"),
    ("bitmask_binary", "golden", ([torch.zeros(2, dtype=torch.int32)], [_bits(16)], 0), "a[0]:"),
    ("bitmask_not", "golden", ([_bits(16)], [16, 8]), "numel:"),
    ("bitmask_not", "golden", ([_bits(16)], [30]), "a[0]:"),
    ("bitmask_count", "golden", ([_bits(16), torch.zeros(2)],), "bits[1]:"),
    ("masked_adamw_", "adamw", _adamw(grads=[torch.zeros(5)]), "grads:"),
    ("masked_adamw_", "adamw", _adamw(exp_avgs=[torch.zeros(5), torch.zeros(4)]), "exp_avgs[1]:"),
    ("masked_adamw_", "adamw", _adamw(exp_avg_sqs=[torch.zeros(5), torch.zeros(3).double()]), "exp_avg_sqs[1]:"),
    ("masked_adamw_", "adamw", _adamw(params=[torch.randn(5), torch.randn(3).double()]), "params[1]:"),
    ("masked_adamw_", "adamw", _adamw(bits=[_bits(40), None]), "bits[0]:"),
    ("masked_adamw_", "adamw", _adamw(beta1=1.0), "beta1:"),
    ("masked_adamw_", "adamw", _adamw(eps=-1.0), "eps:"),
    ("masked_adamw_", "adamw", _adamw(bias_correction1=[0.1, 0.0]), "bias_correction1[1]:"),
]


I64 = torch.int64
_X = torch.randn(4, 6)
CASES += [
    ("gather_segments", "parammap", ([torch.randn(4), torch.randn(3)], [None], None), "index:"),
    ("gather_segments", "parammap", ([torch.randn(4)], [torch.zeros(2)], None), "index[0]:"),
    ("gather_segments_out", "parammap", ([torch.randn(4)], [None], torch.empty(3), False), "out:"),
    ("scatter_segments", "parammap", (torch.randn(7), [None, None], [4], 1.0), "numel:"),
    ("scatter_segments", "parammap", (torch.randn(6), [None, None], [4, 3], 1.0), "flat:"),
    ("scatter_segments_", "parammap", (torch.randn(7), [None, None], [torch.empty(4)], 1.0, False), "index:"),
    ("scatter_segments_", "parammap", (torch.randn(7), [None], [torch.empty(4)], 1.0, False), "flat:"),
    ("mask_to_indices", "parammap", (torch.ones(5), I64), "mask:"),
    ("mask_to_indices", "parammap", (torch.ones(5, dtype=torch.bool), torch.float32), "dtype:"),
    ("bitmask_to_indices", "parammap", (_bits(20), 9, I64), "bits:"),
    ("pack_bitmask", "parammap", (torch.ones(5),), "mask:"),
    ("topk_select", "parammap", (torch.randn(5), None, 6), "k:"),
    ("topk_select", "parammap", (torch.randn(5), torch.ones(4, dtype=torch.bool), 2), "active:"),
    ("topk_select_segments", "parammap", ([torch.randn(5)], [None, None], 2), "active:"),
    ("block_norms", "scope", (_X, [2], 2.0), "block_shape:"),
    ("block_norms", "scope", (_X, [4, 4], 2.0), "block_shape[1]="),
    ("scope_kth", "scope", (_X, [1, 1], [1, 6], 7, 2.0, False, 1.0, False), "k:"),
    ("scope_kth", "scope", (_X, [1, 1], [1, 6], 2, 0.0, False, 1.0, False), "p:"),
    ("scope_kth", "scope", (_X, [1, 1], [1, 4], 2, 2.0, False, 1.0, False), "scope_shape[1]="),
    ("scope_mask", "scope", (_X, [1, 1], [1, 6], 7, 2.0, False, False, False), "nnz:"),
    ("scope_hard_threshold_", "scope", (_X.clone(), torch.randn(3, 6), [1, 1], [1, 6], 2, 2.0, False), "values:"),
    ("block_apply_mask_", "scope", (_X.clone(), [1, 2], torch.ones(4, 2, dtype=torch.bool)), "block_mask:"),
    ("block_soft_threshold_", "scope", (_X.clone(), [1, 2], torch.ones(3), None, 10, 1e-6, 1e-8), "thresholds:"),
    ("obs_select", "obs", (torch.ones(2, 8).double(), torch.ones(2, 8), 4, 1, 2, 0.0), "w:"),
    ("obs_select", "obs", (torch.ones(2, 8), torch.ones(2, 4), 4, 1, 2, 0.0), "d:"),
    ("obs_select", "obs", (torch.ones(2, 8), torch.ones(2, 8), 4, 1, 5, 0.0), "num_prune:"),
    ("obs_select", "obs", (torch.ones(2, 8), torch.ones(2, 8), 4, 1, 2, -1.0), "eps:"),
    ("obs_shared_prune", "obs", (torch.randn(3, 8), torch.eye(4), torch.eye(4), torch.zeros(3, 2, dtype=I64), 2, False),
     "c:"),
    ("obs_schur_extend_", "obs", (torch.zeros(2, 4, 3), torch.zeros(2, 1, 3), torch.zeros(2, 4), torch.eye(2), 9),
     "cnt:"),
    ("obs_sweep_", "obs", (torch.randn(4, 6), torch.zeros(4, 5), torch.eye(4), torch.zeros(4, 6, dtype=torch.bool), 0,
                           4), "err:"),
]


def _outcome(fn, args):
    try:
        fn(*args)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        return type(e), str(e)
    return None, ""


def _snapshot(args):
    flat = []
    for a in args:
        flat += [a] if isinstance(a, torch.Tensor) else [t for t in a if isinstance(t, torch.Tensor)] \
            if isinstance(a, (list, tuple)) else []
    return [(t, t.clone()) for t in flat]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_launcher_refuses_like_the_native_op(case):
    from gradkit.kernels.triton import cuda_kernel

    op, family, args, word = CASES[case]
    launcher = cuda_kernel(family, op)  # what register_triton_for_cuda registers
    before = _snapshot(args)
    native_t, native_msg = _outcome(getattr(torch.ops.gradkit, op), args)
    tri_t, tri_msg = _outcome(launcher, args)
    names = (word, f"{op}: {word}")  # the scope family's messages start with the op's name
    assert native_t is not None and native_msg.startswith(names), (native_t, native_msg)
    assert tri_t is native_t and tri_msg.startswith(names), (tri_t, tri_msg, native_t, native_msg)
    for t, saved in before:  # nothing written by either
        assert torch.equal(t.view(torch.uint8), saved.view(torch.uint8)) if t.numel() else True


def test_every_launcher_has_its_check():
    """Every op a Triton launcher can serve as CUDA kernel has a check_* function (cuda_kernel refuses to build a
    kernel without one), and the cases above cover every family."""
    import importlib

    from gradkit import ops
    from gradkit.kernels.triton import cuda_kernel
    from gradkit.ops import obs, projection, search

    families = {"parammap": ops.PARAMMAP_OPS, "scope": ops.SCOPE_OPS, "golden": ops.GOLDEN_OPS,
                "adamw": ops.ADAMW_OPS, "projection": projection.PROJECTION_OPS, "search": search.SEARCH_OPS,
                "obs": obs.OBS_OPS}
    for family, names in families.items():
        mod = importlib.import_module(f"gradkit.kernels.triton.{family}")
        for name in names:
            assert hasattr(mod, name), (family, name)
            assert callable(cuda_kernel(family, name)), (family, name)
    assert {c[0] for c in CASES} == {n for names in families.values() for n in names}
