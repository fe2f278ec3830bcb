"""Aggregation kernels against Flower's and against the memory-bandwidth ceiling.

One pre-generated set of flat float32 updates (200 x 1M parameters, and
50 x 10M for FedAvg) is shared by every contender; all of them run on one
thread (torch pinned, BLAS pools set to one thread before numpy loads).
Repetitions are interleaved (each round runs every contender once) and the
best time of each is kept. Times are process CPU time: the 2 cores are
shared with other jobs and wall-clock runs swung by 2x from preemption; CPU
time (memory stalls included) still moves by up to ~20% between runs when
neighbours load the memory bus, but not with the scheduler. The median
per-round wall-clock ratio is shown beside each goal for transparency.

* Ceiling: one read-only pass over the same bytes (a sum over each update,
  the faster of torch and numpy).
* FedAvg: ours streams ``FedAvgAccumulator.add`` one update at a time.
  Flower's ``aggregate`` takes decoded ndarrays; ``aggregate_inplace`` takes
  ``FitRes`` whose ``Parameters`` hold serialized bytes, so its time includes
  Flower's own decode (reported separately too).
* Median / trimmed mean / Krum: ours over coordinate chunks (default 64 MiB
  budget) against ``aggregate_median``, ``aggregate_trimmed_avg`` and
  ``aggregate_krum`` on the same vectors given as one-layer models (the
  cheapest case for Flower's per-layer loops).
* Peak RSS of streaming FedAvg over 200 updates, in a subprocess that
  generates the updates one at a time.

End to end (:func:`bench_end_to_end`, its own section): ``training.aggregate``
through the server, FedAvg over 50 and 200 uploaded 1M-parameter updates in
S3, against just reading the same objects with the same minio client (one
after another, and with a few threads); the time is broken down into its
pieces. Goal: within 2x of reading the updates.

Run: ``.venv/bin/python bench/aggregate.py [--only kernels|end-to-end]``
(about 3-4 minutes for the kernels, under 3 for the end-to-end part).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: one thread for everyone

import gc  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

TORCH_THREADS = torch.get_num_threads()  # before the kernel part pins one thread

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _report, and fedrpc without an install

from _report import table, write_section  # noqa: E402

from fedrpc.fl.strategies import (  # noqa: E402
    FedAvgAccumulator,
    bulyan,
    fedmedian,
    fedtrimmedavg,
    krum,
    multikrum,
)

try:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import aggregate as flwr_agg

    FLOWER = True
except ImportError:  # pragma: no cover - reported in the output
    FLOWER = False

SMALL, LARGE = 1_000_000, 10_000_000
N_LARGE = 50
TRIM = 0.1


OUTPUTS: dict[str, object] = {}


def timed(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[tuple]]:
    """(cpu, wall) seconds of each contender per round, rounds interleaved.

    The last output of each contender is left in OUTPUTS.
    """
    times: dict[str, list[tuple]] = {name: [] for name in contenders}
    OUTPUTS.clear()
    for _ in range(rounds):
        for name, run in contenders.items():
            OUTPUTS.pop(name, None)
            gc.collect()
            cpu, wall = time.process_time(), time.perf_counter()
            out = run()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
            OUTPUTS[name] = out
    return times


def best(times: list[tuple]) -> float:
    return min(cpu for cpu, _ in times)


def best_wall(times: list[tuple]) -> float:
    return min(wall for _, wall in times)


def wall_ms(times: list[tuple]) -> str:
    t = best_wall(times)
    return f"{t * 1e3:.1f}" if t < 0.1 else f"{t * 1e3:.0f}"


def wall_ratio(slow: list[tuple], fast: list[tuple]) -> tuple[float, str]:
    """Ratio of the best wall times, and the median per-round wall-clock ratio."""
    value = best_wall(slow) / best_wall(fast)
    median = statistics.median(a[1] / b[1] for a, b in zip(slow, fast, strict=True))
    return value, f"{value:.2f} (median {median:.2f})"


def ms(times: list[tuple]) -> str:
    t = best(times)
    return f"{t * 1e3:.1f}" if t < 0.1 else f"{t * 1e3:.0f}"


def ratio(slow: list[tuple], fast: list[tuple]) -> tuple[float, str]:
    """Ratio of the best CPU times, and the median per-round wall-clock ratio."""
    cpu = best(slow) / best(fast)
    wall = statistics.median(a[1] / b[1] for a, b in zip(slow, fast, strict=True))
    return cpu, f"{cpu:.2f} (wall {wall:.2f})"


def verdict(value: float, goal: float, higher: bool = True) -> str:
    return "met" if (value >= goal if higher else value <= goal) else "NOT met"


def ceiling(vectors: list[np.ndarray]) -> Callable[[], object]:
    """The faster of two read-only passes over every update."""
    tensors = [torch.from_numpy(v) for v in vectors]

    def torch_sum() -> object:
        return [t.sum() for t in tensors]

    def numpy_sum() -> object:
        return [v.sum() for v in vectors]

    t = timed({"torch": torch_sum, "numpy": numpy_sum}, 3)
    OUTPUTS.clear()
    return torch_sum if best(t["torch"]) <= best(t["numpy"]) else numpy_sum


def ceiling_two_threads(vectors: list[np.ndarray]) -> Callable[[], object]:
    """The faster of two read-only passes over every update on both cores.

    torch's own pool (2 threads per sum), or two Python threads each summing
    one half of every update on one torch thread.
    """
    tensors = [torch.from_numpy(v) for v in vectors]
    half = vectors[0].size // 2
    helper = ThreadPoolExecutor(1)

    def pool_sum() -> object:
        with torch_threads(2):
            return [t.sum() for t in tensors]

    def part(lo: int, hi: int | None) -> object:
        with torch_threads(1):
            return [t[lo:hi].sum() for t in tensors]

    def halves() -> object:
        other = helper.submit(part, half, None)
        return part(0, half), other.result()

    t = timed({"pool": pool_sum, "halves": halves}, 3)
    OUTPUTS.clear()
    return pool_sum if best_wall(t["pool"]) <= best_wall(t["halves"]) else halves


def ours_fedavg(vectors: list[np.ndarray], counts: list[int], threads: int = 1) -> np.ndarray:
    acc = FedAvgAccumulator(vectors[0].size, threads=threads)
    for v, c in zip(vectors, counts, strict=True):
        acc.add(v, c)
    return acc.finish()


def ours_fedavg_many(vectors: list[np.ndarray], counts: list[int], threads: int = 1) -> np.ndarray:
    acc = FedAvgAccumulator(vectors[0].size, threads=threads)
    acc.add_many(vectors, counts)
    return acc.finish()


def flwr_decode(fit: list) -> None:
    for _, res in fit:
        parameters_to_ndarrays(res.parameters)


#: Our FedAvg configurations: streaming add() or add_many(), 1 or 2 threads.
OURS = {
    "add, 1 thread": (ours_fedavg, 1),
    "add_many, 1 thread": (ours_fedavg_many, 1),
    "add, 2 threads": (ours_fedavg, 2),
    "add_many, 2 threads": (ours_fedavg_many, 2),
}


def fedavg_rows(
    vectors: list[np.ndarray], counts: list[int], rounds: int
) -> tuple[list[list[object]], list[list[object]]]:
    """The goal row (best ceiling vs our fastest configuration) and one row per configuration."""
    n, size = len(vectors), vectors[0].size
    label = f"{n} x {size / 1e6:g}M"
    contenders: dict[str, Callable[[], object]] = {
        "ceiling, 1 thread": ceiling(vectors),
        "ceiling, 2 threads": ceiling_two_threads(vectors),
    }
    for name, (run, threads) in OURS.items():
        contenders[name] = lambda run=run, threads=threads: run(vectors, counts, threads)
    if FLOWER:
        ndarrays = [([v], c) for v, c in zip(vectors, counts, strict=True)]
        ok = Status(code=Code.OK, message="")
        fit = [
            (None, FitRes(ok, ndarrays_to_parameters([v]), c, {}))
            for v, c in zip(vectors, counts, strict=True)
        ]
        contenders["flwr aggregate"] = lambda: flwr_agg.aggregate(ndarrays)
        contenders["flwr aggregate_inplace"] = lambda: flwr_agg.aggregate_inplace(fit)
        contenders["flwr decode only"] = lambda: flwr_decode(fit)
    t = timed(contenders, rounds)
    reference = OUTPUTS["add, 1 thread"]
    for name in OURS:
        if not np.array_equal(OUTPUTS[name], reference):
            raise AssertionError(f"{name} differs from add, 1 thread")
    agree = ""
    if FLOWER:
        agree = f"{np.max(np.abs(reference - OUTPUTS['flwr aggregate_inplace'][0])):.1e}"
    OUTPUTS.clear()
    ceil = min(("ceiling, 1 thread", "ceiling, 2 threads"), key=lambda k: best_wall(t[k]))
    fastest = min(OURS, key=lambda k: best_wall(t[k]))
    frac, frac_text = wall_ratio(t[ceil], t[fastest])
    row: list[object] = [
        label,
        f"{wall_ms(t['ceiling, 1 thread'])} / {wall_ms(t['ceiling, 2 threads'])}",
        f"{wall_ms(t[fastest])} ({fastest})",
        f"**{frac_text}** {verdict(frac, 0.6)}",
    ]
    if FLOWER:
        speed, speed_text = wall_ratio(t["flwr aggregate_inplace"], t[fastest])
        row += [
            wall_ms(t["flwr aggregate"]),
            f"{wall_ms(t['flwr aggregate_inplace'])} ({wall_ms(t['flwr decode only'])})",
            f"**{speed_text}** {verdict(speed, 5)}",
            wall_ratio(t["flwr aggregate_inplace"], t["ceiling, 1 thread"])[1],
            agree,
        ]
    detail = []
    for name in OURS:
        one = [
            label,
            name,
            wall_ms(t[name]),
            ms(t[name]),
            wall_ratio(t["ceiling, 1 thread"], t[name])[1],
            wall_ratio(t["ceiling, 2 threads"], t[name])[1],
        ]
        if FLOWER:
            one.append(wall_ratio(t["flwr aggregate_inplace"], t[name])[1])
        detail.append(one)
    return [row], detail


def robust_rows(vectors: list[np.ndarray], counts: list[int]) -> list[list[object]]:
    n = len(vectors)
    f = n // 5
    results = [([v], c) for v, c in zip(vectors, counts, strict=True)]
    cases: list[tuple[str, Callable[[], object], Callable[[], object] | None, int]] = [
        (
            "median",
            lambda: fedmedian(vectors),
            (lambda: flwr_agg.aggregate_median(results)) if FLOWER else None,
            3 if n <= 50 else 2,
        ),
        (
            f"trimmed mean (beta={TRIM})",
            lambda: fedtrimmedavg(vectors, beta=TRIM),
            (lambda: flwr_agg.aggregate_trimmed_avg(results, TRIM)) if FLOWER else None,
            3 if n <= 50 else 2,
        ),
        (
            f"Krum (f={f})",
            lambda: krum(vectors, num_malicious=f),
            (lambda: flwr_agg.aggregate_krum(results, f, 0)) if FLOWER else None,
            2 if n <= 50 else 1,
        ),
    ]
    rows = []
    for name, ours, peer, rounds in cases:
        t = timed({"ours": ours} | ({"flwr": peer} if peer else {}), rounds)
        ours_out, peer_out = OUTPUTS["ours"], OUTPUTS.get("flwr")
        OUTPUTS.clear()
        row = [f"{name}, N={n}", ms(t["ours"]), "not run", "", ""]
        if peer_out is not None:
            ours_vec = ours_out.vector if hasattr(ours_out, "vector") else ours_out
            speed, speed_text = ratio(t["flwr"], t["ours"])
            row[2:] = [
                ms(t["flwr"]),
                f"**{speed_text}** {verdict(speed, 2)}",
                f"{np.max(np.abs(ours_vec - peer_out[0])):.1e}",
            ]
        rows.append(row)
    for name, run in [
        (
            f"MultiKrum (f={f}, m={n - f})",
            lambda: multikrum(vectors, num_malicious=f, num_to_keep=n - f),
        ),
        (f"Bulyan (f={n // 10})", lambda: bulyan(vectors, num_malicious=n // 10)),
    ]:
        t = timed({"ours": run}, 1)
        OUTPUTS.clear()
        rows.append([f"{name}, N={n}", ms(t["ours"]), "no peer", "", ""])
    return rows


def accumulator_rows(vectors: list[np.ndarray], counts: list[int]) -> list[list[object]]:
    """Why the accumulator looks the way it does: speed and error of three designs."""
    size, total = vectors[0].size, float(sum(counts))
    exact, magnitude = np.zeros(size), np.zeros(size)
    for v, c in zip(vectors, counts, strict=True):
        wide = v.astype(np.float64)
        exact += c * wide
        magnitude += c * np.abs(wide)
    exact /= total
    # Errors in float32 ulps of the weighted mean of |x| (the scale of a sum's
    # rounding error): the mean of zero-mean data is tiny and its own ulp
    # would say nothing about the accumulation.
    ulp = np.spacing((magnitude / total).astype(np.float32)).astype(np.float64)
    tensors = [torch.from_numpy(v) for v in vectors]

    def float32_running() -> np.ndarray:
        acc = torch.zeros(size)
        with torch_threads(1):
            for t, c in zip(tensors, counts, strict=True):
                acc.add_(t, alpha=c)
        return (acc.numpy() / np.float64(total)).astype(np.float32)

    def float64_running() -> np.ndarray:
        acc = torch.zeros(size, dtype=torch.float64)
        with torch_threads(1):
            for t, c in zip(tensors, counts, strict=True):
                acc.add_(t, alpha=c)
        return (acc.numpy() / total).astype(np.float32)

    variants = {
        "float32 running sum": float32_running,
        "float64 running sum (mixed-dtype axpy)": float64_running,
        "ours: float32 groups of 16, pairwise": lambda: ours_fedavg(vectors, counts),
    }
    t = timed({"ceiling": ceiling(vectors)} | variants, 5)
    rows = []
    for name in variants:
        err = np.max(np.abs(OUTPUTS[name].astype(np.float64) - exact) / ulp)
        rows.append([name, ms(t[name]), ratio(t["ceiling"], t[name])[1], f"{err:.1f}"])
    OUTPUTS.clear()
    return rows


class torch_threads:
    def __init__(self, n: int) -> None:
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.prev)


MEMORY_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from fedrpc.fl.strategies import FedAvgAccumulator
size, n = int(sys.argv[2]), int(sys.argv[3])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
rng = np.random.default_rng(0)
warm = FedAvgAccumulator(16)              # torch/numpy first-use allocations
warm.add(np.ones(16, np.float32), 1); warm.finish()
rng.standard_normal(16, dtype=np.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                          # reset the RSS high-water mark
base = status("VmRSS:")
acc = FedAvgAccumulator(size)
for i in range(n):
    update = rng.standard_normal(size, dtype=np.float32)   # one update at a time
    acc.add(update, 1 + i % 7)
    del update
acc.finish()
print(base, status("VmHWM:"))
"""


