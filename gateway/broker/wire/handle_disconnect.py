"""DISCONNECT from a client (§3.14).

A DISCONNECT ends the connection without its will [MQTT-3.1.2-10], except the 5.0 reason
0x04 "Disconnect with Will Message". A 5.0 client may change its Session Expiry Interval
here, but not from 0 to something else [MQTT-3.14.2-2] (a protocol error: the will is
then published, as for any connection that did not end normally).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import DISCONNECT, V5, Body, Malformed, Reason
from gateway.broker.wire.handle_connect import NEVER_EXPIRES
from gateway.broker.wire.properties import Prop

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.wire.connection import Connection

WITH_WILL = 0x04


def on_disconnect(conn: Connection, cs: ClientState, body: bytes) -> None:
    if conn.version != V5:
        if body:
            raise Malformed("DISCONNECT with a body")
        conn.clean_disconnect = True
        conn.close_now()
        return
    reason = body[0] if body else 0
    if len(body) > 1:
        cursor = Body(body, 1)
        props = P.decode(cursor, DISCONNECT)
        if cursor.remaining:
            raise Malformed("bytes after the DISCONNECT properties")
        expiry = props.get(Prop.SESSION_EXPIRY_INTERVAL)
        if expiry is not None:
            connect = conn.connect
            if connect is not None and connect.session_expiry == 0 and expiry != 0:
                raise Malformed("Session Expiry Interval set on DISCONNECT after 0 on CONNECT",
                                Reason.PROTOCOL_ERROR)
            conn.gw.set_session_expiry(cs, None if expiry == NEVER_EXPIRES else expiry)
    conn.clean_disconnect = reason != WITH_WILL
    conn.close_now()
