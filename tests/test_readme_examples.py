"""README.md's Python examples run as written, so the README cannot silently go stale.

Every fenced ```python block of README.md is executed, each in a fresh namespace, with a temporary
directory as the working directory (the examples write `run/`, `idx/`, `ckpt/`). A block preceded
(on the line above its fence, blank lines allowed) by an HTML comment ``<!-- not-run: REASON -->``
is skipped, with that reason. A few claims the examples' comments make are checked on the
namespace they leave behind (``CHECKS``); each check must find its example.
"""
from __future__ import annotations

import linecache
import os
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")


class Snippet(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str]  # the not-run reason, or None


def readme_snippets(path: str = README) -> List[Snippet]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: List[Snippet] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: unterminated code fence")
        i += 1  # past the closing fence
        if lang not in ("python", "py"):
            continue
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = _NOT_RUN.match(lines[j].strip()) if j >= 0 else None
        out.append(Snippet(start + 1, "\n".join(body) + "\n", marker.group(1) if marker else None))
    return out


SNIPPETS = readme_snippets()


def _two_of_four(ns) -> None:
    W, mask = ns["W"], ns["mask"]
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert bool((mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all())  # exactly 2 of every 4
    assert torch.equal(W != 0, mask)  # hard_threshold(nnz=2) kept exactly the mask's entries


def _param_map(ns) -> None:
    pm, flat, buf, full = ns["pm"], ns["flat"], ns["buf"], ns["full"]
    assert flat.shape == (pm.input_dim,) and torch.equal(buf, flat)
    assert list(full) == pm.names and all(full[n].shape == pm.shape(n) for n in pm.names)
    assert ns["ParamMap"].load("run/gradiend_dir") == pm


def _golden(ns) -> None:
    res, model = ns["res"], ns["model"]
    assert set(res.masks) == {n for n, _ in model.named_parameters()}
    assert len(res.history) == res.samples and set(res.counts) == set(res.masks)


def _projection(ns) -> None:
    col, grads, z, flat_grads = ns["col"], ns["grads"], ns["z"], ns["flat_grads"]
    assert z.shape == (flat_grads.shape[0], 2048)
    assert grads.shape == (ns["batch"]["input_ids"].shape[0], len(col.module_dims) * col.p * col.p)
    assert ns["scores"].shape == ns["rows"].shape == (ns["queries"].shape[0], 10)
    assert torch.equal(ns["rows"][:, 0], torch.arange(ns["queries"].shape[0]))  # each query finds itself first


def _obs(ns) -> None:
    w = ns["layer"].weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    assert len(ns["report"].layers) == 2


# (names the example defines, check); each must match exactly one example
CHECKS: List[Tuple[Tuple[str, ...], Callable[[Dict], None]]] = [
    (("two_four", "mask", "W"), _two_of_four),
    (("pm", "flat", "buf", "full"), _param_map),
    (("res", "opt"), _golden),
    (("col", "grads", "scores", "rows"), _projection),
    (("obs", "report", "layer"), _obs),
]
_matched: Dict[int, int] = {}
_ran: set = set()  # lines of the examples executed in this process


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 7, f"expected the README's 7+ python examples, found {len(SNIPPETS)}"
    for s in SNIPPETS:
        assert s.skip is None or s.skip, f"README.md:{s.line}: a not-run marker needs a reason"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"README.md:{s.line}" for s in SNIPPETS])
def test_readme_snippet(snippet: Snippet, tmp_path, monkeypatch):
    if snippet.skip is not None:
        pytest.skip(f"marked not-run in README.md: {snippet.skip}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: Dict = {"__name__": "__readme__"}
    name = f"README.md:{snippet.line}"
    linecache.cache[name] = (len(snippet.code), None, snippet.code.splitlines(True), name)  # readable tracebacks
    exec(compile(snippet.code, name, "exec"), ns)
    for i, (names, check) in enumerate(CHECKS):
        if all(n in ns for n in names):
            _matched[i] = _matched.get(i, 0) + 1
            check(ns)
    _ran.add(snippet.line)


def test_readme_checks_found_their_examples():
    """Runs after the examples (file order): a renamed variable must not silently disable a check."""
    if _ran != {s.line for s in SNIPPETS if s.skip is None}:
        pytest.skip("not every README example ran in this process (deselected, skipped or failed)")
    missing = [CHECKS[i][1].__name__ for i in range(len(CHECKS)) if _matched.get(i) != 1]
    assert not missing, f"checks that did not match exactly one README example: {missing}"