def memory_rows(size: int, n: int) -> list[list[object]]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(HERE.parent), str(size), str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    base, peak = int(out[0]), int(out[1])
    ratio = (peak - base) / (4 * size)
    return [
        [
            f"streaming FedAvg, {n} updates x {size / 1e6:g}M",
            f"{(peak - base) / 2**20:.1f}",
            f"{4 * size / 2**20:.1f}",
            f"**{ratio:.2f}** {verdict(ratio, 4, higher=False)}",
        ]
    ]


# -- end to end: training.aggregate from S3 against just reading the update objects -----------------

#: updates per round -> measured repetitions (each a fresh round of distinct uploads).
E2E_ROUNDS = {50: 5, 200: 3}
E2E_GOAL = 2.0
PARALLEL_READS = 4
#: Pieces of one aggregation, timed around the server's own functions (Probe).
PIECES = [
    ("compute", "update loop and kernel, in a worker thread (compute, wall)"),
    ("fetch", "- update GETs (Storage.get_blocking; on prefetch threads)"),
    ("check", "- sha256 + decode + check + flatten (on prefetch threads)"),
    ("kernel", "- FedAvg kernel (add + finish)"),
    ("stream", "- update loop, wall (aggregate_streaming)"),
    ("encode", "encode safetensors + torch, in a worker thread (encode_weights)"),
    ("publish", "object writes + version transaction (publish_version, wall)"),
    ("artifacts", "- ONNX + program in a worker thread, beside the weights' PUTs (export_graphs)"),
    ("onnx", "- - of which the sandbox job (values filled in, or a re-export, in a child)"),
    ("put", "- 4 object PUTs, each with its sha256"),
    ("base", "read base weights + program"),
    ("db", "database calls, all (claim, rows, version transaction, auth)"),
    ("server", "aggregate_round, wall"),
]


