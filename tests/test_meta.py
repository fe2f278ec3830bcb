"""House rules that keep the code honest: the registry, the SQL and the docs agree."""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec

from fedrpc.db import load_queries
from fedrpc.errors import APP_ERRORS
from fedrpc.registry import Registry
from schemas._base import Params, Result

ROOT = Path(__file__).resolve().parent.parent
QUERY_HELPERS = {"get", "maybe", "all", "column", "value", "run"}


def test_every_method_has_a_summary_params_and_result():
    registry = Registry.from_package()
    assert len(registry.methods) >= 10
    for spec in registry:
        assert spec.summary, f"{spec.name} has no summary (first line of its Params docstring)"
        assert issubclass(spec.params_type, Params), spec.name
        assert isinstance(spec.result_type, type) and issubclass(spec.result_type, Result), (
            spec.name
        )
        assert spec.description, f"{spec.name} handler has no docstring"


def test_method_names_follow_their_module_path():
    for spec in Registry.from_package():
        module = spec.handler.__module__.removeprefix("methods.")
        assert spec.name == f"{module}.{spec.handler.__name__.rstrip('_')}", spec.name
        schema_module = spec.params_type.__module__.removeprefix("schemas.")
        assert schema_module == module, f"{spec.name}: params live in schemas/{schema_module}"


def _sources() -> list[ast.AST]:
    # Kernels never query, so only the engine and the handlers are read.
    return [
        ast.parse(p.read_text()) for p in [*ROOT.glob("fedrpc/*.py"), *ROOT.glob("methods/**/*.py")]
    ]


def _query_names_called() -> set[str]:
    """First arguments of db helper calls (ctx.db.get("ns.name", ...))."""
    return {
        node.args[0].value
        for tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in QUERY_HELPERS
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and "." in node.args[0].value
    }


def _string_constants() -> set[str]:
    return {
        node.value
        for tree in _sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_every_sql_query_is_used_and_every_used_query_exists():
    defined = set(load_queries())
    assert _query_names_called() - defined == set(), "queries called but not defined"
    assert defined - _string_constants() == set(), "queries defined but never named in the code"


def test_every_query_has_a_description_and_a_verb_first_name():
    verbs = (
        "get_",
        "find_",
        "list_",
        "count_",
        "insert_",
        "update_",
        "upsert_",
        "delete_",
        "claim_",
        "charge_",
        "lock_",
        "release_",
        "complete_",
        "revoke_",
        "touch_",
        "add_",
    )
    for name, query in load_queries().items():
        assert query.doc, f"{name} has no description line"
        assert name.rsplit(".", 1)[1].startswith(verbs), name


def test_error_codes_are_unique_and_outside_the_reserved_range():
    codes = [e.code for e in APP_ERRORS]
    assert len(set(codes)) == len(codes)
    assert all(not -32768 <= c <= -32000 for c in codes)
    assert len({e.type for e in APP_ERRORS}) == len(APP_ERRORS)


def test_public_schemas_have_no_tuples():
    # msgspec renders tuples as 2020-12 prefixItems, which draft-07 OpenRPC tools misread.
    registry = Registry.from_package()
    types = [t for s in registry for t in (s.params_type, s.result_type)]
    _, components = msgspec.json.schema_components(types)
    assert "prefixItems" not in msgspec.json.encode(components).decode()
