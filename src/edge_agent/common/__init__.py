"""Shared I/O helpers every role uses: durable files, the token bucket, the MQTT transport seam
(``transport.Transport``, the paho adapter ``mqtt``, the in-memory test double ``memory``), the
X.509 identity, the TOML config loader, and the byte-bounded queue of closed drift windows
between the device's control tick and its telemetry (``drift_buffer``). No model, no
inference, no fleet policy.
"""
