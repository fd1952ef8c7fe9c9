"""The optional in-process engine: the policy compiled to WebAssembly, evaluated by wasmtime.

Selected with ``[policy] engine = "embedded"`` (ADR: the embedded policy
engine). It loads exactly what the supervised OPA would
(gateway/policy/supervisor.py), through the same pinned ``opa`` binary:

- from ``bundle_dir``: the directory's files without tests, read once into a
  :class:`~gateway.policy.supervisor.PolicySnapshot` and named by its
  revision, compiled from a private copy of those bytes with ``opa build
  --bundle -t wasm --revision``;
- from ``bundle_file``: a private copy of the signed bundle, compiled with
  ``opa build --bundle -t wasm --verification-key``, so OPA's own code verifies
  the signature (a bundle that does not verify is never compiled) and the
  module is built from the very bytes that were verified.

Only the decision path is compiled as an entrypoint. The directory (or file)
is watched like the supervised OPA's: a change is compiled and swapped in
atomically with its revision; one that does not build or verify is logged and
the last good policy stays. Each evaluation may burn at most
:data:`DECISION_FUEL` of wasmtime's fuel. Every decision carries ``nops=<revision>``, the
form OPA's provenance gives, so the decision cache, audit records and shadow
comparisons read the same with either engine.

An evaluation that aborts (an evaluation error, for example two rule values
in conflict, where OPA's server answers 500) raises
:class:`~gateway.policy.engine.PolicyEngineError`: the request fails closed
with the same 503 as an unreachable OPA. Evaluations run on the event loop:
they take tens of microseconds, less than a hand-off to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import io
import logging
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from gateway.policy.engine import Decision, PolicyEngineError
from gateway.policy.result import interpret
from gateway.policy.supervisor import LocalBundle, PolicySnapshot
from gateway.policy.wasm import WasmPolicy, WasmPolicyError

__all__ = [
    "BUNDLE_NAME",
    "DECISION_FUEL",
    "CompiledPolicy",
    "EmbeddedEngine",
    "EmbeddedPolicyError",
    "SignedBundle",
    "compile_policy",
]

_log = logging.getLogger("gateway.policy.embedded")

#: The bundle name OPA reports revisions under (the supervised OPA's bundle is "nops").
BUNDLE_NAME: Final = "nops"
_BUILD_TIMEOUT_S: Final = 30.0
_WATCH_S: Final = 0.5
#: Seconds between reads of a signed bundle file (OPA's bundle plugin polls every 1-2 s).
_BUNDLE_POLL_S: Final = 1.0
#: The only files a wasm bundle built here may hold besides its policy sources.
_MODULE: Final = "/policy.wasm"
_DATA: Final = "/data.json"
#: Wasm fuel (about one unit per instruction) one decision may burn: ~1,000x
#: what today's authz decision takes (~1.7e5). Past it the evaluation stops
#: and the request fails closed, as when OPA exceeds policy.timeout_s.
DECISION_FUEL: Final = 200_000_000


class EmbeddedPolicyError(RuntimeError):
    """The policy could not be compiled, verified or loaded."""


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A loaded module, its entrypoints' ids, its base data and its revision."""

    module: WasmPolicy
    #: ``name=revision`` as OPA's provenance gives it ("nops=" when unknown).
    revision: str
    data: Any

    def entrypoint(self, path: str) -> int:
        try:
            return self.module.entrypoints[path]
        except KeyError:
            raise EmbeddedPolicyError(f"the module has no entrypoint {path}") from None


@dataclass(frozen=True, slots=True)
class SignedBundle:
    """The bytes of a signed bundle file, and what verifies them."""

    bundle: LocalBundle
    body: bytes


async def compile_policy(
    binary: Path,
    entrypoints: tuple[str, ...],
    source: PolicySnapshot | SignedBundle,
    *,
    fuel: int | None = DECISION_FUEL,
) -> CompiledPolicy:
    """Build ``source`` to wasm with ``opa build`` (``binary``: an absolute path) and load it.

    ``fuel`` bounds each evaluation (None: unbounded).
    """
    with tempfile.TemporaryDirectory(prefix="nops-wasm-") as tmp:
        work = Path(tmp)
        out = work / "wasm.tar.gz"
        args = [str(binary), "build", "--bundle", "--target", "wasm", "-o", str(out)]
        for path in entrypoints:
            args += ["--entrypoint", path]
        if isinstance(source, PolicySnapshot):
            files = work / "src"
            await asyncio.to_thread(source.write, files)
            args += ["--revision", source.revision, str(files)]
        else:
            signed = work / "bundle.tar.gz"
            await asyncio.to_thread(signed.write_bytes, source.body)
            key = source.bundle
            # SECURITY: OPA verifies the signature over these bytes before compiling them.
            args += [
                *("--verification-key", str(key.verification_key_file)),
                *("--verification-key-id", key.key_id),
                *("--signing-alg", key.signing_alg),
                str(signed),
            ]
        await _run(args, cwd=work)
        built = await asyncio.to_thread(out.read_bytes)
    policy = await asyncio.to_thread(_load, built, fuel)
    _release_heap()
    return policy


def _release_heap() -> None:
    """Give the compiler's freed working memory back to the OS (glibc only).

    Compiling the module with Cranelift touches ~20 MB that glibc keeps in its
    arenas after it is freed; ``malloc_trim`` returns ~8 MB of it, which
    keeps the embedded gateway's idle RSS under 100 MB (bench/RESULTS.md).
    Elsewhere (musl, macOS) it does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _load(built: bytes, fuel: int | None) -> CompiledPolicy:
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(built)) as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member) if member.isfile() else None
            if handle is not None:
                files["/" + member.name.lstrip("/")] = handle.read()
    manifest = orjson.loads(files.get("/.manifest", b"{}"))
    modules = manifest.get("wasm", []) if isinstance(manifest, dict) else []
    if {m.get("module") for m in modules if isinstance(m, dict)} != {_MODULE}:
        raise EmbeddedPolicyError("the built bundle does not hold exactly one policy.wasm")
    data_files = [n for n in files if n.rsplit("/", 1)[-1] in ("data.json", "data.yaml")]
    if data_files not in ([], [_DATA]):
        raise EmbeddedPolicyError(f"unexpected data files in the built bundle: {data_files}")
    data_bytes = files.get(_DATA, b"{}")
    try:
        module = WasmPolicy(files[_MODULE], data_bytes, fuel=fuel)
    except WasmPolicyError as exc:
        raise EmbeddedPolicyError(str(exc)) from None
    revision = manifest.get("revision", "") if isinstance(manifest, dict) else ""
    return CompiledPolicy(
        module=module,
        revision=f"{BUNDLE_NAME}={revision if isinstance(revision, str) else ''}",
        data=orjson.loads(data_bytes),
    )


async def _run(args: list[str], *, cwd: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,  # opa build reports load errors on stdout
    )
    try:
        async with asyncio.timeout(_BUILD_TIMEOUT_S):
            errors, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise EmbeddedPolicyError("opa build timed out") from None
    if process.returncode != 0:
        raise EmbeddedPolicyError(
            "opa build failed: " + errors.decode(errors="replace").strip()[:2000]
        )


class EmbeddedEngine:
    """Evaluates ``decision_path`` in-process; a :class:`~gateway.policy.engine.PolicyEngine`."""

    #: What the admin plane shows where an OPA engine shows its address.
    url = "in-process"

    def __init__(
        self,
        binary: Path,
        policy_dir: Path,
        *,
        decision_path: str,
        bundle: LocalBundle | None = None,
        watch_s: float | None = None,
    ) -> None:
        self.binary = binary.absolute()  # opa build runs in a scratch directory
        self.policy_dir = policy_dir
        self.bundle = bundle
        self.decision_path = decision_path
        self._watch_s = watch_s if watch_s is not None else (
            _BUNDLE_POLL_S if bundle is not None else _WATCH_S
        )  # fmt: skip
        self._policy: CompiledPolicy | None = None
        self._entrypoint = 0
        self._watcher: asyncio.Task[None] | None = None
        #: Digest of the source last compiled (snapshot revision or bundle bytes).
        self._seen = ""

    @property
    def policy(self) -> CompiledPolicy | None:
        """The policy in force (None before :meth:`start`)."""
        return self._policy

    async def start(self) -> None:
        """Compile and load the policy; raise :class:`EmbeddedPolicyError` if it cannot be."""
        if not self.binary.is_file():
            raise EmbeddedPolicyError(
                f"OPA binary not found at {self.binary}; the embedded engine compiles with it"
            )
        try:
            await self._reload()
        except OSError as exc:
            raise EmbeddedPolicyError(f"cannot read the policy: {exc}") from None
        self._watcher = asyncio.create_task(self._watch(), name="embedded-policy-watch")

    async def _reload(self) -> None:
        """Compile and swap in the source if it changed since the last load."""
        if self.bundle is not None:
            body = await asyncio.to_thread(self.bundle.file.read_bytes)
            digest = "sha256-" + hashlib.sha256(body).hexdigest()
            if digest == self._seen:
                return
            self._seen = digest
            source: PolicySnapshot | SignedBundle = SignedBundle(self.bundle, body)
        else:
            snapshot = await asyncio.to_thread(PolicySnapshot.read, self.policy_dir)
            if snapshot.revision == self._seen:
                return
            self._seen = snapshot.revision
            source = snapshot
        compiled = await compile_policy(self.binary, (self.decision_path,), source)
        entrypoint = compiled.entrypoint(self.decision_path)
        # One assignment each, no await between: a decision sees one policy or the other.
        self._policy, self._entrypoint = compiled, entrypoint
        _log.info("embedded policy loaded", extra={"policy_revision": compiled.revision})

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_s)
            try:
                await self._reload()
            except (EmbeddedPolicyError, OSError) as exc:
                # The last good policy stays; tried again on the next change.
                _log.error("policy change not loaded", extra={"error": str(exc)})

    async def decide(self, document: Mapping[str, Any], decision_id: str) -> Decision:
        policy = self._policy
        if policy is None:
            raise PolicyEngineError("NotStarted")
        try:
            answer = policy.module.evaluate(self._entrypoint, orjson.dumps(document))
            results = orjson.loads(answer)
        except (WasmPolicyError, orjson.JSONEncodeError, orjson.JSONDecodeError) as exc:
            # SECURITY: the evaluation failed; the caller fails closed. The
            # message names the policy's file and line, never the input.
            _log.error(
                "embedded evaluation failed",
                extra={"decision_id": decision_id, "error": str(exc)[:300]},
            )
            raise PolicyEngineError(type(exc).__name__) from None
        if results == []:
            result = None
        elif isinstance(results, list) and len(results) == 1 and isinstance(results[0], dict):
            result = results[0].get("result")
        else:
            raise PolicyEngineError("ValueError")
        return interpret(result, decision_id=decision_id, revision=policy.revision)

    async def revision(self) -> str:
        """The revision of the policy in force, as OPA reports its bundles'."""
        policy = self._policy
        if policy is None:
            raise PolicyEngineError("NotStarted")
        return policy.revision

    async def data(self, path: str) -> Any:
        """The base document at ``data/<path>`` (None when undefined)."""
        policy = self._policy
        if policy is None:
            raise PolicyEngineError("NotStarted")
        node = policy.data
        for part in path.strip("/").split("/"):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    async def healthy(self) -> bool:
        return self._policy is not None

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
