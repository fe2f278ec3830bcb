"""A whole SecAgg+ session in process: 20 devices, 100k parameters, dropouts at every stage.

The server and the devices are simulated here with the kernels only, stage by
stage as docs/secagg.md describes; the result must equal the float64 weighted
mean of the surviving devices' updates within the quantization bound, which
the test computes from the session's parameters itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.secagg import graph, keys, masking, protocol, quantize, shamir

SID = "sag_protocol"
N, D = 20, 100_000
CLIP, BITS, MAX_WEIGHT = 0.5, 16, 200


@dataclass
class Device:
    """The device's side of the protocol, as the client library will run it."""

    index: int
    rand: random.Random
    update: np.ndarray
    samples: int
    sk1: bytes = b""
    sk2: bytes = b""
    b: bytes = b""
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # j -> (pk1, pk2)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # j -> (b share, sk share)

    def setup(self) -> tuple[bytes, bytes]:
        self.sk1, self.sk2, self.b = (self.rand.randbytes(32) for _ in range(3))
        return keys.public_key(self.sk1), keys.public_key(self.sk2)

    def share_keys(self, t: int) -> dict[int, bytes]:
        js = sorted(self.neighbours)
        b_shares = shamir.split(self.b, js, t, self.rand.randbytes)
        sk_shares = shamir.split(self.sk1, js, t, self.rand.randbytes)
        sealed = {}
        for j, bs, ks in zip(js, b_shares, sk_shares, strict=True):
            key = keys.share_encryption_key(
                keys.agree(self.sk2, self.neighbours[j][1]), SID, self.index, j
            )
            sealed[j] = keys.seal_shares(key, SID, self.index, j, bs, ks, self.rand.randbytes(12))
        return sealed

    def receive(self, sender: int, sealed: bytes) -> None:
        key = keys.share_encryption_key(
            keys.agree(self.sk2, self.neighbours[sender][1]), SID, sender, self.index
        )
        self.held[sender] = keys.open_shares(key, SID, sender, self.index, sealed)

    def masked_vector(self, spec: quantize.QuantSpec, active: set[int]) -> bytes:
        v = quantize.quantize(
            self.update,
            quantize.capped_weight(self.samples, spec),
            spec,
            np.random.default_rng(self.index),
        )
        pairwise = {
            j: keys.pairwise_mask_seed(keys.agree(self.sk1, pk1), SID, self.index, j)
            for j, (pk1, _) in self.neighbours.items()
            if j in active
        }
        r = keys.self_mask_seed(self.b, SID, self.index)
        return masking.pack(masking.mask(v, self.index, r, pairwise, spec.modulus_bits), 32)

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        protocol.check_unmask_request(self.index, self.held, survivors, dropped)
        return {j: self.held[j][0] for j in survivors} | {j: self.held[j][1] for j in dropped}


