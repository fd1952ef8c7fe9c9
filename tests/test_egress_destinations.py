"""The destinations file: frozen destinations, bad keys named, ceilings agree with the policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import egress
from egress.destinations import DestinationError, load_destinations, parse_destinations

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"base_url": "https://api.example", "ceiling": "D2"}


def _doc(**destination: Any) -> dict[str, Any]:
    return {"version": 1, "destinations": {"api": {**GOOD, **destination}}}


class TestParse:
    def test_defaults(self) -> None:
        """A minimal destination gets the documented defaults and is frozen."""
        api = parse_destinations(_doc())["api"]
        assert (api.host, api.port, api.ceiling, api.internal, api.mode) == (
            "api.example",
            443,
            "D2",
            False,
            None,
        )
        assert api.allows_path("/anything")
        with pytest.raises(AttributeError):
            api.ceiling = "D3"  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("table", "key"),
        [
            ({"version": 2}, "version"),
            (_doc(ceiling="D4"), "destinations.api.ceiling"),
            (_doc(ceiling="D9"), "destinations.api.ceiling"),
            (_doc(base_url="ftp://x"), "destinations.api.base_url"),
            (_doc(base_url="https://user:pw@api.example"), "destinations.api.base_url"),
            (_doc(base_url="http://0x7f.1"), "destinations.api.base_url"),
            (_doc(methods=["TRACE"]), "destinations.api.methods"),
            (_doc(path_prefixes=["v1"]), "destinations.api.path_prefixes"),
            (_doc(timeout_s=0), "destinations.api.timeout_s"),
            (_doc(internal="yes"), "destinations.api.internal"),
            (_doc(mode="audit"), "destinations.api.mode"),
            (_doc(client_cert_file="c.pem"), "destinations.api.client_cert_file"),
            (_doc(surprise=1), "destinations.api.surprise"),
            ({"version": 1, "destinations": {"API": GOOD}}, "destinations.API"),
        ],
        ids=[
            "version",
            "d4",
            "no-class",
            "scheme",
            "userinfo",
            "odd-address",
            "method",
            "prefix",
            "timeout",
            "internal",
            "mode",
            "cert-without-key",
            "unknown",
            "name",
        ],
    )
    def test_bad_key_is_named(self, table: dict[str, Any], key: str) -> None:
        """Every invalid value is refused with the dotted key that holds it."""
        with pytest.raises(DestinationError) as caught:
            parse_destinations(table)
        assert caught.value.key == key

    def test_shipped_file_agrees_with_the_policy_data(self) -> None:
        """config/egress.toml names the policy's destinations with the policy's ceilings."""
        shipped = load_destinations(ROOT / "config" / "egress.toml")
        data_file = ROOT / "policies" / "rego" / "nops" / "egress_destinations" / "data.json"
        policy = json.loads(data_file.read_text())
        assert {n: d.ceiling for n, d in shipped.items()} == {
            n: d["ceiling"] for n, d in policy.items()
        }


def test_egress_does_not_import_gateway() -> None:
    """The egress package stands on its own."""
    import subprocess
    import sys

    code = "import egress.connector, egress.destinations, sys; print('gateway' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert egress.__doc__
