"""SecAgg+ against Flower's SecAgg+, the same cohorts driven in process.

Each case runs the whole protocol (setup, share keys, masked vectors, unmask)
for n devices holding d float32 parameters, k neighbours per device, Shamir
threshold t, and the same 2 devices dropping out after stage 1 (they shared
their keys, then never sent a masked vector). Three things are compared:

* per-device masking: the device's stage-2 work (decrypt the k share
  ciphertexts addressed to it, weight and quantize the update, add its self
  mask and its k pairwise masks, reduce modulo M, encode for the wire); the
  median over the surviving devices;
* server-side unmask: reconstruct the survivors' self-mask seeds and the
  dropped devices' mask keys from Shamir shares, regenerate and remove those
  masks from the sum, dequantize to the weighted mean;
* bytes on the wire per masked parameter: one device's stage-2 upload
  divided by d + 1 (both sides mask the weight as one more element).

Flower (flwr, a bench-only dependency, imported here and nowhere else): its
own ``secaggplus_mod`` on every device and its own ``SecAggPlusWorkflow``
stages on the server, joined by an in-process ``Grid`` that carries every
message through Flower's protobuf encoding (no Ray, no gRPC). The devices'
masking is timed around the mod's ``_collect_masked_vectors``; the unmask is
``unmask_stage`` minus the time spent inside the devices' answers, with a
strategy whose ``aggregate_fit`` only keeps the unmasked parameters. Flower's
ring only builds even neighbour counts, so it gets ``num_shares = 11`` (10
neighbours and itself) where ours gets k = 11; k = n - 1 below 12 devices
(all to all, for both). Flower's quantization defaults are used for both
sides (clipping 8.0, 2^22 levels, modulus 2^32, maximum weight 1000).

Ours: the kernels in ``fedrpc.fl.secagg`` (docs/secagg.md, "Kernel API"), in
process; and ours end to end over HTTP (``_secagg_http``): the same cases
through the ``training.secagg.*`` methods of a server running in this process
on a throwaway PostgreSQL and S3, n ``SecAggDevice`` clients calling at once,
then ``training.aggregate``; per stage wall time, per call latency, bytes on
the wire, the unmask call and peak RSS.

Every case checks that both results equal the float64 weighted mean of the
survivors' updates within the quantization error. Numeric work runs on one
thread (BLAS pools and torch pinned before they load); Flower's Shamir code
starts its own thread pool, but it is pure Python under the GIL. Times are
wall clock, best of interleaved repetitions (fewer for the 1M cases).

Run: ``.venv/bin/python bench/secagg.py`` (about 2 minutes in process, then about 5
for the HTTP part, which it runs as ``--http-only`` in a child process);
``--http-only`` runs the HTTP part alone and replaces only its part of
docs/benchmarks.md; ``--quick`` (with or without it) runs three small HTTP cases
(n = 10 and 50 at d = 100k) and writes nothing.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: one thread for everyone

import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _report, and fedrpc without an install

import _secagg_http  # noqa: E402
import _secagg_http_report  # noqa: E402
from _report import marked, table, write_part, write_section  # noqa: E402
from _secagg_common import (  # noqa: E402
    BYTES_GOAL,
    CASES,
    CLIPPING,
    DROPOUTS,
    LARGE,
    MASK_GOAL,
    MAX_WEIGHT,
    UNMASK_GOAL,
    K,
    Round,
    T,
    generate,
    neighbours,
    reference,
)
from _secagg_flower import FLOWER, _flower_setup, flower_round  # noqa: E402

# --- ours -----------------------------------------------------------------------------------


def _ours():
    """The kernel modules (docs/secagg.md, "Kernel API"), or None while any is missing."""
    try:
        from fedrpc.fl.secagg import graph, keys, masking, protocol, quantize, shamir
    except ImportError:
        return None
    return SimpleNamespace(
        graph=graph,
        keys=keys,
        masking=masking,
        protocol=protocol,
        quantize=quantize,
        shamir=shamir,
    )


def bits_for_32(n: int) -> int:
    """The most quantization bits whose sum over n full-weight devices fits 32-bit words."""
    q = 1
    while n * ((1 << (q + 1)) - 1) * int(MAX_WEIGHT) <= (1 << 32) - 1:
        q += 1
    return q


def ours_configs(n: int) -> dict[str, tuple[int, int]]:
    """Our contenders: (quantization bits, modulus bits).

    The wire goal (<= 4 bytes) needs 32-bit words, which at maximum weight
    1000 leaves fewer quantization bits than Flower's 22; the second
    configuration keeps Flower's 22 bits and so needs 64-bit words.
    """
    q = bits_for_32(n)
    return {f"ours, b=32 (q={q})": (q, 32), "ours, b=64 (q=22, Flower's precision)": (22, 64)}


def ours_round(
    vectors: list[np.ndarray],
    weights: list[int],
    dropped: list[int],
    seed: int,
    config: tuple[int, int],
) -> Round | None:
    """One SecAgg+ round through fedrpc.fl.secagg's kernels; None while they do not exist.

    Every device's key pairs, shares, sealed bundles and masked vector are made
    with the kernels, and the server's side is done with them too; device
    index i holds ``vectors[i - 1]``. Stage 2 (timed per device) opens the
    bundles addressed to the device with the share keys it derived in stage 1
    (as Flower's device keeps its stage-1 keys), derives its pairwise seeds,
    quantizes, masks and packs. The server's unmask (timed) gathers the
    stage-3 answers into share sets, reconstructs, derives the seeds, removes
    the masks and dequantizes; the sum of the masked vectors happens in
    stage 2, as in Flower.
    """
    sa = _ours()
    if sa is None:
        return None  # TODO(secagg kernels): fedrpc.fl.secagg is not complete yet
    keys, shamir = sa.keys, sa.shamir
    q, modulus_bits = config
    n, d = len(vectors), vectors[0].size
    rng = np.random.default_rng(seed)
    randbytes = rng.bytes
    sid = f"sag_bench{seed}"
    spec = sa.quantize.make_spec(n, CLIPPING, q, int(MAX_WEIGHT), modulus_bits)
    bits = spec.modulus_bits
    index = range(1, n + 1)
    started = time.perf_counter()
    # stage 0: two key pairs per device; the server indexes them and builds the graph
    sk1 = {i: randbytes(32) for i in index}
    sk2 = {i: randbytes(32) for i in index}
    pk1 = {i: keys.public_key(sk1[i]) for i in index}
    pk2 = {i: keys.public_key(sk2[i]) for i in index}
    k = sa.graph.effective_degree(n, K)
    graph = sa.graph.neighbours(n, k, sa.graph.graph_seed(randbytes(32), sid))
    # stage 1: each device shares its self secret and mask key with its neighbours, sealed
    secret, share_key, inbox = {}, {}, {i: {} for i in index}
    for i in index:
        secret[i] = randbytes(32)
        b_shares = shamir.split(secret[i], graph[i], T, randbytes)
        k_shares = shamir.split(sk1[i], graph[i], T, randbytes)
        for j, b_share, k_share in zip(graph[i], b_shares, k_shares, strict=True):
            c = share_key[i, j] = keys.share_encryption_key(keys.agree(sk2[i], pk2[j]), sid, i, j)
            inbox[j][i] = keys.seal_shares(c, sid, i, j, b_share, k_share, randbytes(12))
    # stage 2: the survivors mask (timed one by one); the server sums as vectors arrive
    dead = {i + 1 for i in dropped}
    alive = [i for i in index if i not in dead]
    rounding = {i: np.random.default_rng([seed, i]) for i in alive}
    held, uploads, times = {}, {}, []
    for i in alive:
        t0 = time.perf_counter()
        held[i] = {
            s: keys.open_shares(share_key[i, s], sid, s, i, sealed)
            for s, sealed in inbox[i].items()
        }
        pairwise = {
            j: keys.pairwise_mask_seed(keys.agree(sk1[i], pk1[j]), sid, i, j) for j in graph[i]
        }
        weight = sa.quantize.capped_weight(weights[i - 1], spec)
        vector = sa.quantize.quantize(vectors[i - 1], weight, spec, rounding[i])
        masked = sa.masking.mask(vector, i, keys.self_mask_seed(secret[i], sid, i), pairwise, bits)
        uploads[i] = sa.masking.pack(masked, bits)
        times.append(time.perf_counter() - t0)
    total = sa.masking.sum_vectors(
        (sa.masking.unpack(uploads[i], bits, d + 1) for i in alive), bits
    )
    # stage 3: each survivor answers b shares of surviving and sk1 shares of dropped neighbours
    answers = {}
    for h in alive:
        asked_alive = [j for j in graph[h] if j not in dead]
        asked_dead = [j for j in graph[h] if j in dead]
        sa.protocol.check_unmask_request(h, graph[h], asked_alive, asked_dead)
        answers[h] = {j: held[h][j][0] for j in asked_alive} | {
            j: held[h][j][1] for j in asked_dead
        }
    t0 = time.perf_counter()
    wanted = alive + sorted(dead)
    share_sets = [{h: answers[h][i] for h in graph[i] if h in answers} for i in wanted]
    # What the server runs: each secret checked against a spare share (outvoting a wrong one).
    secrets, _ = shamir.recover_many(share_sets, T)
    self_seeds = [
        keys.self_mask_seed(s, sid, i) for i, s in zip(alive, secrets[: len(alive)], strict=True)
    ]
    pairs = [
        (i, j, keys.pairwise_mask_seed(keys.agree(s, pk1[i]), sid, i, j))
        for j, s in zip(sorted(dead), secrets[len(alive) :], strict=True)
        for i in graph[j]
        if i not in dead
    ]
    mean, total_weight = sa.quantize.dequantize(
        sa.masking.unmask(total, self_seeds, pairs, bits), spec
    )
    unmask = time.perf_counter() - t0
    elapsed = time.perf_counter() - started
    expected = sum(sa.quantize.capped_weight(weights[i - 1], spec) for i in alive)
    if total_weight != expected:
        raise AssertionError(f"ours: total weight {total_weight}, expected {expected}")
    size = len(next(iter(uploads.values()))) / (d + 1)
    error = float(np.max(np.abs(mean - reference(vectors, weights, dropped))))
    if not error <= sa.quantize.error_bound(spec):
        raise AssertionError(f"ours: mean off by {error:.2e}, over the quantization bound")
    return Round(
        mask=times,
        unmask=unmask,
        wire=size,
        payload=size,
        error=error,
        total=elapsed,
    )


# --- report ---------------------------------------------------------------------------------

FLOWER_LABEL = "Flower SecAgg+"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _mask_time(r: Round) -> float:
    return statistics.median(r.mask)


def _unmask_time(r: Round) -> float:
    return r.unmask


def _ratio(peer: list[Round], ours: list[Round], of: Callable[[Round], float]) -> tuple[float, str]:
    """Best peer / best ours, and the median of the per-repetition ratios."""
    value = min(map(of, peer)) / min(map(of, ours))
    median = statistics.median(of(p) / of(o) for p, o in zip(peer, ours, strict=True))
    return value, f"{value:.1f}x (median {median:.1f}x)"


def _log(n: int, d: int, rep: int, name: str, r: Round) -> None:
    print(
        f"n={n} d={d} rep={rep} {name}: mask {_ms(_mask_time(r))} ms "
        f"unmask {_ms(r.unmask)} ms round {r.total:.2f} s "
        f"wire {r.wire:.3f} B/param err {r.error:.1e}",
        flush=True,
    )


def run_case(n: int, d: int, reps: int, seed: int, flower: bool = True) -> dict[str, list[Round]]:
    """Every contender `reps` times, interleaved (each repetition runs each contender once)."""
    vectors, weights, dropped = generate(n, d, seed)
    configs = ours_configs(n)
    rounds: dict[str, list[Round]] = {FLOWER_LABEL: []} if flower and FLOWER else {}
    rounds |= {name: [] for name in configs}
    for rep in range(reps):
        for name in rounds:
            if name == FLOWER_LABEL:
                r = flower_round(vectors, weights, dropped, seed + rep)
            else:
                r = ours_round(vectors, weights, dropped, seed + rep, configs[name])
            if r is not None:
                rounds[name].append(r)
                _log(n, d, rep, name, r)
    return {name: rs for name, rs in rounds.items() if rs}


def _label(n: int, d: int) -> str:
    return f"n={n:,}, d={d / 1e6:g}M, k={neighbours(n)}"


def case_rows(n: int, d: int, rounds: dict[str, list[Round]]) -> list[list[object]]:
    """One row per contender; ours carry the ratios to Flower and the goals."""
    peer = rounds.get(FLOWER_LABEL)
    rows = []
    for name, rs in rounds.items():
        row: list[object] = [
            _label(n, d),
            name,
            _ms(min(map(_mask_time, rs))),
            _ms(min(map(_unmask_time, rs))),
        ]
        if name == FLOWER_LABEL:
            row.append(f"{rs[0].wire:.3f} (vector {rs[0].payload:.3f})")
        else:
            row.append(f"**{rs[0].wire:.3f}** {_verdict(rs[0].wire <= BYTES_GOAL)}")
        row += [f"{max(r.error for r in rs):.1e}", f"{min(r.total for r in rs):.2f}"]
        if peer and name != FLOWER_LABEL:
            mask, mask_text = _ratio(peer, rs, _mask_time)
            unmask, unmask_text = _ratio(peer, rs, _unmask_time)
            row += [
                f"**{mask_text}** {_verdict(mask >= MASK_GOAL)}",
                f"**{unmask_text}** {_verdict(unmask >= UNMASK_GOAL)}",
            ]
        else:
            row += ["", ""]
        row.append(len(rs))
        rows.append(row)
    if not any(name != FLOWER_LABEL for name in rounds):
        rows.append(
            [_label(n, d), "ours", "TODO: fedrpc.fl.secagg kernels not complete"] + [""] * 7
        )
    return rows


HEAD = [
    "case (t=6, 2 dropped after stage 1)",
    "contender",
    "masking ms / device",
    "server unmask ms",
    f"bytes / masked param (goal <= {BYTES_GOAL:g})",
    "max abs error",
    "whole round s, in process",
    f"masking Flower / this (goal >= {MASK_GOAL:g}x)",
    f"unmask Flower / this (goal >= {UNMASK_GOAL:g}x)",
    "reps",
]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-only", action="store_true", help="only the end-to-end HTTP part")
    parser.add_argument(
        "--quick", action="store_true", help="HTTP part: 3 small cases (d=0.1M); write nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick or args.http_only:
        body = http_part(_secagg_http.QUICK if args.quick else _secagg_http.CASES)
        print(body)
        if not args.quick and not write_part("secagg", "http", body):
            print("docs/benchmarks.md has no secagg HTTP part yet: run the whole bench once")
        return
    started = time.perf_counter()
    if FLOWER:
        _flower_setup()
    rows = []
    for i, (n, d, reps) in enumerate(CASES):
        rows += case_rows(n, d, run_case(n, d, reps, seed=100 * (i + 1)))
    n, d, reps = LARGE
    large = case_rows(n, d, run_case(n, d, reps, seed=1000, flower=False))
    kernels = "\n\n".join(
        [
            table(HEAD, rows),
            table(HEAD[:7] + HEAD[9:], [row[:7] + row[9:] for row in large]),
            _notes(time.perf_counter() - started),
        ]
    )
    print(kernels, flush=True)
    pending = "End to end over HTTP: running (`python bench/secagg.py --http-only`)."
    body = kernels + "\n\n" + marked("secagg", "http", pending)
    write_section("secagg", "SecAgg+ vs Flower's SecAgg+ (in process, then over HTTP)", body)
    # Its own process: its peak RSS and event loop owe nothing to the kernel runs above.
    done = subprocess.run([sys.executable, __file__, "--http-only"], check=False)
    if done.returncode != 0:
        failed = f"End to end over HTTP: failed (exit status {done.returncode}; see its output)."
        write_part("secagg", "http", failed)


def http_part(cases) -> str:
    """Ours end to end over HTTP (bench/_secagg_http.py): the tables and their notes."""
    started = time.perf_counter()
    results, failures = _secagg_http.bench_http(cases)
    return _secagg_http_report.report(results, failures, time.perf_counter() - started)


def _notes(elapsed: float) -> str:
    peer = "" if FLOWER else " (flwr not importable: Flower rows skipped.)"
    return (
        "`python bench/secagg.py`. Every contender runs the whole protocol in this process, "
        "on one thread, on the same updates (float32, N(0, 0.1^2)), sample counts (10-999, "
        f"maximum weight {MAX_WEIGHT:g}), dropped devices (the same {DROPOUTS}, after stage 1), "
        f"clipping {CLIPPING:g} and t = {T}. Masking = one device's stage 2 (open the share "
        "bundles addressed to it, derive one pairwise seed per neighbour, weight, quantize, "
        "self mask, pairwise masks, modulo, encode), the median over the survivors of one "
        "repetition; Flower's is its device mod's `_collect_masked_vectors`. Unmask = the "
        "server's reconstruction of every needed secret from the stage-3 shares, mask "
        "removal and dequantization (the sum of the masked vectors is done in stage 2 by "
        "both); Flower's is `SecAggPlusWorkflow.unmask_stage` less the devices' answers, "
        "with a strategy that only keeps the result. Times are the best wall clock over "
        "interleaved repetitions; ratios compare those, the median per-repetition ratio in "
        "brackets. Bytes / masked param = one device's stage-2 upload divided by d + 1 "
        "(both sides mask the weight as one more element): "
        "Flower's whole protobuf Message (its int64 `ndarray_to_bytes` vector alone in "
        "brackets); ours the packed d + 1 words (raw upload; inline base64 would add a "
        "third). Quantization: Flower 2^22 levels of the weight-scaled update, modulus "
        "2^32 held in int64; ours multiplies the quantized update by the capped weight, so "
        "n x levels x 1000 must fit the words: b=32 takes the most levels that fit, b=64 "
        "keeps Flower's 22 bits (docs/secagg.md, Quantization). Flower's ring takes only "
        f"even neighbour counts: num_shares = {K} (10 neighbours and itself) where ours has "
        f"k = {K}; below 12 devices both are all to all (k = n - 1). Max abs error: the "
        "unmasked mean against the float64 weighted mean of the survivors. Flower's Shamir "
        "code runs a thread pool of its own (pure Python, under the GIL). "
        f"flwr {_version('flwr')}, numpy {np.__version__}, cryptography "
        f"{_version('cryptography')}.{peer} Whole bench: {elapsed:.0f} s."
    )


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "absent"


if __name__ == "__main__":
    main()
