# METADATA
# title: Tests for nops.authz
# description: >-
#   Every test compares the whole decision object. Tests without a
#   "with data.nops.routes" use the shipped routes data (echo, readonly, locked, bus).
package nops.authz_test

import data.nops.authz

# Formatting note: the "with" clauses stay on the line of the expression they
# modify. OPA 1.22 accepts either layout, but the formatter inside Regal
# v0.37 (OPA 1.10) joins them, so this is the one layout both agree on.

# An anonymous POST to the echo route, as the gateway sends it today.
_anonymous_echo := {
	"version": 1,
	"request": {"method": "POST", "path": "/echo/x", "route": "echo", "query": {}},
	"tenant": {"id": null, "tier": null},
	"subject": {"sub": null, "scopes": [], "roles": [], "agent_id": null},
	"signature": {"keyid": null, "alg": null, "created": null},
	"target": {"kind": "upstream", "destination": "echo", "classification": null},
	"source": {"ip": "203.0.113.7"},
}

# An authenticated GET to the locked route by a subject holding its scope.
_scoped_locked := object.union(_anonymous_echo, {
	"request": {"method": "GET", "path": "/locked", "route": "locked"},
	"tenant": {"id": "acme", "tier": "professional"},
	"subject": {"sub": "svc-42", "scopes": ["locked:read"], "roles": ["OPERATOR"], "agent_id": "a1"},
	"target": {"destination": "locked"},
})

# Routes for features the shipped data has no example of.
_feature_routes := {
	"debug": {
		"methods": ["GET"],
		"anonymous": true,
		"obligations": {"strip_headers": ["x-debug"]},
	},
	"tenanted": {"methods": ["GET"], "anonymous": false, "tenants": ["acme"]},
	"two_scopes": {"methods": ["GET"], "anonymous": false, "scopes": ["a:read", "b:read"]},
	"no_anonymous_key": {"methods": ["GET"]},
}

_allowed := {"allow": true, "reasons": ["allowed"], "obligations": {}}

_denied(reasons) := {"allow": false, "reasons": reasons, "obligations": {}}

_echo_with(request) := object.union(_anonymous_echo, {"request": request})

_locked_with(patch) := object.union(_scoped_locked, patch)

test_allow_anonymous_echo_post if {
	authz.decision == _allowed with input as _anonymous_echo
}

test_allow_anonymous_echo_every_method if {
	every method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] {
		authz.decision == _allowed with input as _echo_with({"method": method})
	}
}

test_allow_anonymous_readonly_get_and_head if {
	every method in ["GET", "HEAD"] {
		authz.decision == _allowed with input as _echo_with({"method": method, "route": "readonly"})
	}
}

test_allow_authenticated_subject_on_anonymous_route if {
	authz.decision == _allowed with input as _locked_with({"request": {"route": "echo"}})
}

test_allow_locked_with_scope if {
	authz.decision == _allowed with input as _scoped_locked
}

test_allow_locked_with_extra_scopes if {
	doc := _locked_with({"subject": {"scopes": ["agents:write", "locked:read"]}})
	authz.decision == _allowed with input as doc
}

test_allow_passes_route_obligations if {
	want := {"allow": true, "reasons": ["allowed"], "obligations": {"strip_headers": ["x-debug"]}}
	doc := _echo_with({"method": "GET", "route": "debug"})
	authz.decision == want with input as doc with data.nops.routes as _feature_routes
}

test_allow_listed_tenant if {
	doc := _locked_with({"request": {"route": "tenanted"}})
	authz.decision == _allowed with input as doc with data.nops.routes as _feature_routes
}

test_allow_all_of_several_scopes if {
	doc := _locked_with({"request": {"route": "two_scopes"}, "subject": {"scopes": ["b:read", "a:read"]}})
	authz.decision == _allowed with input as doc with data.nops.routes as _feature_routes
}

test_allow_authenticated_bus_publish_and_consume if {
	every method in ["GET", "POST"] {
		doc := _locked_with({"request": {"method": method, "route": "bus"}, "subject": {"scopes": []}})
		authz.decision == _allowed with input as doc
	}
}

test_deny_anonymous_bus if {
	# The bus acts for the verified tenant, so an anonymous caller has nothing to act as.
	doc := _echo_with({"method": "POST", "route": "bus"})
	authz.decision == _denied(["authentication_required"]) with input as doc
}

test_deny_bus_methods_other_than_get_and_post if {
	every method in ["PUT", "PATCH", "DELETE", "HEAD"] {
		doc := _locked_with({"request": {"method": method, "route": "bus"}})
		authz.decision == _denied(["method_not_allowed"]) with input as doc
	}
}

test_deny_unsupported_input_version if {
	every version in [0, 2, "1", 1.5, null, true] {
		doc := object.union(_anonymous_echo, {"version": version})
		authz.decision == _denied(["unsupported_input_version"]) with input as doc
	}
}

