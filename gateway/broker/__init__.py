"""The embedded MQTT 3.1.1/5.0 broker (:mod:`.embedded`, its wire in :mod:`.wire`) and its accounts.

Nothing is imported here: the package also holds tables that CLI commands read and migrate
(``state``, ``passwords``, ``presence``), which must not bring the broker's wire,
websockets and argon2 with them. Import the broker from :mod:`gateway.broker.embedded`.
"""
