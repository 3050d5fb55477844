"""Audit (s35) of gradkit.ParamMap: selections the caller still holds, half-updated models, silent wrong
answers from loosely typed arguments, and the exactness of prune's threshold.

Each test failed on the code before its fix and pins the fixed behaviour."""
import json
import os

import numpy as np
import pytest
import torch

from gradkit import ParamMap, ops


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_scatter_refuses_an_unsupported_flat_dtype_before_creating_any_grad():
    # float8 passed the `is_floating_point` check, .grad tensors were created, then the kernel refused float8:
    # the model was left with zero .grad tensors where it had None
    lin = _linear()
    pm = ParamMap.from_model(lin)
    flat = torch.zeros(pm.input_dim, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^flat: expected float32/float64/float16/bfloat16, got torch.float8_e4m3fn"):
        pm.scatter(flat, out=lin, mode="add")
    assert lin.weight.grad is None and lin.bias.grad is None


def test_scatter_into_a_model_with_an_expanded_grad_creates_no_other_grad():
    # the expanded .grad was refused by the kernel only after the missing bias .grad had been created
    lin = _linear()
    pm = ParamMap.from_model(lin)
    lin.weight.grad = torch.zeros(1, 1).expand(2, 3)
    with pytest.raises(ValueError, match=r"^out\['weight'\]\.grad: several elements share one memory location"):
        pm.scatter(torch.ones(pm.input_dim), out=lin, mode="add")
    assert lin.bias.grad is None
    assert torch.equal(lin.weight.grad, torch.zeros(2, 3))


def test_selection_tensors_are_copied_in_and_out():
    # the map kept the caller's CPU index / mask / bitmask tensors (and to_spec handed its own out): an in-place edit
    # afterwards changed an index entry's gather unvalidated (and not its cached hash), and a mask entry's saved
    # file (the gather plan kept the old positions), which load then refused
    g = torch.arange(12.0).reshape(3, 4)
    idx = torch.tensor([0, 5, 2], dtype=torch.int32)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    bits = ops.pack_bitmask(mask)
    pm = ParamMap({"i": {"shape": (3, 4), "repr": "indices", "indices": idx},
                   "m": {"shape": (3, 4), "repr": "mask", "mask": mask},
                   "b": {"shape": (3, 4), "repr": "bitmask", "bitmask": bits}})
    h = pm.hash
    idx[0] = 5  # would be a repeated position
    mask[1, 1] = True
    bits.fill_(255)
    src = {"i": g, "m": g, "b": g}
    want = torch.tensor([0.0, 5.0, 2.0, 1.0, 11.0, 1.0, 11.0])
    assert torch.equal(pm.gather(src), want)
    spec = pm.to_spec()
    spec["i"]["indices"][1] = 7
    spec["m"]["mask"].fill_(True)
    spec["b"]["bitmask"].fill_(0)
    assert torch.equal(pm.gather(src), want)
    assert pm.hash == h == ParamMap(pm.to_spec()).hash
    assert pm.to_spec()["i"]["indices"].tolist() == [0, 5, 2]


def test_save_after_the_callers_mask_changed_loads_back(tmp_path):
    mask = torch.tensor([[True, False, True], [False, False, False]])
    pm = ParamMap({"w": {"shape": (2, 3), "repr": "mask", "mask": mask}})
    mask[1, 1] = True
    pm.save(tmp_path)
    back = ParamMap.load(tmp_path)  # refused before: num_selected=2 but the stored mask had 3
    assert back == pm and back.counts == [2]


def test_base_global_index_refuses_non_integer_positions():
    # torch.as_tensor(positions, dtype=int64) truncated 3.7 to 3 and read True as 1: a wrong (name, index)
    pm = ParamMap({"a": {"shape": (4,), "repr": "all"}, "b": {"shape": (4,), "repr": "indices",
                                                              "indices": torch.tensor([3, 1, 0, 2])}})
    with pytest.raises(TypeError, match=r"^positions: expected integers, got 3.7"):
        pm.base_global_index([3.7])
    with pytest.raises(TypeError, match=r"^positions: expected integers, got True"):
        pm.base_global_index([0, True])
    with pytest.raises(TypeError, match=r"^positions: "):
        pm.base_global_index(5.0)
    assert pm.base_global_index(np.int64(5)) == ("b", 1)
    assert pm.base_global_index([np.int32(4), 7]) == [("b", 3), ("b", 2)]
    assert pm.base_global_index([]) == []


def test_from_model_refuses_a_uint8_or_float_selection_by_name():
    # a uint8 0/1 mask (GRADIEND's stored mask format) was read as flat indices: [0, 1] on a 2-element bias
    # silently selected both elements instead of the second
    lin = _linear()
    with pytest.raises(TypeError, match=r"^masks\['bias'\]: a uint8 tensor is ambiguous"):
        ParamMap.from_model(lin, ["bias"], masks={"bias": torch.tensor([0, 1], dtype=torch.uint8)})
    with pytest.raises(TypeError, match=r"^masks\['bias'\]: expected a bool mask or an integer tensor"):
        ParamMap.from_model(lin, ["bias"], masks={"bias": torch.tensor([0.0, 1.0])})
    pm = ParamMap.from_model(lin, ["bias"], masks={"bias": torch.tensor([0, 1], dtype=torch.uint8).bool()})
    assert pm.counts == [1]
    assert ParamMap.from_model(lin, ["bias"], masks={"bias": torch.tensor([1], dtype=torch.int16)}).counts == [1]


def test_scale_past_the_float_range_is_a_value_error():
    pm = ParamMap({"a": {"shape": (2,), "repr": "all"}})
    d = torch.ones(2)
    for bad in (10 ** 400, -(10 ** 400)):  # math.isfinite raised OverflowError
        with pytest.raises(ValueError, match=r"^scale: expected a finite number"):
            pm.scatter(torch.ones(2), out={"a": d}, mode="add", scale=bad)
    assert torch.equal(d, torch.ones(2))


@pytest.mark.parametrize("dtype,value,threshold", [
    (torch.float16, 0.0999755859375, 0.1),   # float16(0.1) rounds down to the value
    (torch.bfloat16, 0.69921875, 0.7),       # bfloat16(0.7) rounds down to the value
    (torch.float32, 0.699999988079071, 0.7),  # float32(0.7) rounds down to the value
    (torch.float16, 65504.0, 65519),          # an int threshold between fp16's max and infinity
])
def test_prune_threshold_is_exact_for_low_precision_importances(dtype, value, threshold):
    # `imp >= float(threshold)` compared in imp's dtype: the threshold was rounded down onto a value below it,
    # which was then kept (README: keep importance >= threshold)
    pm = ParamMap({"a": {"shape": (4,), "repr": "all"}})
    imp = torch.tensor([value, 2 * value, value / 2, value], dtype=dtype)
    assert float(imp[0]) == value < threshold
    new, kept = pm.prune(threshold=threshold, importance=imp)
    assert kept.tolist() == [1] and new.input_dim == 1
    # a value exactly at (or just above) the threshold stays
    _, kept = pm.prune(threshold=value, importance=imp)
    assert kept.tolist() == [0, 1, 3]
    _, kept = pm.prune(threshold=-(10 ** 400), importance=imp)  # float(threshold) overflowed before
    assert kept.tolist() == [0, 1, 2, 3]


def test_load_refuses_a_non_string_key_by_name(tmp_path):
    # an edited entry key (a list) raised TypeError('unhashable type') instead of naming the file and entry
    pm = ParamMap({"w": {"shape": (64,), "repr": "indices", "indices": torch.tensor([3, 1])}})
    pm.save(tmp_path)
    cfg_path = os.path.join(tmp_path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["mapping"]["param_map"][0]["key"] = ["L0"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"config\.json: mapping\.param_map\[0\]: indices tensor \['L0'\] missing"):
        ParamMap.load(tmp_path)


def test_gather_with_nothing_selected_checks_dtype_and_out():
    # with no selected entry no kernel ran, so dtype=torch.int32 returned an int tensor (and an int `out` was
    # returned as is), where a map with selected entries refuses both
    pm = ParamMap({"a": {"shape": (4,), "repr": "indices", "indices": torch.empty(0, dtype=torch.long)}})
    src = {"a": torch.ones(4)}
    with pytest.raises(TypeError, match=r"^dtype: expected float32/float64/float16/bfloat16"):
        pm.gather(src, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^dtype: "):
        pm.gather(src, dtype="float32")
    with pytest.raises(TypeError, match=r"^out: expected float32/float64/float16/bfloat16"):
        pm.gather(src, out=torch.zeros(0, dtype=torch.int64))
    assert pm.gather(src, dtype=torch.float16).dtype == torch.float16


def test_save_errors_name_the_directory_argument(tmp_path):
    """save(directory) where the directory is a regular file, or a regular file sits where one of its parents should
    be: a ValueError naming `directory`, nothing written (was `path:` and a raw FileExistsError)."""
    pm = ParamMap({"w": {"shape": (4,), "repr": "all"}})
    f = tmp_path / "plain.txt"
    f.write_text("keep")
    with pytest.raises(ValueError, match=r"^directory: .* exists and is not a directory"):
        pm.save(str(f))
    with pytest.raises(ValueError, match=r"^directory: cannot create .*not a directory"):
        pm.save(str(f / "sub" / "map"))
    assert f.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["plain.txt"]
