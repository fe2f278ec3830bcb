"""federations.analytics.*: statistical questions over what the members' devices report.

Field names follow the seed's Federations API. Groups are device groups or
member organizations, named by their ids; groups smaller than the federation's
``analytics_min_group_size`` are suppressed and named in ``suppressed_groups``
(docs/analytics.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import Epsilon, FederationId
from schemas.analytics import VariableName
from schemas.devices import Platform

GroupBy = Literal["device_group", "federation_member"]
GroupKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^(grp|org)_[0-9a-f]{32}$")]
GroupKeys = Annotated[list[GroupKey], Meta(min_length=1, max_length=200)]
ConfidenceLevel = Annotated[float, Meta(gt=0, lt=1)]
Finite = Annotated[float, Meta(ge=-1e15, le=1e15)]


class Filters(Params, kw_only=True):
    """Which observations count: recorded in [start_time, end_time), of one platform; groups
    with fewer than min_sample_count observations are suppressed too."""

    start_time: datetime | None = None
    end_time: datetime | None = None
    device_platform: Platform | None = None
    min_sample_count: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None


class DpParams(Params, kw_only=True):
    """Differential privacy for this question: values clipped to [lower, upper], each device
    counted once, Gaussian noise for epsilon charged to the federation's ledger."""

    epsilon: Epsilon
    lower: Finite = 0.0
    upper: Finite = 1.0


class Histogram(Params, kw_only=True):
    """Counts in `bins` equal-width bins of [lower, upper), plus below and above."""

    bins: Annotated[int, Meta(ge=1, le=100)]
    lower: Finite
    upper: Finite


class DescriptiveParams(MutatingParams, kw_only=True):
    """Count, mean, median, standard deviation and percentiles of a numeric variable per group."""

    federation_id: FederationId
    variable: VariableName
    group_by: GroupBy = "device_group"
    group_ids: GroupKeys | None = None
    include_percentiles: bool = True
    filters: Filters | None = None
    histogram: Histogram | None = None
    dp: DpParams | None = None


class Percentiles(Result, kw_only=True):
    p25: float
    p50: float
    p75: float


class HistogramCounts(Result, kw_only=True):
    edges: list[float]
    # Per bin; a bin with fewer observations than the privacy floor is null.
    counts: list[int | None]
    below: int | None
    above: int | None


class GroupStats(Result, kw_only=True):
    group_id: str
    count: float  # an integer, except under dp (a noised count)
    mean: float | None = None
    median: float | None = None
    std_dev: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: Percentiles | None = None
    missing: int | None = None
    histogram: HistogramCounts | None = None


class DpCharge(Result, kw_only=True):
    epsilon: float
    delta: float
    noise_multiplier: float


class DescriptiveResult(Result, kw_only=True):
    query_id: str
    variable: str
    group_by: str
    groups: list[GroupStats]
    suppressed_groups: list[str]
    overall: GroupStats | None = None
    dp: DpCharge | None = None


class ConfidenceInterval(Result, kw_only=True):
    lower: float
    upper: float
    level: float


class TTestParams(MutatingParams, kw_only=True):
    """Welch's (default) or Student's two-sample t-test of a numeric variable between two groups."""

    federation_id: FederationId
    variable: VariableName
    group_a: GroupKey
    group_b: GroupKey
    group_by: GroupBy = "device_group"
    confidence_level: ConfidenceLevel = 0.95
    equal_var: bool = False
    filters: Filters | None = None
    dp: DpParams | None = None


class TTestResult(Result, kw_only=True):
    query_id: str
    t_statistic: float
    p_value: float
    degrees_of_freedom: float
    mean_difference: float
    confidence_interval: ConfidenceInterval
    significant: bool
    cohens_d: float
    count_a: float
    count_b: float
    dp: DpCharge | None = None


class AnovaParams(MutatingParams, kw_only=True):
    """One-way ANOVA of a numeric variable across groups, with Tukey-Kramer HSD pairs."""

    federation_id: FederationId
    variable: VariableName
    group_by: GroupBy = "device_group"
    group_ids: GroupKeys | None = None
    confidence_level: ConfidenceLevel = 0.95
    post_hoc: bool = True
    filters: Filters | None = None
    dp: DpParams | None = None


class PostHocPair(Result, kw_only=True):
    group_a: str
    group_b: str
    mean_difference: float
    p_value: float
    confidence_interval: ConfidenceInterval
    significant: bool


class AnovaResult(Result, kw_only=True):
    query_id: str
    f_statistic: float
    p_value: float
    degrees_of_freedom_between: float
    degrees_of_freedom_within: float
    eta_squared: float
    significant: bool
    groups: list[str]
    post_hoc_pairs: list[PostHocPair] | None = None
    suppressed_groups: list[str]
    dp: DpCharge | None = None


class ChiSquareParams(MutatingParams, kw_only=True):
    """Chi-square test of independence of two categorical variables, devices counted once."""

    federation_id: FederationId
    variable_1: VariableName
    variable_2: VariableName
    group_ids: GroupKeys | None = None
    confidence_level: ConfidenceLevel = 0.95
    yates: bool | None = None
    filters: Filters | None = None


class Table(Result, kw_only=True):
    rows: list[str]  # categories of variable_1
    columns: list[str]  # categories of variable_2
    counts: list[list[float]]


class ChiSquareResult(Result, kw_only=True):
    query_id: str
    chi_square_statistic: float
    p_value: float
    degrees_of_freedom: int
    observed: Table
    expected: Table
    cramers_v: float
    significant: bool
    yates_applied: bool
    warnings: list[str]
    # How many categories were dropped (their names are devices' free text: never shown).
    suppressed_categories: int
