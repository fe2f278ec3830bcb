"""Key agreement, key derivation and share-bundle encryption for SecAgg+.

X25519 (RFC 7748) agreements between devices give the pairwise mask seeds and
the keys that encrypt Shamir shares in transit (Bonawitz et al. 2017, §4:
``KA.agree`` and ``AE.enc``). Every key is derived with HKDF-SHA256
(RFC 5869) salted with the session id and one info string per use, so no
derived value is valid in another session or for another purpose. The exact
encodings are in ``docs/secagg.md``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.secagg import PROTOCOL

__all__ = [
    "INFO_GRAPH",
    "INFO_PAIRWISE_MASK",
    "INFO_SELF_MASK",
    "INFO_SHARE_ENCRYPTION",
    "KEY_BYTES",
    "NONCE_BYTES",
    "SEALED_BYTES",
    "SHARES_PLAINTEXT_BYTES",
    "agree",
    "associated_data",
    "check_public_key",
    "hkdf",
    "open_shares",
    "pairwise_mask_seed",
    "public_key",
    "seal_shares",
    "self_mask_seed",
    "session_bytes",
    "share_encryption_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_SHARE_BYTES = 66  # shamir.SHARE_BYTES; repeated to keep this module free of field math
SHARES_PLAINTEXT_BYTES = 2 * _SHARE_BYTES
SEALED_BYTES = NONCE_BYTES + SHARES_PLAINTEXT_BYTES + _TAG_BYTES

INFO_PAIRWISE_MASK = f"{PROTOCOL} pairwise-mask".encode()
INFO_SHARE_ENCRYPTION = f"{PROTOCOL} share-encryption".encode()
INFO_SELF_MASK = f"{PROTOCOL} self-mask".encode()
INFO_GRAPH = f"{PROTOCOL} graph".encode()
_AAD_SHARES = f"{PROTOCOL} shares".encode()

_MAX_INDEX = 2**32 - 1


def _key(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != KEY_BYTES:
        raise InvalidInput(f"{what} must be {KEY_BYTES} bytes")
    return bytes(value)


def _index(value: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_INDEX:
        raise InvalidInput(f"{what} must be a device index in 1..2^32-1")
    return value.to_bytes(4, "big")


def _pair(i: int, j: int) -> bytes:
    lo, hi = _index(i, "index i"), _index(j, "index j")
    if i == j:
        raise InvalidInput("a pairwise key needs two different devices")
    return lo + hi if i < j else hi + lo


def session_bytes(session_id: str) -> bytes:
    """The UTF-8 session id used as HKDF salt and in associated data (1..255 bytes)."""
    if not isinstance(session_id, str):
        raise InvalidInput("session id must be a string")
    raw = session_id.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise InvalidInput("session id must be 1..255 bytes of UTF-8")
    return raw


def public_key(private_key: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw 32-byte private key (RFC 7748).

    The private key is 32 random bytes chosen by the caller; X25519 clamps it.
    """
    sk = X25519PrivateKey.from_private_bytes(_key(private_key, "private key"))
    return sk.public_key().public_bytes_raw()


def agree(private_key: bytes, peer_public_key: bytes) -> bytes:
    """Raw 32-byte X25519 shared secret (``KA.agree`` of Bonawitz et al. 2017).

    Refuses a peer key of small order (an all-zero shared secret), which would
    make the "secret" public.
    """
    sk = X25519PrivateKey.from_private_bytes(_key(private_key, "private key"))
    pk = X25519PublicKey.from_public_bytes(_key(peer_public_key, "public key"))
    try:
        shared = sk.exchange(pk)
    except ValueError:
        raise InvalidInput("public key is of small order") from None
    if not any(shared):  # defence in depth: some backends return zeros
        raise InvalidInput("public key is of small order")
    return shared


