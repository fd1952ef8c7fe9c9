"""RFC 9421 HTTP Message Signatures (HMAC) and RFC 9530 Content-Digest.

Pure functions over a :class:`Message` (what a signature can cover in a
request), shared by the gateway, which verifies, and :mod:`gateway.client`,
which signs, so both build byte-identical signature bases. Structured fields
(RFC 8941) are parsed and serialized with ``http_sfv``; the one shape signers
send in Signature-Input and Signature is first tried against a strict pattern
that yields exactly what ``http_sfv`` would (six times faster), and anything
else, malformed input included, goes to ``http_sfv``.

Two exception types carry a stable snake_case ``reason``:
:class:`MalformedFields` (the fields cannot be parsed: 400) and
:class:`ComponentError` (a covered component cannot be produced: 401).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yarl
from http_sfv.dictionary import Dictionary
from http_sfv.item import InnerList, Item

__all__ = [
    "DIGEST_ALGORITHMS",
    "ComponentError",
    "MalformedFields",
    "Message",
    "SignatureEntry",
    "accept_signature",
    "content_digest",
    "digest_mismatches",
    "hmac_sha256",
    "normalize_authority",
    "parse_signature",
    "signature_base",
    "signature_params",
]

#: RFC 9530 algorithms the gateway computes and checks.
DIGEST_ALGORITHMS: Final = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Fields whose structured type is known to be a Dictionary, for ;sf and ;key.
_DICTIONARY_FIELDS: Final = frozenset(
    {
        "accept-signature",
        "content-digest",
        "repr-digest",
        "signature",
        "signature-input",
        "want-content-digest",
        "want-repr-digest",
    }
)
_FIELD_PARAMS: Final = frozenset({"sf", "key", "bs"})
_FORM_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-._")
_HEX_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")


class MalformedFields(Exception):
    """Signature-Input, Signature or Content-Digest is not what RFC 9421/9530 define."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ComponentError(Exception):
    """A covered component is absent, unsupported or unusable: verification fails."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Message:
    """The parts of a request a signature can cover, exactly as sent."""

    method: str
    #: Lower-case scheme of the target URI.
    scheme: str
    #: host[:port], lower-case, default port omitted (see normalize_authority).
    authority: str
    #: The raw (still percent-encoded) absolute path.
    path: str
    #: The raw query without its '?'; None when the target has no '?'.
    query: str | None
    #: Lower-case field name -> raw value of each field line, in order.
    fields: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)

    @classmethod
    def from_url(
        cls, method: str, url: str | yarl.URL, headers: Iterable[tuple[str, str]] = ()
    ) -> Message:
        """A request to an absolute URL (as a client is about to send it)."""
        target = url if isinstance(url, yarl.URL) else yarl.URL(url)
        authority = target.host_port_subcomponent
        if not target.absolute or authority is None:
            raise ValueError("signing needs an absolute URL")
        # What an aiohttp client puts on the request line and in Host.
        path, sep, query = target.raw_path_qs.partition("?")
        return cls(
            method=method.upper(),
            scheme=target.scheme.lower(),
            authority=normalize_authority(authority, target.scheme),
            path=path or "/",
            query=query if sep else None,
            fields=_group_fields((k, v.encode("utf-8")) for k, v in headers),
        )

    @property
    def request_target(self) -> str:
        return self.path + ("?" + self.query if self.query is not None else "")

    @property
    def target_uri(self) -> str:
        return f"{self.scheme}://{self.authority}{self.request_target}"


def _group_fields(pairs: Iterable[tuple[str, bytes]]) -> dict[str, tuple[bytes, ...]]:
    grouped: dict[str, list[bytes]] = {}
    for name, value in pairs:
        grouped.setdefault(name.lower(), []).append(value)
    return {name: tuple(values) for name, values in grouped.items()}


def normalize_authority(host: str, scheme: str) -> str:
    """RFC 9421 §2.2.3: lower-case, without the scheme's default port."""
    authority = host.strip().lower()
    if authority.startswith("["):  # an IPv6 literal
        end = authority.find("]") + 1
        name, port = authority[:end], authority[end + 1 :]
    else:
        name, _, port = authority.partition(":")
    if port.isdigit() and int(port) == _DEFAULT_PORTS.get(scheme.lower()):
        return name
    return authority


