"""gradkit.compat.gradiend against gradiend 0.2.3 itself (installed by the test command; never skipped)."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

from gradiend.model.param_mapped import ParamMappedGradiendModel

from gradkit import ParamMap
from gradkit.compat.gradiend import accelerate


def _base_and_spec(seed, unsorted=False):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    base(torch.randn(3, 16)).pow(2).sum().backward()
    idx = torch.randperm(32, generator=g)[:9]
    if not unsorted:
        idx = idx.sort().values
    spec = {
        "0.weight": {"shape": (8, 16), "repr": "mask", "mask": torch.rand(8, 16, generator=g) < 0.4},
        "0.bias": {"shape": (8,), "repr": "all"},
        "2.weight": {"shape": (4, 8), "repr": "indices", "indices": idx},
        "2.bias": {"shape": (4,), "repr": "indices", "indices": torch.empty(0, dtype=torch.long)},
    }
    return base, spec


def _models(seed, unsorted=False, latent=3):
    base, spec = _base_and_spec(seed, unsorted)
    n = ParamMap(spec).input_dim
    torch.manual_seed(seed)
    ref = ParamMappedGradiendModel(n, latent, spec, device=torch.device("cpu"))
    fast = accelerate(copy.deepcopy(ref))
    return base, ref, fast


def _positions(model):
    return ParamMap(model.param_map).hash


@given(seed=st.integers(0, 10_000), unsorted=st.booleans())
def test_gather_paths_match_gradiend(seed, unsorted):
    base, ref, fast = _models(seed, unsorted)
    assert torch.equal(fast.extract_gradients(base), ref.extract_gradients(base))
    grads = {n: p.grad for n, p in base.named_parameters()}
    assert torch.equal(fast.flatten_gradient_dict(grads), ref.flatten_gradient_dict(grads))
    d_ref, e_ref = ref(grads, return_encoded=True)
    d_fast, e_fast = fast(grads, return_encoded=True)
    assert torch.equal(e_ref, e_fast)
    assert d_ref.keys() == d_fast.keys()
    for k in d_ref:
        assert torch.equal(d_ref[k], d_fast[k])
    assert torch.equal(fast.forward_encoder(grads), ref.forward_encoder(grads))
    flat = ref.extract_gradients(base)
    assert torch.equal(fast(flat), ref(flat))  # tensor input: GRADIEND's own path


@given(seed=st.integers(0, 10_000), unsorted=st.booleans(),
       topk=st.one_of(st.none(), st.floats(0.05, 1.0), st.integers(1, 40)),
       use_mask=st.booleans(), use_threshold=st.booleans(), part=st.sampled_from(["decoder-weight", "encoder-weight"]))
def test_prune_matches_gradiend(seed, unsorted, topk, use_mask, use_threshold, part):
    base, ref, fast = _models(seed, unsorted)
    n = ref.input_dim
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(n, generator=g)  # continuous: no ties, so torch.topk's choice is unique
    kw = {"importance": imp} if seed % 2 else {"part": part}
    mask = (torch.rand(n, generator=g) < 0.8) if use_mask else None
    threshold = 0.1 if use_threshold else None
    if mask is None and threshold is None and topk is None:
        topk = 0.3
    args = dict(mask=mask, threshold=threshold, topk=topk, return_mask=True, **kw)
    try:
        r_model, r_mask = ref.prune(**args)
    except ValueError:
        with pytest.raises(ValueError):
            fast.prune(**args)
        return
    f_model, f_mask = fast.prune(**args)
    assert torch.equal(r_mask, f_mask)
    assert r_model.input_dim == f_model.input_dim
    for a, b in zip(r_model.state_dict().values(), f_model.state_dict().values()):
        assert torch.equal(a, b)
    kept = f_mask.nonzero().reshape(-1)
    # gradkit's pruned map selects exactly the kept input positions, in their old order
    assert torch.equal(f_model.extract_gradients(base), fast.extract_gradients(base)[kept])
    if not unsorted:
        assert _positions(r_model) == _positions(f_model)
        assert torch.equal(f_model.extract_gradients(base), r_model.extract_gradients(base))
    # the original models were not modified (inplace=False)
    assert ref.input_dim == fast.input_dim == n and fast.encoder[0].linear.weight.shape[1] == n
    assert getattr(f_model, "_gradkit_accelerated", False)


def test_prune_inplace_and_errors_match_gradiend():
    base, ref, fast = _models(3)
    imp = torch.rand(ref.input_dim)
    r = ref.prune(topk=5, importance=imp, inplace=True)
    f = fast.prune(topk=5, importance=imp, inplace=True)
    assert r is ref and f is fast and _positions(r) == _positions(f)
    assert torch.equal(f.extract_gradients(base), r.extract_gradients(base))
    # the same type and message as GRADIEND's (which has no "<arg>: " prefix), naming the argument
    for bad, err, msg in ((dict(topk=True, importance=imp[:5]), TypeError, r"^topk must be int or float, not bool$"),
                          (dict(), ValueError, r"^At least one of topk, threshold, mask must be provided\.$"),
                          (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError,
                           r"^mask must be bool tensor with shape \(5,\)$")):
        with pytest.raises(err, match=msg):
            ref.prune(**bad)
        with pytest.raises(err, match=msg):
            fast.prune(**bad)


def test_missing_grad_raises_like_gradiend():
    base, ref, fast = _models(1)
    base[2].weight.grad = None
    with pytest.raises(RuntimeError, match="2.weight"):
        ref.extract_gradients(base)
    with pytest.raises(RuntimeError, match="2.weight"):
        fast.extract_gradients(base)


@pytest.mark.parametrize("unsorted", [False, True])
def test_files_interoperate_both_ways(tmp_path, unsorted):
    base, ref, _ = _models(7, unsorted)
    # GRADIEND writes, gradkit reads
    ref.save_pretrained(str(tmp_path / "g"))
    loaded = ParamMap.load(tmp_path / "g")
    if not unsorted:
        assert loaded.hash == ParamMap(ref.param_map).hash
    else:
        # GRADIEND re-encodes an unsorted index list as a mask when that is smaller, which
        # reorders the input space; gradkit reads what GRADIEND wrote, exactly.
        assert loaded.input_dim == ref.input_dim
    # gradkit writes into a GRADIEND model directory, GRADIEND reads it back with its weights
    pm = ParamMap(ref.param_map)
    pruned, kept = pm.prune(topk=0.5, importance=torch.rand(pm.input_dim))
    pruned_model = ref.prune(mask=torch.isin(torch.arange(pm.input_dim), kept))
    pruned_model.save_pretrained(str(tmp_path / "h"))
    pruned.save(tmp_path / "h")
    back = ParamMappedGradiendModel.from_pretrained(str(tmp_path / "h"))
    assert ParamMap(back.param_map).hash == pruned.hash
    assert torch.equal(back.extract_gradients(base), pruned.gather(base))
    for a, b in zip(back.state_dict().values(), pruned_model.state_dict().values()):
        assert torch.equal(a, b)


def test_unsorted_indices_gradiend_reorders_gradkit_does_not():
    """gradiend 0.2.3's prune re-encodes a dense-enough unsorted index list as a mask,
    silently reordering the input space against its own (correctly sliced) weights.
    gradkit keeps the index order, so the pruned input space means what it meant before."""
    base, ref, fast = _models(5, unsorted=True)
    imp = torch.rand(ref.input_dim, generator=torch.Generator().manual_seed(0))
    r = ref.prune(topk=0.9, importance=imp)
    f, mask = fast.prune(topk=0.9, importance=imp, return_mask=True)
    kept = mask.nonzero().reshape(-1)
    before = ref.extract_gradients(base)
    assert torch.equal(f.extract_gradients(base), before[kept])
    assert not torch.equal(r.extract_gradients(base), before[kept])  # gradiend's divergence (pinned at 0.2.3)


def test_topk_one_keeps_everything_like_gradiend_without_reordering():
    base, ref, fast = _models(0, unsorted=True)
    mask = torch.zeros(ref.input_dim, dtype=torch.bool)  # GRADIEND ignores mask/threshold with topk=1.0
    r, r_mask = ref.prune(topk=1.0, mask=mask, return_mask=True)
    f, f_mask = fast.prune(topk=1.0, mask=mask, return_mask=True)
    assert torch.equal(r_mask, f_mask) and bool(f_mask.all())
    assert f.input_dim == r.input_dim == ref.input_dim
    assert torch.equal(f.extract_gradients(base), ref.extract_gradients(base))  # same order as before
    assert not torch.equal(r.extract_gradients(base), ref.extract_gradients(base))  # gradiend 0.2.3 reorders


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_prune_threshold_on_low_precision_importance_matches_gradiend(dtype):
    """GRADIEND compares `importance >= threshold` in the importance's dtype (the threshold rounded to it: float16
    0.09998 passes 0.1); ParamMap.prune compares exactly. The drop-in keeps GRADIEND's answer at the boundary."""
    base, ref, fast = _models(5)
    n = ref.input_dim
    t = 0.1
    below = torch.tensor(t, dtype=dtype)  # t rounded to dtype, then nudged just under t where rounding went up
    if float(below) >= t:
        below = torch.nextafter(below, torch.tensor(0.0, dtype=dtype))
    imp = torch.full((n,), 0.5, dtype=dtype)
    imp[0], imp[1], imp[2] = below, torch.tensor(t, dtype=dtype), 0.01
    r_model, r_mask = ref.prune(threshold=t, importance=imp, return_mask=True)
    f_model, f_mask = fast.prune(threshold=t, importance=imp, return_mask=True)
    assert torch.equal(r_mask, f_mask)
    assert not bool(f_mask[2]) and bool(f_mask[3])
    assert r_model.input_dim == f_model.input_dim == int(r_mask.sum())