def _probe(stack):
    from _e2e_setup import Probe

    import fedrpc.fl.aggregate as fl_agg
    import fedrpc.services.round_aggregation as agg
    import fedrpc.services.update_loop as agg_compute
    import methods.training
    from fedrpc.db import Database
    from fedrpc.services.artifact_sandbox import ArtifactSandbox
    from fedrpc.storage import Storage

    probe = Probe()
    probe.wrap(Storage, "get_blocking", "fetch")
    probe.wrap(Storage, "get", "base")
    probe.wrap(Storage, "put", "put")
    probe.wrap(agg_compute, "checked_vector", "check")
    probe.wrap_class(fl_agg, "FedAvgAccumulator", {"add": "kernel", "finish": "kernel"})
    probe.wrap(agg_compute, "aggregate_streaming", "stream")
    probe.wrap(ArtifactSandbox, "make_version", "onnx")
    probe.wrap(agg, "compute", "compute")
    probe.wrap(agg, "export_graphs", "artifacts")
    probe.wrap(agg, "publish_version", "publish")
    probe.wrap(agg, "encode_weights", "encode")
    probe.wrap(Database, "_rows", "db")
    probe.wrap(Database, "run", "db")
    probe.wrap(methods.training, "aggregate_round", "server")
    return probe


def _read_all(storage, keys: list[str], threads: int) -> int:
    """The ceiling: GET every object with the server's own minio client, whole bodies in memory."""
    from concurrent.futures import ThreadPoolExecutor

    def read(key: str) -> int:
        response = storage.client.get_object(storage.bucket, key)
        try:
            return len(response.read())
        finally:
            response.close()
            response.release_conn()

    if threads == 1:
        return sum(read(k) for k in keys)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(read, keys))