test_deny_missing_input_version if {
	doc := object.remove(_anonymous_echo, ["version"])
	authz.decision == _denied(["unsupported_input_version"]) with input as doc
}

test_deny_unknown_route if {
	every route in ["nope", "", "ECHO", null, 1, ["echo"], {"echo": true}] {
		authz.decision == _denied(["unknown_route"]) with input as _echo_with({"route": route})
	}
}

test_deny_unknown_route_when_routes_data_is_empty if {
	authz.decision == _denied(["unknown_route"]) with input as _anonymous_echo with data.nops.routes as {}
}

test_deny_unknown_route_when_route_entry_is_not_an_object if {
	routes := {"echo": ["GET", "POST"]}
	authz.decision == _denied(["unknown_route"]) with input as _anonymous_echo with data.nops.routes as routes
}

test_deny_method_not_allowed if {
	every method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "", null] {
		doc := _echo_with({"method": method, "route": "readonly"})
		authz.decision == _denied(["method_not_allowed"]) with input as doc
	}
}

test_deny_authentication_required if {
	doc := _locked_with({"subject": {"sub": null}})
	authz.decision == _denied(["authentication_required"]) with input as doc
}

test_deny_authentication_required_for_ill_typed_subject if {
	every sub in ["", 42, ["svc-42"], {"id": "svc-42"}, true] {
		doc := _locked_with({"subject": {"sub": sub}})
		authz.decision == _denied(["authentication_required"]) with input as doc
	}
}

test_deny_authentication_required_when_anonymous_is_absent if {
	doc := _echo_with({"method": "GET", "route": "no_anonymous_key"})
	want := _denied(["authentication_required"])
	authz.decision == want with input as doc with data.nops.routes as _feature_routes
}

test_deny_authentication_required_when_anonymous_is_not_boolean_true if {
	every anonymous in ["true", 1, null, false] {
		routes := {"echo": {"methods": ["GET"], "anonymous": anonymous}}
		doc := _echo_with({"method": "GET"})
		authz.decision == _denied(["authentication_required"]) with input as doc with data.nops.routes as routes
	}
}

test_deny_missing_scope if {
	doc := _locked_with({"subject": {"scopes": ["agents:write"]}})
	authz.decision == _denied(["missing_scope"]) with input as doc
}

test_deny_missing_scope_for_ill_typed_scopes if {
	every scopes in ["locked:read", {"s": "locked:read"}, [["locked:read"]], null, []] {
		doc := _locked_with({"subject": {"scopes": scopes}})
		authz.decision == _denied(["missing_scope"]) with input as doc
	}
}

test_deny_missing_scope_when_only_some_are_granted if {
	doc := _locked_with({"request": {"route": "two_scopes"}, "subject": {"scopes": ["a:read"]}})
	authz.decision == _denied(["missing_scope"]) with input as doc with data.nops.routes as _feature_routes
}

test_deny_tenant_not_allowed if {
	every tenant in ["globex", "", null, 7, ["acme"]] {
		doc := _locked_with({"request": {"route": "tenanted"}, "tenant": {"id": tenant}})
		want := _denied(["tenant_not_allowed"])
		authz.decision == want with input as doc with data.nops.routes as _feature_routes
	}
}

test_deny_withholds_route_obligations if {
	doc := _echo_with({"route": "debug"})
	authz.decision == _denied(["method_not_allowed"]) with input as doc with data.nops.routes as _feature_routes
}

test_deny_anonymous_post_to_locked_gives_every_reason_sorted if {
	want := _denied(["authentication_required", "method_not_allowed", "missing_scope"])
	authz.decision == want with input as _echo_with({"route": "locked"})
}

test_deny_unsupported_version_and_unknown_route_together if {
	doc := object.union(_anonymous_echo, {"version": 2, "request": {"route": "nope"}})
	authz.decision == _denied(["unknown_route", "unsupported_input_version"]) with input as doc
}

test_deny_all_route_reasons_together if {
	routes := {"strict": {"methods": ["GET"], "scopes": ["s:read"], "tenants": ["acme"]}}
	doc := {"version": 2, "request": {"method": "DELETE", "route": "strict"}}
	want := _denied([
		"authentication_required",
		"method_not_allowed",
		"missing_scope",
		"tenant_not_allowed",
		"unsupported_input_version",
	])
	authz.decision == want with input as doc with data.nops.routes as routes
}

test_deny_empty_input if {
	authz.decision == _denied(["unknown_route", "unsupported_input_version"]) with input as {}
}

test_deny_non_object_input if {
	every doc in ["", "echo", 1, null, [], [_anonymous_echo]] {
		authz.decision == _denied(["unknown_route", "unsupported_input_version"]) with input as doc
	}
}

test_deny_missing_request_fields if {
	doc := object.union(object.remove(_anonymous_echo, ["request"]), {"request": {"route": "echo"}})
	authz.decision == _denied(["method_not_allowed"]) with input as doc
}

