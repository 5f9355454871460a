r"""Benchmark of the margin barrier alone: ``sum_t log|det J_tt|`` of one causal-attention prior.

Four ways to get the per-position ``log|det J_tt|``, ``(B, T)``, side by side on the same weights and inputs:

``sylvester``
    the closed-form low-rank path, an ``r x r`` determinant per position, ``r = H d_k``
    (``CausalAttentionTransform(logdet="sylvester")``).
``full``
    the closed-form ``d x d`` path: ``slogdet`` of :meth:`~CausalAttentionTransform.jacobian_blocks`
    (``logdet="full"``).
``autograd``
    the reference of ``tests/reference.py``: the whole ``(T d) x (T d)`` Jacobian of ``x -> z`` by
    ``torch.func.jacrev`` (chunked vmap of the backward pass), then ``slogdet`` of its diagonal blocks; one sequence only
    (``batch`` column is 1), forward only, and only where the Jacobian fits ``--autograd-max-entries``.
``loop``
    a naive Python loop over positions: for each ``t`` attend from ``x_t`` over ``x_{<=t}`` and take the
    Sylvester determinant of that one block (the same closed form, not vectorised over ``t``).

The weights are random (``init_scale = d^-1/2``), the inputs ``x_scale * N(0, 1)``. The default coupling is
``repulsive``, where every ``det J_tt >= 1``: the regime the barrier keeps training in, so the float32
errors measure the method. With ``--coupling free`` and unit inputs about half the blocks are folded
(``det J_tt < 0``, column ``folded_frac`` of the JSON) and ``cond(J_tt)`` reaches ``1e5``; float32 errors of
``1e-5 .. 1e-4`` there are the conditioning, the same for every method. Timings do not depend on it.

Every cell is timed in ``fwd`` (the barrier values) and ``fwd+bwd`` (plus ``backward`` of their sum into
``x`` and the weights). Accuracy: each float32 result against the float64 Sylvester closed form on the
same inputs, ``rel_err = ||l32 - l64||_2 / ||l64||_2`` over all ``B x T`` positions (and the same for the
gradient in ``x`` in ``fwd+bwd`` rows).

Example (a few seconds)::

    python -m benchmarks.barrier --dims 64 --lengths 128 --ranks 16 --batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from experiments.report import write_json
from inference.map import device_name, resolve_device
from prob_attention import CausalAttentionTransform

METHODS = ("sylvester", "full", "autograd", "loop")
MODES = ("fwd", "fwd+bwd")
TARGET_CELL = {"d": 256, "T": 512, "d_k": 64}
TARGET_SPEEDUP = 5.0
TARGET_REL_ERR = 1e-5
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# ------------------------------------------------------------------------------------ shared helpers
def device_slug(device: torch.device) -> str:
    """``cpu``, or the CUDA device name in lower case with non-alphanumerics as ``-`` (for file names)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run_metadata(device: torch.device, prog: str, argv: Sequence[str]) -> dict[str, Any]:
    """What a result file records about the machine and the command (``prog`` and its ``argv``) that made it,
    with the machine's 1, 5 and 15 minute load averages at the start (where the OS reports them)."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": f"{prog} {shlex.join(argv)}".rstrip(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float,
              warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], Any]:
    """Seconds of ``fn()`` by ``clock`` (default wall clock) after ``warmup`` untimed calls; returns the times and
    the last output.

    Runs ``repeats`` timed calls, or fewer once ``budget_s`` seconds have been spent (always at least one).
    CUDA is synchronised before and after each call.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < max(1, repeats) and (not times or spent < budget_s):
        start = clock()
        out = fn()
        synchronize(device)
        times.append(clock() - start)
        spent += times[-1]
    return times, out


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above the level at its start (tensors that existed before do not count).

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the running sum of the
    allocation and free events that ``torch.profiler`` records with ``profile_memory=True`` (torch's CPU
    allocator only: not the Python heap, not the process RSS).
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return int(peak)


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _iqr(times: list[float]) -> float:
    if len(times) < 4:
        return max(times) - min(times)
    q = statistics.quantiles(times, n=4)
    return q[2] - q[0]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------- the four methods
