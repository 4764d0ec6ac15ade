"""Shared I/O helpers every role uses: durable files, the token bucket, the MQTT adapter, the
X.509 identity, the TOML config loader. No model, no inference, no fleet policy.
"""