test_deny_locked_with_only_version_and_route if {
	want := _denied(["authentication_required", "method_not_allowed", "missing_scope"])
	authz.decision == want with input as {"version": 1, "request": {"route": "locked"}}
}

test_deny_ill_typed_route_data_fails_closed if {
	routes := {"locked": {"methods": "GET", "anonymous": "true", "scopes": "locked:read", "tenants": "acme"}}
	want := _denied(["method_not_allowed", "missing_scope", "tenant_not_allowed"])
	authz.decision == want with input as _scoped_locked with data.nops.routes as routes
}

# An egress request: acme's service sends D2 data to the payment processor.
_egress := _locked_with({
	"request": {"method": "POST", "path": "/egress/payments-api", "route": "egress"},
	"subject": {"scopes": ["egress:send"]},
	"target": {"kind": "egress", "destination": "payments-api", "classification": "D2"},
})

_egress_to(destination, classification) := object.union(_egress, {"target": {
	"destination": destination,
	"classification": classification,
}})

test_allow_egress_within_both_ceilings if {
	authz.decision == _allowed with input as _egress
}

test_allow_egress_merges_route_and_destination_obligations if {
	routes := {"egress": {"methods": ["POST"], "anonymous": true, "obligations": {"a": 1, "b": 1}}}
	destinations := {"payments-api": {"ceiling": "D2", "obligations": {"b": 2, "c": 2}}}
	want := {"allow": true, "reasons": ["allowed"], "obligations": {"a": 1, "b": 2, "c": 2}}
	authz.decision == want with input as _egress with data.nops.routes as routes
		with data.nops.egress_destinations as destinations
}

test_allow_non_egress_target_ignores_the_egress_gate if {
	doc := _locked_with({"target": {"kind": "upstream", "destination": "nope", "classification": "D4"}})
	authz.decision == _allowed with input as doc
}

test_deny_egress_reasons_become_decision_reasons if {
	cases := [
		["public-search", "D2", ["class_above_destination_ceiling"]],
		["claims-processor", "D4", ["d4_never_leaves"]],
		["nope", "D0", ["unknown_destination"]],
		["payments-api", "D7", ["unknown_classification"]],
		["payments-api", null, ["unknown_classification"]],
	]
	every case in cases {
		authz.decision == _denied(case[2]) with input as _egress_to(case[0], case[1])
	}
}

test_deny_egress_for_tenant_reasons if {
	every case in [["globex", ["class_above_tenant_ceiling"]], ["initech", ["unknown_tenant"]]] {
		doc := object.union(_egress, {"tenant": {"id": case[0]}})
		authz.decision == _denied(case[1]) with input as doc
	}
}

test_deny_egress_reasons_join_route_reasons if {
	doc := object.union(_egress_to("nope", "D0"), {"subject": {"scopes": []}})
	authz.decision == _denied(["missing_scope", "unknown_destination"]) with input as doc
}

test_deny_egress_withholds_all_obligations if {
	routes := {"egress": {"methods": ["POST"], "anonymous": true, "obligations": {"a": 1}}}
	doc := _egress_to("public-search", "D3")
	authz.decision == _denied(["class_above_destination_ceiling"]) with input as doc with data.nops.routes as routes
}

test_deny_malformed_route_obligations if {
	every obligations in [["strip_headers"], "x-debug", 1, null, true] {
		routes := {"echo": {"methods": ["POST"], "anonymous": true, "obligations": obligations}}
		authz.decision == _denied(["malformed_obligations"]) with input as _anonymous_echo with data.nops.routes as routes
	}
}

test_deny_malformed_destination_obligations if {
	destinations := {"payments-api": {"ceiling": "D2", "obligations": "audit"}}
	want := _denied(["malformed_obligations"])
	authz.decision == want with input as _egress with data.nops.egress_destinations as destinations
}

# Agent routing (issue #6): the gateway sends target.kind "agent" and the agent
# id, or "capability:<name>", as target.destination.
_agent_call := _locked_with({
	"request": {"method": "POST", "path": "/agents/a1/tasks", "route": "agents"},
	"subject": {"scopes": []},
	"target": {"kind": "agent", "destination": "a1"},
})

test_allow_agents_authenticated_any_method if {
	every method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
		authz.decision == _allowed with input as object.union(_agent_call, {"request": {"method": method}})
	}
}

test_deny_agents_anonymous if {
	doc := object.union(_agent_call, {"subject": {"sub": null}})
	authz.decision == _denied(["authentication_required"]) with input as doc
}

test_allow_registry_authenticated if {
	doc := object.union(_agent_call, {
		"request": {"method": "PATCH", "path": "/registry/agents/a1", "route": "registry"},
		"target": {"kind": "upstream", "destination": "registry"},
	})
	authz.decision == _allowed with input as doc
}

test_deny_registry_put if {
	doc := object.union(_agent_call, {"request": {"method": "PUT", "route": "registry"}})
	authz.decision == _denied(["method_not_allowed"]) with input as doc
}
