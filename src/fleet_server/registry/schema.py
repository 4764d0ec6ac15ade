"""The registry's complete schema: every table module on the shared ``Base``, as one ``MetaData``.

Owns: which modules define registry tables (``TABLE_MODULES``) and the ``METADATA`` they fill,
which Alembic's environment and the schema-drift tests compare with the migrated database.
Does not own: any table (``models``, ``rollout_models``) nor the base (``orm``). A new table module
is added here, or Alembic would not see it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

from sqlalchemy import MetaData

from fleet_server.registry import evalset_models, models, rollout_models
from fleet_server.registry.orm import Base

__all__ = ["METADATA", "TABLE_MODULES"]

#: Every module that defines registry tables; importing them registers their tables on ``Base``.
TABLE_MODULES: Final[tuple[ModuleType, ...]] = (models, rollout_models, evalset_models)

#: The shared metadata, complete: every table of ``TABLE_MODULES``.
METADATA: Final[MetaData] = Base.metadata
