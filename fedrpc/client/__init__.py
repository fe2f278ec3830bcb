"""The Python SDK: device-side protocol clients."""
