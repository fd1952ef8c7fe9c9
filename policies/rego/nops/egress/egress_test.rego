# METADATA
# title: Tests for nops.egress
# description: >-
#   Every test compares the whole decision object. Tests without a "with
#   data..." use the shipped taxonomy, destinations and tenants: tenant acme
#   has ceiling D3, globex D1; destinations public-search D0, partner-wiki D1,
#   payments-api D2, claims-processor D3.
package nops.egress_test

import data.nops.egress

# acme sends D2 data to the contracted payment processor (ceiling D2).
_payments := {
	"version": 1,
	"request": {"method": "POST", "path": "/egress/payments-api/charges", "route": "egress", "query": {}},
	"tenant": {"id": "acme", "tier": "professional"},
	"subject": {"sub": "svc-42", "scopes": ["egress:send"], "roles": [], "agent_id": "a1"},
	"signature": {"keyid": "acme-k1", "alg": "hmac-sha256", "created": 1763800000},
	"target": {"kind": "egress", "destination": "payments-api", "classification": "D2"},
	"source": {"ip": "203.0.113.7"},
}

_allowed := {"allow": true, "reasons": ["allowed"], "obligations": {}}

_denied(reasons) := {"allow": false, "reasons": reasons, "obligations": {}}

_to(destination, classification) := object.union(_payments, {"target": {
	"destination": destination,
	"classification": classification,
}})

_as(tenant, destination, classification) := object.union(_to(destination, classification), {"tenant": {"id": tenant}})

_obliging := {
	"audited": {"ceiling": "D3", "obligations": {"record_payload_digest": true}},
	"sloppy": {"ceiling": "D1", "obligations": ["record_payload_digest"]},
}

test_allow_class_at_both_ceilings if {
	egress.decision == _allowed with input as _payments
}

test_allow_every_class_up_to_the_destination_ceiling if {
	every class in ["D0", "D1", "D2", "D3"] {
		egress.decision == _allowed with input as _to("claims-processor", class)
	}
}

test_allow_public_data_anywhere if {
	every destination in ["public-search", "partner-wiki", "payments-api", "claims-processor"] {
		egress.decision == _allowed with input as _as("globex", destination, "D0")
	}
}

test_allow_class_at_the_tenant_ceiling if {
	egress.decision == _allowed with input as _as("globex", "partner-wiki", "D1")
}

test_allow_passes_destination_obligations if {
	want := {"allow": true, "reasons": ["allowed"], "obligations": {"record_payload_digest": true}}
	egress.decision == want with input as _to("audited", "D3") with data.nops.egress_destinations as _obliging
}

test_deny_class_above_destination_ceiling if {
	every destination in ["public-search", "partner-wiki"] {
		egress.decision == _denied(["class_above_destination_ceiling"]) with input as _to(destination, "D2")
	}
}

test_deny_class_above_tenant_ceiling if {
	egress.decision == _denied(["class_above_tenant_ceiling"]) with input as _as("globex", "payments-api", "D2")
}

test_deny_class_above_both_ceilings if {
	want := _denied(["class_above_destination_ceiling", "class_above_tenant_ceiling"])
	egress.decision == want with input as _as("globex", "partner-wiki", "D3")
}

test_deny_d4_never_leaves if {
	every destination in ["public-search", "claims-processor"] {
		egress.decision == _denied(["d4_never_leaves"]) with input as _to(destination, "D4")
	}
}

test_deny_d4_never_leaves_even_to_a_d4_ceiling if {
	levels := {"D0": {"rank": 0}, "D4": {"rank": 4}, "D5": {"rank": 5, "never_leaves": false}}
	destinations := {"vault": {"ceiling": "D5"}}
	tenants := {"acme": {"egress_ceiling": "D5"}}
	taxonomy := {"levels": object.union(levels, {"D4": {"never_leaves": true}})}
	doc := _to("vault", "D4")
	egress.decision == _denied(["d4_never_leaves"]) with input as doc with data.nops.taxonomy as taxonomy
		with data.nops.egress_destinations as destinations with data.nops.tenants as tenants
}

test_deny_unknown_classification if {
	every class in ["D5", "d2", "", "public", null, 2, ["D2"], {"level": "D2"}] {
		egress.decision == _denied(["unknown_classification"]) with input as _to("payments-api", class)
	}
}

test_deny_unknown_classification_when_rank_is_ill_typed if {
	want := _denied(["unknown_classification", "unknown_destination", "unknown_tenant"])
	egress.decision == want with input as _payments with data.nops.taxonomy as {"levels": {"D2": {"rank": "2"}}}
}

test_deny_unknown_destination if {
	every destination in ["nope", "", "PAYMENTS-API", null, 7, ["payments-api"]] {
		egress.decision == _denied(["unknown_destination"]) with input as _to(destination, "D0")
	}
}

test_deny_unknown_destination_when_its_ceiling_is_unusable if {
	every ceiling in ["D4", "D9", null, 2, ["D2"]] {
		dests := {"payments-api": {"ceiling": ceiling}}
		want := _denied(["unknown_destination"])
		egress.decision == want with input as _to("payments-api", "D0") with data.nops.egress_destinations as dests
	}
}

test_deny_unknown_destination_when_entry_is_not_an_object if {
	want := _denied(["unknown_destination"])
	doc := _to("payments-api", "D0")
	egress.decision == want with input as doc with data.nops.egress_destinations as {"payments-api": "D2"}
}

test_deny_unknown_tenant if {
	every tenant in ["initech", "", null, 3, ["acme"]] {
		egress.decision == _denied(["unknown_tenant"]) with input as _as(tenant, "payments-api", "D0")
	}
}

test_deny_unknown_tenant_when_tenant_data_is_missing if {
	egress.decision == _denied(["unknown_tenant"]) with input as _payments with data.nops.tenants as {}
}

test_deny_unknown_tenant_when_its_ceiling_is_unusable if {
	every ceiling in ["D4", "secret", null, {"D2": true}] {
		tenants := {"acme": {"egress_ceiling": ceiling}}
		egress.decision == _denied(["unknown_tenant"]) with input as _payments with data.nops.tenants as tenants
	}
}

test_deny_unknown_tenant_still_checks_the_destination_ceiling if {
	want := _denied(["class_above_destination_ceiling", "unknown_tenant"])
	egress.decision == want with input as _as("initech", "public-search", "D1")
}

test_deny_unknown_destination_still_checks_the_tenant_ceiling if {
	want := _denied(["class_above_tenant_ceiling", "unknown_destination"])
	egress.decision == want with input as _as("globex", "nope", "D2")
}

test_deny_malformed_obligations if {
	want := _denied(["malformed_obligations"])
	egress.decision == want with input as _to("sloppy", "D1") with data.nops.egress_destinations as _obliging
}

test_deny_withholds_destination_obligations if {
	want := _denied(["d4_never_leaves"])
	egress.decision == want with input as _to("audited", "D4") with data.nops.egress_destinations as _obliging
}

test_deny_empty_input if {
	want := _denied(["unknown_classification", "unknown_destination", "unknown_tenant"])
	egress.decision == want with input as {}
}

test_deny_non_object_input if {
	every doc in ["", 1, null, [], [_payments]] {
		want := _denied(["unknown_classification", "unknown_destination", "unknown_tenant"])
		egress.decision == want with input as doc
	}
}

test_deny_when_taxonomy_data_is_missing if {
	want := _denied(["unknown_classification", "unknown_destination", "unknown_tenant"])
	egress.decision == want with input as _payments with data.nops.taxonomy as {}
}
