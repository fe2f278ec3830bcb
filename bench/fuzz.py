"""The long fuzz campaign: tests/test_fuzz.py's generated requests, many per method.

The same world, generators and checks as the bounded campaign of ``make test``, on a
throwaway PostgreSQL and S3 with the server in this process (``create_app`` on a
loopback port). Hypothesis draws fresh examples on every run unless ``--derandomize``
is given. Prints, per method, how many answers of each kind it saw, then every
violation (an internal error, a traceback or SQL in an answer, an answer that is not
JSON-RPC, a result that does not fit its type, a server that stops answering) with the
shortest request that caused it; exits 1 when there is one that KNOWN does not list.

    python bench/fuzz.py                      # 5,000 examples per method
    python bench/fuzz.py --examples 200 --only federations.privacy
    python bench/fuzz.py --skip privacy.estimate    # its PLD prices take seconds each
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.test_fuzz, and this checkout's fedrpc before any other


async def run(args: argparse.Namespace) -> int:
    from aiohttp.test_utils import TestClient, TestServer

    from fedrpc.app import create_app
    from fedrpc.db import migrate
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3
    from fedrpc.settings import Settings
    from tests.conftest import RpcClient
    from tests.methods.conftest import _bundle
    from tests.test_fuzz import Campaign, build_target, campaign_settings, server_still_answers

    bundle = _bundle("mlp", 1)[1]
    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        await migrate(pg.url)
        settings = Settings(
            database_url=pg.url,
            s3_endpoint=s3.endpoint,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            auth_cache_seconds=0.0,
            log_level="CRITICAL",
        )
        http = TestClient(TestServer(create_app(campaign_settings(settings))))
        await http.start_server()
        try:
            client = RpcClient(http)
            target = await build_target(client, bundle)
            campaign = Campaign(target, derandomize=args.derandomize)

            def progress(name: str, seconds: float) -> None:
                counts = campaign.report.outcomes[name]
                shown = ", ".join(f"{k} {v}" for k, v in counts.most_common())
                print(f"{name:42} {seconds:7.1f} s  {shown}", flush=True)

            report = await asyncio.to_thread(
                campaign.run,
                args.examples,
                args.envelope_examples,
                lambda name: (
                    any(part in name for part in args.only)
                    and not any(part in name for part in args.skip)
                ),
                progress,
            )
            down = await server_still_answers(client, target)
        finally:
            await http.close()
    envelope = report.outcomes.get("(envelope)", {})
    print(f"{'(envelope)':42} {'':9}  " + ", ".join(f"{k} {v}" for k, v in envelope.items()))
    failures, known = report.failures(), report.known()
    print(
        f"\n{report.calls:,} calls in {report.seconds:.0f} s; {len(failures)} kinds of "
        f"violation, {len(known)} known; the server "
        + ("stopped answering: " + "; ".join(down) if down else "still answers")
    )
    for line in [*failures, *known]:
        print(line)
    return 1 if failures or down else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="per method (default 5000)")
    parser.add_argument("--envelope-examples", type=int, default=20_000)
    parser.add_argument(
        "--only", nargs="*", default=[""], help="methods whose name holds one of these"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="methods whose name holds one of these"
    )
    parser.add_argument(
        "--derandomize", action="store_true", help="the examples of make test's campaign"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    status = asyncio.run(run(args))
    print(f"Whole bench: {time.perf_counter() - started:.0f} s.")
    sys.exit(status)


if __name__ == "__main__":
    main()
