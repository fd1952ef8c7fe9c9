"""OPA's WebAssembly ABI, evaluated in-process through wasmtime.

A thin typed wrapper of the ABI documented on OPA's "WebAssembly" page
(version 1.2 or later: the one-call ``opa_eval`` fast path). One
:class:`WasmPolicy` holds one instantiated ``policy.wasm`` (built by ``opa
build -t wasm``) with its base ``data`` document parsed once into the module's
memory; :meth:`WasmPolicy.evaluate` then writes an input document at the
saved heap pointer and calls ``opa_eval``, which resets the heap to that
pointer first, so evaluations never leak and never see each other's values.

It refuses a module that asks the host for built-in functions: every
built-in these policies use is compiled into the module, and a host
implementation would be a second implementation of OPA's semantics that no
conformance test pins (docs/adr: the embedded policy engine). ``opa_abort``
(an evaluation error, such as a conflict between two rule values) and a
trap become :class:`WasmPolicyError`; the caller fails closed. So does an
evaluation that runs out of fuel: with ``fuel``, wasmtime counts the
instructions of each evaluation and stops it past that budget, so a runaway
policy cannot hold the event loop.

Not thread-safe: one instance is used from one thread (the event loop).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping
from typing import Final

import wasmtime

__all__ = ["WasmPolicy", "WasmPolicyError"]

_PAGE: Final = 65536
#: The ABI this wrapper speaks: major 1, minor >= 2 (``opa_eval``).
_ABI: Final = (1, 2)
#: ``opa_eval``'s output format 0: the result set as JSON.
_FORMAT_JSON: Final = 0
_I32: Final = wasmtime.ValType.i32()
#: Bytes read at a time while looking for a string's terminating NUL.
_CHUNK: Final = 4096
#: Fuel for loading a module and its data (not bounded by the per-evaluation budget).
_LOAD_FUEL: Final = 1 << 62


class WasmPolicyError(Exception):
    """The module cannot be loaded, or an evaluation aborted or trapped."""

    code = "wasm_policy_error"


class _Abort(Exception):
    """Raised from inside ``opa_abort``: wasmtime unwinds the guest and re-raises it."""


class WasmPolicy:
    """One compiled policy and its data, ready to evaluate any entrypoint."""

    def __init__(self, module: bytes, data: bytes, *, fuel: int | None = None) -> None:
        config = wasmtime.Config()
        config.consume_fuel = fuel is not None
        engine = wasmtime.Engine(config)
        self._store = wasmtime.Store(engine)
        self._fuel = fuel
        if fuel is not None:
            self._store.set_fuel(_LOAD_FUEL)  # loading (parsing the data) is not an evaluation
        try:
            compiled = wasmtime.Module(engine, module)
        except wasmtime.WasmtimeError as exc:
            raise WasmPolicyError(f"not a WebAssembly module: {exc}") from None
        pages = max(_declared_min_pages(compiled), _data_end(module) // _PAGE + 2)
        self._memory = wasmtime.Memory(
            self._store, wasmtime.MemoryType(wasmtime.Limits(pages, None))
        )
        linker = wasmtime.Linker(engine)
        linker.define(self._store, "env", "memory", self._memory)
        linker.define_func("env", "opa_abort", wasmtime.FuncType([_I32], []), self._abort)
        linker.define_func("env", "opa_println", wasmtime.FuncType([_I32], []), _ignore)
        for arity in range(5):
            linker.define_func(
                "env",
                f"opa_builtin{arity}",
                wasmtime.FuncType([_I32] * (arity + 2), [_I32]),
                _no_host_builtins,
            )
        try:
            instance = linker.instantiate(self._store, compiled)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise WasmPolicyError(f"cannot instantiate the module: {exc}") from None
        exports = instance.exports(self._store)

        def function(name: str) -> wasmtime.Func:
            found = exports.get(name)
            if not isinstance(found, wasmtime.Func):
                raise WasmPolicyError(f"the module exports no function {name}")
            return found

        version = exports.get("opa_wasm_abi_version")
        minor = exports.get("opa_wasm_abi_minor_version")
        if not isinstance(version, wasmtime.Global) or not isinstance(minor, wasmtime.Global):
            raise WasmPolicyError("the module names no OPA Wasm ABI version")
        abi = (version.value(self._store), minor.value(self._store))
        if abi[0] != _ABI[0] or abi < _ABI:
            raise WasmPolicyError(f"OPA Wasm ABI {abi[0]}.{abi[1]} is not supported (need 1.2+)")
        self._malloc = function("opa_malloc")
        self._free = function("opa_free")
        self._json_parse = function("opa_json_parse")
        self._json_dump = function("opa_json_dump")
        self._heap_ptr_get = function("opa_heap_ptr_get")
        self._eval = function("opa_eval")

        # SECURITY: refuse, never stub, a built-in the host would have to provide.
        needed = self._load_value(function("builtins"))
        if needed != {}:
            names = ", ".join(sorted(needed)) if isinstance(needed, dict) else repr(needed)
            raise WasmPolicyError(f"the policy needs built-ins the host does not provide: {names}")
        entrypoints = self._load_value(function("entrypoints"))
        if not isinstance(entrypoints, dict) or not all(
            isinstance(v, int) for v in entrypoints.values()
        ):
            raise WasmPolicyError("the module's entrypoints are not a name -> id map")
        #: Entrypoint ids by slash-separated path ("nops/authz/decision").
        self.entrypoints: Mapping[str, int] = dict(entrypoints)
        self._data = self._parse(data)
        # Every evaluation starts from here: the data stays, everything after is scratch.
        self._heap: int = self._call(self._heap_ptr_get)

    def evaluate(self, entrypoint: int, input_json: bytes | None) -> bytes:
        """The result set of ``entrypoint`` on ``input_json``, as JSON.

        ``[]`` when the rule is undefined, else ``[{"result": <value>}]``.
        ``input_json`` None leaves ``input`` undefined (as ``opa test`` does).
        """
        heap = self._heap
        if self._fuel is not None:
            self._store.set_fuel(self._fuel)
        input_json = input_json or b""
        self._reserve(heap + len(input_json))
        if input_json:
            self._memory.write(self._store, input_json, heap)
        result: int = self._call(
            self._eval, 0, entrypoint, self._data, heap, len(input_json),
            heap + len(input_json), _FORMAT_JSON,
        )  # fmt: skip
        return self._string(result)

    # -- memory -------------------------------------------------------------------------

    def _reserve(self, end: int) -> None:
        size = self._memory.data_len(self._store)
        if end > size:
            self._memory.grow(self._store, (end - size) // _PAGE + 1)

    def _string(self, address: int) -> bytes:
        """The NUL-terminated string at ``address``, never read past the memory's end."""
        size = self._memory.data_len(self._store)
        if not 0 < address < size:
            raise WasmPolicyError("the module returned an address outside its memory")
        base = ctypes.addressof(self._memory.data_ptr(self._store).contents)
        chunks = []
        while address < size:
            chunk = ctypes.string_at(base + address, min(_CHUNK, size - address))
            end = chunk.find(b"\0")
            if end >= 0:
                chunks.append(chunk[:end])
                return b"".join(chunks)
            chunks.append(chunk)
            address += len(chunk)
        raise WasmPolicyError("the module returned an unterminated string")

    def _parse(self, document: bytes) -> int:
        """Parse JSON into a value in the module's memory; its address."""
        buffer: int = self._call(self._malloc, len(document))
        self._memory.write(self._store, document, buffer)
        value: int = self._call(self._json_parse, buffer, len(document))
        self._call(self._free, buffer)
        if value == 0:
            raise WasmPolicyError("the module could not parse a JSON document")
        return value

    def _load_value(self, getter: wasmtime.Func) -> object:
        address = self._call(getter)
        loaded: object = json.loads(self._string(self._call(self._json_dump, address)))
        return loaded

    # -- calls --------------------------------------------------------------------------

    def _call(self, function: wasmtime.Func, *args: int) -> int:
        try:
            result = function(self._store, *args)
        except _Abort as exc:
            raise WasmPolicyError(f"evaluation aborted: {exc}") from None
        except wasmtime.Trap as exc:
            if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise WasmPolicyError(f"evaluation ran out of fuel ({self._fuel})") from None
            raise WasmPolicyError(f"evaluation trapped: {exc.message[:300]}") from None
        except wasmtime.WasmtimeError as exc:
            raise WasmPolicyError(f"evaluation failed: {str(exc)[:300]}") from None
        return int(result) if result is not None else 0

    def _abort(self, address: int) -> None:
        try:
            message = self._string(address).decode(errors="replace")[:500]
        except WasmPolicyError:
            message = "(unreadable message)"
        raise _Abort(message)


