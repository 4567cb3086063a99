"""Who answered: a client's identifiers travel in a ConfigRecord of their own.

Flower's strategies average every number in a reply's MetricRecord, so an identifier put there
(``partition-id``) comes out as a meaningless "mean partition id" under a stock ``FedAvg``.
fedge's ClientApp therefore sends its identity as a separate ConfigRecord named
:data:`IDENTITY_RECORD` (strategies ignore ConfigRecords in replies), and the server reads it
back with :func:`reply_identity` for sorting, clustering and ``clients.jsonl``.
"""

from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

IDENTITY_RECORD = "client"
PARTITION_ID = "partition-id"
DEVICE_INDEX = "device-index"  # into the sorted device class names of the scenario's [devices]
DEVICE_PROFILE = "device-profile"  # the device class name (or a SuperNode's --device-profile)
TRAINER = "trainer"  # the local trainer's name ([edge] trainers, else the algorithm's)
RAY_NODE_ID = "ray-node-id"  # the Ray node (machine) a simulated client ran on; ray engine only


def ray_node_id() -> str | None:
    """The id of the Ray node this process runs on, None outside Ray.

    Only asks Ray when the process already imported it (Flower's Ray actors have): the in-process
    engine and SuperNodes never pay for importing Ray.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


def identity_record(content: RecordDict) -> ConfigRecord:
    """The reply's identity record, created empty when missing (for mods that add to it)."""
    if IDENTITY_RECORD not in content.config_records:
        content[IDENTITY_RECORD] = ConfigRecord()
    return content.config_records[IDENTITY_RECORD]


def reply_identity(msg: Message) -> dict[str, int | float | str | bool]:
    """The identifiers a reply carries: its identity record; for clients that put a
    ``partition-id`` into their metrics (as some Flower examples do) that one; else ``{}``."""
    if msg.has_error():
        return {}
    # Read the records directly: RecordDict.config_records & co. build a synced copy per call.
    record = msg.content.get(IDENTITY_RECORD)
    if isinstance(record, ConfigRecord):
        return {k: v for k, v in record.items() if isinstance(v, int | float | str | bool)}
    for metrics in msg.content.values():
        if isinstance(metrics, MetricRecord) and PARTITION_ID in metrics:
            return {PARTITION_ID: int(metrics[PARTITION_ID])}
    return {}


def as_partition_id(value: object) -> int | None:
    """``value`` as a partition id: an int (or an integral float), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():  # also NaN and +-inf
        return None
    return int(value)


def reply_partition_id(msg: Message) -> int | None:
    """The partition id a reply names, None when it names none or no integer (a claim the
    server's identity guard refuses; sorting and bookkeeping must not fail on it first)."""
    return as_partition_id(reply_identity(msg).get(PARTITION_ID))
