"""Signed bundles for the tests: throwaway keys, scripts/build-bundle, tampering.

Every bundle here is built by the same script CI and operators use, from a
copy of policies/rego that a test may edit first.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POLICY_DIR, ROOT, TOOLS_BIN, wait_healthy

__all__ = [
    "KeyPair",
    "build_bundle",
    "bundle_fixture",
    "copy_policies",
    "deny_echo_get",
    "keys_fixture",
    "manifest",
    "other_keys_fixture",
    "rewrite_bundle",
    "wait_healthy",
]

BUILD_BUNDLE = ROOT / "scripts" / "build-bundle"


class KeyPair:
    """A throwaway ES256 key pair in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.private = directory / "private.pem"
        self.public = directory / "public.pem"
        subprocess.run(
            [
                *("openssl", "genpkey", "-algorithm", "EC"),
                *("-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(self.private)),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(self.private), "-pubout", "-out", str(self.public)],
            check=True,
            capture_output=True,
        )


def build_bundle(
    out: Path, keys: KeyPair, *, policy_dir: Path = POLICY_DIR, revision: str | None = None
) -> str:
    """Build and sign a bundle with scripts/build-bundle; return its revision.

    The file appears whole (built aside, then renamed), so an OPA watching
    ``out`` never reads half of one.
    """
    partial = out.with_name(out.name + ".partial")
    args = [str(BUILD_BUNDLE), "-o", str(partial), "--signing-key", str(keys.private)]
    args += ["--policy-dir", str(policy_dir)]
    if revision is not None:
        args += ["--revision", revision]
    env = {**os.environ, "TOOLS_BIN": str(TOOLS_BIN)}
    subprocess.run(args, check=True, capture_output=True, env=env)
    partial.replace(out)
    return str(manifest(out)["revision"])


def manifest(bundle: Path) -> dict[str, Any]:
    with tarfile.open(bundle) as archive:
        member = archive.extractfile("/.manifest")
        assert member is not None
        result: dict[str, Any] = json.load(member)
        return result


def rewrite_bundle(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a bundle, passing each file through ``change`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for member in tin.getmembers():
            handle = tin.extractfile(member)
            assert handle is not None
            data = change(member.name, handle.read())
            if data is not None:
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))


def deny_echo_get(policies: Path) -> None:
    """Edit a policy copy so that GET on the echo route is no longer allowed."""
    routes = policies / "nops" / "routes" / "data.json"
    routes.write_text(routes.read_text().replace('"GET", "HEAD", "POST"', '"POST"', 1))


@pytest.fixture(scope="module", name="keys")
def keys_fixture(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A throwaway signing key pair for the module."""
    return KeyPair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module", name="other_keys")
def other_keys_fixture(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A second key pair, which the verifying OPA does not trust."""
    return KeyPair(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="module", name="bundle")
def bundle_fixture(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Path:
    """The repository's policies, built and signed once for the module."""
    path = tmp_path_factory.mktemp("bundle") / "bundle.tar.gz"
    build_bundle(path, keys)
    return path


def copy_policies(directory: Path) -> Path:
    """A private copy of policies/rego a test may edit."""
    target = directory / "rego"
    shutil.copytree(POLICY_DIR, target)
    return target