@dataclass(frozen=True, slots=True)
class SignatureEntry:
    """One signature: its label, covered components, parameters and value."""

    label: str
    components: tuple[Item, ...]
    params: Mapping[str, Any]
    #: The @signature-params value: the parsed inner list re-serialized.
    params_value: str
    signature: bytes


# The shape every signer we know sends, one field line each:
#   Signature-Input: sig1=("@method" "@path" ...);created=1;keyid="k";nonce="n";alg="a"
#   Signature: sig1=:base64:
# restricted to what RFC 8941 serializes back byte for byte (canonical
# integers, strings without escapes, single spaces, component names without
# parameters, no repeated parameter). Anything else goes to http_sfv.
_SF_KEY: Final = r"[a-z*][a-z0-9_\-.*]*"
_SF_VALUE: Final = r'(?:0|-?[1-9][0-9]{0,14}|"[\x20\x21\x23-\x5b\x5d-\x7e]*")'
_FAST_INPUT: Final = re.compile(
    rf'({_SF_KEY})=(\("[a-z0-9@_.\-]+"(?: "[a-z0-9@_.\-]+")*\)((?:;{_SF_KEY}={_SF_VALUE})*))'
)
_FAST_PARAM: Final = re.compile(rf";({_SF_KEY})=(?:([0-9-][0-9]*)|\"([^\"]*)\")")
_FAST_SIGNATURE: Final = re.compile(rf"({_SF_KEY})=:([A-Za-z0-9+/]*={{0,2}}):")


def _fast_entry(
    signature_input: Sequence[str], signature: Sequence[str], label: str
) -> tuple[str, list[str], dict[str, Any], str, bytes] | None:
    """The common shape parsed without http_sfv; None means "use http_sfv".

    Returns what http_sfv would give (label, component names, parameters,
    the re-serialized inner list, the signature bytes) or None whenever the
    input is anything else, malformed included, so errors always come from
    http_sfv.
    """
    if len(signature_input) != 1 or len(signature) != 1:
        return None
    inputs = _FAST_INPUT.fullmatch(signature_input[0])
    value = _FAST_SIGNATURE.fullmatch(signature[0])
    if inputs is None or value is None:
        return None
    chosen = inputs.group(1)
    if value.group(1) != chosen or (label and label != chosen):
        return None
    params: dict[str, Any] = {}
    for param in _FAST_PARAM.finditer(inputs.group(3)):
        name, number, text = param.groups()
        if name in params:
            return None  # http_sfv keeps the last one: not our shape
        params[name] = int(number) if number is not None else text
    try:
        raw = base64.b64decode(value.group(2), validate=True)
    except ValueError:
        return None
    inner = inputs.group(2)
    names = inner[2 : inner.index(")") - 1].split('" "')
    return chosen, names, params, inner, raw


def parse_signature(
    signature_input: Sequence[str], signature: Sequence[str], label: str = ""
) -> SignatureEntry:
    """Pick one signature out of the fields (by label, or the only one)."""
    fast = _fast_entry(signature_input, signature, label)
    if fast is None:
        return _parse_signature_sfv(signature_input, signature, label)
    chosen, names, params, params_value, raw = fast
    # The pattern admits only lower-case names without parameters: of the
    # checks _checked_entry makes, only a repeated component can fail.
    if len(set(names)) != len(names):
        raise MalformedFields("duplicate_component", "a component is covered twice")
    return SignatureEntry(
        label=chosen,
        components=tuple(Item(name) for name in names),
        params=params,
        params_value=params_value,
        signature=raw,
    )


