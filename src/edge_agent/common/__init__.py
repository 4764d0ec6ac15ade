"""Shared I/O helpers every role uses: durable files, the token bucket, the MQTT transport seam
(``transport.Transport``, the paho adapter ``mqtt``, the in-memory test double ``memory``), the
X.509 identity, the TOML config loader. No model, no inference, no fleet policy.
"""
