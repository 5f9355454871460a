r"""Benchmark of one MAP training step with the embedding prior off (``lambda_m = 0``) and on.

A step is what :class:`~inference.map.MAPTrainer` does per batch: ``svi.step`` (forward through
:func:`~inference.map.map_model`, ``Trace_ELBO`` backward, global gradient clipping and the AdamW updates of
:class:`~inference.map.GlobalClipScheduler`) and then ``optim.step()`` (the cosine schedule). Both runs are
built by ``MAPTrainer`` from ``RunConfig.preset(...)`` with only ``lambda_m`` changed, from the same seed
(the same GPT initialisation), and fed the same batches, which are drawn and moved to the device before
timing (data loading is not part of the step). The two runs alternate step by step (``A B B A A B ...``) so
that both see the same machine load; each has its own Pyro parameter store contents (the store is cleared
between steps, untimed, and ``pyro.module`` re-registers the network's own tensors).

Columns: ``median``/``min``/``iqr`` step time in seconds over ``--steps`` timed steps (after ``--warmup``), by
``--clock``: ``wall`` (elapsed) or ``cpu`` (the process's CPU time, CPU device only: other processes on a shared
machine do not inflate it; with ``--threads 1`` the time of one core),
``tokens/s`` = batch x T / median, ``peak mem`` = peak bytes allocated during one extra step (see
:func:`benchmarks.barrier.peak_memory` for what is counted on CPU), ``ratio`` = median(on) / median(off).

Example (seconds)::

    python -m benchmarks.train_step --preset tiny --steps 5

The step-ratio figures of the README (one thread, CPU time, default preset; about a minute)::

    python -m benchmarks.train_step --threads 1 --clock cpu --out results/bench/train_step-cpu-1thread-cputime.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor

from inference.map import MAPTrainer, RunConfig, StepStats, with_overrides
from prob_attention.corpus import load_corpus

from .barrier import (
    CLOCKS,
    _iqr,
    _median,
    device_slug,
    format_bytes,
    peak_memory,
    resolve_device,
    run_metadata,
    synchronize,
    write_json,
)

TARGET_RATIO = 1.15
"""The margin step may cost at most this many CE-only steps, on CPU and GPU alike."""


class StepRunner:
    """One configuration's network, optimiser and SVI, stepping exactly as ``MAPTrainer`` does."""

    def __init__(self, config: RunConfig, corpus: Any, compile_forward: bool) -> None:
        self.trainer = MAPTrainer(config, run_dir=None, corpus=corpus, progress=False, log=lambda line: None)
        self.optim = self.trainer.make_optimizer()
        net = self.trainer.net
        forward: Callable[[Tensor], Any] = torch.compile(net) if compile_forward else net
        self.svi = self.trainer.make_svi(self.optim, forward)
        self.stats = StepStats.zeros(self.device)
        net.train()

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def step(self, idx: Tensor, tgt: Tensor, clear: bool = True) -> float:
        """One optimiser step on a batch already on the device (the body of ``MAPTrainer._train_epoch``).

        ``clear`` empties Pyro's global parameter store first, so that ``pyro.module`` registers this run's
        tensors and not the other run's (both register under the name ``"map"``).
        """
        if clear:
            pyro.clear_param_store()
        return self.trainer.train_step(self.svi, self.optim, idx, tgt, self.stats)


