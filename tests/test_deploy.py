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

    def test_paths_the_deployments_run_are_in_the_image(self) -> None:
        """Every /app/... path that compose.yaml or deploy/k8s runs is copied into the image,
        and the bundle directory is the gateway user's."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        copied = re.findall(r"^COPY (?!--from)\S+ \./(\S+)$", dockerfile, re.MULTILINE)
        texts = [(ROOT / "compose.yaml").read_text()]
        texts += [p.read_text() for p in (ROOT / "deploy" / "k8s").glob("*.yaml")]
        used = {m for text in texts for m in re.findall(r"/app/([\w./-]+)", text)}
        assert used >= {"scripts/build-bundle", "deploy/opa/config.yaml"}
        for path in used:
            assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied), path
            assert (ROOT / path).exists(), path
        assert "mkdir -p /var/lib/nops/audit /var/lib/nops/bundles" in dockerfile

    def test_dockerignore_lets_in_exactly_what_the_image_copies(self) -> None:
        """The build context starts empty ('*') and lets in each COPY source, nothing else."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        sources = set(re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE))
        wanted = {s.rstrip("/") for line in sources for s in line.split()}
        lines = (ROOT / ".dockerignore").read_text().splitlines()
        assert "*" in lines
        allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
        assert allowed - {"Dockerfile"} == wanted