async def _e2e_rep(stack, n: int, rep: int, *, cold: bool = False) -> dict[str, float]:
    """One round of n updates: aggregate it and read its objects. ``cold`` forgets the
    server's ONNX templates first, as a server does that has not yet made a version
    from this base (it re-exports once)."""
    import asyncio

    from fedrpc.services.version_artifacts import TEMPLATES

    round_id, keys = await stack.ready_round(n, seed=n * 10 + rep)
    storage = stack.services.storage
    out: dict[str, float] = {}

    async def ceilings() -> None:
        for name, threads in (("serial", 1), ("parallel", PARALLEL_READS)):
            gc.collect()
            started = time.perf_counter()
            out["bytes"] = await asyncio.to_thread(_read_all, storage, keys, threads)
            out[name] = time.perf_counter() - started

    async def aggregate() -> None:
        gc.collect()
        if cold:
            TEMPLATES.clear()
        with _probe(stack) as probe:
            started = time.perf_counter()
            version = await stack.api.ok("training.aggregate", {"round_id": round_id}, stack.token)
            out["e2e"] = time.perf_counter() - started
        assert version["num_updates"] == n, version
        out.update(probe.seconds)

    # Alternate which comes first, so drift and cache warmth do not favour one side.
    for step in (ceilings, aggregate) if rep % 2 == 0 else (aggregate, ceilings):
        await step()
    await stack.drop_objects(keys)
    return out


