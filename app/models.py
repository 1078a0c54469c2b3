"""Every table of the service, imported in one place so SQLModel.metadata is complete.

Alembic's env.py and the migration test import this module; adding a table means adding it here.
"""

import app.audit.models
import app.core.idempotency
import app.diagnosis.budget
import app.notify.models
import app.overrides.models
import app.targets.models  # noqa: F401  (tables register on SQLModel.metadata)