def _parse_signature_sfv(
    signature_input: Sequence[str], signature: Sequence[str], label: str
) -> SignatureEntry:
    """:func:`parse_signature` for any input, with http_sfv."""
    inputs = _parse_dictionary(signature_input, "signature_input_unparseable", "Signature-Input")
    values = _parse_dictionary(signature, "signature_unparseable", "Signature")
    if label:
        if label not in inputs:
            raise MalformedFields("label_not_found", f"no signature labelled {label!r}")
        chosen = label
    else:
        if len(inputs) != 1:
            raise MalformedFields(
                "multiple_signatures",
                "more than one signature; the gateway verifies exactly one",
            )
        chosen = next(iter(inputs))
    if chosen not in values:
        raise MalformedFields("signature_label_mismatch", "Signature lacks the labelled value")
    member = inputs[chosen]
    if not isinstance(member, InnerList):
        raise MalformedFields("signature_input_unparseable", "Signature-Input is not an inner list")
    value = values[chosen]
    if not isinstance(value, Item) or type(value.value) is not bytes or value.params:
        raise MalformedFields("signature_unparseable", "Signature is not a byte sequence")
    return _checked_entry(chosen, tuple(member), dict(member.params), str(member), value.value)


def _checked_entry(
    label: str,
    components: tuple[Item, ...],
    params: dict[str, Any],
    params_value: str,
    signature: bytes,
) -> SignatureEntry:
    seen: set[str] = set()
    for item in components:
        name = item.value
        if type(name) is not str or not name or name != name.lower():
            raise MalformedFields(
                "signature_input_unparseable", "component identifiers must be lower-case strings"
            )
        identifier = str(item)
        if identifier in seen:
            raise MalformedFields("duplicate_component", "a component is covered twice")
        seen.add(identifier)
    return SignatureEntry(
        label=label,
        components=components,
        params=params,
        params_value=params_value,
        signature=signature,
    )


