# METADATA
# title: NOPS egress classification gate (D0..D4)
# description: >-
#   Decides whether data of the request's class may leave the perimeter for
#   the named destination. Three things are compared: the request's class
#   (input.target.classification), the destination's ceiling
#   (data.nops.egress_destinations) and the tenant's ceiling
#   (data.nops.tenants); the order of the levels comes from the taxonomy
#   (data.nops.taxonomy). Deny by default: every deny rule is written as
#   "not <positive condition>", so a missing label, an unknown destination or
#   tenant, or ill-typed data denies. nops.authz consults this package when
#   input.target.kind is "egress"; the egress proxy may query
#   data.nops.egress.decision directly.
package nops.egress

# METADATA
# title: Decision
# description: >-
#   Always defined and always exactly {"allow": bool, "reasons": [string],
#   "obligations": object}: reasons is ["allowed"] on allow, otherwise the
#   sorted deny codes; obligations is the destination's "obligations" object
#   on allow, otherwise {}.
# entrypoint: true
decision := {
	"allow": allow,
	"reasons": _reasons,
	"obligations": _obligations,
}

# METADATA
# title: Allow
# description: True only when no deny rule matches.
# scope: document
default allow := false

allow if count(deny) == 0

# METADATA
# title: Deny reasons
# description: >-
#   Stable snake_case reason codes. When the class is unknown, or never
#   leaves the perimeter, no ceiling is compared (there is nothing to
#   compare); when the destination or tenant is unknown, its ceiling is not
#   compared.
# scope: document
# custom:
#   codes:
#     - unknown_classification
#     - d4_never_leaves
#     - unknown_destination
#     - unknown_tenant
#     - class_above_destination_ceiling
#     - class_above_tenant_ceiling
#     - malformed_obligations
deny contains "unknown_classification" if not _class

deny contains "d4_never_leaves" if {
	_class
	not _may_leave
}

deny contains "unknown_destination" if not _destination

deny contains "unknown_tenant" if not _tenant

deny contains "class_above_destination_ceiling" if {
	_may_leave
	_destination
	not _within(_destination.ceiling)
}

deny contains "class_above_tenant_ceiling" if {
	_may_leave
	_tenant
	not _within(_tenant.egress_ceiling)
}

deny contains "malformed_obligations" if {
	_destination
	"obligations" in object.keys(_destination)
	not is_object(_destination.obligations)
}

_reasons := ["allowed"] if allow

_reasons := sort(deny) if not allow

default _obligations := {}

_obligations := object.get(_destination, "obligations", {}) if allow

# The taxonomy level of the request's class, if the label is known.
_class := level if {
	is_string(input.target.classification)
	level := _level(input.target.classification)
}

# SECURITY: only the boolean false (or no flag) lets a level leave.
_may_leave if {
	_class
	not _class.never_leaves == true
}

# A destination is known when it has an object entry whose ceiling is a
# level that may leave; anything else is no usable entry.
_destination := destination if {
	is_string(input.target.destination)
	destination := data.nops.egress_destinations[input.target.destination]
	_ceiling(destination.ceiling)
}

_tenant := tenant if {
	is_string(input.tenant.id)
	tenant := data.nops.tenants[input.tenant.id]
	_ceiling(tenant.egress_ceiling)
}

_level(label) := level if {
	level := data.nops.taxonomy.levels[label]
	is_number(level.rank)
}

_ceiling(label) if {
	is_string(label)
	level := _level(label)
	not level.never_leaves == true
}

_within(ceiling) if _class.rank <= _level(ceiling).rank
