"""A subscription's granted QoS and MQTT 5.0 options, packed into one integer.

The subscription index, the session's ``subscriptions`` and the ``broker_subscriptions.qos``
column all hold this integer, so routing reads one value per subscriber and a 3.1.1
subscription (QoS only) is the same number it always was:

- bits 0–1: the granted QoS;
- bit 2: No Local [MQTT-3.8.3-3]; bit 3: Retain As Published [MQTT-3.3.1-12/13];
- bits 4–5: Retain Handling (0 send retained, 1 only for a new subscription, 2 never);
- bits 8 and up: the Subscription Identifier (0: none) [MQTT-3.3.4-3].
"""

from __future__ import annotations

import enum

QOS_MASK = 0x03
NO_LOCAL = 0x04
RETAIN_AS_PUBLISHED = 0x08
RH_SHIFT = 4
SUB_ID_SHIFT = 8


class RetainHandling(enum.IntEnum):
    SEND = 0
    SEND_IF_NEW = 1
    NEVER = 2


def pack(qos: int, *, no_local: bool = False, retain_as_published: bool = False,
         retain_handling: RetainHandling = RetainHandling.SEND, sub_id: int = 0) -> int:
    return (qos | (NO_LOCAL if no_local else 0) | (RETAIN_AS_PUBLISHED if retain_as_published else 0)
            | (int(retain_handling) << RH_SHIFT) | (sub_id << SUB_ID_SHIFT))


def qos_of(options: int) -> int:
    return options & QOS_MASK


def sub_id_of(options: int) -> int:
    return options >> SUB_ID_SHIFT


def retain_handling_of(options: int) -> RetainHandling:
    return RetainHandling((options >> RH_SHIFT) & 0x03)
