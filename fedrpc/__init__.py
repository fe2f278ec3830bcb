"""fedrpc: a JSON-RPC 2.0 control plane for federated learning."""

__version__ = "0.1.0"
