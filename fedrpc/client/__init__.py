"""The Python SDK: ``Client`` / ``SyncClient`` for scripts (``sdk.py``), ``DeviceAgent`` for
devices (``agent.py``) and the device side of SecAgg+ (``secagg.py``)."""

from fedrpc.client.agent import DeviceAgent, LocalResult, LocalTask, RoundOutcome
from fedrpc.client.sdk import Client, SyncClient, error_from

__all__ = [
    "Client",
    "DeviceAgent",
    "LocalResult",
    "LocalTask",
    "RoundOutcome",
    "SyncClient",
    "error_from",
]
