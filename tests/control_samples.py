"""Control-plane test helpers: one valid message of every type, and a raw peer socket."""

import zmq

VALID_MESSAGES = {
    "HELLO": dict(endpoint="d", fingerprint="ab", layout={"num_layers": 2}, transports=["host"], host="h", pid=1,
                  device="", chunk_bytes=1 << 20, ipc=None, auth=None),
    "WELCOME": dict(endpoint="p", transport="nccl", nccl_id=b"\x00" * 128, chunk_bytes=1 << 20, layout={},
                    ipc={"strides": [1, 2, 3]}, auth=None),
    "REJECT": dict(reason="no"),
    "PULL": dict(xfer=1, request="r", src_blocks=[1, 2], num_tokens=20, layers=[0, 2], heads=[0, 8],
                 chunks=[[0, 2, 0, 20]], layerwise=False, counter=[0, 0], checksum=False,
                 wire=""),
    "DATA": dict(xfer=1, chunk=0),
    "SENT": dict(xfer=1),
    "FAILED": dict(xfer=1, reason="x", whole=True),
    "CANCEL": dict(xfer=1, request="r"),
    "NOTIFY": dict(xfer=1, request="r", ok=True),
    "RELEASE": dict(request="r"),
    "HEARTBEAT": {},
    "BYE": dict(reason="closing"),
}


def raw_dealer(context: zmq.Context, address: str) -> zmq.Socket:
    """A bare DEALER connected to an endpoint: a peer that speaks the wire format by hand."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock
