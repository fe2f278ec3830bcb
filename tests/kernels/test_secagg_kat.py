"""SecAgg+ known answers: RFC vectors, and docs/secagg.md's vectors recomputed twice.

Every value in the documentation's known-answer block is computed by the
kernels and, independently, by tests/kernels/secagg_reference.py (pure Python
from the RFCs and the page's prose); both must equal the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedrpc.fl.secagg import graph, keys, masking, prg, quantize, shamir
from tests.kernels import secagg_reference as ref

DOC = Path(__file__).resolve().parents[2] / "docs" / "secagg.md"
SID = "sag_kat"
SK1_3, SK2_3 = bytes(range(1, 33)), bytes(range(33, 65))
SK1_7, SK2_7 = bytes(range(65, 97)), bytes(range(97, 129))
B_3, B_7 = bytes(range(129, 161)), bytes(range(161, 193))
XS = [1, 2, 5, 7, 9]
NOISE_B = bytes(range(132))
NOISE_SK = bytes(range(255, 123, -1))
NONCE = bytes(range(12))
U_3, W_3 = [-1.5, -0.5, 0.0, 0.25, 1.0], 7
U_7, W_7 = [0.5, 0.5, -0.25, 2.0, -1.0], 3


def _doc_vectors() -> dict[str, str]:
    section = DOC.read_text().split("## Known-answer vectors", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    return dict(re.findall(r"^(\w+) = (.+)$", block, flags=re.M))


KAT = _doc_vectors()


def kat(name: str) -> bytes:
    return bytes.fromhex(KAT[name])


def _fixed(data: bytes):
    return lambda n: data[:n]


# --- The primitives against their RFCs -----------------------------------------------


RFC7748_ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


@pytest.mark.parametrize("x25519_public", [keys.public_key, ref.x25519_public])
def test_x25519_matches_rfc7748_section_6_1(x25519_public):
    assert x25519_public(RFC7748_ALICE_SK) == RFC7748_ALICE_PK
    assert x25519_public(RFC7748_BOB_SK) == RFC7748_BOB_PK


def test_x25519_agreement_matches_rfc7748_section_6_1():
    assert keys.agree(RFC7748_ALICE_SK, RFC7748_BOB_PK) == RFC7748_SHARED
    assert keys.agree(RFC7748_BOB_SK, RFC7748_ALICE_PK) == RFC7748_SHARED
    assert ref.x25519(RFC7748_ALICE_SK, RFC7748_BOB_PK) == RFC7748_SHARED


def test_hkdf_matches_rfc5869_test_case_1():
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(13))  # 0x00..0x0c: valid UTF-8, so it can be a session id
    info = bytes(range(0xF0, 0xFA))
    okm = bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    assert keys.hkdf(ikm, salt.decode(), info, 42) == okm
    assert ref.hkdf_sha256(ikm, salt, info, 42) == okm


RFC8439_BLOCK = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


def test_chacha20_block_matches_rfc8439_section_2_3_2():
    key, nonce = bytes(range(32)), bytes.fromhex("000000090000004a00000000")
    assert ref.chacha20_block(key, 1, nonce) == RFC8439_BLOCK
    # cryptography's 16-byte nonce is the little-endian counter then the 96-bit nonce.
    enc = Cipher(algorithms.ChaCha20(key, (1).to_bytes(4, "little") + nonce), None).encryptor()
    assert enc.update(bytes(64)) == RFC8439_BLOCK


def test_prg_is_the_zero_nonce_keystream_from_counter_zero():
    seed = bytes(range(32))
    stream = ref.keystream(seed, 200 * 8)
    assert prg.expand(seed, 400, 32).tobytes() == stream[: 400 * 4]
    assert prg.expand(seed, 200, 64).tolist() == ref.mask_words(seed, 200, 64)


# --- docs/secagg.md's vectors ---------------------------------------------------------


def test_the_documentation_lists_every_vector():
    assert len(KAT) >= 25


def test_public_keys_and_agreements():
    for name, sk in [("pk1_3", SK1_3), ("pk2_3", SK2_3), ("pk1_7", SK1_7), ("pk2_7", SK2_7)]:
        assert keys.public_key(sk) == ref.x25519_public(sk) == kat(name), name
    assert keys.agree(SK1_3, kat("pk1_7")) == keys.agree(SK1_7, kat("pk1_3"))
    assert keys.agree(SK1_3, kat("pk1_7")) == ref.x25519(SK1_3, kat("pk1_7"))
    assert keys.agree(SK1_3, kat("pk1_7")) == kat("agree_sk1_3_pk1_7")
    assert keys.agree(SK2_7, kat("pk2_3")) == ref.x25519(SK2_3, kat("pk2_7"))
    assert keys.agree(SK2_7, kat("pk2_3")) == kat("agree_sk2_3_pk2_7")


def test_derived_keys_use_the_documented_info_strings():
    salt = SID.encode()
    pair = (3).to_bytes(4, "big") + (7).to_bytes(4, "big")
    s_ref = ref.hkdf_sha256(
        kat("agree_sk1_3_pk1_7"), salt, b"fedrpc-secagg-v1 pairwise-mask" + pair
    )
    c_ref = ref.hkdf_sha256(
        kat("agree_sk2_3_pk2_7"), salt, b"fedrpc-secagg-v1 share-encryption" + pair
    )
    r_ref = ref.hkdf_sha256(B_3, salt, b"fedrpc-secagg-v1 self-mask" + (3).to_bytes(4, "big"))
    r7_ref = ref.hkdf_sha256(B_7, salt, b"fedrpc-secagg-v1 self-mask" + (7).to_bytes(4, "big"))
    g_ref = ref.hkdf_sha256(bytes(32), salt, b"fedrpc-secagg-v1 graph")
    # both ends derive the same pairwise values, whichever order they name the pair in
    assert keys.pairwise_mask_seed(kat("agree_sk1_3_pk1_7"), SID, 7, 3) == s_ref == kat("s_3_7")
    assert keys.share_encryption_key(kat("agree_sk2_3_pk2_7"), SID, 3, 7) == c_ref
    assert c_ref == kat("c_3_7")
    assert keys.self_mask_seed(B_3, SID, 3) == r_ref == kat("r_3")
    assert keys.self_mask_seed(B_7, SID, 7) == r7_ref == kat("r_7")
    assert graph.graph_seed(bytes(32), SID) == g_ref == kat("graph_seed")


def test_shamir_shares_are_the_documented_polynomial():
    coeffs = ref.shamir_coefficients(B_3, NOISE_B)
    shares = shamir.split(B_3, XS, 3, _fixed(NOISE_B))
    for x, share in zip(XS, shares, strict=True):
        assert share == ref.poly_eval(coeffs, x).to_bytes(66, "big") == kat(f"share_{x}_b_3")
    sk_coeffs = ref.shamir_coefficients(SK1_3, NOISE_SK)
    sk_share_7 = shamir.split(SK1_3, XS, 3, _fixed(NOISE_SK))[3]
    assert sk_share_7 == ref.poly_eval(sk_coeffs, 7).to_bytes(66, "big") == kat("share_7_sk1_3")


def test_documented_shares_interpolate_to_the_secret():
    points = {x: int.from_bytes(kat(f"share_{x}_b_3"), "big") for x in (2, 7, 9)}
    assert ref.lagrange_at_zero(points).to_bytes(32, "big") == B_3
    assert shamir.combine({x: kat(f"share_{x}_b_3") for x in (1, 5, 9)}, 3) == B_3


def test_sealed_bundle_layout():
    aad = (
        b"fedrpc-secagg-v1 shares"
        + len(SID).to_bytes(2, "big")
        + SID.encode()
        + (3).to_bytes(4, "big")
        + (7).to_bytes(4, "big")
    )
    assert keys.associated_data(SID, 3, 7) == aad == kat("aad_3_7")
    plaintext = kat("share_7_b_3") + kat("share_7_sk1_3")
    expected = NONCE + AESGCM(kat("c_3_7")).encrypt(NONCE, plaintext, aad)
    sealed = keys.seal_shares(
        kat("c_3_7"), SID, 3, 7, kat("share_7_b_3"), kat("share_7_sk1_3"), NONCE
    )
    assert sealed == expected == kat("sealed_3_7")
    assert len(sealed) == keys.SEALED_BYTES == 160
    assert keys.open_shares(kat("c_3_7"), SID, 3, 7, sealed) == (
        kat("share_7_b_3"),
        kat("share_7_sk1_3"),
    )


def test_mask_words():
    words32 = ref.mask_words(kat("s_3_7"), 8, 32)
    assert prg.expand(kat("s_3_7"), 8, 32).tolist() == words32
    assert b"".join(w.to_bytes(4, "little") for w in words32) == kat("prg_s_3_7_u32x8")
    words64 = ref.mask_words(kat("r_3"), 4, 64)
    assert prg.expand(kat("r_3"), 4, 64).tolist() == words64
    assert b"".join(w.to_bytes(8, "little") for w in words64) == kat("prg_r_3_u64x4")


def _ref_quantize(update: list[float], weight: int) -> list[int]:
    """Round to nearest with c = 1, L = 255, from the page's formula."""
    q = [int(np.floor((min(max(x, -1.0), 1.0) + 1.0) * 255 / 2 + 0.5)) for x in update]
    return [weight * v for v in q] + [weight]


