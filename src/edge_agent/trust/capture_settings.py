"""What an operator turned on for capture upload of one model: the ``capture-config`` arguments.

Pure. Owns ``UploadSettings`` (opt-in, sampling rate in parts per million, the daily byte
budget, the fields to drop), the field-drop syntax (``DROP_PATTERN``) and the chunk size
bounds the ``capture-upload`` command accepts. Does not apply the drops or pack chunks
(``edge_agent.common.capture_chunk``) nor verify the command carrying them
(``edge_agent.trust.command``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.errors import ContractError
from edge_agent.ids import NAME_PATTERN

__all__ = [
    "DROP_PATTERN",
    "MAX_CHUNK_BYTES",
    "MAX_DROPS",
    "MIN_CHUNK_BYTES",
    "SAMPLE_SCALE",
    "UploadSettings",
]

#: The smallest and largest chunk a device packs (the upload offer's cap is 16 MiB).
MIN_CHUNK_BYTES: Final = 64 * 1024
MAX_CHUNK_BYTES: Final = 8 * 1024 * 1024
MAX_DROPS: Final = 64
#: Sampling rates travel as integers per million (canonical JSON has no floats).
SAMPLE_SCALE: Final = 1_000_000
#: ``inputs``, ``outputs``, ``labels``, ``metadata`` (request ids; time cut to the hour), one
#: tensor (``input:<name>``, ``output:<name>``) or one feature index of every input's last
#: axis (``feature:<k>``).
DROP_PATTERN: Final = re.compile(
    r"inputs|outputs|labels|metadata|(?:input|output):[A-Za-z0-9_.:/-]{1,64}|feature:[0-9]{1,6}"
)


@dataclass(frozen=True)
class UploadSettings:
    """What an operator turned on for one model on one device.

    Raises:
        ContractError: a field is out of range (on construction).
    """

    model: str
    enabled: bool
    sample_ppm: int = SAMPLE_SCALE
    bytes_per_day: int = 16 * 1024 * 1024
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not NAME_PATTERN.fullmatch(self.model):
            raise ContractError("capture settings: model must be a model name")
        if type(self.enabled) is not bool:
            raise ContractError("capture settings: enabled must be a boolean")
        if type(self.sample_ppm) is not int or not 0 <= self.sample_ppm <= SAMPLE_SCALE:
            raise ContractError(f"capture settings: sample_ppm must be 0..{SAMPLE_SCALE}")
        if type(self.bytes_per_day) is not int or not 0 <= self.bytes_per_day <= 2**40:
            raise ContractError("capture settings: bytes_per_day must be 0..2**40")
        if not isinstance(self.drop, tuple) or len(self.drop) > MAX_DROPS:
            raise ContractError(f"capture settings: at most {MAX_DROPS} field drops")
        for d in self.drop:
            if not isinstance(d, str) or not DROP_PATTERN.fullmatch(d):
                raise ContractError(f"capture settings: unknown field drop {str(d)[:80]!r}")

    def to_dict(self) -> dict[str, Any]:
        """The ``capture-config`` command's arguments."""
        return {
            "model": self.model,
            "enabled": self.enabled,
            "sample_ppm": self.sample_ppm,
            "bytes_per_day": self.bytes_per_day,
            "drop": list(self.drop),
        }

    @classmethod
    def from_dict(cls, data: object) -> UploadSettings:
        """Parse strictly.

        Raises:
            ContractError: missing, unknown or invalid fields.
        """
        keys = {"model", "enabled", "sample_ppm", "bytes_per_day", "drop"}
        if not isinstance(data, dict) or set(data) != keys:
            raise ContractError(f"capture settings take exactly {sorted(keys)}")
        drop = data["drop"]
        if not isinstance(drop, list):
            raise ContractError("capture settings: drop must be a list")
        return cls(
            data["model"], data["enabled"], data["sample_ppm"], data["bytes_per_day"], tuple(drop)
        )
