"""Pure kernels: no I/O, no clock, no global random state.

Kernels import only the standard library, numpy, torch, scipy and
cryptography. They signal bad input with :class:`InvalidInput`, whose message
is written for the caller and is safe to show in an RPC error.
"""

from fedrpc.fl._errors import InvalidInput

__all__ = ["InvalidInput"]
