"""The device-id rule every role shares. Pure.

A device id is a certificate CN, an MQTT username and client id, a topic level and a field of
every signed desired-state document, so it must be safe in all of them: a DNS label, lowercase
(no '/', '+', '#', '$', no case confusion between two devices). This module is its one owner;
the identity files (``edge_agent.common.identity``), the topic tree, the wire parsers and the
desired-state checks all call ``validate_device_id`` or match ``DEVICE_ID_PATTERN``.
"""

from __future__ import annotations

import re

from edge_agent.errors import IdentityError

DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid device id.

    Raises:
        IdentityError: not a lowercase DNS label of 1-63 characters.
    """
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise IdentityError(
            f"invalid device id {device_id!r}: use 1-63 lowercase letters, digits and '-' "
            "(not at either end)"
        )
    return device_id
