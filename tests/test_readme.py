"""The README's examples run against the real server, in order, as a reader would run them.

What is extracted (strictly: a test fails when there is nothing to run):

- every ``curl`` command in a ``sh`` block: the JSON after ``-d``/``--data``, sent with the
  token of its ``Authorization: Bearer $VAR`` header (none when it has no header);
- every call of the README's ``rpc TOKEN 'JSON'`` shell helper;
- every ``python`` block, run as a script in an empty folder.

Substitutions, the only ones made:

- ``$KEY`` is the admin key of a fresh organization; ``$DEVICE_TOKEN`` the ``token`` of the
  latest ``devices.register`` result;
- a JSON string ``"<prefix>_…"`` (e.g. ``"mdl_…"``, ``"rnd_…"``; the ellipsis is U+2026) is
  the latest id with that prefix in an earlier example's result;
- ``"<base64 safetensors>"`` is an update for the model the Python example registered:
  safetensors of small deltas with the names and shapes of its ``weights.safetensors``;
- in Python (run as ``python script.py`` in an empty folder), ``http://localhost:8080/rpc``
  is the test server's URL and ``KEY`` in the environment is ``$KEY``.

Every example must succeed, unless a comment line right above it says ``# error: TYPE``:
then it must fail with that ``data.type``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"
ELLIPSIS_ID = re.compile(r'"([a-z]+)_\u2026"')
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
# A curl or rpc command at the start of a line, up to the end of its line; single-quoted
# strings and backslash continuations may span lines.
COMMAND = re.compile(r"^[ \t]*(curl|rpc)[ \t](?:[^'\n\\]|'[^']*'|\\\n|\\.)*", re.M)


@dataclass
class Example:
    line: int
    kind: str  # "json" or "python"
    text: str
    token: str | None = None  # the shell variable named for the bearer token
    error: str | None = None


def extract(readme: str) -> list[Example]:
    examples: list[Example] = []
    for block in BLOCK.finditer(readme):
        lang, body = block.group(1), block.group(2)
        first_line = readme.count("\n", 0, block.start(2)) + 1
        if lang == "python":
            examples.append(Example(first_line, "python", body))
            continue
        if lang not in ("sh", "bash", "shell"):
            continue
        for command in COMMAND.finditer(body):
            line = first_line + body.count("\n", 0, command.start())
            args = shlex.split(command.group(0).replace("\\\n", " "))
            examples.append(_json_example(args, line, _marked_error(body, command.start())))
    return examples


def _json_example(args: list[str], line: int, error: str | None) -> Example:
    if args[0] == "rpc":
        token, data = args[1], args[2]
    else:
        data = next(args[i + 1] for i, a in enumerate(args) if a in ("-d", "--data"))
        headers = [args[i + 1] for i, a in enumerate(args) if a in ("-H", "--header")]
        token = next(
            (h.split("Bearer ", 1)[1] for h in headers if h.startswith("Authorization:")), None
        )
    return Example(line, "json", data, token.lstrip("$") if token else None, error)


def _marked_error(body: str, start: int) -> str | None:
    above = body[:start].rstrip("\n").rsplit("\n", 1)[-1].strip()
    found = re.fullmatch(r"#.*\berror: ([a-z_]+)\b.*", above)
    return found.group(1) if found else None


def test_the_readme_has_examples_of_every_kind():
    examples = extract(README.read_text())
    kinds = [e.kind for e in examples]
    assert kinds.count("json") >= 5 and kinds.count("python") >= 1, kinds
    methods = {
        json.loads(ELLIPSIS_ID.sub('"x"', e.text))["method"] for e in examples if e.kind == "json"
    }
    assert {"models.create", "devices.register", "training.aggregate"} <= methods


def test_extraction_reads_curl_rpc_continuations_and_error_marks():
    readme = (
        "```sh\n"
        'curl -s localhost:8080/rpc -H "Authorization: Bearer $KEY" \\\n'
        '  -d \'{"jsonrpc": "2.0", "method": "a", "id": 1}\'\n'
        "# error: not_found\n"
        'rpc $DEVICE_TOKEN \'{"jsonrpc":"2.0",\n  "method":"b","id":2}\'\n'
        'curl -s localhost:8080/rpc --data \'{"method": "c"}\'\n'
        "```\n"
    )
    examples = extract(readme)
    assert [(e.token, json.loads(e.text)["method"], e.error) for e in examples] == [
        ("KEY", "a", None),
        ("DEVICE_TOKEN", "b", "not_found"),
        (None, "c", None),
    ]
    assert [e.line for e in examples] == [2, 5, 7]


class Walkthrough:
    """The state a reader carries from one example to the next."""

    def __init__(self, client, org, folder: Path) -> None:
        self.client, self.folder = client, folder
        self.tokens: dict[str, str] = {"KEY": org.token}
        self.ids: dict[str, str] = {}

    def substitute(self, text: str) -> str:
        def latest(match: re.Match) -> str:
            prefix = match.group(1)
            assert prefix in self.ids, f"no earlier result holds a {prefix}_ id"
            return json.dumps(self.ids[prefix])

        text = ELLIPSIS_ID.sub(latest, text)
        if '"<base64 safetensors>"' in text:
            text = text.replace('"<base64 safetensors>"', json.dumps(self.update()))
        return text

    def update(self) -> str:
        import safetensors.numpy

        base = safetensors.numpy.load_file(str(self.folder / "weights.safetensors"))
        delta = {name: (value * 0 + 0.01).astype(value.dtype) for name, value in base.items()}
        return base64.b64encode(safetensors.numpy.save(delta)).decode()

    def remember(self, result: Any) -> None:
        """Every ``xyz_…`` id in a result, the last one of each prefix winning; device tokens."""
        if isinstance(result, dict):
            if isinstance(result.get("token"), str) and result["token"].startswith("fd_"):
                self.tokens["DEVICE_TOKEN"] = result["token"]
            for value in result.values():
                self.remember(value)
        elif isinstance(result, list):
            for value in result:
                self.remember(value)
        elif isinstance(result, str) and re.fullmatch(r"[a-z]+_[0-9a-f]{8,}", result):
            self.ids.setdefault(result.split("_", 1)[0], result)

    def remember_result(self, result: Any) -> None:
        # Ids the result is about come first (`id`, then the rest): record them fresh.
        fresh: dict[str, str] = {}
        saved, self.ids = self.ids, fresh
        if isinstance(result, dict) and isinstance(result.get("id"), str):
            self.remember(result["id"])
        self.remember(result)
        self.ids = {**saved, **fresh}

    async def run(self, example: Example) -> None:
        where = f"README.md line {example.line}"
        if example.kind == "python":
            url = str(self.client.http.make_url("/rpc"))
            script = self.substitute(example.text).replace("http://localhost:8080/rpc", url)
            path = self.folder / f"readme_{example.line}.py"
            path.write_text(script)
            # A process of its own, as a reader runs it; its HTTP call is served by this loop.
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                path.name,
                cwd=self.folder,
                env={**os.environ, "KEY": self.tokens["KEY"]},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=300)
            assert process.returncode == 0, (where, err.decode()[-3000:])
            return
        token = None
        if example.token is not None:
            assert example.token in self.tokens, f"{where}: ${example.token} is not known yet"
            token = self.tokens[example.token]
        envelope = json.loads(self.substitute(example.text))
        _, body = await self.client.post(envelope, token)
        if example.error:
            assert "error" in body, f"{where}: expected {example.error}, got {body}"
            assert body["error"]["data"]["type"] == example.error, (where, body)
        else:
            assert "error" not in body, (where, body)
            self.remember_result(body["result"])


async def test_the_readme_examples_work_against_the_server(client, org, tmp_path):
    walk = Walkthrough(client, org, tmp_path)
    examples = extract(README.read_text())
    assert examples
    for example in examples:
        await walk.run(example)
    # The walk-through ends with a new version made from the device's update.
    model_id = walk.ids["mdl"]
    latest = await client.ok("models.get", {"model_id": model_id}, org.token)
    assert latest["latest_version"] == 2