async def _e2e_all(
    stack, rounds: dict[int, int]
) -> tuple[dict[int, list[dict[str, float]]], dict[int, dict[str, float]]]:
    """Warm repetitions per round size, and one cold one (no ONNX template kept)."""
    await stack.register_model()
    await stack.register_devices(max(rounds))
    for _ in range(2):  # warm-up: imports (torch.onnx, onnxscript), connections, first export
        round_id, keys = await stack.ready_round(4, seed=0)
        await stack.api.ok("training.aggregate", {"round_id": round_id}, stack.token)
        await stack.drop_objects(keys)
    results: dict[int, list[dict[str, float]]] = {}
    for n, reps in rounds.items():
        results[n] = []
        for rep in range(reps):
            results[n].append(await _e2e_rep(stack, n, rep))
            r = results[n][-1]
            print(
                f"e2e n={n} rep={rep}: e2e {r['e2e']:.2f}s serial {r['serial']:.2f}s "
                f"parallel {r['parallel']:.2f}s onnx {r.get('onnx', 0):.2f}s",
                flush=True,
            )
    cold = {n: await _e2e_rep(stack, n, reps, cold=True) for n, reps in rounds.items()}
    return results, cold


def bench_end_to_end(rounds: dict[int, int] = E2E_ROUNDS) -> str:
    """`training.aggregate` through the server against reading the same update objects from S3.

    For each round size: fresh rounds of distinct 1M-parameter delta updates
    uploaded through ``training.weights.upload`` (set-up, not timed), then, in
    alternating order, one ``training.aggregate`` call (FedAvg) and the
    ceilings: the same objects fetched with the server's own minio client, one
    after another and with a few threads. The section is written to
    docs/benchmarks.md and returned.
    """
    import asyncio

    from _e2e_setup import services, stack

    started = time.perf_counter()
    torch.set_num_threads(TORCH_THREADS)  # the server's default, not the kernels' bench setting

    async def run(pg_url: str, s3):
        async with stack(pg_url, s3) as s:
            return await _e2e_all(s, rounds)

    with services() as (pg_url, s3):
        results, cold = asyncio.run(run(pg_url, s3))
    body = _e2e_report(results, cold, time.perf_counter() - started)
    print(body)
    write_section(
        "aggregate_end_to_end", "training.aggregate end to end vs reading the updates from S3", body
    )
    return body


