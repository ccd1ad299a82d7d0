"""Pure parts of tokens.py and enroll.py: thumbprints, the TPM2 PCR policy, LUKS2 token JSON, the
crypttab line edit and the removal refusals."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from luksvm import cryptsetup, enroll, tokens
from luksvm.config import load
from luksvm.errors import LuksvmError
from tests.conftest import write_config

# RFC 7638 section 3.1: the RSA key and its SHA-256 thumbprint
RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJ"
    "ECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2"
    "QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh"
    "6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_jwk_thumbprint_matches_rfc7638() -> None:
    assert tokens.jwk_thumbprint(RFC7638_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_pcr_policy_of_zero_pcr7_is_what_systemd_cryptenroll_sealed_against_swtpm() -> None:
    # tpm2-policy-hash of a token systemd-cryptenroll 252 enrolled on a fresh swtpm (PCR 7 zero)
    zero = {7: bytes(32)}
    expected = "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b"
    assert tokens.pcr_policy_hash("sha256", [7], zero) == expected
    assert tokens.pcr_policy_hash("sha256", [7], zero, pin=True) != expected
    assert tokens.pcr_policy_hash("sha256", [7], {7: b"\x01" * 32}) != expected


def test_pcrread_output_parses() -> None:
    text = "  sha256:\n    7 : 0x" + "00" * 32 + "\n    8 : 0x" + "AB" * 32 + "\n"
    assert tokens.parse_pcrread(text) == {7: bytes(32), 8: b"\xab" * 32}


def _protected(header: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()


def test_clevis_tokens_tang_and_sss_give_urls_and_thumbprints() -> None:
    signing = {"kty": "EC", "crv": "P-521", "x": "AX", "y": "AY", "key_ops": ["verify"]}
    exchange = {"kty": "EC", "crv": "P-521", "x": "BX", "y": "BY", "key_ops": ["deriveKey"]}
    tang = {"pin": "tang", "tang": {"url": "http://tang.lan", "adv": {"keys": [signing, exchange]}}}
    inner = _protected({"clevis": tang}) + ".x.y.z.w"
    metadata = {
        "keyslots": {"0": {"kdf": {"type": "argon2id", "salt": "s0"}}, "1": {"kdf": {"salt": "s1"}},
                     "2": {"kdf": {"salt": "s2"}}},
        "tokens": {
            "0": {"type": "clevis", "keyslots": ["1"],
                  "jwe": {"protected": _protected({"clevis": tang})}},
            "1": {"type": "clevis", "keyslots": ["2"],
                  "jwe": {"protected": _protected(
                      {"clevis": {"pin": "sss", "sss": {"t": 1, "jwe": [inner, inner]}}})}},
        },
    }  # fmt: skip
    inventory = tokens.parse_metadata("/dev/x", metadata)
    tang_token, sss = inventory.tokens
    assert tang_token.kind == "tang" and tang_token.urls == ("http://tang.lan",)
    assert tang_token.thumbprints == (tokens.jwk_thumbprint(signing),)
    assert sss.kind == "sss" and sss.urls == ("http://tang.lan", "http://tang.lan")
    assert [s.passphrase for s in inventory.keyslots] == [True, False, False]
    assert inventory.salts([1, 2]) == frozenset({"s1", "s2"})


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"tokens": {}}, "no 'keyslots'"),
        ({"keyslots": []}, "keyslots is not a JSON object"),
        ({"keyslots": {"0": {"kdf": ["argon2id"]}}}, "keyslots[0].kdf is not a JSON object"),
        ({"keyslots": {}, "tokens": {"3": {"type": "x", "keyslots": "1"}}}, "tokens[3].keyslots"),
        ({"keyslots": {}, "tokens": {"0": {"type": "clevis", "jwe": "x"}}}, "tokens[0].jwe"),
    ],
)
def test_metadata_of_an_unknown_shape_names_the_member(
    metadata: dict[str, object], named: str
) -> None:
    # (an AttributeError from a list where an object belongs escaped every caller before)
    with pytest.raises((ValueError, KeyError), match=re.escape(named)):
        tokens.parse_metadata("/dev/x", metadata)
    if "jwe" in named:
        return  # cryptsetup's header reader does not look into clevis tokens
    segments = {"0": {"encryption": "aes-xts-plain64", "offset": "16777216"}}
    with pytest.raises((ValueError, KeyError), match=re.escape(named)):
        cryptsetup.luks2_header("/dev/x", "uuid", "", {"segments": segments, **metadata})


@pytest.mark.parametrize(
    ("line", "kwargs", "expected"),
    [
        (
            "cr_a  /dev/vg/a   /etc/k  luks,discard  # note",
            {"add": ["tpm2-device=auto"]},
            "cr_a  /dev/vg/a   /etc/k  luks,discard,tpm2-device=auto  # note",
        ),
        ("cr_a /dev/vg/a", {"add": ["x-luksvm.tang"]}, "cr_a /dev/vg/a  -  luks,x-luksvm.tang"),
        (
            "cr_a /dev/vg/a /etc/k luks,tpm2-device=auto,x-luksvm.tang",
            {"drop": ["tpm2-device"], "key": "-"},
            "cr_a /dev/vg/a - luks,x-luksvm.tang",
        ),
        (
            "cr_a /dev/vg/a - tpm2-device=swtpm:path=/s",
            {"add": ["tpm2-device=auto"], "drop": ["tpm2-device"]},
            "cr_a /dev/vg/a - tpm2-device=auto",
        ),
    ],
)
def test_edit_line_keeps_spacing_and_changes_only_what_it_names(
    line: str, kwargs: dict[str, object], expected: str
) -> None:
    assert enroll.edit_line(line, **kwargs) == expected  # type: ignore[arg-type]


def _inventory(*slots: tuple[int, tuple[int, ...]], kinds: dict[int, str]) -> tokens.Inventory:
    return tokens.Inventory(
        "/dev/vg/a",
        2,
        tuple(tokens.Keyslot(n, "pbkdf2", "normal", t, f"salt{n}") for n, t in slots),
        tuple(
            tokens.Token(number, "x", kind, tuple(n for n, t in slots if number in t))
            for number, kind in kinds.items()
        ),
    )


def test_removal_refuses_the_last_key_and_drops_options_no_token_needs_any_more(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, {"a.conf": "cr_a /dev/vg/a - luks,tpm2-device=auto,x-luksvm.tang\n"})
    config = load(str(tmp_path))
    alone = _inventory((0, ()), kinds={})
    with pytest.raises(LuksvmError, match="no key at all"):
        enroll.plan(config, "cr_a", enroll.Request("remove", remove="0"), alone)
    odd = _inventory((0, ()), (1, (0,)), kinds={0: "other"})
    with pytest.raises(LuksvmError, match="tokens luksvm does not know"):
        enroll.plan(config, "cr_a", enroll.Request("remove", remove="0"), odd)
    both = _inventory((0, ()), (1, (0,)), (2, (1,)), kinds={0: "tpm2", 1: "tang"})
    plan = enroll.plan(config, "cr_a", enroll.Request("remove", remove="tpm2"), both)
    assert plan.command == ("systemd-cryptenroll", "--wipe-slot=1", "/dev/vg/a")
    assert plan.wipe_salts == frozenset({"salt1"})
    assert plan.config_after == "cr_a /dev/vg/a - luks,x-luksvm.tang\n"
    assert "-cr_a /dev/vg/a - luks,tpm2-device=auto,x-luksvm.tang" in plan.diff()
    with pytest.raises(LuksvmError, match="no keyslot 7"):
        enroll.plan(config, "cr_a", enroll.Request("remove", remove="7"), both)


def test_tang_needs_a_thumbprint_and_pcrs_are_checked(tmp_path: Path) -> None:
    write_config(tmp_path, {"a.conf": "cr_a /dev/vg/a - luks\n"})
    config = load(str(tmp_path))
    empty = _inventory((0, ()), kinds={})
    with pytest.raises(LuksvmError, match="never trusts a key on first use") as error:
        enroll.plan(config, "cr_a", enroll.Request("tang", tang_url="http://t"), empty)
    assert error.value.exit_code == 64
    with pytest.raises(LuksvmError, match="numbered 0 to 23"):
        enroll.plan(config, "cr_a", enroll.Request("tpm2", tpm2_pcrs="7+24"), empty)
    luks1 = tokens.Inventory("/dev/vg/a", 1, (), ())
    with pytest.raises(LuksvmError, match="tokens need LUKS2"):
        enroll.plan(config, "cr_a", enroll.Request("tpm2"), luks1)
