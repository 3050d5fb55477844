"""Benchmark harness shared by every family: timing, long-format JSONL rows, table, plot.

One row per (family, op, provider, shape, dtype, device, metric) with p20/p50/p80.
CPU timings use torch.utils.benchmark; CUDA timings use triton.testing.do_bench.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.utils.benchmark as tb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: str) -> Dict[str, object]:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    return {"device_name": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": tv, "git_sha": _git_sha(), "host": platform.node(), "python": platform.python_version(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "loadavg_1m": _loadavg()}


def _loadavg():
    """The host's 1-minute load average when the row is written (None where the OS has none): on a shared VM a
    load above the thread count slows providers unequally (faiss's two OpenMP regions per block more than
    gradkit's one parallel loop), so a ratio should be read with it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _quantiles(xs: List[float]) -> Dict[str, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return {"p20": xs[0], "p50": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(xs), "p80": q[7]}


def time_fn(fn: Callable[[], object], device: str = "cpu", min_run_time: float = 1.0,
            slow_reps: int = 3, setup: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Seconds per call as p20/p50/p80 plus the sample count.

    Timers run with the process's thread count (torch.utils.benchmark defaults to 1 thread).
    Fast calls (< 0.2 s): torch.utils.benchmark blocked_autorange samples. Slow calls:
    ``slow_reps`` single timed runs after one warm-up (each preceded by ``setup``).
    On CUDA: triton.testing.do_bench (ms -> s).
    """
    if device.startswith("cuda"):
        import triton.testing

        if setup:
            setup()
        q = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])  # ms, CUDA-event timed, median of many
        return {"p20": q[0] / 1e3, "p50": q[1] / 1e3, "p80": q[2] / 1e3, "n": "do_bench"}
    if setup:
        setup()
    t0 = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).raw_times[0]  # warm-up, also sizes the call
    if t0 < 0.2 and setup is None:
        m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
        times = m.times
    else:
        times = []
        for _ in range(slow_reps):
            if setup:
                setup()
            times.append(tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).raw_times[0])
    return {**_quantiles(times), "n": len(times)}


def with_env(name: str, value: str, fn: Callable[..., object]) -> Callable[..., object]:
    """fn with the environment variable ``name`` set to ``value`` during each call, restored after it (the A/B
    scripts' switch between two kernel paths that gradkit reads per call; bench_collector's extra rows)."""
    def call(*args):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return call


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 30, calls: int = 10,
                     baseline: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Side by side under a shared, drifting CPU load: per round, each provider runs ``calls`` calls
    back to back (the order rotates every round), so all of them see the same stretch of load.
    Returns per provider p20/p50/p80 of its per-call time per round, and, against ``baseline``, the
    quantiles of the per-round ratios (``ratio_p20`` / ``ratio_p50`` / ``ratio_p80``: provider time /
    baseline time in the same round). CPU only; one warm-up call each first."""
    names = list(fns)
    for n in names:
        fns[n]()
    per = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            f = fns[n]
            t = time.perf_counter()
            for _ in range(calls):
                f()
            per[n].append((time.perf_counter() - t) / calls)
    out = {}
    for n in names:
        st = {**_quantiles(per[n]), "n": rounds * calls}
        if baseline is not None and n != baseline:
            rq = _quantiles([a / b for a, b in zip(per[n], per[baseline])])
            st.update(ratio_p20=rq["p20"], ratio_p50=rq["p50"], ratio_p80=rq["p80"])
        out[n] = st
    return out


class Recorder:
    """Collects rows and writes the JSONL, the markdown table and the plot."""

    def __init__(self, device: str = "cpu", min_run_time: float = 1.0):
        self.device = device
        self.min_run_time = min_run_time
        self.env = environment(device)
        self.rows: List[Dict[str, object]] = []

    def time(self, fn: Callable[[], object], **kw) -> Dict[str, float]:
        return time_fn(fn, self.device, min_run_time=self.min_run_time, **kw)

    time_raw = time

    def add(self, family: str, op: str, provider: str, shape: str, dtype: str, stats: Dict[str, float],
            metric: str = "seconds", **extra) -> None:
        row = {"family": family, "op": op, "provider": provider, "shape": shape, "dtype": dtype,
               "device": self.device, "metric": metric, **stats, **extra, **self.env}
        self.rows.append(row)
        if metric == "seconds":
            print(f"  {op:<28} {provider:<22} p50={stats['p50'] * 1e3:10.2f} ms  (p20 {stats['p20'] * 1e3:.2f}, "
                  f"p80 {stats['p80'] * 1e3:.2f}, n={stats['n']})", flush=True)
        else:
            print(f"  {op:<28} {provider:<22} {stats['p50']:.5g} {metric}", flush=True)

    def write_jsonl(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)


def ratio_table(rows: List[Dict[str, object]], baseline: str = "gradkit") -> str:
    """Markdown: one line per (op, provider) with p50 and the ratio provider/gradkit (>1 = gradkit faster)."""
    head = rows[0] if rows else {}
    lines = [f"Device: {head.get('device_name', '?')} ({head.get('device', '?')}, {head.get('threads', '?')} threads), "
             f"torch {head.get('torch', '?')}, git {head.get('git_sha', '?')}, {head.get('time', '?')}", "",
             "| family | op | shape | provider | p50 (ms) | p20-p80 (ms) | time / gradkit |",
             "|---|---|---|---|---:|---:|---:|"]
    base = {(r["family"], r["op"], r["shape"]): r["p50"] for r in rows
            if r["provider"] == baseline and r["metric"] == "seconds"}
    for r in rows:
        if r["metric"] != "seconds":
            lines.append(f"| {r['family']} | {r['op']} | {r['shape']} | {r['provider']} | "
                         f"{r['p50']:.5g} ({r['metric']}) | - | - |")
            continue
        b = base.get((r["family"], r["op"], r["shape"]))
        ratio = f"{r['p50'] / b:.1f}x" if b else "-"
        lines.append(f"| {r['family']} | {r['op']} | {r['shape']} | {r['provider']} | {r['p50'] * 1e3:.2f} | "
                     f"{r['p20'] * 1e3:.2f}-{r['p80'] * 1e3:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metric"] == "seconds"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(ops)), 5))
    width = 0.8 / max(1, len(providers))
    for j, p in enumerate(providers):
        xs, ys = [], []
        for i, op in enumerate(ops):
            v = [r["p50"] for r in rows if r["op"] == op and r["provider"] == p]
            if v:
                xs.append(i + j * width)
                ys.append(v[0] * 1e3)
        ax.bar(xs, ys, width=width, label=p)
    ax.set_yscale("log")
    ax.set_ylabel("p50 time per call (ms, log scale)")
    ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(ops))])
    ax.set_xticklabels(ops, rotation=20, ha="right")
    head = rows[0] if rows else {}
    ax.set_title(f"gradkit vs peers — {head.get('device_name', '')} ({head.get('threads', '?')} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
