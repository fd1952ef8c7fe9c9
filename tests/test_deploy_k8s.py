"""deploy/k8s: valid Kubernetes objects (offline schemas), agreeing with each other
and with the code they run (probe paths, ports, labels, secrets, security)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import pytest
import yaml
import yarl
from aiohttp import web

from bus.app import create_app as create_bus_app
from bus.config import DEFAULT_BUS_CONFIG, config_from_env
from gateway.app import create_app as create_gateway_app
from gateway.config import load_config
from registry.__main__ import DSN_FILE_ENV
from registry.app import create_app as create_registry_app
from registry.settings import RegistrySettings
from tests.conftest import ROOT, TOOLS_BIN
from tests.deploykit import inline_secrets, load_yaml, load_yaml_documents, strings

K8S: Final = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes release the manifests are checked against, and the newest
#: the pinned kubernetes-validate knows.
KUBE_VERSIONS: Final = ("1.30.0", kubernetes_validate.latest_version() + ".0")
#: Secrets the manifests reference (created by the operator; docs/operations.md).
SECRETS: Final = {
    "nops-postgres": {"dsn"},
    "nops-redis": {"url"},
    "nops-bundle-verify": {"verify.pem"},
    "nops-bundle-signing": {"signing.pem"},
}
#: What each referenced Secret key looks like (the compose .example files).
EXAMPLES: Final = {
    ("nops-postgres", "dsn"): ROOT / "deploy" / "secrets" / "postgres_dsn.example",
    ("nops-redis", "url"): ROOT / "deploy" / "secrets" / "redis_url.example",
}
#: Services outside these manifests, reached by label (see networkpolicy.yaml).
EXTERNAL: Final = {"redis": 6379, "postgresql": 5432}


def _objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in load_yaml_documents(K8S / name):
            found.append((name, doc))
    return found


OBJECTS: Final = _objects()


def _kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in OBJECTS if d["kind"] == kind}


def _pod(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _containers(deployment: Mapping[str, Any], init: bool = True) -> list[dict[str, Any]]:
    pod = _pod(deployment)
    return [*pod["containers"], *(pod.get("initContainers", []) if init else [])]


def _container(deployment: str, name: str) -> dict[str, Any]:
    for container in _containers(_kind("Deployment")[deployment]):
        if container["name"] == name:
            return container
    raise AssertionError(f"{deployment} has no container {name}")


def _argv(container: Mapping[str, Any]) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


def _flag(argv: list[str], name: str) -> str:
    """The value of ``--name V`` or ``--name=V`` in ``argv``."""
    for index, arg in enumerate(argv):
        if arg == name:
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _deployment_for(selector: Mapping[str, str]) -> list[str]:
    return [
        name
        for name, d in _kind("Deployment").items()
        if _matches(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def _secret_file(
    container: Mapping[str, Any], pod: Mapping[str, Any], path: str
) -> tuple[str, str]:
    """The (Secret, key) a file path inside ``container`` comes from."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            secret = volumes[mount["name"]].get("secret")
            assert secret is not None, f"{path} is not in a Secret volume"
            item = path.removeprefix(prefix)
            keys = {i["path"]: i["key"] for i in secret.get("items", [])}
            assert item in keys, f"{path}: no item {item} in {secret['secretName']}"
            return secret["secretName"], keys[item]
    raise AssertionError(f"{path} is under no volume mount of {container['name']}")


def _env_from_examples(deployment: str, container: str) -> dict[str, str]:
    """The container's environment, secret file paths mapped to the .example files."""
    pod = _pod(_kind("Deployment")[deployment])
    spec = _container(deployment, container)
    env = {}
    for item in spec.get("env", []):
        value = item["value"]
        if value.startswith("/etc/nops/secrets/"):
            value = str(EXAMPLES[_secret_file(spec, pod, value)])
        env[item["name"]] = value
    return env


def _gateway_config() -> Any:
    return load_config(K8S / "gateway.toml", environ=_env_from_examples("nops-gateway", "gateway"))


def _routes(app: web.Application) -> set[str]:
    return {r.canonical for r in app.router.resources()}


