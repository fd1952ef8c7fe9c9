"""Role-based access control for the admin plane, with casbin, in process."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import casbin

__all__ = ["MODEL_FILE", "POLICY_FILE", "ROLES", "Rbac"]

MODEL_FILE: Final = Path(__file__).with_name("rbac_model.conf")
POLICY_FILE: Final = Path(__file__).with_name("rbac_policy.csv")
#: Strongest first; each role inherits every permission of the ones after it.
ROLES: Final = ("SUPER_ADMIN", "ADMIN", "OPERATOR", "VIEWER")


class Rbac:
    """Answers "may ``role`` do ``action`` on ``obj``?" from the casbin model and policy."""

    def __init__(self, model: Path = MODEL_FILE, policy: Path = POLICY_FILE) -> None:
        self._enforcer = casbin.Enforcer(str(model), str(policy))

    def allowed(self, role: str, obj: str, action: str) -> bool:
        # SECURITY: deny by default; only roles we know are asked about.
        if role not in ROLES:
            return False
        return bool(self._enforcer.enforce(role, obj, action))

    def permissions(self, role: str) -> list[tuple[str, str]]:
        """Every (object, action) the role holds, inherited ones included."""
        if role not in ROLES:
            return []
        rules = self._enforcer.get_implicit_permissions_for_user(role)
        return sorted({(rule[1], rule[2]) for rule in rules})
