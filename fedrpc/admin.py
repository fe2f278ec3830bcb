"""Operator actions that are not RPC methods (the CLI's `admin` commands)."""

from __future__ import annotations

from fedrpc.auth import ORG_KEY_PREFIX, new_id, new_token
from fedrpc.db import Database, constraint_message
from schemas.orgs import Org

constraint_message("orgs_name_key", "an organization with this name already exists")


async def create_org(db: Database, name: str) -> tuple[Org, str]:
    """A new organization and its first admin API key (returned once, stored hashed)."""
    token, digest = new_token(ORG_KEY_PREFIX)
    async with db.transaction() as tx:
        org = await tx.get("orgs.insert_org", Org, id=new_id("org"), name=name)
        await tx.run(
            "orgs.api_keys.insert_key",
            id=new_id("key"),
            org_id=org.id,
            name="admin",
            token_hash=digest,
            prefix=token[:8],
        )
    return org, token