def run_session(k: int, t: int, drop_at: dict[int, set[int]], seed: int = 0):
    """Run stages 0-3; ``drop_at[s]`` are the devices that go silent from stage ``s`` on."""
    rng = np.random.default_rng(seed)
    devices = {
        i: Device(
            index=i,
            rand=random.Random(f"{seed}-{i}"),
            update=rng.uniform(-0.45, 0.45, D).astype(np.float32),
            samples=int(rng.integers(20, 300)),  # some above MAX_WEIGHT: capped
        )
        for i in range(1, N + 1)
    }
    spec = quantize.make_spec(N, CLIP, BITS, MAX_WEIGHT)
    silent: set[int] = set()

    # Stage 0: keys and the graph.
    silent |= drop_at.get(0, set())
    public = {i: d.setup() for i, d in devices.items() if i not in silent}
    # (The server indexes only stage-0 completers; here indices are fixed and a
    # stage-0 dropout is simply absent from the graph's vertex set.)
    order = sorted(public)
    g = graph.neighbours(len(order), k, graph.graph_seed(bytes(32), SID))
    nb = {order[p - 1]: [order[q - 1] for q in qs] for p, qs in g.items()}
    for i in order:
        devices[i].neighbours = {j: public[j] for j in nb[i]}

    # Stage 1: sealed shares, forwarded by the server.
    silent |= drop_at.get(1, set())
    inbox: dict[int, dict[int, bytes]] = {i: {} for i in order}
    for i in order:
        if i not in silent:
            for j, sealed in devices[i].share_keys(t).items():
                inbox[j][i] = sealed
    active = {i for i in order if i not in silent}  # stage-1 completers
    for j in active:
        for i, sealed in inbox[j].items():
            devices[j].receive(i, sealed)

    # Stage 2: masked vectors.
    silent |= drop_at.get(2, set())
    masked = {
        i: masking.unpack(devices[i].masked_vector(spec, active), 32, D + 1)
        for i in sorted(active - silent)
    }
    survivors, dropped = set(masked), active - set(masked)

    # Stage 3: unmask shares, never both for one device.
    silent |= drop_at.get(3, set())
    b_shares: dict[int, dict[int, bytes]] = {i: {} for i in survivors}
    sk_shares: dict[int, dict[int, bytes]] = {j: {} for j in dropped}
    for u in sorted(survivors - silent):
        mine = [j for j in nb[u] if j in active]
        answer = devices[u].unmask(
            [j for j in mine if j in survivors], [j for j in mine if j in dropped]
        )
        for j, share in answer.items():
            (b_shares if j in survivors else sk_shares)[j][u] = share

    self_secrets = dict(
        zip(survivors, shamir.combine_many([b_shares[i] for i in survivors], t), strict=True)
    )
    sk_secrets = dict(
        zip(dropped, shamir.combine_many([sk_shares[j] for j in dropped], t), strict=True)
    )
    total = masking.sum_vectors(masked.values(), 32)
    pairs = [
        (i, j, keys.pairwise_mask_seed(keys.agree(sk_secrets[j], public[i][0]), SID, i, j))
        for j in dropped
        for i in nb[j]
        if i in survivors
    ]
    selfs = [keys.self_mask_seed(self_secrets[i], SID, i) for i in survivors]
    mean, weight = quantize.dequantize(masking.unmask(total, selfs, pairs, 32), spec)
    return devices, survivors, mean, weight


CASES = {
    "no dropouts": {},
    "after stage 1": {2: {4, 9}},
    "after stage 1 and 2": {2: {4, 9}, 3: {13}},
    "at every stage": {0: {20}, 1: {5}, 2: {4, 9}, 3: {13}},
}


@pytest.mark.parametrize(("k", "t"), [(11, 6), graph.default_parameters(N)], ids=["k11", "default"])
@pytest.mark.parametrize("drops", CASES.values(), ids=CASES.keys())
def test_session_reconstructs_the_weighted_mean_of_the_survivors(k, t, drops):
    devices, survivors, mean, weight = run_session(k, t, drops)

    expected_survivors = set(range(1, N + 1)) - drops.get(0, set())
    expected_survivors -= drops.get(1, set()) | drops.get(2, set())
    assert survivors == expected_survivors  # stage-3 silence does not remove a vector
    weights = {i: min(devices[i].samples, MAX_WEIGHT) for i in survivors}
    assert weight == sum(weights.values())
    exact = sum(weights[i] * devices[i].update.astype(np.float64) for i in survivors) / weight
    # Stochastic rounding moves each device's value by less than one step 2c/(2^q - 1);
    # a weighted mean of such errors stays below one step. Float64 noise is far smaller.
    bound = 2 * CLIP / (2**BITS - 1)
    error = np.abs(mean - exact)
    assert error.max() < bound
    assert error.mean() < bound / 4  # unbiased rounding: errors average out


def test_too_many_silent_holders_leave_a_secret_unrecoverable():
    # With k = 4 and t = 4 one silent neighbour in stage 3 leaves fewer than t shares.
    with pytest.raises(InvalidInput, match="needed"):
        run_session(4, 4, {3: {1}})
