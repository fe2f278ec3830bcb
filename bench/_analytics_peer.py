"""The peer of each analytics question: pull its raw rows into numpy, then numpy/scipy.

Each peer reads exactly the rows the server's question reads, through the
same SQL function (``analytics_scope``: the federation's active members, the
variable, the asking organization's device groups), with one psycopg
``fetchall`` as a data scientist would, turns them into numpy arrays and
computes the same statistics with numpy and scipy. ``copy_floor`` is the
fastest any pull could be: the same rows as binary COPY, bytes only, parsed
into nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import psycopg.sql
from scipy import stats

_SCOPE = (
    "analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, "
    "%(group_ids)s, NULL, NULL, NULL)"
)
NUMERIC_SQL = f"SELECT group_id, value FROM {_SCOPE} WHERE value IS NOT NULL"
CATEGORY_SQL = (
    f"SELECT device_id, category, recorded_at, id FROM {_SCOPE} WHERE category IS NOT NULL"
)


@dataclass
class Timed:
    """A peer's answer and where its time went (seconds)."""

    answer: dict[str, Any]
    pull: float
    compute: float
    rows: int
    post_hoc: float | None = None  # anova: scipy's tukey_hsd, when timed

    @property
    def total(self) -> float:
        return self.pull + self.compute + (self.post_hoc or 0.0)


def scope(fed: str, org: str, variable: str, group_by: str = "device_group", groups=None) -> dict:
    return {
        "federation_id": fed,
        "org_id": org,
        "variable": variable,
        "group_by": group_by,
        "group_ids": groups,
    }


def _numeric(conn: psycopg.Connection, params: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Group names, and the values sorted by group with each group's count."""
    rows = conn.execute(NUMERIC_SQL, params).fetchall()
    values = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    names, codes = np.unique(np.array([r[0] for r in rows]), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    return list(names), values[order], np.bincount(codes, minlength=len(names))


def _split(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1])


def _describe(x: np.ndarray, percentiles: bool) -> dict[str, float]:
    out = {"count": x.size, "mean": x.mean(), "std_dev": x.std(ddof=1), "min": x.min(), "max": x.max()}  # fmt: skip
    if percentiles:
        out["p25"], out["p50"], out["p75"] = np.percentile(x, [25, 50, 75])
    return out


def descriptive(conn: psycopg.Connection, params: dict, percentiles: bool) -> Timed:
    started = time.perf_counter()
    names, values, counts = _numeric(conn, params)
    pulled = time.perf_counter()
    groups = {n: _describe(x, percentiles) for n, x in zip(names, _split(values, counts), strict=True)}  # fmt: skip
    answer = {"groups": groups, "overall": _describe(values, percentiles)}
    return Timed(answer, pulled - started, time.perf_counter() - pulled, values.size)


def t_test(conn: psycopg.Connection, params: dict) -> Timed:
    started = time.perf_counter()
    names, values, counts = _numeric(conn, params)
    pulled = time.perf_counter()
    by_name = dict(zip(names, _split(values, counts), strict=True))
    a, b = (by_name[g] for g in params["group_ids"])  # group_a, group_b as asked
    want = stats.ttest_ind(a, b, equal_var=False)
    answer = {"t_statistic": want.statistic, "p_value": want.pvalue, "groups": names}
    return Timed(answer, pulled - started, time.perf_counter() - pulled, values.size)


def anova(conn: psycopg.Connection, params: dict, tukey: bool) -> Timed:
    """f_oneway, then (when ``tukey``) scipy's tukey_hsd on the same groups, timed apart."""
    started = time.perf_counter()
    names, values, counts = _numeric(conn, params)
    pulled = time.perf_counter()
    groups = _split(values, counts)
    want = stats.f_oneway(*groups)
    computed = time.perf_counter()
    answer = {"f_statistic": want.statistic, "p_value": want.pvalue, "groups": names}
    timed = Timed(answer, pulled - started, computed - pulled, values.size)
    if tukey:
        answer["tukey_pvalue"] = stats.tukey_hsd(*groups).pvalue
        timed.post_hoc = time.perf_counter() - computed
    return timed


def _latest(conn: psycopg.Connection, params: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per device (as codes of the device ids), its latest category (as codes), and the rows."""
    rows = conn.execute(CATEGORY_SQL, params).fetchall()
    devices = np.array([r[0] for r in rows])
    categories = np.array([r[1] for r in rows])
    when = np.array([r[2].timestamp() for r in rows])
    ids = np.fromiter((r[3] for r in rows), dtype=np.int64, count=len(rows))
    order = np.lexsort((ids, when, devices))  # last key first: by device, then time, then id
    last = np.r_[devices[order][1:] != devices[order][:-1], True]
    return devices[order][last], categories[order][last], len(rows)


def chi_square(conn: psycopg.Connection, params_1: dict, params_2: dict) -> Timed:
    """Devices by their latest category of each variable, then chi2_contingency (Yates at dof 1)."""
    started = time.perf_counter()
    dev_1, cat_1, n_1 = _latest(conn, params_1)
    dev_2, cat_2, n_2 = _latest(conn, params_2)
    pulled = time.perf_counter()
    both, i_1, i_2 = np.intersect1d(dev_1, dev_2, assume_unique=True, return_indices=True)
    rows, r = np.unique(cat_1[i_1], return_inverse=True)
    cols, c = np.unique(cat_2[i_2], return_inverse=True)
    table = np.zeros((rows.size, cols.size), dtype=np.int64)
    np.add.at(table, (r, c), 1)
    want = stats.chi2_contingency(table)
    answer = {"chi_square_statistic": want.statistic, "p_value": want.pvalue, "observed": table}
    return Timed(answer, pulled - started, time.perf_counter() - pulled, n_1 + n_2)


def copy_floor(conn: psycopg.Connection, sql: str, params: dict) -> tuple[float, int]:
    """Seconds to receive the rows of ``sql`` as binary COPY (nothing parsed), and their bytes."""
    query = psycopg.sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(
        psycopg.sql.SQL(psycopg.ClientCursor(conn).mogrify(sql, params))
    )
    started = time.perf_counter()
    size = 0
    with conn.cursor().copy(query) as copy:
        for block in copy:
            size += len(block)
    return time.perf_counter() - started, size
