"""The deployable artefacts stay in step with the code they ship."""

from __future__ import annotations

import re

from gateway.config import load_config
from tests.conftest import ROOT


class TestArtefacts:
    def test_dockerfile_pins_the_same_opa_as_the_tools_script(self) -> None:
        """The image and the test suite run the same OPA release."""
        tools = (ROOT / "scripts" / "tools").read_text()
        dockerfile = (ROOT / "Dockerfile").read_text()
        pinned = re.search(r"^OPA_VERSION=(\S+)$", tools, re.MULTILINE)
        image = re.search(r"^ARG OPA_VERSION=(\S+)$", dockerfile, re.MULTILINE)
        assert pinned is not None
        assert image is not None
        assert image.group(1) == pinned.group(1)

    def test_compose_config_is_valid(self) -> None:
        """config/compose.toml, used by compose.yaml, passes check-config."""
        compose = (ROOT / "compose.yaml").read_text()
        assert "config/compose.toml" in compose
        config = load_config(ROOT / "config" / "compose.toml", environ={})
        assert config.policy.url == "http://opa:8181"
        upstreams = {r.name: r.upstream for r in config.routes if r.kind == "upstream"}
        assert set(upstreams.values()) == {
            "http://echo:8081",
            "http://bus:8082",
            "http://registry:8083",
        }
        assert upstreams["bus"] == "http://bus:8082"
        assert upstreams["registry"] == "http://registry:8083"
        agents = [r.agent for r in config.routes if r.agent is not None]
        assert [a.registry_url for a in agents] == ["http://registry:8083"]

    def test_image_copies_every_package(self) -> None:
        """Each top-level package named in pyproject is copied into the image."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        for package in ("gateway", "egress", "registry", "bus", "audit", "policies", "config"):
            assert f"COPY {package} ./{package}" in dockerfile

    def test_image_audit_data_is_writable_and_compose_keeps_it(self) -> None:
        """The audit paths point into a directory the image gives the gateway user;
        compose (read-only root) mounts a volume there and records into PostgreSQL."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        compose = (ROOT / "compose.yaml").read_text()
        assert "chown -R gateway:gateway /var/lib/nops" in dockerfile
        assert "NOPS_GATEWAY__AUDIT__PATH=/var/lib/nops/audit/audit.jsonl" in dockerfile
        assert "NOPS_GATEWAY__AUDIT__SPOOL_PATH=/var/lib/nops/audit/spool.jsonl" in dockerfile
        assert "- audit:/var/lib/nops/audit" in compose
        assert "NOPS_GATEWAY__AUDIT__STORE: postgres" in compose
