"""House rules that keep the code honest: the registry, the SQL and the docs agree."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import msgspec
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

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
    # The whole engine, services and kernels included, and the handlers.
    return [
        ast.parse(p.read_text())
        for p in [*ROOT.glob("fedrpc/**/*.py"), *ROOT.glob("methods/**/*.py")]
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
    # Kernels call .get("fedrpc.dtype") on metadata dicts: only names in a query namespace count.
    namespaces = {name.split(".")[0] for name in defined}
    called = {n for n in _query_names_called() if n.split(".")[0] in namespaces}
    assert called - defined == set(), "queries called but not defined"
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


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imports_any(path: Path, prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in _imported_modules(path) if m.split(".")[0] in prefixes or m in prefixes}


def test_imports_flow_one_way():
    # Services never see HTTP or the database driver; kernels see nothing of ours but other
    # kernels; only the database layer touches psycopg and only the app (and the CLI that
    # runs it) aiohttp on the server side; the SDK in fedrpc/client uses it as a client.
    for path in ROOT.glob("fedrpc/services/**/*.py"):
        assert not _imports_any(path, ("aiohttp", "psycopg", "psycopg_pool", "methods")), path
    for path in ROOT.glob("fedrpc/fl/**/*.py"):
        ours = {
            m for m in _imported_modules(path) if m.startswith(("fedrpc", "methods", "schemas"))
        }
        assert all(m.startswith("fedrpc.fl") for m in ours), (path, ours)
    for path in [*ROOT.glob("fedrpc/**/*.py"), *ROOT.glob("methods/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        if rel not in ("fedrpc/db.py", "fedrpc/group_commit.py") and not rel.startswith(
            "fedrpc/embedded/"
        ):
            assert not _imports_any(path, ("psycopg", "psycopg_pool")), rel
        # fedrpc/client is the SDK: it speaks HTTP to a server, as a client; so does the
        # simulator in fedrpc/sim, whose devices share one client session.
        if rel not in ("fedrpc/app.py", "fedrpc/rpc.py", "fedrpc/cli.py") and not rel.startswith(
            ("fedrpc/client/", "fedrpc/sim/")
        ):
            assert not _imports_any(path, ("aiohttp",)), rel


LOCK_ENTRY = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)", re.M
)


def _lock(name: str) -> dict[str, tuple[Version, int]]:
    """requirements/NAME.lock as {canonical name: (version, number of hashes)}."""
    text = (ROOT / "requirements" / f"{name}.lock").read_text()
    entries = {
        canonicalize_name(m[1]): (Version(m[2]), m[3].count("--hash="))
        for m in LOCK_ENTRY.finditer(text)
    }
    pins = re.findall(r"^[A-Za-z0-9].*==", text, re.M)
    assert len(entries) == len(pins) > 0, f"{name}.lock: an entry the pattern does not read"
    return entries


def test_the_locks_pin_what_pyproject_asks_for():
    # make run / make test install torch from its pin, then test.lock (make bench adds
    # bench.lock) with --require-hashes --no-deps: a requirement added to pyproject.toml
    # without make lock would be missing, or installed at a version outside its range.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    test, bench = _lock("test"), _lock("bench")
    for lock, wanted in (
        (test, project["dependencies"] + extras["test"]),
        (bench, project["dependencies"] + extras["test"] + extras["bench"]),
    ):
        for spec in map(Requirement, wanted):
            name = canonicalize_name(spec.name)
            if name == "torch" or (spec.marker and not spec.marker.evaluate()):
                continue
            assert name in lock, f"{spec} is not in the lock: run make lock"
            assert spec.specifier.contains(lock[name][0], prereleases=True), (spec, lock[name])
    for name, (version, hashes) in {**test, **bench}.items():
        assert hashes, f"{name} has no hash"
        assert not version.is_prerelease, f"{name}=={version}"
        # torch comes from its pin (the CPU wheel on disk); PyPI's build drags in CUDA.
        assert name != "torch" and not name.startswith(("nvidia-", "triton", "cuda-")), name
    # One resolution: make bench only adds packages to the test venv, never moves one.
    assert test.keys() <= bench.keys()
    assert all(test[name] == bench[name] for name in test), "run make lock"


def test_the_venv_holds_the_locked_versions():
    # What this suite runs on is what the lock says (pip check at install proves the set
    # consistent, torch's own requirements included).
    for name, (version, _) in _lock("test").items():
        assert Version(importlib.metadata.version(name)) == version, name
