"""Client-side state that survives a resume on every engine.

A node's ``Context.state`` (LoRA error-feedback residuals, anything a trainer keeps between rounds)
lives in the node's process: the in-process grid, the Ray simulation driver or a SuperNode. A
killed run loses it, so a resumed run would diverge from an uninterrupted one. fedge therefore
carries it through the server, which checkpoints it with everything else:

1. The server asks for it in the train config (:data:`RETURN_STATE_KEY`); after training the client
   adds its whole ``Context.state`` (serialized RecordDict) to the reply as the ConfigRecord
   :data:`STATE_RECORD`. The server strips that record before any plugin or strategy sees the reply
   (``server/client_state.py``), so aggregation and traffic metrics are as without it.
2. After a resume the server sends each connected node a ``query.fedge_state`` message without
   state; the node answers with its identity (partition id). The server then sends each node the
   state its partition had at the checkpoint in a second ``query.fedge_state``, which replaces the
   node's ``Context.state``.

Node ids change when a SuperNode or a Ray simulation restarts; partition ids do not, so state is
keyed by partition id.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

STATE_RECORD = "fedge-node-state"  # ConfigRecord {STATE_KEY: bytes} in a reply or a query
STATE_KEY = "state"
RETURN_STATE_KEY = "return-state"  # train config: "send your Context.state back with the reply"
STATE_ACTION = "fedge_state"  # message type "query.fedge_state"


def state_to_bytes(state: RecordDict) -> bytes:
    return recorddict_to_proto(state).SerializeToString()


def state_from_bytes(raw: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(raw)
    return recorddict_from_proto(proto)


def attach_state(content: RecordDict, context: Context, config: ConfigRecord) -> None:
    """Add the node's state to a train reply when the server asked for it (and there is any)."""
    if bool(config.get(RETURN_STATE_KEY, False)) and len(context.state) > 0:
        content[STATE_RECORD] = ConfigRecord({STATE_KEY: state_to_bytes(context.state)})


def restore_state(msg: Message, context: Context) -> bool:
    """Replace ``context.state`` with the state a ``query.fedge_state`` message carries;
    False when it carries none (the server's "who are you?")."""
    record = msg.content.config_records.get(STATE_RECORD)
    if record is None:
        return False
    context.state = state_from_bytes(bytes(record[STATE_KEY]))
    return True