# Any scalar works: X25519 clamps it to a multiple of the cofactor 8, which sends every
# point of small order (and each non-canonical encoding of one) to the all-zero output.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def check_public_key(public_key: bytes) -> bytes:
    """The key, if it is 32 bytes and not of small order (whose agreements are public)."""
    pk = X25519PublicKey.from_public_bytes(_key(public_key, "public key"))
    try:
        shared = _PROBE.exchange(pk)
    except ValueError:
        raise InvalidInput("public key is of small order") from None
    if not any(shared):
        raise InvalidInput("public key is of small order")
    return bytes(public_key)


def hkdf(ikm: bytes, session_id: str, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) with the UTF-8 session id as salt."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=session_bytes(session_id), info=info
    ).derive(bytes(ikm))


def pairwise_mask_seed(shared: bytes, session_id: str, i: int, j: int) -> bytes:
    """PRG seed ``s_ij`` of the pairwise mask between devices ``i`` and ``j`` (symmetric)."""
    return hkdf(_key(shared, "shared secret"), session_id, INFO_PAIRWISE_MASK + _pair(i, j))


def share_encryption_key(shared: bytes, session_id: str, i: int, j: int) -> bytes:
    """AES-256-GCM key ``c_ij`` for share bundles between ``i`` and ``j`` (symmetric)."""
    return hkdf(_key(shared, "shared secret"), session_id, INFO_SHARE_ENCRYPTION + _pair(i, j))


def self_mask_seed(self_secret: bytes, session_id: str, index: int) -> bytes:
    """PRG seed ``r_i`` of device ``index``'s self mask, from its 32-byte secret ``b_i``."""
    return hkdf(
        _key(self_secret, "self secret"), session_id, INFO_SELF_MASK + _index(index, "index")
    )


def associated_data(session_id: str, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data binding a bundle to session, sender and receiver."""
    sid = session_bytes(session_id)
    return (
        _AAD_SHARES
        + len(sid).to_bytes(2, "big")
        + sid
        + _index(sender, "sender")
        + _index(receiver, "receiver")
    )


def seal_shares(
    key: bytes,
    session_id: str,
    sender: int,
    receiver: int,
    self_share: bytes,
    key_share: bytes,
    nonce: bytes,
) -> bytes:
    """Encrypt the sender's two shares for one receiver (``AE.enc``, Bonawitz et al. 2017).

    Parameters
    ----------
    key
        ``c_ij`` from :func:`share_encryption_key`.
    self_share, key_share
        The receiver's 66-byte Shamir shares of the sender's self secret
        ``b_i`` and of its mask private key ``sk1_i``.
    nonce
        12 fresh random bytes; sent in clear as the bundle's first bytes.

    Returns
    -------
    bytes
        ``nonce || ciphertext || tag``, :data:`SEALED_BYTES` long.
    """
    if len(nonce) != NONCE_BYTES:
        raise InvalidInput(f"nonce must be {NONCE_BYTES} bytes")
    if len(self_share) != _SHARE_BYTES or len(key_share) != _SHARE_BYTES:
        raise InvalidInput(f"shares must be {_SHARE_BYTES} bytes each")
    aad = associated_data(session_id, sender, receiver)
    body = AESGCM(_key(key, "encryption key")).encrypt(
        bytes(nonce), bytes(self_share) + bytes(key_share), aad
    )
    return bytes(nonce) + body


def open_shares(
    key: bytes, session_id: str, sender: int, receiver: int, sealed: bytes
) -> tuple[bytes, bytes]:
    """Decrypt a bundle from :func:`seal_shares`; returns ``(self_share, key_share)``.

    Refuses a bundle of the wrong length, a tampered one, and one sealed for
    another session, sender or receiver (the associated data differs).
    """
    if not isinstance(sealed, bytes | bytearray) or len(sealed) != SEALED_BYTES:
        raise InvalidInput(f"sealed shares must be {SEALED_BYTES} bytes")
    aad = associated_data(session_id, sender, receiver)
    try:
        plain = AESGCM(_key(key, "encryption key")).decrypt(
            bytes(sealed[:NONCE_BYTES]), bytes(sealed[NONCE_BYTES:]), aad
        )
    except InvalidTag:
        raise InvalidInput("sealed shares failed authentication") from None
    return plain[:_SHARE_BYTES], plain[_SHARE_BYTES:]