def _e2e_report(
    results: dict[int, list[dict[str, float]]], cold: dict[int, dict[str, float]], elapsed: float
) -> str:
    med = statistics.median
    rows, pieces = [], []
    for n, reps in results.items():
        size_mb = reps[0]["bytes"] / 1e6
        e2e, serial, parallel = (med(r[k] for r in reps) for k in ("e2e", "serial", "parallel"))
        ratio = med(r["e2e"] / r["serial"] for r in reps)
        rows.append([
            f"{n} x 1.01M (FedAvg, {size_mb:.0f} MB)",
            f"{serial * 1e3:.0f} ({size_mb / serial:.0f} MB/s)",
            f"{parallel * 1e3:.0f}",
            f"{e2e * 1e3:.0f}",
            f"**{ratio:.2f}** {verdict(ratio, E2E_GOAL, higher=False)}",
            f"{med(r['e2e'] / r['parallel'] for r in reps):.2f}",
            f"{med(r['stream'] / r['serial'] for r in reps):.2f}",
            f"{cold[n]['e2e'] * 1e3:.0f} ({cold[n]['e2e'] / cold[n]['serial']:.2f})",
        ])  # fmt: skip
        for key, label in PIECES:
            value = med(r.get(key, 0.0) for r in reps)
            pieces.append([f"{n}", label, f"{value * 1e3:.0f}", f"{value / e2e:.0%}"])
        rest = med(r["e2e"] - r.get("server", 0.0) for r in reps)
        pieces.append([f"{n}", "HTTP + JSON-RPC + auth outside the handler", f"{rest * 1e3:.0f}", f"{rest / e2e:.0%}"])  # fmt: skip
    return "\n\n".join(
        [
            table(
                [
                    "round",
                    "ceiling: serial GETs ms",
                    f"ceiling: {PARALLEL_READS} threads ms",
                    "training.aggregate ms",
                    "e2e / serial (goal <= 2)",
                    "e2e / parallel",
                    "update loop / serial",
                    "first version from a base, ms (/ serial)",
                ],
                rows,
            ),
            table(["updates", "piece of training.aggregate", "ms (median)", "of e2e"], pieces),
            "`python bench/aggregate.py --only end-to-end`: the server runs in the bench's process "
            "(create_app on a loopback port) with a throwaway PostgreSQL (pgserver) and S3 "
            "(weed mini), all on the same 2 cores. Per round size, fresh rounds of distinct delta "
            "updates of an MLP 1000-1000-10 (1,011,010 float32 parameters, safetensors) uploaded "
            "through training.weights.upload (not timed); then, in alternating order, one "
            "training.aggregate call (FedAvg, wall clock of the HTTP call) and the ceilings: the "
            "same update objects fetched with the server's own minio client, whole bodies, one "
            f"after another and with {PARALLEL_READS} threads. Times and ratios are medians over "
            f"{', '.join(f'{len(r)} rounds of {n}' for n, r in results.items())} "
            "(ratios per round, then the median). The pieces are wall times around the server's "
            "own functions, summed over calls; a row starting with - is part of the wall time "
            "above it, and the pieces on prefetch threads run beside the kernel (up to "
            "fedrpc.services.update_loop.MAX_PREFETCH at a time), so they add up to more than the loop's "
            "wall time. The new ONNX model and program are the base graph with the new values "
            "filled in and checked against the program (docs/model-artifacts.md); the server "
            "keeps that graph per base program. The last column is one round measured after the "
            "others with the kept graphs forgotten: this MLP's uploaded ONNX takes the new values "
            "as it is, so only its parse is added; a base whose graph an exporter folded "
            "(BatchNorm) is re-exported once per process instead (torch.export + "
            "torch.onnx.export, about a second whatever the model's size). "
            f"torch {torch.__version__}. "
            f"Whole e2e part: {elapsed:.0f} s.",
        ]
    )


