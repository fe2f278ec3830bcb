"""SecAgg+ stage names and the device's never-both rule (Bonawitz et al. 2017, §4).

In the unmasking stage the server asks each surviving device for its shares
of the self-mask secret ``b_j`` of every surviving neighbour ``j`` and of the
mask private key ``sk1_j`` of every dropped one. With both for one ``j`` it
could remove all of ``j``'s masks and read ``j``'s vector alone, so a device
answers nothing to a request that names one neighbour in both lists
(Bonawitz et al. 2017, Round 4; Bell et al. 2020 keep the rule).
"""

from __future__ import annotations

from collections.abc import Iterable

from fedrpc.fl._errors import InvalidInput

__all__ = ["Stage", "check_unmask_request"]


class Stage:
    """Stage names; each is the last part of its method, ``training.secagg.<stage>``."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    MASKED_VECTORS = "masked_vectors"
    UNMASK = "unmask"

    ORDER = (SETUP, SHARE_KEYS, MASKED_VECTORS, UNMASK)


def check_unmask_request(
    index: int, neighbours: Iterable[int], survivors: Iterable[int], dropped: Iterable[int]
) -> None:
    """Refuse an unmask request a device must not answer.

    Parameters
    ----------
    index
        The answering device.
    neighbours
        Its neighbours whose shares it holds.
    survivors
        Neighbours whose self-mask secret share the server asks for.
    dropped
        Neighbours whose mask private key share the server asks for.

    Raises
    ------
    InvalidInput
        If one device is named in both lists (never both), a list repeats a
        device, or names the device itself or a device that is not its neighbour.
    """
    neighbours = set(neighbours)
    survivors, dropped = list(survivors), list(dropped)
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        raise InvalidInput("the unmask request names a device twice")
    both = set(survivors) & set(dropped)
    if both:
        raise InvalidInput(
            f"refused: the request asks for both secrets of device {min(both)} (never both)"
        )
    asked = set(survivors) | set(dropped)
    if index in asked:
        raise InvalidInput("refused: the request asks for the device's own secrets")
    strangers = asked - neighbours
    if strangers:
        raise InvalidInput(f"refused: device {min(strangers)} is not a neighbour")
