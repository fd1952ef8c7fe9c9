"""parse_signature's fast path gives exactly what http_sfv gives, or defers to it."""

from __future__ import annotations

import base64

import pytest

from gateway.httpsig import (
    MalformedFields,
    SignatureEntry,
    _fast_entry,
    _parse_signature_sfv,
    parse_signature,
)

MAC = base64.b64encode(bytes(range(32))).decode()
INNER = '("@method" "@authority" "@path" "content-digest")'
PARAMS = ';created=1700000000;keyid="agent-1";nonce="n-0123456789abcdef";alg="hmac-sha256"'
GOOD = f"sig1={INNER}{PARAMS}"
SIG = f"sig1=:{MAC}:"

# (Signature-Input lines, Signature lines, label, takes the fast path)
CASES: list[tuple[list[str], list[str], str, bool]] = [
    # the shapes signers send: parsed without http_sfv
    ([GOOD], [SIG], "", True),
    ([GOOD], [SIG], "sig1", True),
    (['sig1=("@method");keyid="k"'], [SIG], "", True),
    (['sig1=("@method")'], [SIG], "", True),
    (['s*-._9=("@path");created=-5;keyid=""'], [f"s*-._9=:{MAC}:"], "", True),
    ([f"sig1={INNER};created=0;expires=999999999999999"], [SIG], "", True),
    ([GOOD], ["sig1=::"], "", True),
    ([GOOD], ["sig1=:QQ==:"], "", True),
    # the fast path finds a problem the shared checks report
    (['sig1=("@method" "@method");keyid="k"'], [SIG], "", True),
    # valid, but not the restricted shape: http_sfv decides
    (['sig1=("@method" "@path";req);keyid="k"'], [SIG], "", False),
    (['sig1=("@query-param";name="a");keyid="k"'], [SIG], "", False),
    (['sig1=("@method");keyid="k";keyid="j"'], [SIG], "", False),
    (['sig1=("@method");created=007;keyid="k"'], [SIG], "", False),
    (['sig1=("@method");created=-0;keyid="k"'], [SIG], "", False),
    (['sig1=("@method");keyid="a\\"b"'], [SIG], "", False),
    (['sig1=("@method");keyid=tok'], [SIG], "", False),
    (['sig1=("@method");keyid="k";flag'], [SIG], "", False),
    (['sig1=("@method");created=1.5;keyid="k"'], [SIG], "", False),
    (['sig1=( "@method"  "@path" );keyid="k"'], [SIG], "", False),
    (
        ['sig1=("@method");keyid="k"', 'sig2=("@path");keyid="k"'],
        [SIG, f"sig2=:{MAC}:"],
        "sig2",
        False,
    ),
    (['sig1=("@method");keyid="k", sig2=("@path")'], [SIG], "", False),
    ([GOOD], [f"sig1=:{MAC}:;p=1"], "", False),
    (['sig1=("@method");keyid="k"'], [SIG], "other", False),
    (['sig1=("@method");keyid="k"'], [f"sig2=:{MAC}:"], "", False),
    (['sig1=();keyid="k"'], [SIG], "", False),
    # malformed: always http_sfv's reason
    ([""], [SIG], "", False),
    (["sig1="], [SIG], "", False),
    (['sig1=("@method"'], [SIG], "", False),
    (['Sig1=("@method");keyid="k"'], [SIG], "", False),
    (['sig1=("@Method");keyid="k"'], [SIG], "", False),
    (['sig1=("@method");keyid="k",'], [SIG], "", False),
    (['sig1=("@method");keyid="é"'], [SIG], "", False),
    (['sig1=("@method");created=1234567890123456'], [SIG], "", False),
    (['sig1="@method";keyid="k"'], [SIG], "", False),
    ([GOOD], ["sig1=:A:"], "", False),
    ([GOOD], ["sig1=:AB=C:"], "", False),
    ([GOOD], ["sig1=:A===:"], "", False),
    ([GOOD], ["sig1=:QQ-_:"], "", False),
    ([GOOD], ["sig1=QQ=="], "", False),
    ([GOOD], ['sig1="QQ=="'], "", False),
    ([GOOD], [" sig1=:QQ==:"], "", False),
]


def _outcome(entry_or_error: SignatureEntry | MalformedFields) -> object:
    if isinstance(entry_or_error, MalformedFields):
        return ("error", entry_or_error.reason)
    entry = entry_or_error
    return (
        entry.label,
        [(str(item), item.value, dict(item.params)) for item in entry.components],
        entry.params,
        entry.params_value,
        entry.signature,
    )


def _run(
    parse: object, inputs: list[str], values: list[str], label: str
) -> SignatureEntry | MalformedFields:
    assert callable(parse)
    try:
        result = parse(inputs, values, label)
    except MalformedFields as exc:
        return exc
    assert isinstance(result, SignatureEntry)
    return result


@pytest.mark.parametrize(("inputs", "values", "label", "fast"), CASES)
def test_same_result_as_http_sfv(
    inputs: list[str], values: list[str], label: str, fast: bool
) -> None:
    expected = _outcome(_run(_parse_signature_sfv, inputs, values, label))
    assert _outcome(_run(parse_signature, inputs, values, label)) == expected
    assert (_fast_entry(inputs, values, label) is not None) is fast


def test_the_common_shape_parses_to_its_parts() -> None:
    """Not only equal to http_sfv: equal to what the header says."""
    entry = parse_signature([GOOD], [SIG])
    assert entry.label == "sig1"
    assert [item.value for item in entry.components] == [
        "@method",
        "@authority",
        "@path",
        "content-digest",
    ]
    assert entry.params == {
        "created": 1700000000,
        "keyid": "agent-1",
        "nonce": "n-0123456789abcdef",
        "alg": "hmac-sha256",
    }
    assert entry.params_value == INNER + PARAMS
    assert entry.signature == bytes(range(32))
