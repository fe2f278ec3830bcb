"""The device side of SecAgg+ (docs/secagg.md), over the pure kernels in ``fedrpc.fl.secagg``.

One :class:`SecAggDevice` holds one device's keys and state across the four
stages of one session. It is transport-agnostic: each stage has a ``*_params``
method that builds the JSON-ready params of the call (bytes as base64) and a
``read_*`` method that takes the call's result (decoded JSON) and returns
whether the session moved past the stage (else the device polls by
replaying the same params). What a device checks (the section "What the
server and a device check") raises :class:`fedrpc.fl.InvalidInput`:
a config naming other primitives or one whose modulus cannot hold the
cohort, a threshold below what the device accepts, a bad neighbour list, and
an unmask request that breaks never-both. A bundle that does not open under
its binding is discarded (kept in ``rejected``): the device then holds no
shares of that sender and sends none for it.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedrpc.fl import InvalidInput
from fedrpc.fl import secagg as fl_secagg
from fedrpc.fl.secagg import keys, masking, protocol, quantize, shamir

__all__ = ["SecAggDevice"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bytes(value: str) -> bytes:
    return base64.b64decode(value)


class SecAggDevice:
    """One device in one SecAgg+ session.

    Parameters
    ----------
    update
        The device's update: tensor name -> array (the session's tensor order
        picks and flattens them), or one flat vector.
    samples
        Its sample count (capped at the session's maximum weight).
    min_threshold
        The smallest threshold ``t`` the device accepts.
    randbytes
        Source of key, secret, nonce and coefficient bytes (``os.urandom``).
    rng
        Generator for stochastic rounding (seeded from ``secrets`` if omitted).
    """

    def __init__(
        self,
        update: Mapping[str, np.ndarray] | np.ndarray,
        samples: int,
        *,
        min_threshold: int = 2,
        randbytes: Callable[[int], bytes] = os.urandom,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.update, self.samples, self.min_threshold = update, samples, min_threshold
        self.randbytes = randbytes
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.sk1, self.sk2, self.secret = randbytes(32), randbytes(32), randbytes(32)
        self.pk1, self.pk2 = keys.public_key(self.sk1), keys.public_key(self.sk2)
        self.round_id = ""
        self.session_id = ""
        self.config: dict[str, Any] = {}
        self.spec: quantize.QuantSpec | None = None
        self.index: int | None = None
        self.neighbours: dict[int, tuple[bytes, bytes]] = {}  # j -> (pk1_j, pk2_j)
        self.sealed: dict[int, bytes] = {}  # kept: a retry resends the same bytes
        self.held: dict[int, tuple[bytes, bytes]] = {}  # j -> (share of b_j, share of sk1_j)
        self.active: list[int] = []  # neighbours that completed stage 1
        self.rejected: list[int] = []  # senders whose bundle did not open
        self.survivors: list[int] | None = None
        self.dropped: list[int] | None = None
        self._masked: bytes | None = None
        self.accepted = False  # the server holds this device's masked vector: poll without it
        self.released: set[tuple[int, str]] = set()  # (neighbour, "self" | "key") given out

    # -- stage 0 ------------------------------------------------------------------------------

    def setup_params(self, round_id: str) -> dict[str, Any]:
        self.round_id = round_id
        return {"round_id": round_id, "pk1": _b64(self.pk1), "pk2": _b64(self.pk2)}

    def read_setup(self, result: Mapping[str, Any]) -> bool:
        """Check the config; True once stage 0 closed and the neighbours are known."""
        config = result["config"]
        for name, expected in fl_secagg.PRIMITIVES.items():
            if config.get(name) != expected:
                raise InvalidInput(f"the session names {name} {config.get(name)!r}")
        self.session_id, self.config = result["session_id"], dict(config)
        if result.get("index") is None:
            return False
        n, k, t = config["devices"], config["neighbours"], config["threshold"]
        self.spec = quantize.make_spec(
            n,
            config["clip"],
            config["quantization_bits"],
            config["max_weight"],
            config["modulus_bits"],
        )
        if not (max(1, self.min_threshold) <= t <= k):
            raise InvalidInput(f"threshold {t} is outside {self.min_threshold}..{k}")
        index = result["index"]
        found = {nb["index"]: (_bytes(nb["pk1"]), _bytes(nb["pk2"])) for nb in result["neighbours"]}
        if len(found) != len(result["neighbours"]) or index in found:
            raise InvalidInput("the neighbour list repeats a device or names this one")
        if len(found) != k:
            raise InvalidInput(f"the neighbour list must have {k} devices")
        self.index, self.neighbours = index, found
        return True

    # -- stage 1 ------------------------------------------------------------------------------

    def _key_with(self, j: int) -> bytes:
        shared = keys.agree(self.sk2, self.neighbours[j][1])
        return keys.share_encryption_key(shared, self.session_id, self.index, j)

    def share_keys_params(self) -> dict[str, Any]:
        if not self.sealed:
            js = sorted(self.neighbours)
            t = self.config["threshold"]
            b_shares = shamir.split(self.secret, js, t, self.randbytes)
            k_shares = shamir.split(self.sk1, js, t, self.randbytes)
            for j, bs, ks in zip(js, b_shares, k_shares, strict=True):
                nonce = self.randbytes(keys.NONCE_BYTES)
                sealed = keys.seal_shares(
                    self._key_with(j), self.session_id, self.index, j, bs, ks, nonce
                )
                self.sealed[j] = sealed
        return {
            "round_id": self.round_id,
            "session_id": self.session_id,
            "ciphertexts": [{"receiver": j, "bundle": _b64(b)} for j, b in self.sealed.items()],
        }

    def read_share_keys(self, result: Mapping[str, Any]) -> bool:
        """Open the forwarded bundles once stage 1 closed; True then."""
        if result["status"] != "ready":
            return False
        active, held, rejected = [], {}, []
        for item in result.get("ciphertexts", []):
            j = item["sender"]
            if j not in self.neighbours or j in active:
                raise InvalidInput(f"a bundle from device {j}, which is not a neighbour")
            active.append(j)
            try:
                held[j] = keys.open_shares(
                    self._key_with(j), self.session_id, j, self.index, _bytes(item["bundle"])
                )
            except InvalidInput:
                rejected.append(j)  # tampered or misdirected: no shares of j held
        if len(active) < self.config["threshold"]:
            # Fewer than t neighbours to mask with: a server that forwarded no bundles to this
            # device could unmask its vector alone (Bonawitz et al. abort here too).
            raise InvalidInput(
                f"only {len(active)} neighbours completed stage 1; masking needs t = "
                f"{self.config['threshold']}"
            )
        self.active, self.held, self.rejected = sorted(active), held, rejected
        return True

    # -- stage 2 ------------------------------------------------------------------------------

    def _flat_update(self) -> np.ndarray:
        if isinstance(self.update, np.ndarray):
            flat = self.update.astype(np.float64).reshape(-1)
        else:
            parts = [np.asarray(self.update[t["name"]]).reshape(-1) for t in self.config["tensors"]]
            flat = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
        if flat.shape[0] != self.config["dimension"]:
            raise InvalidInput(
                f"the update has {flat.shape[0]} values, the session masks "
                f"{self.config['dimension']}"
            )
        return flat

    def _norm_bound(self) -> float | None:
        """With central DP, the L2 norm to clip to: the device's own computation of the bound
        (docs/secagg.md, "Central DP"), never above what the server states."""
        stated = self.config.get("l2_norm_bound")
        if stated is None:
            return None
        cfg = self.config
        own = quantize.l2_norm_bound(cfg["clip"], cfg["quantization_bits"], cfg["dimension"])
        return min(own, float(stated))

    def masked_vector_bytes(self) -> bytes:
        """The packed masked vector; computed once, so a retry resends the same bytes."""
        if self._masked is None:
            self._masked = self._mask()
        return self._masked

    def _mask(self) -> bytes:
        spec = self.spec
        flat = self._flat_update()
        bound = self._norm_bound()
        if bound is not None:
            flat = quantize.clip_l2(flat, bound)
        vector = quantize.quantize(flat, quantize.capped_weight(self.samples, spec), spec, self.rng)
        seeds = {
            j: keys.pairwise_mask_seed(
                keys.agree(self.sk1, self.neighbours[j][0]), self.session_id, self.index, j
            )
            for j in self.active
        }
        self_seed = keys.self_mask_seed(self.secret, self.session_id, self.index)
        masked = masking.mask(vector, self.index, self_seed, seeds, spec.modulus_bits)
        return masking.pack(masked, spec.modulus_bits)

    def masked_vectors_params(self, upload_id: str | None = None) -> dict[str, Any]:
        """Stage 2's params: the vector inline, or ``upload_id`` of an upload (purpose
        ``secagg_vector``) of :meth:`masked_vector_bytes`; once the server has accepted it,
        a poll without it."""
        if self.accepted:
            return {"round_id": self.round_id, "session_id": self.session_id}
        if upload_id is not None:
            return {
                "round_id": self.round_id,
                "session_id": self.session_id,
                "upload_id": upload_id,
            }
        return {
            "round_id": self.round_id,
            "session_id": self.session_id,
            "masked_vector": _b64(self.masked_vector_bytes()),
        }

    def read_masked_vectors(self, result: Mapping[str, Any]) -> bool:
        """True once stage 2 closed: the unmask request is then known, and fixed: a later answer
        that asks otherwise is refused (a server switching a neighbour between the lists
        across polls would collect both of its secrets)."""
        self.accepted = result.get("status") == "accepted"
        if result.get("survivors") is None:
            return False
        request = list(result["survivors"]), list(result["dropped"])
        if self.survivors is not None and (self.survivors, self.dropped) != request:
            raise InvalidInput("the server changed its unmask request; never-both forbids it")
        self.survivors, self.dropped = request
        return True

    # -- stage 3 ------------------------------------------------------------------------------

    def unmask_params(
        self, survivors: list[int] | None = None, dropped: list[int] | None = None
    ) -> dict[str, Any]:
        """The shares asked for, after the never-both check (raises InvalidInput to refuse)."""
        survivors = self.survivors if survivors is None else survivors
        dropped = self.dropped if dropped is None else dropped
        protocol.check_unmask_request(self.index, self.neighbours, survivors, dropped)
        # Never both across calls too: a secret released for j rules out j's other one.
        asked = {(j, "self") for j in survivors} | {(j, "key") for j in dropped}
        if any((j, "key" if kind == "self" else "self") in self.released for j, kind in asked):
            raise InvalidInput("never both: this device already gave the other secret of one")
        self.released |= {(j, kind) for j, kind in asked if j in self.held}
        shares = [
            {"owner": j, "kind": "self", "share": _b64(self.held[j][0])}
            for j in survivors
            if j in self.held
        ] + [
            {"owner": j, "kind": "key", "share": _b64(self.held[j][1])}
            for j in dropped
            if j in self.held
        ]
        return {"round_id": self.round_id, "session_id": self.session_id, "shares": shares}
