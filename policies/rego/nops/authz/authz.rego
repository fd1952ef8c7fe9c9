# METADATA
# title: NOPS gateway authorization
# description: >-
#   Decides whether a request may pass the gateway. The gateway sends the
#   version 1 policy input document and queries data.nops.authz.decision.
#   Deny by default: a request is allowed only when no deny rule matches, and
#   every deny rule is written as "not <positive condition>", so a missing or
#   ill-typed input field makes the condition undefined and the request denied.
#   Routes are data, loaded from nops/routes/data.json as data.nops.routes.
#   When input.target.kind is "egress", the D0..D4 gate in nops.egress is
#   consulted too and its deny reasons become this decision's reasons.
package nops.authz

import data.nops.egress

# METADATA
# title: Decision
# description: >-
#   The one document the gateway queries. Always defined and always exactly
#   {"allow": bool, "reasons": [string], "obligations": object}. reasons is
#   ["allowed"] on allow, otherwise the sorted deny codes. obligations is the
#   route's "obligations" object on allow, merged (for egress) with the
#   destination's, otherwise {}.
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
#   The set of stable snake_case reason codes for which the request is denied.
#   The codes reach metrics labels, logs, audit records and problem+json
#   bodies: never rename one, add a new code instead.
# scope: document
# custom:
#   codes:
#     - unsupported_input_version
#     - unknown_route
#     - method_not_allowed
#     - authentication_required
#     - missing_scope
#     - tenant_not_allowed
#     - malformed_obligations
#     - the nops.egress codes, for an egress target
deny contains "unsupported_input_version" if not _version_supported

deny contains "unknown_route" if not _route

deny contains "method_not_allowed" if {
	_route
	not _method_allowed
}

deny contains "authentication_required" if {
	_route
	not _caller_admitted
}

deny contains "missing_scope" if {
	_route
	not _scopes_granted
}

deny contains "tenant_not_allowed" if {
	_route
	not _tenant_allowed
}

deny contains "malformed_obligations" if {
	_route
	"obligations" in object.keys(_route)
	not is_object(_route.obligations)
}

deny contains reason if {
	_egress_target
	some reason in egress.deny
}

_reasons := ["allowed"] if allow

_reasons := sort(deny) if not allow

default _obligations := {}

_obligations := object.union(object.get(_route, "obligations", {}), _egress_obligations) if allow

default _egress_obligations := {}

_egress_obligations := egress.decision.obligations if _egress_target

_egress_target if input.target.kind == "egress"

_version_supported if input.version == 1

# The route named by the request, if the routes data knows it.
_route := route if {
	route := data.nops.routes[input.request.route]
	is_object(route)
}

_method_allowed if input.request.method in _route.methods

# SECURITY: only the boolean true opens a route to anonymous callers; an
# absent, null or non-boolean "anonymous" means authentication is required.
_caller_admitted if _route.anonymous == true

_caller_admitted if _authenticated

_authenticated if {
	is_string(input.subject.sub)
	input.subject.sub != ""
}

_scopes_granted if {
	every scope in object.get(_route, "scopes", []) {
		scope in _subject_scopes
	}
}

_subject_scopes contains scope if {
	is_array(input.subject.scopes)
	some scope in input.subject.scopes
	is_string(scope)
}

# A route without a "tenants" list is open to every tenant.
_tenant_allowed if not "tenants" in object.keys(_route)

_tenant_allowed if {
	is_string(input.tenant.id)
	input.tenant.id in _route.tenants
}