def make_batches(runner: StepRunner, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` training batches drawn as the trainer draws them, already on the device."""
    gen = torch.Generator().manual_seed(seed)
    return [runner.trainer.batch(gen) for _ in range(n)]


def timed_step(runner: StepRunner, batch: tuple[Tensor, Tensor],
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one step by ``clock``; the parameter store is cleared before the clock starts."""
    pyro.clear_param_store()
    synchronize(runner.device)
    start = clock()
    runner.step(*batch, clear=False)
    synchronize(runner.device)
    return clock() - start


def profile_step(runner: StepRunner, batch: tuple[Tensor, Tensor], rows: int) -> tuple[str, dict[str, float]]:
    """A ``torch.profiler`` table of one step by self time, and the self time (us) of each op name."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        runner.step(*batch)
        synchronize(runner.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows,
                                                              max_name_column_width=40, max_shapes_column_width=70)
    return table, {e.key: float(getattr(e, key)) for e in prof.key_averages()}


def profile_difference(on: dict[str, float], off: dict[str, float], rows: int) -> list[tuple[str, float]]:
    """Ops by the self time the prior adds (on minus off, microseconds), largest first."""
    diff = {k: on.get(k, 0.0) - off.get(k, 0.0) for k in set(on) | set(off)}
    return sorted(diff.items(), key=lambda kv: -kv[1])[:rows]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", help="RunConfig preset: default, quick, tiny")
    p.add_argument("--lambda-m", type=float, default=0.02, help="prior weight of the 'on' run (the 'off' run has 0)")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run first (compilation included)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA, as the trainer (ignored on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network's forward (both runs)")
    p.add_argument("--corpus", default="bundled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (CPU device only), which other processes on "
                        "a shared machine do not inflate: with --threads 1, the time of one core")
    p.add_argument("--note", default=None, help="a remark stored in the JSON's meta, e.g. what else ran on the machine")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="print a torch.profiler table (ROWS rows) of one step of each run")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench/train_step-<device>.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time the two runs interleaved, print a table and the ratio, write the JSON; returns what was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.lambda_m <= 0:
        raise SystemExit("--lambda-m must be positive (the 'off' run is lambda_m = 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu times the CPU device only")
    out_path = args.out or Path("results") / "bench" / f"train_step-{device_slug(device)}.json"
    train = {"device": device.type, "amp": args.amp, "seed": args.seed, "corpus": args.corpus}
    if args.batch_size:
        train["batch_size"] = args.batch_size
    base = RunConfig.preset(args.preset)
    configs = {lm: with_overrides(base, train={**train, "lambda_m": lm}) for lm in (0.0, args.lambda_m)}
    corpus = load_corpus(args.corpus, seed=base.train.corpus_seed)
    runners = {lm: StepRunner(cfg, corpus, args.compile) for lm, cfg in configs.items()}
    first = runners[0.0]
    batches = make_batches(first, args.warmup + args.steps + 1, args.seed)
    tokens = batches[0][0].numel()
    meta = run_metadata(device, "python -m benchmarks.train_step", argv)
    meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.note:
        meta["note"] = args.note
    print(f"train-step benchmark on {meta['device_name']} ({device}), torch {meta['torch']}, {meta['threads']} threads; "
          f"preset {args.preset}: batch {tuple(batches[0][0].shape)}, {tokens} tokens/step, "
          f"amp {first.trainer.amp}, compile {args.compile}, {args.clock} clock"
          + (f"; note: {args.note}" if args.note else ""))

    for i in range(args.warmup):
        for runner in runners.values():
            runner.step(*batches[i])
    synchronize(device)
    times: dict[float, list[float]] = {lm: [] for lm in runners}
    order = list(runners)
    for i in range(args.steps):
        for lm in (order if i % 2 == 0 else order[::-1]):  # A B, B A, ...: the same load for both
            times[lm].append(timed_step(runners[lm], batches[args.warmup + i], CLOCKS[args.clock]))
    mems = {lm: (None if args.no_memory else peak_memory(lambda r=r: r.step(*batches[-1]), device))
            for lm, r in runners.items()}

    rows = []
    for lm, ts in times.items():
        med = _median(ts)
        rows.append({"lambda_m": lm, "prior": lm > 0, "median_s": med, "min_s": min(ts), "iqr_s": _iqr(ts),
                     "steps": len(ts), "tokens_per_s": tokens / med, "peak_mem_bytes": mems[lm], "times_s": ts})
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    print(f"{'lambda_m':>9} {'median':>10} {'min':>10} {'iqr':>9} {'steps':>5} {'tokens/s':>10} {'peak mem':>9}")
    for r in rows:
        print(f"{r['lambda_m']:>9g} {r['median_s'] * 1e3:8.1f}ms {r['min_s'] * 1e3:8.1f}ms {r['iqr_s'] * 1e3:7.1f}ms "
              f"{r['steps']:>5} {r['tokens_per_s']:>10.0f} {format_bytes(r['peak_mem_bytes']):>9}")
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"ratio (prior on / off, median {args.clock} step time): {ratio:.3f}  target <= {TARGET_RATIO}  [{verdict}]")

    profiles: dict[str, Any] = {}
    if args.profile:
        self_times = {}
        for lm, r in runners.items():
            table, self_times[lm] = profile_step(r, batches[-1], args.profile)
            profiles[str(lm)] = table
            print(f"--- profile of one step, lambda_m = {lm:g} ---\n{table}")
        diff = profile_difference(self_times[args.lambda_m], self_times[0.0], args.profile)
        profiles["added_by_prior_us"] = diff
        total = sum(self_times[args.lambda_m].values()) - sum(self_times[0.0].values())
        print(f"--- self time the prior adds per op (one profiled step; total {total / 1e3:+.1f} ms) ---")
        for name, us in diff:
            print(f"{us / 1e3:+9.2f} ms  {name}")
    result = {
        "meta": meta,
        "configs": {str(lm): cfg.to_dict() for lm, cfg in configs.items()},
        "tokens_per_step": tokens,
        "rows": rows,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_ok": ratio <= TARGET_RATIO,
        "profiles": profiles,
    }
    write_json(out_path, result)
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
