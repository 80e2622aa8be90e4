"""The embedded broker's own MQTT 5.0 codec vs the ``mqtt5`` wheel (Rust/PyO3), per packet.

    pip install mqtt5==0.8.0 && python -m bench.mqtt5_codec

What the broker does with a 5.0 PUBLISH: decode it from the bytes one read brought (topic,
packet id, properties, payload) and, per subscriber, encode it again with the properties
passed through, the Message Expiry lowered and a Subscription Identifier added. Measured
for a PUBLISH without properties (the common case) and one with five (expiry, content
type, response topic, correlation data, two user properties). The wheel is not a dependency:
the measurement is how the choice was made (docs/broker.md, "The wire").
"""

from __future__ import annotations

import sys
import timeit

from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import send_publish, utf8
from gateway.broker.wire.properties import Prop

TOPIC = "homepot/site-1/devices/pos-7/telemetry"
PAYLOAD = b"x" * 64
PROPS = {Prop.MESSAGE_EXPIRY_INTERVAL: 60, Prop.CONTENT_TYPE: "application/json", Prop.RESPONSE_TOPIC: "reply/here",
         Prop.CORRELATION_DATA: b"\x01\x02\x03\x04", Prop.USER_PROPERTY: [("a", "1"), ("b", "2")]}


def ours_roundtrip(body: bytes) -> bytes:
    """The broker's path: topic and id by slicing, properties by the PUBLISH decoder (skipped when
    empty), the pass-through ones forwarded as they came, expiry and subscription id appended."""
    end = 2 + int.from_bytes(body[:2], "big")
    topic = body[2:end].decode("utf-8")
    pid = int.from_bytes(body[end:end + 2], "big")
    start = end + 2
    if body[start] == 0:
        forwarded = b""
        payload = body[start + 1:]
    else:
        props, forwarded, end_props = P.decode_publish(body, start)
        payload = body[end_props:]
    forwarded += b"\x02" + (59).to_bytes(4, "big") + b"\x0b\x07"
    return send_publish(utf8(topic), payload, 1, False, False, pid, forwarded)


def main() -> None:
    try:
        import mqtt5
    except ImportError:
        print("the mqtt5 wheel is not installed (pip install mqtt5==0.8.0): nothing to compare")
        sys.exit(2)
    n = 20000
    for label, props in (("no properties", {}), ("5 properties", PROPS)):
        packet = send_publish(utf8(TOPIC), PAYLOAD, 1, False, False, 7, P.encode(props))
        body = packet[2 if packet[1] < 128 else 3:]

        def theirs(packet: bytes = packet) -> bytes:
            msg, _ = mqtt5.read(memoryview(packet))
            out = mqtt5.PublishPacket(msg.topic, msg.payload, qos=msg.qos, packet_id=msg.packet_id,
                                      message_expiry_interval=59, content_type=msg.content_type,
                                      response_topic=msg.response_topic, correlation_data=msg.correlation_data,
                                      user_properties=msg.user_properties, subscription_ids=[7],
                                      payload_format_indicator=msg.payload_format_indicator)
            return out.write()

        ours_us = min(timeit.repeat(lambda: ours_roundtrip(body), number=n, repeat=5)) / n * 1e6
        theirs_us = min(timeit.repeat(theirs, number=n, repeat=5)) / n * 1e6
        print(f"{label:<14} decode + re-encode per PUBLISH: own codec {ours_us:.2f} us, mqtt5 wheel {theirs_us:.2f} us")


if __name__ == "__main__":
    main()
