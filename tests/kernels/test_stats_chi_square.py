"""Chi-square test of independence against ``scipy.stats.chi2_contingency`` and ``association``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.stats import contingency

from fedrpc.fl import InvalidInput
from fedrpc.fl.stats import chi_square

RTOL = 1e-9

TABLES = {
    "2x2": [[25, 14], [9, 31]],
    # every |observed - expected| below 0.5: Yates moves counts only up to their expectation
    "2x2_near_independent": [[10, 10], [10, 11]],
    "2x2_sparse": [[3, 1], [1, 4]],
    "3x4": [[12, 5, 9, 20], [7, 15, 3, 11], [22, 8, 14, 6]],
    "4x2": [[3, 7], [12, 2], [5, 5], [1, 9]],
}


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("correction", [None, True, False])
def test_chi_square_matches_scipy(name: str, correction: bool | None) -> None:
    observed = np.array(TABLES[name])
    # None means scipy's default, which corrects.
    ref = stats.chi2_contingency(observed, correction=correction is not False)

    r = chi_square(observed, correction=correction)

    np.testing.assert_allclose(r.statistic, ref.statistic, rtol=RTOL, atol=0)
    np.testing.assert_allclose(r.p_value, ref.pvalue, rtol=RTOL, atol=0)
    assert r.dof == ref.dof
    np.testing.assert_allclose(np.array(r.expected), ref.expected_freq, rtol=RTOL, atol=0)
    np.testing.assert_allclose(
        r.cramers_v, contingency.association(observed, method="cramer"), rtol=RTOL, atol=0
    )
    assert r.corrected == (correction is not False and observed.shape == (2, 2))
    low = int((ref.expected_freq < 5).sum())
    assert r.low_expected_cells == low
    assert len(r.warnings) == (1 if low else 0)


def test_yates_changes_only_2x2_tables() -> None:
    two_by_two, larger = TABLES["2x2"], TABLES["3x4"]

    assert chi_square(two_by_two).statistic < chi_square(two_by_two, correction=False).statistic
    assert chi_square(larger).statistic == chi_square(larger, correction=False).statistic


def test_sparse_table_warns_in_words() -> None:
    r = chi_square(TABLES["2x2_sparse"])

    assert r.low_expected_cells == 4
    assert r.warnings == (
        "4 of 4 cells have an expected count below 5; the chi-square p-value may be "
        "unreliable (consider merging categories or an exact test)",
    )


def test_a_list_of_lists_and_whole_floats_are_accepted() -> None:
    as_ints = chi_square(TABLES["3x4"])
    as_floats = chi_square(np.array(TABLES["3x4"], dtype=float))

    assert as_ints == as_floats


@pytest.mark.parametrize(
    ("observed", "message"),
    [
        ([[1, 2, 3]], "at least 2 rows and 2 columns"),
        ([[1], [2]], "at least 2 rows and 2 columns"),
        ([1, 2, 3, 4], "2-D table"),
        (np.ones((2, 2, 2), dtype=int), "2-D table"),
        ([[1, -2], [3, 4]], "whole numbers of 0 or more"),
        ([[1.5, 2], [3, 4]], "whole numbers of 0 or more"),
        ([[np.nan, 2], [3, 4]], "whole numbers of 0 or more"),
        ([[0, 0], [3, 4]], "row 0 has no observations"),
        ([[1, 0, 2], [3, 0, 4]], "column 1 has no observations"),
        ([[1, 2], [3]], "equal-length rows"),
        ([["a", "b"], ["c", "d"]], "table of counts"),
        ([[True, False], [False, True]], "table of counts"),
    ],
)
def test_bad_table_is_refused(observed: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        chi_square(observed)


def test_correction_must_be_a_flag() -> None:
    with pytest.raises(InvalidInput, match="correction must be true or false"):
        chi_square(TABLES["2x2"], correction="no")