class TestSchemas:
    def test_kustomization_lists_every_manifest(self) -> None:
        """Each manifest file is a kustomization resource (none forgotten, none missing)."""
        kustomization = load_yaml(K8S / "kustomization.yaml")
        listed = set(kustomization["resources"])
        on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk
        generated = [f for g in kustomization["configMapGenerator"] for f in g["files"]]
        assert all((K8S / f).is_file() for f in generated)

    @pytest.mark.parametrize("version", KUBE_VERSIONS)
    @pytest.mark.parametrize(
        ("source", "obj"),
        [pytest.param(s, d, id=f"{d['kind']}/{d['metadata']['name']}") for s, d in OBJECTS],
    )
    def test_object_is_valid_for_kubernetes(
        self, source: str, obj: dict[str, Any], version: str
    ) -> None:
        """Each object validates (strict: no unknown fields) against the Kubernetes schema."""
        kubernetes_validate.validate(obj, version, strict=True)

    @pytest.mark.parametrize(
        ("change", "error"),
        [
            pytest.param(
                lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenessprobe={}),
                "'livenessprobe' was unexpected",
                id="unknown-field",
            ),
            pytest.param(lambda d: d["spec"].update(replicas="2"), "is not of type", id="type"),
        ],
    )
    def test_schema_check_refuses_a_broken_object(self, change: Any, error: str) -> None:
        """The offline schema check can fail: a typo or a wrong type is an error."""
        broken = copy.deepcopy(_kind("Deployment")["nops-gateway"])
        change(broken)
        with pytest.raises(kubernetes_validate.ValidationError, match=error):
            kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)

    def test_kustomize_build_renders_valid_objects(self) -> None:
        """The pinned `kustomize build` (scripts/tools) renders the directory into objects
        that validate, in namespace nops, with the generated ConfigMap."""
        tools = TOOLS_BIN / "kustomize"
        assert tools.exists(), f"{tools} is missing: run scripts/tools"
        argv = [str(tools), "build"]
        done = subprocess.run([*argv, str(K8S)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rendered = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
        assert len(rendered) == len(OBJECTS) + 1  # + the generated ConfigMap
        for obj in rendered:
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "nops", obj["metadata"]["name"]

    def test_kustomize_build_refuses_a_missing_resource(self, tmp_path: Path) -> None:
        """The render can fail: a kustomization naming a file that is not there is an error."""
        copy_dir = tmp_path / "k8s"
        shutil.copytree(K8S, copy_dir)
        kustomization = copy_dir / "kustomization.yaml"
        doc = yaml.safe_load(kustomization.read_text())
        doc["resources"].append("missing.yaml")
        kustomization.write_text(yaml.safe_dump(doc))
        done = subprocess.run(
            [str(TOOLS_BIN / "kustomize"), "build", str(copy_dir)], capture_output=True, text=True
        )
        assert done.returncode != 0
        assert "missing.yaml" in done.stderr


class TestGateway:
    def test_probes_exist_in_the_gateway(self) -> None:
        """Liveness /health and readiness /_readyz are routes of the gateway app."""
        gateway = _container("nops-gateway", "gateway")
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/_readyz"
        assert {"/health", "/_readyz"} <= _routes(create_gateway_app(_gateway_config()))

    def test_ports_match_the_config(self) -> None:
        """The container port, the Service and the OPA sidecar agree with gateway.toml."""
        config = _gateway_config()
        gateway = _container("nops-gateway", "gateway")
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert ports["http"] == config.server.port
        assert config.server.host == "0.0.0.0"
        opa = _argv(_container("nops-gateway", "opa"))
        policy = yarl.URL(config.policy.url)
        assert _flag(opa, "--addr") == f"{policy.host}:{policy.port}"
        assert policy.host == "127.0.0.1"  # SECURITY: OPA's API stays inside the pod
        service = _kind("Service")["nops-gateway"]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        metrics = getattr(config, "metrics", None)
        if metrics is not None:  # once the [metrics] listener is configured
            assert (metrics.enabled, metrics.host, metrics.port) == (True, "0.0.0.0", 9090)

    def test_upstreams_are_services_of_these_manifests(self) -> None:
        """Every route's upstream (and the agent registry) is a Service here, on its port."""
        services = {
            name: {p["port"] for p in s["spec"]["ports"]} for name, s in _kind("Service").items()
        }
        for route in _gateway_config().routes:
            target = route.upstream or (route.agent.registry_url if route.agent else "")
            url = yarl.URL(target)
            assert url.host in services, route.name
            assert url.port in services[url.host], route.name

    def test_metrics_are_annotated_for_prometheus(self) -> None:
        """Scrape annotations name the metrics container port (9090) and /metrics."""
        deployment = _kind("Deployment")["nops-gateway"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        gateway = _container("nops-gateway", "gateway")
        ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"] == 9090
        assert annotations["prometheus.io/path"] == "/metrics"

    def test_opa_sidecar_is_fed_the_signed_bundle(self) -> None:
        """The sidecar uses deploy/opa/config.yaml (in the image), polls the bundle Service,
        and reads the verification key from the nops-bundle-verify Secret."""
        opa = _container("nops-gateway", "opa")
        argv = _argv(opa)
        assert _flag(argv, "--config-file") == "/app/deploy/opa/config.yaml"
        assert "COPY deploy/opa ./deploy/opa" in (ROOT / "Dockerfile").read_text()
        sets = [a.split("=", 1)[1] for a in argv if a.startswith("--set=")]
        url = yarl.URL(dict(s.split("=", 1) for s in sets)["services.bundles.url"])
        server = _kind("Service")[str(url.host)]
        assert url.port in {p["port"] for p in server["spec"]["ports"]}
        key_file = _flag(argv, "--set-file").removeprefix("keys.nops-bundle.key=")
        pod = _pod(_kind("Deployment")["nops-gateway"])
        assert _secret_file(opa, pod, key_file) == ("nops-bundle-verify", "verify.pem")
        assert opa["readinessProbe"]["httpGet"]["path"] == "/health?bundles"
        diagnostic = _flag(argv, "--diagnostic-addr")
        probe_port = {p["name"]: p["containerPort"] for p in opa["ports"]}
        assert diagnostic == f"0.0.0.0:{probe_port[opa['readinessProbe']['httpGet']['port']]}"

    def test_bundle_server_builds_with_the_signing_key_in_its_init_container_only(self) -> None:
        """Only the init container that signs sees the signing key; the server serves the file."""
        deployment = _kind("Deployment")["nops-bundle-server"]
        pod = _pod(deployment)
        init = pod["initContainers"][0]
        server = pod["containers"][0]
        key = _flag(_argv(init), "--signing-key")
        assert _secret_file(init, pod, key) == ("nops-bundle-signing", "signing.pem")
        assert _flag(_argv(init), "-o") == _flag(_argv(server), "--file")
        signing_mounts = [
            (c["name"], m["name"])
            for c in _containers(_kind("Deployment")["nops-bundle-server"])
            for m in c.get("volumeMounts", [])
            if m["name"] == "bundle-signing"
        ]
        assert signing_mounts == [("build-bundle", "bundle-signing")]
        for name, other in _kind("Deployment").items():
            if name != "nops-bundle-server":
                volumes = [v.get("secret", {}).get("secretName") for v in _pod(other)["volumes"]]
                assert "nops-bundle-signing" not in volumes, name


class TestServices:
    @pytest.mark.parametrize(
        ("deployment", "app"),
        [
            pytest.param(
                "nops-registry",
                lambda: create_registry_app(RegistrySettings(dsn="postgresql://x/y")),
                id="registry",
            ),
            pytest.param("nops-bus", lambda: create_bus_app(DEFAULT_BUS_CONFIG), id="bus"),
        ],
    )
    def test_registry_and_bus_probes_and_ports(self, deployment: str, app: Any) -> None:
        """Probe paths are routes of the service; its --port is the container port."""
        container = _pod(_kind("Deployment")[deployment])["containers"][0]
        paths = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
        assert paths <= _routes(app())
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
        assert int(_flag(_argv(container), "--port")) == port

    def test_registry_and_bus_read_their_secrets_from_files(self) -> None:
        """The variables are the services' own, and point into Secret volumes."""
        assert list(_env_from_examples("nops-registry", "registry")) == [DSN_FILE_ENV]
        bus = config_from_env(_env_from_examples("nops-bus", "bus"))
        assert bus.redis_url.startswith("redis://:CHANGE-ME-random-hex@")
        registry_bus = _flag(_argv(_container("nops-registry", "registry")), "--bus-url")
        url = yarl.URL(registry_bus)
        assert url.port in {p["port"] for p in _kind("Service")[str(url.host)]["spec"]["ports"]}

    def test_services_select_a_deployment_and_name_its_ports(self) -> None:
        """Every Service selects exactly one Deployment, on container ports it declares."""
        for name, service in _kind("Service").items():
            owners = _deployment_for(service["spec"]["selector"])
            assert len(owners) == 1, name
            declared = {
                p["name"]
                for c in _containers(_kind("Deployment")[owners[0]])
                for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in declared, f"{name}: {port['targetPort']}"

    def test_deployment_selectors_match_their_pods(self) -> None:
        """A Deployment's selector matches its own pod template labels."""
        for name, deployment in _kind("Deployment").items():
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert _matches(selector, deployment["spec"]["template"]["metadata"]["labels"]), name


class TestAvailability:
    def test_pdb_and_hpa_target_the_gateway(self) -> None:
        """The PDB selects the gateway pods; the HPA scales its Deployment and keeps
        more replicas than the PDB needs available."""
        pdb = _kind("PodDisruptionBudget")["nops-gateway"]
        assert _deployment_for(pdb["spec"]["selector"]["matchLabels"]) == ["nops-gateway"]
        hpa = _kind("HorizontalPodAutoscaler")["nops-gateway"]
        target = hpa["spec"]["scaleTargetRef"]
        deployment = _kind("Deployment")[target["name"]]
        assert (target["apiVersion"], target["kind"]) == (
            deployment["apiVersion"],
            deployment["kind"],
        )
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
        assert deployment["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


class TestNetworkPolicy:
    def _policies(self) -> dict[str, dict[str, Any]]:
        return _kind("NetworkPolicy")

    def test_everything_is_denied_by_default(self) -> None:
        """An empty-selector policy denies all ingress and egress in the namespace."""
        default = self._policies()["nops-default-deny"]["spec"]
        assert default == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    def test_selectors_match_deployments(self) -> None:
        """Every policy selects exactly one Deployment's pods; every pod peer is one of
        ours or an external dependency the docs name."""
        for name, policy in self._policies().items():
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if selector:
                assert len(_deployment_for(selector)) == 1, name
            for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]:
                for peer in [*rule.get("from", []), *rule.get("to", [])]:
                    labels = peer.get("podSelector", {}).get("matchLabels")
                    if labels and "namespaceSelector" not in peer:
                        app = labels["app.kubernetes.io/name"]
                        assert app in EXTERNAL or _deployment_for(labels), f"{name}: {app}"

    def test_gateway_ingress_is_8080_from_clients_and_9090_from_monitoring(self) -> None:
        """Only the proxy port from the allowed namespaces, and metrics from monitoring."""
        ingress = self._policies()["nops-gateway"]["spec"]["ingress"]
        rules = {
            tuple(p["port"] for p in rule["ports"]): rule["from"][0]["namespaceSelector"][
                "matchLabels"
            ]
            for rule in ingress
        }
        assert rules == {
            (8080,): {"nops.io/gateway-clients": "true"},
            (9090,): {"kubernetes.io/metadata.name": "monitoring"},
        }

    def test_gateway_egress_is_dns_and_its_dependencies_only(self) -> None:
        """Egress: DNS, Redis, PostgreSQL, the registry, the bus and the bundle server."""
        egress = self._policies()["nops-gateway"]["spec"]["egress"]
        allowed = set()
        for rule in egress:
            peer = rule["to"][0]
            target = peer["podSelector"]["matchLabels"].get(
                "app.kubernetes.io/name", peer["podSelector"]["matchLabels"].get("k8s-app")
            )
            for port in rule["ports"]:
                allowed.add((target, port["protocol"], port["port"]))
        service_ports = {
            name: next(p["port"] for p in s["spec"]["ports"])
            for name, s in _kind("Service").items()
        }
        assert allowed == {
            ("kube-dns", "UDP", 53),
            ("kube-dns", "TCP", 53),
            ("redis", "TCP", EXTERNAL["redis"]),
            ("postgresql", "TCP", EXTERNAL["postgresql"]),
            ("nops-registry", "TCP", service_ports["nops-registry"]),
            ("nops-bus", "TCP", service_ports["nops-bus"]),
            ("nops-bundle-server", "TCP", service_ports["nops-bundle-server"]),
        }
        # The dependencies' ports are the ones the config and the example secrets use.
        config = _gateway_config()
        assert yarl.URL(config.dependencies.redis_url).port == EXTERNAL["redis"]
        assert yarl.URL(config.dependencies.postgres_dsn).port == EXTERNAL["postgresql"]

    def test_every_service_port_is_reachable_by_its_clients(self) -> None:
        """The bus, registry and bundle server admit their clients on their Service port."""
        for name in ("nops-bus", "nops-registry", "nops-bundle-server"):
            ingress = self._policies()[name]["spec"]["ingress"]
            ports = {p["port"] for rule in ingress for p in rule["ports"]}
            service = _kind("Service")[name]
            assert ports == {p["port"] for p in service["spec"]["ports"]}, name
            peers = [p["podSelector"]["matchLabels"] for r in ingress for p in r["from"]]
            assert {"app.kubernetes.io/name": "nops-gateway"} in peers, name


class TestSecurity:
    def test_pods_run_as_non_root_with_read_only_roots(self) -> None:
        """Every pod is non-root; every container has a read-only root, no escalation,
        no capabilities, requests and limits."""
        for name, deployment in _kind("Deployment").items():
            pod = _pod(deployment)
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True, name
            assert context["runAsUser"] == 10001, name
            assert pod["automountServiceAccountToken"] is False, name
            for container in _containers(deployment):
                where = f"{name}/{container['name']}"
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"]["drop"] == ["ALL"], where
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][part]), where

    def test_image_uid_matches_run_as_user(self) -> None:
        """The image's USER is the uid the pods run as."""
        user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
        assert user is not None
        assert (int(user.group(1)), int(user.group(2))) == (10001, 10001)

    def test_secrets_are_references_only(self) -> None:
        """No Secret object and no secret value is in the manifests; every referenced
        Secret and key is one the docs tell the operator to create."""
        assert not [d for _, d in OBJECTS if d["kind"] == "Secret"]
        pairs = [pair for _, d in OBJECTS for pair in strings(d)]
        for _, d in OBJECTS:
            if d["kind"] == "Deployment":
                for container in _containers(d):
                    pairs += [(f"env.{e['name']}", e["value"]) for e in container.get("env", [])]
        assert inline_secrets(pairs) == []
        referenced: dict[str, set[str]] = {}
        for deployment in _kind("Deployment").values():
            for volume in _pod(deployment)["volumes"]:
                if "secret" in volume:
                    keys = {i["key"] for i in volume["secret"]["items"]}
                    referenced.setdefault(volume["secret"]["secretName"], set()).update(keys)
        assert referenced == SECRETS
        operations = (ROOT / "docs" / "operations.md").read_text()
        for secret, keys in SECRETS.items():
            assert secret in operations, secret
            for key in keys:
                assert f"--from-file={key}=" in operations, key

    def test_images_are_pinned_by_the_kustomization(self) -> None:
        """Every container runs our image, whose tag the kustomization pins (never latest)."""
        images = load_yaml(K8S / "kustomization.yaml")["images"]
        assert [i["name"] for i in images] == ["nops-gateway"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", images[0]["newTag"])
        for name, deployment in _kind("Deployment").items():
            assert {c["image"] for c in _containers(deployment)} == {"nops-gateway"}, name