def _parse_dictionary(lines: Sequence[str], reason: str, name: str) -> Dictionary:
    parsed = Dictionary()
    try:
        # RFC 9110 §5.3: several field lines are one comma-joined value.
        parsed.parse(", ".join(lines).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise MalformedFields(reason, f"{name} is not a valid structured field") from None
    if not parsed:
        raise MalformedFields(reason, f"{name} is empty")
    return parsed


def signature_params(components: Sequence[str], params: Mapping[str, Any]) -> InnerList:
    """The inner list a signer puts in Signature-Input (parameters in the given order)."""
    inner = InnerList([Item(name) for name in components])
    for key, value in params.items():
        inner.params[key] = value
    return inner


def signature_base(message: Message, components: Sequence[Item], params_value: str) -> bytes:
    """RFC 9421 §2.5: one line per covered component, then @signature-params."""
    lines: list[bytes] = []
    for item in components:
        value = _component_value(message, item)
        if b"\n" in value or b"\r" in value:
            raise ComponentError("component_invalid", "a covered value contains a line break")
        lines.append(str(item).encode("ascii") + b": " + value)
    lines.append(b'"@signature-params": ' + params_value.encode("ascii"))
    return b"\n".join(lines)


def _component_value(message: Message, item: Item) -> bytes:
    name = item.value
    if type(name) is not str:
        raise ComponentError("component_unsupported", "component identifiers are strings")
    params: Mapping[str, Any] = item.params
    if name.startswith("@"):
        return _derived_value(message, name, params)
    return _field_value(message, name, params)


def _derived_value(message: Message, name: str, params: Mapping[str, Any]) -> bytes:
    if name == "@query-param":
        wanted = params.get("name")
        if set(params) != {"name"} or type(wanted) is not str:
            raise ComponentError("component_unsupported", "@query-param needs one name parameter")
        return _query_param(message.query, wanted)
    if params:
        raise ComponentError("component_unsupported", f"{name} takes no parameters here")
    value: str
    if name == "@method":
        value = message.method
    elif name == "@target-uri":
        value = message.target_uri
    elif name == "@authority":
        value = message.authority
    elif name == "@scheme":
        value = message.scheme
    elif name == "@request-target":
        value = message.request_target
    elif name == "@path":
        value = message.path or "/"
    elif name == "@query":
        value = "?" + (message.query or "")
    else:
        # @status is for responses; @signature-params is never covered.
        raise ComponentError("component_unsupported", f"{name} cannot be covered in a request")
    return value.encode("utf-8", "surrogateescape")


def _query_param(query: str | None, wanted: str) -> bytes:
    """RFC 9421 §2.2.8: form-urlencoded parsing, then percent-encode after encoding."""
    found: list[str] = []
    for part in (query or "").split("&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        if _form_encode(_form_decode(raw_name)) == wanted:
            found.append(_form_encode(_form_decode(raw_value)))
    if len(found) != 1:
        # A parameter that is absent or repeated cannot be covered by name.
        raise ComponentError("component_unavailable", "query parameter absent or repeated")
    return found[0].encode("ascii")


def _form_decode(raw: str) -> str:
    data = raw.replace("+", " ").encode("utf-8", "surrogateescape")
    return urllib.parse.unquote_to_bytes(data).decode("utf-8", "replace")


def _form_encode(text: str) -> str:
    return "".join(chr(b) if b in _FORM_SAFE else f"%{b:02X}" for b in text.encode("utf-8"))


def _field_value(message: Message, name: str, params: Mapping[str, Any]) -> bytes:
    if not set(params) <= _FIELD_PARAMS:
        raise ComponentError("component_unsupported", f"unsupported parameters on {name}")
    lines = message.fields.get(name)
    if lines is None:
        raise ComponentError("component_unavailable", f"covered field {name} is absent")
    # RFC 9421 §2.1: strip each line, join with ", ".
    stripped = [line.strip(b" \t") for line in lines]
    if params.get("bs") is True:
        if len(params) != 1:
            raise ComponentError("component_unsupported", "bs cannot be combined")
        return b", ".join(b":" + base64.b64encode(line) + b":" for line in stripped)
    combined = b", ".join(stripped)
    if not params:
        return combined
    if name not in _DICTIONARY_FIELDS or params.get("sf", True) is not True:
        raise ComponentError("component_unsupported", f"{name} has no known structured type")
    parsed = Dictionary()
    try:
        parsed.parse(combined)
    except ValueError:
        raise ComponentError("component_invalid", f"{name} is not a structured field") from None
    if "key" not in params:
        return str(parsed).encode("ascii")
    key = params["key"]
    if type(key) is not str or key not in parsed:
        raise ComponentError("component_unavailable", f"{name} lacks the covered key")
    return str(parsed[key]).encode("ascii")


def accept_signature(components: Sequence[str], label: str) -> str:
    """RFC 9421 §5.1 Accept-Signature: what to cover, with created and nonce, for hmac-sha256."""
    wanted = InnerList([Item(name) for name in components])
    wanted.params["created"] = True
    wanted.params["nonce"] = True
    wanted.params["alg"] = "hmac-sha256"
    members = Dictionary()
    members[label] = wanted
    return str(members)


def hmac_sha256(secret: bytes, base: bytes) -> bytes:
    return hmac.new(secret, base, hashlib.sha256).digest()


def content_digest(body: bytes, algorithms: Sequence[str] = ("sha-256",)) -> str:
    """A Content-Digest field value for ``body``."""
    digests = Dictionary()
    for alg in algorithms:
        digests[alg] = DIGEST_ALGORITHMS[alg](body).digest()
    return str(digests)


def digest_mismatches(lines: Sequence[str], body: bytes) -> int:
    """How many supported digests in Content-Digest do not match ``body``.

    Raises MalformedFields when the field cannot be parsed or names no
    algorithm this gateway computes (RFC 9530 §2: unknown ones are ignored).
    """
    parsed = _parse_dictionary(lines, "content_digest_unparseable", "Content-Digest")
    checked = 0
    mismatches = 0
    for alg, member in parsed.items():
        if alg not in DIGEST_ALGORITHMS:
            continue
        if not isinstance(member, Item) or type(member.value) is not bytes:
            raise MalformedFields("content_digest_unparseable", "a digest is not a byte sequence")
        checked += 1
        expected = DIGEST_ALGORITHMS[alg](body).digest()
        # SECURITY: constant-time, like every comparison of a MAC or digest.
        if not hmac.compare_digest(expected, member.value):
            mismatches += 1
    if not checked:
        raise MalformedFields(
            "content_digest_unsupported", "Content-Digest carries no sha-256 or sha-512 digest"
        )
    return mismatches