def barrier_sylvester(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``log|det J_tt|`` by the ``r x r`` Sylvester determinant, ``(B, T)``."""
    assert transform.uses_sylvester
    return transform.log_abs_det_blocks(x)[0]


def barrier_full(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``log|det J_tt|`` by the ``d x d`` determinant of the explicit blocks, ``(B, T)``."""
    assert not transform.uses_sylvester
    return transform.log_abs_det_blocks(x)[0]


def barrier_autograd(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``log|det J_tt|`` from the autograd Jacobian of ``x -> z`` (one ``(T d)^2`` matrix per sequence)."""
    T = x.shape[-2]
    chunk = max(1, 2**26 // (3 * T * T))  # rows of the Jacobian per vmapped backward: ~256 MiB of (T, T) grads
    out = []
    for seq in x:  # (T, d)
        jac = torch.func.jacrev(transform._inverse, chunk_size=chunk)(seq)  # (T, d, T, d)
        blocks = torch.diagonal(jac, dim1=0, dim2=2).permute(2, 0, 1)  # (T, d, d): J_tt
        out.append(torch.linalg.slogdet(blocks)[1])
    return torch.stack(out)


def barrier_loop(transform: CausalAttentionTransform, x: Tensor) -> Tensor:
    """``log|det J_tt|`` one position at a time (attention of ``x_t`` over ``x_{<=t}``), ``(B, T)``."""
    out = []
    for t in range(x.shape[1]):
        prefix = x[:, : t + 1]
        out.append(transform.log_abs_det_blocks(prefix, transform.attend(prefix, start=t))[0][:, 0])
    return torch.stack(out, dim=1)


BARRIERS: dict[str, Callable[[CausalAttentionTransform, Tensor], Tensor]] = {
    "sylvester": barrier_sylvester,
    "full": barrier_full,
    "autograd": barrier_autograd,
    "loop": barrier_loop,
}


def estimated_bytes(method: str, d: int, T: int, d_k: int, heads: int, batch: int, backward: bool) -> int:
    """A rough estimate of the peak memory of a method (float32), used only to skip cells that would not fit.

    Counts the largest tensors of each path, calibrated on CPU peaks at ``d=256, T=512, d_k=64``: the
    ``(B, T, d, d)`` blocks and ``(B, H, T, d d_k)`` moments of ``full``; attention ``(B, H, T, T)`` and
    ``(B, H^2, T, d_k^2)`` moments of ``sylvester``; for ``loop`` the per-prefix moments kept for backward
    (``~ B T^2 d_k^2``); for ``autograd`` the Jacobian twice and one chunk of vmapped gradients.
    """
    if method == "full":
        n = batch * T * (2 * heads * d * d_k + (heads + 2) * d * d) + 3 * batch * heads * T * T
    elif method == "sylvester":
        n = batch * (4 * heads * T * T + 3 * heads * heads * T * d_k * d_k + 4 * heads * T * d)
    elif method == "loop":
        n = batch * heads * heads * T * T * d_k * d_k if backward else batch * 3 * heads * heads * T * d_k * d_k
    else:  # autograd, one sequence
        n = 2 * (T * d) ** 2 + 2**26
    return int(4 * n * (1.5 if backward and method in ("full", "sylvester") else 1.0))


# ----------------------------------------------------------------------------------------- the runner
def make_transforms(d: int, d_k: int, heads: int, coupling: str, device: torch.device,
                    seed: int) -> tuple[CausalAttentionTransform, CausalAttentionTransform]:
    """The same random weights under the Sylvester and the full log-det (strict causal, values = x)."""
    torch.manual_seed(seed)
    syl = CausalAttentionTransform(d, heads, d_k, coupling=coupling, logdet="sylvester")  # type: ignore[arg-type]
    full = CausalAttentionTransform(d, heads, d_k, coupling=coupling, logdet="full")  # type: ignore[arg-type]
    full.load_state_dict(syl.state_dict())
    return syl.to(device), full.to(device)


def _call(method: str, transform: CausalAttentionTransform, x: Tensor, backward: bool) -> Callable[[], Any]:
    barrier = BARRIERS[method]

    def fwd() -> Tensor:
        with torch.no_grad():
            return barrier(transform, x)

    def fwd_bwd() -> tuple[Tensor, Tensor]:
        x.grad = None
        transform.zero_grad(set_to_none=True)
        logabs = barrier(transform, x)
        logabs.sum().backward()
        return logabs.detach(), x.grad

    return fwd_bwd if backward else fwd


def _rel_err(value: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return float((value.double() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


def reference(syl: CausalAttentionTransform, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """float64 Sylvester values, their gradient in ``x`` and the fraction of folded positions (``det J_tt < 0``)."""
    syl64 = deepcopy(syl).double()
    x64 = x.detach().double().requires_grad_(True)
    logabs, sign = syl64.log_abs_det_blocks(x64)
    (grad,) = torch.autograd.grad(logabs.sum(), x64)
    return logabs.detach(), grad, float((sign < 0).double().mean())


def run_cell(d: int, T: int, d_k: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """All methods and modes of one ``(d, T, d_k)`` cell; one row each (skipped rows say why)."""
    syl, full = make_transforms(d, d_k, args.heads, args.coupling, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = (args.x_scale * torch.randn(args.batch, T, d, generator=gen)).to(device).requires_grad_(True)
    ref_logabs, ref_grad, folded = reference(syl, x)
    rows = []
    for mode in args.modes:
        backward = mode == "fwd+bwd"
        for method in args.methods:
            row: dict[str, Any] = {"d": d, "T": T, "d_k": d_k, "heads": args.heads, "mode": mode, "method": method,
                                   "batch": 1 if method == "autograd" else args.batch, "folded_frac": folded}
            reason = _skip_reason(method, d, T, d_k, backward, args)
            if reason:
                rows.append({**row, "status": "skipped", "reason": reason})
                continue
            transform = syl if method in ("sylvester", "loop") else full
            xin = x[:1].detach().requires_grad_(True) if method == "autograd" else x
            if method == "autograd":  # the first torch.func call imports and sets up vmap: keep it out of the clock
                with torch.no_grad():
                    barrier_autograd(transform, x[:1, :2].detach())
            fn = _call(method, transform, xin, backward)
            repeats = 1 if method in ("autograd",) else args.repeats
            try:
                times, out = time_call(fn, device, repeats, args.budget, warmup=0 if method == "autograd" else 1,
                                       clock=CLOCKS[args.clock])
                mem = None if (args.no_memory or method == "autograd") else peak_memory(fn, device)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. out of memory on the device
                rows.append({**row, "status": "error", "reason": f"{type(err).__name__}: {str(err)[:200]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            logabs, grad = (out if backward else (out, None))
            n = row["batch"]
            row.update({
                "status": "ok",
                "median_s": _median(times), "min_s": min(times), "iqr_s": _iqr(times), "repeats": len(times),
                "peak_mem_bytes": mem,
                "rel_err": _rel_err(logabs, ref_logabs[:n]),
                "max_abs_err": float((logabs.double() - ref_logabs[:n]).abs().max()),
                "grad_rel_err": _rel_err(grad, ref_grad[:n]) if grad is not None else None,
            })
            rows.append(row)
        _add_speedups(rows)
    return rows


def _skip_reason(method: str, d: int, T: int, d_k: int, backward: bool, args: argparse.Namespace) -> str | None:
    if method == "autograd":
        if backward:
            return "the autograd Jacobian is a reference for values only (no double backward measured)"
        if (T * d) ** 2 > args.autograd_max_entries:
            return (f"autograd Jacobian has (T d)^2 = {(T * d) ** 2:.3g} entries > --autograd-max-entries "
                    f"{args.autograd_max_entries:.3g} (memory, and T d backward passes)")
    if method == "loop" and T > args.loop_max_length:
        return f"T = {T} > --loop-max-length {args.loop_max_length}"
    need = estimated_bytes(method, d, T, d_k, args.heads, 1 if method == "autograd" else args.batch, backward)
    if need > args.max_mem_gb * 2**30:
        return f"estimated {need / 2**30:.1f} GiB > --max-mem-gb {args.max_mem_gb}"
    return None


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_full`` = full's median / this row's median, per batch element, within one cell and mode."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["method"] == "full":
            by_key[(r["d"], r["T"], r["d_k"], r["mode"])] = r
    for r in rows:
        full = by_key.get((r["d"], r["T"], r["d_k"], r["mode"]))
        if r.get("status") == "ok" and full is not None:
            r["speedup_vs_full"] = (full["median_s"] / full["batch"]) / (r["median_s"] / r["batch"])
        elif r.get("status") == "ok":
            r["speedup_vs_full"] = None


def target_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The target figure at ``d=256, d_k=64, T=512``: Sylvester vs full speedup and float32 error."""
    cell = TARGET_CELL
    summary: dict[str, Any] = {"cell": cell, "speedup_target": TARGET_SPEEDUP, "rel_err_target": TARGET_REL_ERR}
    for mode in MODES:
        syl = next((r for r in rows if r["method"] == "sylvester" and r["mode"] == mode and r.get("status") == "ok"
                    and all(r[k] == v for k, v in cell.items())), None)
        if syl is None:
            summary[mode] = {"status": "not measured (cell not in the grid, or skipped)"}
            continue
        speedup = syl.get("speedup_vs_full")
        summary[mode] = {
            "speedup": speedup,
            "rel_err": syl["rel_err"],
            "grad_rel_err": syl.get("grad_rel_err"),
            "speedup_ok": None if speedup is None else speedup >= TARGET_SPEEDUP,
            "rel_err_ok": syl["rel_err"] <= TARGET_REL_ERR,
        }
    return summary


# --------------------------------------------------------------------------------------- printing
HEADER = (f"{'d':>4} {'T':>5} {'d_k':>4} {'mode':>7} {'method':>9} {'B':>3} {'median':>10} {'min':>10} "
          f"{'n':>3} {'x full':>7} {'peak mem':>9} {'rel_err':>9} {'abs_err':>9} {'grad_err':>9}")


def format_row(r: dict[str, Any]) -> str:
    head = f"{r['d']:>4} {r['T']:>5} {r['d_k']:>4} {r['mode']:>7} {r['method']:>9} {r['batch']:>3}"
    if r["status"] != "ok":
        return f"{head}  {r['status']}: {r['reason']}"

    def sci(v: float | None) -> str:
        return f"{v:9.1e}" if v is not None else f"{'-':>9}"

    speed = f"{r['speedup_vs_full']:7.1f}" if r.get("speedup_vs_full") is not None else f"{'-':>7}"
    return (f"{head} {r['median_s'] * 1e3:8.2f}ms {r['min_s'] * 1e3:8.2f}ms {r['repeats']:>3} {speed} "
            f"{format_bytes(r['peak_mem_bytes']):>9} {sci(r['rel_err'])} {sci(r['max_abs_err'])} "
            f"{sci(r['grad_rel_err'])}")


def format_targets(summary: dict[str, Any]) -> list[str]:
    c = summary["cell"]
    lines = [(f"target cell d={c['d']} T={c['T']} d_k={c['d_k']}: Sylvester vs full speedup >= "
              f"{summary['speedup_target']:g}x, float32 rel err <= {summary['rel_err_target']:g}")]
    for mode in MODES:
        s = summary[mode]
        if "speedup" not in s:
            lines.append(f"  {mode:>7}: {s['status']}")
            continue
        sp = "n/a (full skipped)" if s["speedup"] is None else \
            f"{s['speedup']:.1f}x [{'PASS' if s['speedup_ok'] else 'MISS'}]"
        lines.append(f"  {mode:>7}: speedup {sp}; rel err {s['rel_err']:.2e} "
                     f"[{'PASS' if s['rel_err_ok'] else 'MISS'}]")
    return lines


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.barrier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512], help="embedding sizes d")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024], help="sequence lengths T")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="head sizes d_k")
    p.add_argument("--heads", type=int, default=1, help="heads H (the default prior has 1)")
    p.add_argument("--batch", type=int, default=4, help="sequences per call (autograd rows use 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (after one warm-up)")
    p.add_argument("--budget", type=float, default=5.0, help="stop repeating a row after this many seconds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--coupling", choices=("free", "repulsive", "barrier"), default="repulsive",
                   help="repulsive: every det J_tt >= 1 (well conditioned); free: the training prior's, but with "
                        "random weights and unit inputs many blocks are folded or near-singular")
    p.add_argument("--x-scale", type=float, default=1.0, help="inputs are x-scale * N(0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-mem-gb", type=float, default=4.0, help="skip rows estimated to need more")
    p.add_argument("--autograd-max-entries", type=float, default=2.0**26,
                   help="skip the autograd reference when its Jacobian has more entries (T d)^2")
    p.add_argument("--loop-max-length", type=int, default=1024, help="skip the Python loop for longer T")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory (saves one call per row)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (all its threads; CPU device only), which "
                        "other processes on a shared machine do not inflate: with --threads 1, the time of one core")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench/barrier-<device>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the grid, print the table and the target lines, write the JSON; returns what was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times the CPU device only")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_path = args.out or Path("results") / "bench" / f"barrier-{device_slug(device)}.json"
    meta = run_metadata(device, "python -m benchmarks.barrier", argv)
    meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"barrier benchmark on {meta['device_name']} ({device}), torch {meta['torch']}, "
          f"{meta['threads']} threads, batch {args.batch}, heads {args.heads}, coupling {args.coupling}")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for d in args.dims:
        for T in args.lengths:
            for d_k in args.ranks:
                cell = run_cell(d, T, d_k, args, device)
                for r in cell:
                    print(format_row(r), flush=True)
                rows.extend(cell)
                result = {"meta": meta, "rows": rows, "targets": target_summary(rows)}
                write_json(out_path, result)  # after every cell: a long run leaves partial results
    result = {"meta": meta, "rows": rows, "targets": target_summary(rows)}
    for line in format_targets(result["targets"]):
        print(line)
    write_json(out_path, result)
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
