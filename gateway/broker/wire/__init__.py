"""The broker's MQTT wire: listeners, framing, the 3.1.1 and 5.0 packet codec, one packet flow per module.

- :mod:`.codec`: primitives (§1.5 data representation, §2.1 fixed header) and the encoders
  of every packet the broker writes (``send_*``), for both protocol levels;
- :mod:`.properties`: MQTT 5.0 properties (§2.2.2): which may appear in which packet,
  their types, duplicates, and the values the standard forbids;
- :mod:`.handle_connect`, :mod:`.handle_publish`, :mod:`.handle_subscribe`,
  :mod:`.handle_disconnect`: decoding and answering one packet flow each;
- :mod:`.connection`: one client connection (reader loop, keepalive, write path);
- :mod:`.listeners`: TCP, TLS, WebSocket and secure WebSocket servers.
"""
