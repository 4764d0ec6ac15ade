"""The registry's complete schema: every table module on the shared ``Base``, as one ``MetaData``.

Owns: which modules define registry tables (``TABLE_MODULES``) and the ``METADATA`` they fill,
which Alembic's environment and the schema-drift tests compare with the migrated database.
Also owns ``include_name``, the filter that keeps the PostgreSQL partitions of ``telemetry``
(``telemetry_pYYYYMMDD``, ``telemetry_default``: storage of one table, created and dropped at run
time by ``fleet_server.history.retention``) out of Alembic's comparisons. Does not own: any
table (``tables.core``, ``tables.rollouts``, ``tables.evalsets``, ``tables.labels``,
``tables.agents``, ``audit``)
nor the base (``orm``). A new table module is added here, or Alembic would not see it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Final

from sqlalchemy import MetaData

from fleet_server.registry import audit
from fleet_server.registry.orm import Base
from fleet_server.registry.tables import agents, capture, core, evalsets, labels, rollouts

__all__ = ["METADATA", "PARTITION_NAME", "TABLE_MODULES", "include_name"]

#: Every module that defines registry tables; importing them registers their tables on ``Base``.
TABLE_MODULES: Final[tuple[ModuleType, ...]] = (
    core,
    rollouts,
    evalsets,
    audit,
    labels,
    agents,
    capture,
)

#: The shared metadata, complete: every table of ``TABLE_MODULES``.
METADATA: Final[MetaData] = Base.metadata

#: The names of ``telemetry``'s partitions on PostgreSQL (daily ranges and the default one).
PARTITION_NAME: Final = re.compile(r"telemetry_(p\d{8}|default)")


def include_name(name: str | None, type_: str, parent_names: Mapping[Any, Any]) -> bool:
    """Alembic's ``include_name`` hook: every name except the partitions of ``telemetry``."""
    return not (
        type_ == "table" and name is not None and PARTITION_NAME.fullmatch(name) is not None
    )
