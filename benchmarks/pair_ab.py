"""Paired A/B of ``factored_project`` between two builds: a git ref (built once in a worktree) and this checkout.

    python benchmarks/pair_ab.py --base REF [--pairs 10] [--shape 1000,64,128] [--dtype float32] [--env K=V ...]

Each pair runs the base build and this checkout's build in two fresh processes, one after the other (the order
alternating), each timing ``torch.ops.gradkit.factored_project`` on the same inputs (two threads, 5 warm-up calls,
31 rounds x 10 calls, the median round). It prints every pair's ratio (this / base: below 1 is faster) and the
median and p20 / p80 over the pairs.

Why separate processes: two variants of a kernel built into one library and alternated in one process
(``harness.time_interleaved``) differ in code layout as well as in what was changed, and in session 19 such a
comparison was off by up to 0.2x against the same two builds timed in their own processes. Alternating fresh
processes in pairs keeps the shared host's drift out of each ratio, as ``time_interleaved`` does within one
process. The base worktree (``$TMPDIR/gradkit-pair-<sha>``) is built with ``MAX_JOBS=2`` on first use (a few
minutes) and kept for later runs. This checkout must be built already (``python setup.py build_ext --inplace``).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child(shape: str, dtype: str) -> None:
    import torch

    from gradkit.projection import projection_matrix

    torch.set_num_threads(2)
    width, nb, T = (int(v) for v in shape.split(","))
    gen = torch.Generator().manual_seed(5)
    lt = projection_matrix(16, width, seed=1).T.contiguous()
    rt = projection_matrix(16, width, seed=2).T.contiguous()
    a = torch.randn(nb * T, width, generator=gen).to(getattr(torch, dtype))
    g = torch.randn(nb * T, width, generator=gen).to(a.dtype)
    for _ in range(5):
        torch.ops.gradkit.factored_project(a, g, lt, rt, None, None, T)
    rounds = []
    for _ in range(31):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.ops.gradkit.factored_project(a, g, lt, rt, None, None, T)
        rounds.append((time.perf_counter() - t0) / 10)
    print(sorted(rounds)[len(rounds) // 2])


def base_tree(ref: str) -> str:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = os.path.join(tempfile.gettempdir(), f"gradkit-pair-{sha[:12]}")
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", "-f", path, sha], cwd=ROOT, check=True)
    pkg = os.path.join(path, "python", "gradkit")
    if not any(f.startswith("_C") and f.endswith(".so") for f in os.listdir(pkg)):
        print(f"building {ref} ({sha[:12]}) in {path} ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=path, check=True,
                       env={**os.environ, "MAX_JOBS": "2"}, stdout=subprocess.DEVNULL)
    return os.path.join(path, "python")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="git ref to compare against (built in a worktree)")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--shape", default="1000,64,128", help="width,examples,tokens per example")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--env", action="append", default=[], help="K=V set in both processes (repeatable)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.shape, args.dtype)
        return
    if not args.base:
        ap.error("--base is required")
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    env = dict(os.environ)
    for kv in args.env:
        if "=" not in kv:
            ap.error(f"--env takes K=V, got {kv!r}")
        k, v = kv.split("=", 1)
        env[k] = v
    trees = {"base": base_tree(args.base), "this": os.path.join(ROOT, "python")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape, "--dtype", args.dtype]

    def run(which: str) -> float:
        e = {**env, "PYTHONPATH": trees[which] + os.pathsep + env.get("PYTHONPATH", "")}
        return float(subprocess.run(cmd, env=e, capture_output=True, text=True, check=True).stdout.split()[-1])

    ratios = []
    for i in range(args.pairs):
        order = ("base", "this") if i % 2 == 0 else ("this", "base")
        t = {w: run(w) for w in order}
        ratios.append(t["this"] / t["base"])
        print(f"pair {i + 1}: base {t['base'] * 1e3:.3f} ms, this {t['this'] * 1e3:.3f} ms, this / base "
              f"{ratios[-1]:.3f}", flush=True)
    from harness import _quantiles  # the p20 / p50 / p80 every benchmark row reports

    q = _quantiles(ratios)
    print(f"this / base over {len(ratios)} pairs: median {q['p50']:.3f}, p20 {q['p20']:.3f}, p80 {q['p80']:.3f} "
          f"({args.dtype}, shape {args.shape}, env {args.env or '-'})")


if __name__ == "__main__":
    main()