def generate(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    vectors = [rng.standard_normal(size, dtype=np.float32) for _ in range(n)]
    counts = [int(c) for c in rng.integers(10, 5000, size=n)]
    return vectors, counts


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=("kernels", "end-to-end"), help="run one part (default: both)"
    )
    only = parser.parse_args().only
    if only != "end-to-end":
        bench_kernels()
    if only != "kernels":
        bench_end_to_end()


def bench_kernels() -> None:
    started = time.perf_counter()
    torch.set_num_threads(1)  # one thread unless a contender says otherwise
    vectors, counts = generate(200, SMALL, 1)
    fedavg, configs = [], []
    for n in (50, 200):
        row, detail = fedavg_rows(vectors[:n], counts[:n], rounds=7)
        fedavg += row
        configs += detail
        print(row, detail, flush=True)
    accumulators = accumulator_rows(vectors, counts)
    print(accumulators, flush=True)
    robust = []
    for n in (50, 200):
        robust += robust_rows(vectors[:n], counts[:n])
        print(robust[-5:], flush=True)
    del vectors
    gc.collect()
    big, big_counts = generate(N_LARGE, LARGE, 2)
    row, detail = fedavg_rows(big, big_counts, rounds=5)
    fedavg += row
    configs += detail
    print(row, detail, flush=True)
    del big
    gc.collect()
    memory = memory_rows(SMALL, 200)
    print(memory, flush=True)

    peer = [] if FLOWER else ["(flwr not importable: Flower columns skipped)"]
    fedavg_head = [
        "FedAvg updates",
        "read ceiling ms, 1 / 2 threads",
        "ours ms (fastest configuration)",
        "best ceiling / ours (goal >= 0.6)",
    ]
    config_head = [
        "FedAvg updates",
        "our configuration",
        "ms",
        "ms (process CPU)",
        "1-thread ceiling / this",
        "2-thread ceiling / this",
    ]
    if FLOWER:
        fedavg_head += [
            "flwr aggregate ms",
            "flwr aggregate_inplace ms (its decode)",
            "aggregate_inplace / ours (goal >= 5)",
            "aggregate_inplace / 1-thread ceiling",
            "max abs diff",
        ]
        config_head.append("aggregate_inplace / this")
    body = "\n\n".join(
        [
            table(fedavg_head, fedavg),
            table(config_head, configs),
            table(
                [
                    "robust strategy",
                    "ours ms (cpu)",
                    "flwr ms (cpu)",
                    "flwr/ours (goal >= 2)",
                    "max abs diff",
                ],
                robust,
            ),
            table(
                [
                    "FedAvg accumulator (200 x 1M, 1 thread)",
                    "ms (cpu)",
                    "ceiling/variant",
                    "max error, float32 ulps of mean abs",
                ],
                accumulators,
            ),
            table(
                ["memory", "peak RSS above baseline MiB", "one update MiB", "ratio (goal <= 4x)"],
                memory,
            ),
            "`python bench/aggregate.py --only kernels`. FedAvg tables: times are the best "
            "wall clock over interleaved rounds (7 for 1M, 5 for 10M) and ratios compare "
            "those; the median of the per-round ratios is in brackets (the 2 cores are "
            "shared with other jobs, and a neighbour on the other core slows every "
            "2-thread contender). Read ceiling = one read-only sum over the same bytes: "
            "1 thread (the faster of torch and numpy) or 2 threads (the faster of torch's "
            "pool and two threads summing one half of each update); the goal compares "
            "the faster ceiling with the fastest of our four configurations "
            "(`FedAvgAccumulator(threads=1|2)`, streaming `add` or `add_many` over all "
            "updates; all four give the same bits, checked). Flower is numpy on one "
            "thread; aggregate_inplace decodes its `Parameters` bytes itself (decode "
            "alone in brackets), aggregate takes decoded arrays; aggregate_inplace / "
            "1-thread ceiling bounds what any one-thread FedAvg can reach against it. "
            "Robust strategies and the accumulator table: one thread, best process CPU "
            "time, median per-round wall ratio in brackets; robust strategies run over "
            "coordinate chunks with the default 64 MiB working budget, Flower's on "
            "one-layer models; max abs diff compares the two outputs (0 = same Krum "
            "choice, same median). The memory row streams `add` on one thread. "
            f"flwr {_flwr_version()}, torch {torch.__version__}, numpy {np.__version__}. "
            + " ".join(peer)
            + f" Whole bench: {time.perf_counter() - started:.0f} s.",
        ]
    )
    print(body)
    write_section("aggregate_kernels", "Aggregation kernels vs Flower and the memory ceiling", body)


def _flwr_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:
        return "absent"


if __name__ == "__main__":
    main()
