"""Flower's SecAgg+ driven in process for bench/secagg.py (flwr is a bench-only dependency,
imported here and nowhere else): its own ``secaggplus_mod`` on every device and its own
``SecAggPlusWorkflow`` stages on the server, joined by an in-process ``Grid`` that carries
every message through Flower's protobuf encoding (no Ray, no gRPC)."""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Iterable

import numpy as np
from _secagg_common import CLIPPING, LEVELS, MAX_WEIGHT, MODULUS, K, Round, T, reference

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common import (
        Code,
        FitIns,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.compat.common import recorddict_compat as compat
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    # The package re-exports the function under the module's name: fetch the module itself.
    FLOWER_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    FLOWER = True
except ImportError:  # pragma: no cover - reported in the output
    FLOWER = False
    Grid = object  # type: ignore[assignment,misc]

MASK_TIMES: list[float] = []


def _flower_setup() -> None:
    """Quiet Flower's logs, give this process a task identity, time the devices' masking."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    masking = FLOWER_MOD._collect_masked_vectors

    def timed_masking(*args, **kwargs):
        started = time.perf_counter()
        out = masking(*args, **kwargs)
        MASK_TIMES.append(time.perf_counter() - started)
        return out

    FLOWER_MOD._collect_masked_vectors = timed_masking


def _wire(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def _unwire(data: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(data))


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _KeepResult:
    """A strategy that samples every node and keeps the unmasked parameters as they are."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.parameters = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(nid), FitIns(parameters, {})) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.parameters = results[0][1].parameters
        return None, {}


class _InProcessGrid(Grid):
    """Delivers each message to a device's ``secaggplus_mod`` through Flower's wire encoding."""

    def __init__(self, updates: dict[int, np.ndarray], weights: dict[int, int], dropped: set[int]):
        self.updates, self.weights, self.dropped = updates, weights, dropped
        self.contexts = {nid: Context(1, nid, {}, RecordDict(), {}) for nid in updates}
        self.device_seconds = 0.0
        self.uploads: dict[int, tuple[int, int]] = {}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.updates)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        started = time.perf_counter()
        replies = []
        for sent in messages:
            msg = _unwire(_wire(sent))
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.dropped and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
                continue  # dropped after stage 1: no reply
            reply = FLOWER_MOD.secaggplus_mod(msg, self.contexts[nid], self._fit)
            data = _wire(reply)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                arrays = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                self.uploads[nid] = (len(data), sum(len(a) for a in arrays))
            replies.append(_unwire(data))
        self.device_seconds += time.perf_counter() - started
        return replies

    def _fit(self, msg: Message, context: Context) -> Message:
        """The device's training step: its update and sample count as a FitRes."""
        nid = context.node_id
        res = FitRes(
            Status(Code.OK, ""), ndarrays_to_parameters([self.updates[nid]]), self.weights[nid], {}
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def flower_round(
    vectors: list[np.ndarray], weights: list[int], dropped: list[int], seed: int
) -> Round:
    """One SecAgg+ round through Flower's workflow stages and device mod."""
    random.seed(seed)  # the workflow shuffles its ring with `random`
    np.random.seed(seed)  # and quantizes with numpy's global generator
    n = len(vectors)
    node_ids = list(range(1, n + 1))
    grid = _InProcessGrid(
        dict(zip(node_ids, vectors, strict=True)),
        dict(zip(node_ids, weights, strict=True)),
        {node_ids[i] for i in dropped},
    )
    strategy = _KeepResult(node_ids)
    context = LegacyContext(Context(1, 0, {}, RecordDict(), {}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(1, np.float32)]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        n if n < 12 else K,  # num_shares counts the device itself
        T,
        max_weight=MAX_WEIGHT,
        clipping_range=CLIPPING,
        quantization_range=LEVELS,
        modulus_range=MODULUS,
    )
    state = WorkflowState()
    MASK_TIMES.clear()
    started = time.perf_counter()
    for stage in (workflow.setup_stage, workflow.share_keys_stage):
        if not stage(grid, context, state):
            raise AssertionError(f"Flower's {stage.__name__} failed")
    if not workflow.collect_masked_vectors_stage(grid, context, state):
        raise AssertionError("Flower's collect_masked_vectors_stage failed")
    devices_before = grid.device_seconds
    unmask_started = time.perf_counter()
    if not workflow.unmask_stage(grid, context, state):
        raise AssertionError("Flower's unmask_stage failed")
    unmask = time.perf_counter() - unmask_started - (grid.device_seconds - devices_before)
    total = time.perf_counter() - started
    result = parameters_to_ndarrays(strategy.parameters)[0]
    error = float(np.max(np.abs(result - reference(vectors, weights, dropped))))
    # one quantization step of the weight-scaled update, over the smallest weight fraction
    bound = 2 * CLIPPING / LEVELS * MAX_WEIGHT / min(weights)
    if not error <= 2 * bound:
        raise AssertionError(f"Flower's mean is off by {error:.2e} (bound {bound:.2e})")
    d = vectors[0].size
    upload, payload = next(iter(grid.uploads.values()))
    return Round(
        mask=list(MASK_TIMES),
        unmask=unmask,
        wire=upload / (d + 1),  # d parameters and the weight, as for ours
        payload=payload / (d + 1),
        error=error,
        total=total,
    )
