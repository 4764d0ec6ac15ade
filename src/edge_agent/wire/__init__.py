"""Wire formats every role shares: topics, telemetry, reported state, block transfer, fallback.

Pure: values with strict ``from_dict``/``from_bytes`` and canonical ``to_bytes``; no I/O, no
runtime, no ``cryptography``.
"""