def _ignore(address: int) -> None:
    """``print()`` output: not compiled in (no --wasm-include-print), dropped if it were."""


def _no_host_builtins(builtin_id: int, *_: int) -> int:
    # Never reached: a module that lists a host built-in is refused at load.
    raise _Abort(f"host built-in {builtin_id} called")


def _declared_min_pages(module: wasmtime.Module) -> int:
    for item in module.imports:
        if item.name == "memory" and isinstance(item.type, wasmtime.MemoryType):
            return int(item.type.limits.min)
    raise WasmPolicyError("the module imports no memory: not an OPA policy module")


def _data_end(module: bytes) -> int:
    """The end of the module's active data segments in memory 0.

    OPA declares fewer memory pages than its own data segments span, so the
    memory is sized from them (as OPA's JavaScript SDK sizes it generously).
    """
    if module[:8] != b"\0asm\1\0\0\0":
        raise WasmPolicyError("not a WebAssembly module")
    position, end = 8, 0
    while position < len(module):
        section = module[position]
        size, position = _uleb(module, position + 1)
        if section == 11:
            end = max(end, _segments_end(module[position : position + size]))
        position += size
    return end


def _segments_end(section: bytes) -> int:
    count, position = _uleb(section, 0)
    end = 0
    for _ in range(count):
        flags, position = _uleb(section, position)
        if flags == 2:
            _, position = _uleb(section, position)  # memory index
        offset = 0
        if flags in (0, 2):
            if section[position] != 0x41:  # i32.const
                raise WasmPolicyError("unsupported data segment offset")
            offset, position = _sleb(section, position + 1)
            if section[position] != 0x0B:
                raise WasmPolicyError("unsupported data segment offset")
            position += 1
        size, position = _uleb(section, position)
        position += size
        if flags in (0, 2):
            end = max(end, offset + size)
    return end


def _uleb(data: bytes, position: int) -> tuple[int, int]:
    return _leb128(data, position, signed=False)


def _sleb(data: bytes, position: int) -> tuple[int, int]:
    return _leb128(data, position, signed=True)


def _leb128(data: bytes, position: int, *, signed: bool) -> tuple[int, int]:
    """A LEB128 integer at ``position``: (its value, the position after it)."""
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if signed and byte & 0x40:
                result -= 1 << shift
            return result, position
