"""SecAgg+ secure aggregation kernels (Bonawitz et al. 2017; Bell et al. 2020).

Small byte-in/byte-out modules, specified in ``docs/secagg.md``:

* :mod:`~fedrpc.fl.secagg.keys`: X25519, HKDF-SHA256 with domain separation,
  AES-256-GCM sealing of a share bundle;
* :mod:`~fedrpc.fl.secagg.shamir`: Shamir sharing of 32-byte secrets over
  GF(2^521 - 1);
* :mod:`~fedrpc.fl.secagg.prg`: ChaCha20 keystream expansion of 32-byte seeds;
* :mod:`~fedrpc.fl.secagg.quantize`: clipping, stochastic quantization, the
  capacity check and the modulus;
* :mod:`~fedrpc.fl.secagg.masking`: masking, unmasking, the wire format;
* :mod:`~fedrpc.fl.secagg.graph`: the neighbour graph and default ``k``/``t``;
* :mod:`~fedrpc.fl.secagg.protocol`: stage names and the never-both rule.

No I/O, no clock, no global random state: randomness comes in as bytes, a
``randbytes`` callable or a numpy ``Generator``.
"""

__all__ = ["AEAD", "FIELD", "KDF", "KEY_AGREEMENT", "PRG", "PRIMITIVES", "PROTOCOL"]

#: Version tag that starts every domain-separation string.
PROTOCOL = "fedrpc-secagg-v1"
#: Primitive names as the session config states them (docs/secagg.md).
KEY_AGREEMENT = "x25519"
KDF = "hkdf-sha256"
AEAD = "aes-256-gcm"
PRG = "chacha20"
FIELD = "gf(2^521-1)"

#: The session config's primitive fields: the server states them, a device checks them.
PRIMITIVES = {
    "protocol": PROTOCOL,
    "key_agreement": KEY_AGREEMENT,
    "kdf": KDF,
    "aead": AEAD,
    "prg": PRG,
    "field": FIELD,
}
