"""The Python SDK: ``Client`` / ``SyncClient`` for scripts (``sdk.py``) and the device side
of SecAgg+ (``secagg.py``)."""

from fedrpc.client.sdk import Client, SyncClient, error_from

__all__ = ["Client", "SyncClient", "error_from"]
