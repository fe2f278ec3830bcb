"""SecAgg+ kernels one by one: round trips, properties and refusals."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.secagg import graph, keys, masking, prg, protocol, quantize, shamir
from tests.kernels import secagg_reference as ref

SID = "sag_test"


def _rand(seed: int):
    gen = random.Random(seed)
    return lambda n: gen.randbytes(n)


# --- keys ------------------------------------------------------------------------------


def _sealed():
    sk_a, sk_b = os.urandom(32), os.urandom(32)
    key = keys.share_encryption_key(keys.agree(sk_a, keys.public_key(sk_b)), SID, 2, 5)
    shares = (os.urandom(66), os.urandom(66))
    return key, shares, keys.seal_shares(key, SID, 2, 5, *shares, os.urandom(12))


def test_sealed_shares_open_for_their_receiver():
    key, shares, sealed = _sealed()
    assert keys.open_shares(key, SID, 2, 5, sealed) == shares


@pytest.mark.parametrize("position", [0, 11, 12, 80, 143, 159])
def test_tampered_ciphertext_is_refused(position):
    key, _, sealed = _sealed()
    tampered = bytearray(sealed)
    tampered[position] ^= 0x01
    with pytest.raises(InvalidInput, match="authentication"):
        keys.open_shares(key, SID, 2, 5, bytes(tampered))


@pytest.mark.parametrize(
    ("session", "sender", "receiver"),
    [("sag_other", 2, 5), (SID, 5, 2), (SID, 2, 6), (SID, 3, 5)],
    ids=["other session", "swapped direction", "other receiver", "other sender"],
)
def test_wrong_associated_data_is_refused(session, sender, receiver):
    key, _, sealed = _sealed()
    with pytest.raises(InvalidInput, match="authentication"):
        keys.open_shares(key, session, sender, receiver, sealed)


def test_truncated_bundle_is_refused():
    key, _, sealed = _sealed()
    with pytest.raises(InvalidInput, match="160 bytes"):
        keys.open_shares(key, SID, 2, 5, sealed[:-1])


def test_small_order_public_key_is_refused():
    with pytest.raises(InvalidInput, match="small order"):
        keys.agree(os.urandom(32), bytes(32))


# The points of order dividing 8 on Curve25519 and non-canonical encodings of them (u + p),
# as listed by libsodium's blocklist: every X25519 agreement with them is all zeros.
SMALL_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", SMALL_ORDER)
def test_check_public_key_refuses_every_small_order_point(point):
    with pytest.raises(InvalidInput, match="small order"):
        keys.check_public_key(bytes.fromhex(point))


def test_check_public_key_passes_real_keys():
    for _ in range(50):
        pk = keys.public_key(os.urandom(32))
        assert keys.check_public_key(pk) == pk


def test_derivations_are_separated_by_use_session_and_pair():
    shared = os.urandom(32)
    seeds = {
        keys.pairwise_mask_seed(shared, SID, 1, 2),
        keys.share_encryption_key(shared, SID, 1, 2),
        keys.self_mask_seed(shared, SID, 1),
        keys.pairwise_mask_seed(shared, "sag_other", 1, 2),
        keys.pairwise_mask_seed(shared, SID, 1, 3),
    }
    assert len(seeds) == 5
    assert keys.pairwise_mask_seed(shared, SID, 2, 1) == keys.pairwise_mask_seed(shared, SID, 1, 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: keys.public_key(bytes(31)),
        lambda: keys.pairwise_mask_seed(bytes(32), SID, 4, 4),
        lambda: keys.self_mask_seed(bytes(32), SID, 0),
        lambda: keys.self_mask_seed(bytes(32), "", 1),
        lambda: keys.seal_shares(bytes(32), SID, 1, 2, bytes(66), bytes(66), bytes(8)),
    ],
    ids=["short key", "self pair", "index 0", "empty session", "short nonce"],
)
def test_malformed_key_inputs_are_refused(call):
    with pytest.raises(InvalidInput):
        call()


# --- shamir -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "t"), [(1, 1), (3, 2), (5, 3), (7, 7), (9, 4)])
def test_any_t_of_n_shares_recover_the_secret(n, t):
    secret = os.urandom(32)
    xs = random.Random(n).sample(range(1, 5000), n)
    shares = dict(zip(xs, shamir.split(secret, xs, t, os.urandom), strict=True))
    for subset in itertools.combinations(xs, t):
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret
    assert shamir.combine(shares, t) == secret  # more than t: the t lowest are used


@pytest.mark.parametrize("secret", [bytes(32), b"\xff" * 32, bytes(31) + b"\x01"])
def test_extreme_secrets_round_trip(secret):
    shares = shamir.split(secret, [1, 2, 3], 2, os.urandom)
    assert shamir.combine({2: shares[1], 3: shares[2]}, 2) == secret


def test_shares_match_an_independent_lagrange_interpolation():
    secret, noise = os.urandom(32), os.urandom(66 * 4)
    xs = [3, 10, 11, 40, 77, 90]
    shares = shamir.split(secret, xs, 5, lambda n: noise[:n])
    coeffs = ref.shamir_coefficients(secret, noise)
    assert [int.from_bytes(s, "big") for s in shares] == [ref.poly_eval(coeffs, x) for x in xs]
    points = {x: int.from_bytes(s, "big") for x, s in list(zip(xs, shares, strict=True))[1:]}
    assert ref.lagrange_at_zero(points) == int.from_bytes(secret, "big")


def test_fewer_than_t_shares_are_refused():
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3], 3, os.urandom)
    with pytest.raises(InvalidInput, match="2 shares given, 3 needed"):
        shamir.combine({1: shares[0], 2: shares[1]}, 3)


def test_combine_many_matches_combine():
    secrets = [os.urandom(32) for _ in range(30)]
    sets = []
    for m, secret in enumerate(secrets):
        xs = random.Random(m).sample(range(1, 60), 10)
        sets.append(dict(zip(xs, shamir.split(secret, xs, 4, os.urandom), strict=True)))
    assert shamir.combine_many(sets, 4) == secrets == [shamir.combine(s, 4) for s in sets]


def test_shares_of_different_secrets_are_detected():
    a = shamir.split(os.urandom(32), [1, 2, 3], 3, os.urandom)
    b = shamir.split(os.urandom(32), [1, 2, 3], 3, os.urandom)
    with pytest.raises(InvalidInput, match="inconsistent"):
        shamir.combine({1: a[0], 2: a[1], 3: b[2]}, 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: shamir.split(bytes(32), [1, 2, 3], 4, os.urandom),
        lambda: shamir.split(bytes(32), [1, 2, 3], 0, os.urandom),
        lambda: shamir.split(bytes(32), [1, 2, 2], 2, os.urandom),
        lambda: shamir.split(bytes(32), [0, 1, 2], 2, os.urandom),
        lambda: shamir.split(bytes(33), [1, 2, 3], 2, os.urandom),
        lambda: shamir.combine({1: bytes(65), 2: bytes(66)}, 2),
        lambda: shamir.combine({1: b"\xff" * 66, 2: bytes(66)}, 2),
    ],
    ids=["t > n", "t = 0", "repeated x", "x = 0", "long secret", "short share", "share >= p"],
)
def test_malformed_sharing_is_refused(call):
    with pytest.raises(InvalidInput):
        call()


# --- prg --------------------------------------------------------------------------------


def test_prg_is_deterministic_prefix_stable_and_seed_sensitive():
    seed = os.urandom(32)
    long = prg.expand(seed, 1000)
    assert np.array_equal(prg.expand(seed, 10), long[:10])
    assert np.array_equal(prg.expand(seed, 500, 64).view("<u4"), long)
    other = prg.expand(bytes([seed[0] ^ 1]) + seed[1:], 1000)
    assert np.count_nonzero(long == other) < 5
    assert prg.expand(seed, 0).shape == (0,)


@pytest.mark.parametrize("seed", [bytes(4), bytes(16), bytes(33)])
def test_prg_refuses_short_or_long_seeds(seed):
    with pytest.raises(InvalidInput, match="32 bytes"):
        prg.expand(seed, 10)


def test_prg_refuses_other_word_widths():
    with pytest.raises(InvalidInput, match="32 or 64"):
        prg.expand(bytes(32), 10, 16)


# --- quantize --------------------------------------------------------------------------


def test_modulus_is_the_smallest_that_holds_the_sum():
    assert quantize.choose_modulus_bits(1000, 12, 1000) == 32  # 4.1e9 < 2^32
    assert quantize.choose_modulus_bits(1100, 12, 1000) == 64
    assert quantize.choose_modulus_bits(1, 32, 1) == 32
    assert quantize.choose_modulus_bits(2, 32, 1) == 64


def test_capacity_overflow_is_refused_not_wrapped():
    with pytest.raises(InvalidInput, match="64-bit"):
        quantize.choose_modulus_bits(2**20, 32, 2**13)
    with pytest.raises(InvalidInput, match="overflow a 32-bit"):
        quantize.make_spec(1100, 1.0, 12, 1000, modulus_bits=32)
    # Flower's failure: 1,031 full-weight devices at 2^22 levels wrap a 2^32 sum.
    with pytest.raises(InvalidInput):
        quantize.make_spec(1031, 1.0, 22, 1, modulus_bits=32)
    assert quantize.make_spec(1031, 1.0, 22, 1).modulus_bits == 64


def test_full_capacity_sum_does_not_wrap():
    spec = quantize.make_spec(16, 1.0, 8, 2**20 - 1)  # 16 * 255 * (2^20 - 1) < 2^32
    assert spec.modulus_bits == 32
    top = quantize.quantize(np.ones(3, np.float32) * 5, spec.max_weight, spec, None)
    total = masking.sum_vectors([top] * 16, 32)
    assert int(total[0]) == 16 * 255 * (2**20 - 1)
    mean, weight = quantize.dequantize(total, spec)
    assert weight == 16 * spec.max_weight
    np.testing.assert_allclose(mean, 1.0)


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    spec = quantize.make_spec(1, 1.0, 4, 1)
    x = np.full(200_000, 0.123, np.float32)
    v = quantize.quantize(x, 1, spec, np.random.default_rng(0))
    deq = v[:-1] * spec.step - spec.clip
    assert np.abs(deq - 0.123).max() < spec.step
    assert abs(deq.mean() - 0.123) < 3 * spec.step / np.sqrt(x.size)


class _RoundsUp:
    """A stand-in generator whose uniforms are all 0: stochastic rounding always rounds up."""

    def random(self, n: int) -> np.ndarray:
        return np.zeros(n)


@pytest.mark.parametrize(("bits", "d"), [(16, 100_806), (12, 1000), (20, 1_000_000)])
def test_an_update_clipped_to_the_dp_bound_stays_within_c_after_worst_case_rounding(bits, d):
    clip = 0.7
    bound = quantize.l2_norm_bound(clip, bits, d)
    # Independent: C minus sqrt(d) steps of 2C / (2^bits - 1).
    assert bound == pytest.approx(clip - np.sqrt(d) * 2 * clip / (2**bits - 1), rel=1e-12)
    spec = quantize.make_spec(1, clip, bits, 1)
    # The worst case: equal coordinates a hair above a level, at the bound, all rounded up.
    level = np.floor((bound / np.sqrt(d) + clip) / spec.step)
    x = np.full(d, (level + 1e-6) * spec.step - clip)
    assert np.linalg.norm(x) <= bound
    words = quantize.quantize(x, 1, spec, _RoundsUp())
    rounded = words[:-1].astype(np.float64) * spec.step - clip
    assert bound < np.linalg.norm(rounded) <= clip
    # And any direction with stochastic rounding.
    rng = np.random.default_rng(bits)
    y = quantize.clip_l2(rng.normal(size=d) * 1e3, bound)
    words = quantize.quantize(y, 1, spec, rng)
    assert np.linalg.norm(words[:-1].astype(np.float64) * spec.step - clip) <= clip


def test_too_few_bits_for_dp_are_refused():
    with pytest.raises(InvalidInput, match="too coarse"):
        quantize.l2_norm_bound(1.0, 8, 100_000)


def test_nearest_rounding_is_within_half_a_step():
    spec = quantize.make_spec(1, 0.5, 10, 1)
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 10_000).astype(np.float32)
    mean, _ = quantize.dequantize(quantize.quantize(x, 1, spec, None), spec)
    assert np.abs(mean - x.astype(np.float64)).max() <= quantize.error_bound(spec, False) + 1e-12


def test_weight_is_capped_and_travels_last():
    spec = quantize.make_spec(10, 1.0, 8, 50)
    assert quantize.capped_weight(1000, spec) == 50
    assert quantize.capped_weight(7, spec) == 7
    v = quantize.quantize(np.zeros(4, np.float32), 7, spec, None)
    assert v.dtype == np.dtype("<u4") and v.shape == (5,) and v[-1] == 7


@pytest.mark.parametrize(
    "call",
    [
        lambda s: quantize.quantize(np.array([np.nan], np.float32), 1, s, None),
        lambda s: quantize.quantize(np.array([np.inf], np.float32), 1, s, None),
        lambda s: quantize.quantize(np.zeros(2, np.float32), 51, s, None),
        lambda s: quantize.quantize(np.zeros(2, np.float32), -1, s, None),
        lambda s: quantize.capped_weight(-3, s),
        lambda s: quantize.dequantize(np.zeros(3, np.uint32), s),
        lambda s: quantize.dequantize(np.zeros(3, np.uint64), s),
        lambda s: quantize.make_spec(10, 0.0, 8, 50),
        lambda s: quantize.make_spec(10, 1.0, 0, 50),
        lambda s: quantize.make_spec(10, 1.0, 8, 50, modulus_bits=16),
    ],
    ids=["nan", "inf", "over cap", "negative", "negative samples", "zero weight", "dtype"]
    + ["zero clip", "zero bits", "16-bit modulus"],
)
def test_bad_quantization_input_is_refused(call):
    with pytest.raises(InvalidInput):
        call(quantize.make_spec(10, 1.0, 8, 50))


# --- masking ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_pairwise_masks_cancel_over_a_complete_graph(n, bits):
    dtype = prg.word_dtype(bits)
    seeds = {(i, j): os.urandom(32) for i in range(1, n + 1) for j in range(i + 1, n + 1)}
    zero = np.zeros(1000, dtype)
    masked = []
    for i in range(1, n + 1):
        pair = {j: seeds[min(i, j), max(i, j)] for j in range(1, n + 1) if j != i}
        self_seed = os.urandom(32)
        masked.append(
            masking.unmask(masking.mask(zero, i, self_seed, pair, bits), [self_seed], [], bits)
        )
    assert not masking.sum_vectors(masked, bits).any()


def test_masks_of_dropped_neighbours_are_removed():
    vectors = {
        i: np.random.default_rng(i).integers(0, 2**32, 50, dtype=np.uint32) for i in (1, 2, 3, 4)
    }
    selfs = {i: os.urandom(32) for i in vectors}
    seeds = {(i, j): os.urandom(32) for i in vectors for j in vectors if i < j}
    pair = lambda i: {j: seeds[min(i, j), max(i, j)] for j in vectors if j != i}  # noqa: E731
    masked = {i: masking.mask(v, i, selfs[i], pair(i), 32) for i, v in vectors.items()}
    survivors, dropped = [1, 3], [2, 4]
    total = masking.sum_vectors([masked[i] for i in survivors], 32)
    pairs = [(i, j, seeds[min(i, j), max(i, j)]) for i in survivors for j in dropped]
    plain = masking.unmask(total, [selfs[i] for i in survivors], pairs, 32)
    assert np.array_equal(plain, vectors[1] + vectors[3])


def test_masked_vector_hides_the_vector():
    v = np.zeros(10_000, np.uint32)
    y = masking.mask(v, 1, os.urandom(32), {}, 32)
    assert np.count_nonzero(y == 0) < 5


def test_wire_format_round_trips_at_the_modulus_width():
    for bits, width in [(32, 4), (64, 8)]:
        words = prg.expand(os.urandom(32), 17, bits)
        data = masking.pack(words, bits)
        assert len(data) == 17 * width
        assert data[:width] == int(words[0]).to_bytes(width, "little")
        assert np.array_equal(masking.unpack(data, bits, 17), words)


@pytest.mark.parametrize(
    "call",
    [
        lambda: masking.unpack(bytes(10), 32),
        lambda: masking.unpack(bytes(12), 32, 4),
        lambda: masking.mask(np.zeros(3, np.uint64), 1, bytes(32), {}, 32),
        lambda: masking.mask(np.zeros(3, np.uint32), 1, bytes(32), {1: bytes(32)}, 32),
        lambda: masking.sum_vectors([np.zeros(3, np.uint32), np.zeros(4, np.uint32)], 32),
        lambda: masking.sum_vectors([], 32),
    ],
    ids=["ragged bytes", "wrong count", "wrong dtype", "own neighbour", "lengths", "empty"],
)
def test_bad_masking_input_is_refused(call):
    with pytest.raises(InvalidInput):
        call()


# --- graph ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k"), [(10, 3), (10, 4), (11, 4), (11, 3), (50, 11), (51, 11), (7, 6), (7, 20), (2, 1)]
)
def test_graph_is_regular_symmetric_and_loop_free(n, k):
    nb = graph.neighbours(n, k, os.urandom(32))
    degree = graph.effective_degree(n, k)
    assert sorted(nb) == list(range(1, n + 1))
    for i, js in nb.items():
        assert len(js) == degree and i not in js and list(js) == sorted(js)
        assert all(i in nb[j] for j in js)


def test_odd_k_with_odd_n_uses_k_plus_one_and_large_k_is_all_to_all():
    assert graph.effective_degree(11, 3) == 4
    assert graph.effective_degree(10, 3) == 3
    assert graph.effective_degree(10, 9) == 9
    assert graph.effective_degree(10, 72) == 9
    assert graph.effective_degree(11, 10) == 10


def test_graph_depends_on_the_seed():
    a, b = graph.neighbours(100, 8, bytes(32)), graph.neighbours(100, 8, b"\x01" + bytes(31))
    assert a == graph.neighbours(100, 8, bytes(32)) and a != b


@pytest.mark.parametrize(
    ("n", "expected"),
    [(3, (2, 2)), (10, (9, 5)), (50, (49, 26)), (100, (28, 6)), (1000, (72, 24))],
)
def test_default_parameters(n, expected):
    # 1,000 devices at 1/3 dropout and 5% collusion: Google federated-compute's 72/24.
    assert graph.default_parameters(n) == expected


def _hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    from math import comb

    total = comb(population, draws)
    hits = sum(
        comb(marked, i) * comb(population - marked, draws - i) for i in range(at_least, draws + 1)
    )
    return hits / total


@pytest.mark.parametrize("n", [100, 1000, 5000])
def test_default_threshold_meets_its_bounds_and_is_the_smallest(n):
    k, t = graph.default_parameters(n)
    colluders, survivors = n // 20, n - n // 3  # 5% and 1/3 of n, as integers
    assert k % 2 == 0 and 2 <= t <= k < n - 1
    assert _hypergeometric_tail(n, colluders, k, t) <= 2**-41 / n
    assert t == 2 or _hypergeometric_tail(n, colluders, k, t - 1) > 2**-41 / n
    assert 1 - _hypergeometric_tail(n, survivors, k, t) <= 2**-20 / n


def test_small_cohorts_are_all_to_all_with_an_honest_majority_threshold():
    for n in (3, 5, 20, 99):
        k, t = graph.default_parameters(n)
        assert k == n - 1 and 2 * t > k + n // 20
    with pytest.raises(InvalidInput):
        graph.default_parameters(2)


# --- protocol ---------------------------------------------------------------------------


def test_stage_names_are_the_method_names():
    assert protocol.Stage.ORDER == ("setup", "share_keys", "masked_vectors", "unmask")


def test_a_request_for_both_secrets_of_one_neighbour_is_refused():
    with pytest.raises(InvalidInput, match="never both"):
        protocol.check_unmask_request(1, [2, 3, 4], survivors=[2, 3], dropped=[3])


@pytest.mark.parametrize(
    ("survivors", "dropped"),
    [([1], []), ([], [1]), ([9], []), ([2, 2], [])],
    ids=["own self secret", "own key", "not a neighbour", "repeated"],
)
def test_other_bad_unmask_requests_are_refused(survivors, dropped):
    with pytest.raises(InvalidInput, match="refused|twice"):
        protocol.check_unmask_request(1, [2, 3, 4], survivors, dropped)


def test_a_proper_unmask_request_passes():
    protocol.check_unmask_request(1, [2, 3, 4], survivors=[2, 4], dropped=[3])


def _dp_spec(n: int = 20, bits: int = 12):
    return quantize.make_spec(2 * n, 0.5, bits, 1)


def test_the_dp_sum_of_honest_updates_is_their_dequantized_sum():
    spec, rng = _dp_spec(), np.random.default_rng(11)
    xs = [rng.uniform(-0.5, 0.5, 1000) for _ in range(20)]
    words = [quantize.quantize(x, 1, spec, rng) for x in xs]
    total = masking.sum_vectors(words, 32)
    want = sum(w[:-1].astype(np.float64) * spec.step - spec.clip for w in words)
    np.testing.assert_allclose(quantize.dp_sum(total, 20, spec), want, rtol=1e-12, atol=1e-12)


def test_no_other_vectors_make_one_device_move_the_dp_sum_more_than_its_own_update():
    spec, rng = _dp_spec(), np.random.default_rng(12)
    m = 1 << 32
    for _ in range(20):
        # Anything the other 19 send (weight words kept right), with or without device v.
        others = rng.integers(0, m, 1001, dtype=np.uint64).astype(np.uint32)
        v = quantize.quantize(rng.uniform(-0.5, 0.5, 1000), 1, spec, rng)
        others[-1] = 19
        with_v = quantize.dp_sum(masking.sum_vectors([others, v], 32), 20, spec)
        without = quantize.dp_sum(others, 19, spec)
        own = v[:-1].astype(np.float64) * spec.step - spec.clip
        assert np.all(np.abs(with_v - without) <= np.abs(own) + 1e-8)  # float64 at ~1e5


def test_a_dp_sum_whose_weights_do_not_add_up_is_refused():
    spec = _dp_spec()
    total = np.zeros(11, dtype=np.uint32)
    total[-1] = 21
    with pytest.raises(InvalidInput, match="weight other than 1"):
        quantize.dp_sum(total, 20, spec)


@pytest.mark.parametrize("z0", [(1 << 32) - 1, -(1 << 32) + 1, (1 << 31) + 1, -(1 << 31) - 1, 1])
def test_the_dp_sum_does_not_jump_where_a_plain_reading_of_the_modulus_wraps(z0):
    # Other vectors that put the doubled, centred sum at z0: at the wrap (+-M) and the fold.
    spec, rng = _dp_spec(), np.random.default_rng(13)
    s = ((z0 + 19 * spec.levels) // 2) % (1 << 32)
    others = np.full(1001, s, dtype=np.uint32)
    others[-1] = 19
    v = quantize.quantize(rng.uniform(-0.5, 0.5, 1000), 1, spec, rng)
    with_v = quantize.dp_sum(masking.sum_vectors([others, v], 32), 20, spec)
    own = v[:-1].astype(np.float64) * spec.step - spec.clip
    moved = with_v - quantize.dp_sum(others, 19, spec)
    assert np.all(np.abs(moved) <= np.abs(own) + 1e-8)


def _shares_of(secret: bytes, xs: list[int], t: int, seed: int) -> dict[int, bytes]:
    return dict(zip(xs, shamir.split(secret, xs, t, _rand(seed)), strict=True))


def test_a_wrong_share_among_spares_is_outvoted_and_named():
    secret = bytes(range(32))
    xs = [2, 3, 5, 7, 11, 13, 17]
    shares = _shares_of(secret, xs, 4, 1)
    # A liar shifts its share so the t lowest still give a plausible 32-byte value.
    lied = dict(shares)
    lied[2] = ((int.from_bytes(shares[2], "big") + 1) % shamir.PRIME).to_bytes(66, "big")
    assert shamir.combine(lied, 4) != secret  # the plain combine is fooled

    (got,), (wrong,) = shamir.recover_many([lied], 4)

    assert got == secret and wrong == [2]


def test_recover_many_matches_combine_many_on_honest_shares_and_refuses_a_lost_cause():
    r = random.Random(3)
    secrets_ = [r.randbytes(32) for _ in range(20)]
    sets = [_shares_of(s, r.sample(range(1, 60), 9), 5, i) for i, s in enumerate(secrets_)]
    got, wrong = shamir.recover_many(sets, 5)
    assert got == secrets_ == shamir.combine_many(sets, 5) and wrong == [[]] * 20
    # 9 shares, t = 5: decoding needs 7 to agree; with 3 wrong, no polynomial has them.
    bad = dict(sets[0])
    for x in sorted(bad)[:3]:
        bad[x] = r.randbytes(65).rjust(66, b"\0")
    with pytest.raises(InvalidInput, match="too few agree"):
        shamir.recover_many([bad], 5)
