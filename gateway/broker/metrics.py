"""Counters of the embedded broker, read by the gateway (``EmbeddedBroker.metrics()``).

Plain integers bumped on the event loop: no locks, no allocation on the hot path.
The names are stable: the HTTP API's Prometheus metrics and ``$SYS/broker/...`` read
them. Gauges (sessions, retained, queued, ...) are added by ``snapshot``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class BrokerMetrics:
    clients_connected: int = 0
    connections_total: int = 0
    auth_failures: int = 0
    logins_throttled: int = 0        # CONNECTs refused unchecked (0x89 / 3.1.1 0x03): their address failed too often
    messages_in: int = 0             # PUBLISH packets received from clients
    messages_out: int = 0            # PUBLISH packets written to clients (resends included)
    bytes_in: int = 0                # payload bytes received
    bytes_out: int = 0               # payload bytes written
    dropped: int = 0                 # queued messages dropped (max_queued_messages, oldest first)
    dropped_acl: int = 0             # queued/in-flight messages withheld when sent: the receiver's role may not read
    denied_publish: int = 0          # PUBLISHes dropped by the ACL (still acknowledged)
    denied_subscribe: int = 0        # SUBSCRIBE filters refused with 0x80
    denied_receive: int = 0          # deliveries withheld because the receiver's role may not read
    sessions_refused: int = 0        # CONNECTs refused (0x05): client id owned by another principal, or reserved
    retained_refused: int = 0        # retained messages not kept: the retained store is at a limit
    keepalive_timeouts: int = 0      # connections closed after 1.5 × keepalive of silence
    packet_timeouts: int = 0         # connections closed while stalled in the middle of a packet
    wills_published: int = 0
    protocol_errors: int = 0         # connections closed for malformed input
    persist_errors: int = 0          # SQLite commits of broker state that failed (logged once per episode)
    expired: int = 0                 # MQTT 5.0 messages dropped from queues or retained when their expiry passed
    dropped_too_large: int = 0       # messages not sent: larger than the receiving client's Maximum Packet Size
    shared_handed_over: int = 0      # unacknowledged messages of a leaving shared-subscription member given to another
    receive_maximum_exceeded: int = 0  # MQTT 5.0 clients disconnected (0x93) for exceeding the broker's Receive Maximum
    not_acknowledged: int = 0        # PUBLISH/SUBSCRIBE/QoS 2 steps left unacknowledged because state was not stored
    # [broker.limits] (gateway.broker.limits.Limit.metric): each hit of a limit
    limited_packet_size: int = 0     # connections closed: a packet's fixed header announced more than max_packet_size
    limited_connections: int = 0     # connections refused: max_connections (or before CONNECT: too many connecting)
    limited_sessions: int = 0        # CONNECTs refused: max_sessions_per_account, every session connected
    limited_queued_bytes: int = 0    # queued messages dropped: max_queued_bytes
    limited_retained: int = 0        # retained messages not kept: the principal's retained quota
    limited_rate: int = 0            # PUBLISHes after which the reader paused: max_publish_rate / bytes rate
    sessions_evicted: int = 0        # offline persistent sessions forgotten for a newer one (max_sessions_per_account)
    sessions_expired: int = 0        # offline persistent sessions forgotten: session_expiry_s, or 5.0 Session Expiry Interval
    accounts_disconnected: int = 0   # connections closed because their account was removed or its password changed
    accounts_updated: int = 0        # connected clients whose role changed in the password file (new ACL at once)

    def snapshot(self, **gauges: int) -> dict[str, int]:
        out = asdict(self)
        out["denied"] = self.denied_publish + self.denied_subscribe + self.denied_receive
        out.update(gauges)
        return out
