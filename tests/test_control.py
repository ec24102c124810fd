"""Control-plane messages: msgpack maps with a schema; anything malformed is a ProtocolError, never a crash."""

import msgpack
import pytest
from control_samples import VALID_MESSAGES

from kvlink import control
from kvlink.control import ProtocolError


def test_roundtrip_of_every_message_type():
    samples = VALID_MESSAGES
    assert set(samples) == set(control.SCHEMAS)
    for kind, fields in samples.items():
        message = control.decode(control.encode(kind, **fields))
        assert message["type"] == kind and all(message[k] == v for k, v in fields.items())


@pytest.mark.parametrize("data,match", [
    (b"\xc1", "undecodable"),
    (msgpack.packb([1, 2]), "expected a map"),
    (msgpack.packb({"type": "NOPE", "v": 1}), "unknown control message type"),
    (msgpack.packb({"type": "SENT", "v": 99, "xfer": 1}), "protocol version 99"),
    (msgpack.packb({"type": "SENT", "v": 1}), "missing field 'xfer'"),
    (msgpack.packb({"type": "SENT", "v": 1, "xfer": "1"}), "field 'xfer' has type str"),
    (msgpack.packb({"type": "NOTIFY", "v": 1, "xfer": 1, "request": "r", "ok": 1}), "field 'ok' has type int"),
    (msgpack.packb({"type": "SENT", "v": 1, "xfer": True}), "field 'xfer' has type bool"),
    (b"\x00" * (control.MAX_CONTROL_BYTES + 1), "exceeds"),
])
def test_malformed_messages_are_refused(data, match):
    with pytest.raises(ProtocolError, match=match):
        control.decode(data)


def test_int_lists_are_checked():
    message = control.decode(control.encode("PULL", xfer=1, request="r", src_blocks=[1, "2"], num_tokens=20,
                                            layers=[0, 2], heads=[0, 8, 9], chunks=[], layerwise=False,
                                            counter=[0, 0], checksum=False, wire=""))
    with pytest.raises(ProtocolError, match="src_blocks must hold ints"):
        control.int_list(message, "src_blocks")
    with pytest.raises(ProtocolError, match="heads has 3 items, expected 2"):
        control.int_list(message, "heads", length=2)
    with pytest.raises(ValueError, match="unknown control message type"):
        control.encode("NOPE")