def _le32(words: list[int]) -> bytes:
    return b"".join((w % 2**32).to_bytes(4, "little") for w in words)


def test_quantized_and_masked_vectors():
    spec = quantize.make_spec(2, 1.0, 8, 100)
    assert spec.modulus_bits == 32
    v3 = quantize.quantize(np.array(U_3, np.float32), W_3, spec, None)
    v7 = quantize.quantize(np.array(U_7, np.float32), W_7, spec, None)
    assert masking.pack(v3, 32) == _le32(_ref_quantize(U_3, W_3)) == kat("v_3")
    assert masking.pack(v7, 32) == _le32(_ref_quantize(U_7, W_7)) == kat("v_7")

    s37 = ref.mask_words(kat("s_3_7"), 6, 32)
    r3, r7 = ref.mask_words(kat("r_3"), 6, 32), ref.mask_words(kat("r_7"), 6, 32)
    y3_ref = [v + a + b for v, a, b in zip(_ref_quantize(U_3, W_3), r3, s37, strict=True)]
    y7_ref = [v + a - b for v, a, b in zip(_ref_quantize(U_7, W_7), r7, s37, strict=True)]
    y3 = masking.mask(v3, 3, kat("r_3"), {7: kat("s_3_7")}, 32)
    y7 = masking.mask(v7, 7, kat("r_7"), {3: kat("s_3_7")}, 32)
    assert masking.pack(y3, 32) == _le32(y3_ref) == kat("y_3")
    assert masking.pack(y7, 32) == _le32(y7_ref) == kat("y_7")

    total = masking.unmask(masking.sum_vectors([y3, y7], 32), [kat("r_3"), kat("r_7")], [], 32)
    plain = [a + b for a, b in zip(_ref_quantize(U_3, W_3), _ref_quantize(U_7, W_7), strict=True)]
    assert masking.pack(total, 32) == _le32(plain) == kat("v_3_plus_v_7")
    mean, weight = quantize.dequantize(total, spec)
    assert weight == 10
    np.testing.assert_allclose(mean, [p / 10 * 2 / 255 - 1 for p in plain[:-1]], rtol=1e-12)


def test_graph_ring_and_neighbours():
    seed = kat("graph_seed")
    order = [int(v) for v in KAT["graph_ring"].split()]
    assert graph.shuffle(10, seed) == ref.ring(10, seed) == order
    expected = ref.harary(order, 3)
    nb = graph.neighbours(10, 3, seed)
    assert {i: set(v) for i, v in nb.items()} == expected
    assert list(nb[1]) == [int(v) for v in KAT["graph_neighbours_1"].split()]
