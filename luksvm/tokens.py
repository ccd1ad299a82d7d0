"""LUKS2 keyslots and tokens, and the tools that make them: systemd-cryptenroll and clevis.

What can unlock a volume is read from `cryptsetup luksDump --dump-json-metadata`: keyslots, and the
tokens that point at them (systemd-tpm2, systemd-fido2, systemd-pkcs11, systemd-recovery, clevis
with its tang/tpm2/sss pins). A keyslot no token points at is a passphrase or a keyfile.

Whether an unattended source would unlock a volume now is tested without opening anything: a
TPM2 token's PCR policy is recomputed from the PCRs the TPM holds now (and, where the kernel has a
TPM device, unsealed with `cryptsetup open --test-passphrase --token-only`); a Tang token is
decrypted with `clevis luks pass` (the Tang server must answer), its server's advertisement
fetched and the enrolled thumbprint looked for in it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from luksvm import cryptsetup, jsonshape
from luksvm.errors import LuksvmError
from luksvm.run import run

TIMEOUT = 60
# TPM2 constants (TPM 2.0 Library, Part 2): command codes hashed into a policy, and hash algorithms
TPM_CC_POLICY_PCR = 0x17F
TPM_CC_POLICY_AUTH_VALUE = 0x16B
TPM_ALG = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
PCR_COUNT = 24
SYSFS_TPM = "/sys/class/tpm/tpm0"

# Token kinds as luksvm names them (and as LUKSVM_KEY_SOURCE spells the unattended ones)
TOKEN_KINDS = {
    "systemd-tpm2": "tpm2",
    "systemd-fido2": "fido2",
    "systemd-pkcs11": "pkcs11",
    "systemd-recovery": "recovery",
}
UNATTENDED_KINDS = ("tpm2", "tang", "fido2", "pkcs11")


@dataclass(frozen=True)
class Token:
    """One LUKS2 token: what kind of key it is and the keyslots it opens."""

    number: int
    type: str  # as written in the header: systemd-tpm2, clevis, …
    kind: str  # tpm2 | fido2 | pkcs11 | recovery | tang | clevis-tpm2 | sss | other
    keyslots: tuple[int, ...]
    pcrs: tuple[int, ...] = ()  # TPM2: the PCRs the key is sealed against
    pcr_bank: str = ""
    policy_hash: str = ""  # TPM2: the policy digest the TPM checks (hex)
    pin: bool = False  # TPM2: a PIN is asked as well
    public_key: bool = False  # TPM2: a signed PCR policy (tpm2-public-key)
    urls: tuple[str, ...] = ()  # Tang servers (one for the tang pin, several in an sss policy)
    thumbprints: tuple[str, ...] = ()  # Tang: S256 thumbprints of the advertisement's signing keys

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "token": self.number,
            "type": self.type,
            "kind": self.kind,
            "keyslots": list(self.keyslots),
        }
        if self.kind == "tpm2":
            data.update(
                pcrs=list(self.pcrs),
                pcr_bank=self.pcr_bank,
                pin=self.pin,
                signed_policy=self.public_key,
            )
        if self.urls:
            data.update(urls=list(self.urls), thumbprints=list(self.thumbprints))
        return data

    def describe(self) -> str:
        if self.kind == "tpm2":
            pcrs = "+".join(str(p) for p in self.pcrs) or "none"
            extra = ", PIN" if self.pin else ""
            return f"TPM2 (PCRs {pcrs}{extra})"
        if self.kind == "tang":
            return f"Tang {self.urls[0] if self.urls else '?'} (thumbprint {self.thumbprint})"
        if self.kind == "sss":
            return f"clevis sss ({', '.join(self.urls) or 'no Tang servers'})"
        if self.kind == "recovery":
            return "recovery key"
        return {"fido2": "FIDO2 key", "pkcs11": "PKCS#11 token"}.get(self.kind, self.type)

    @property
    def thumbprint(self) -> str:
        return self.thumbprints[0] if self.thumbprints else "?"


@dataclass(frozen=True)
class Keyslot:
    number: int
    kdf: str
    priority: str  # normal | prefer | ignore
    tokens: tuple[int, ...]  # the tokens that open it; none: a passphrase or keyfile
    salt: str = ""  # its KDF salt: tells this keyslot from a later one with the same number

    @property
    def passphrase(self) -> bool:
        return not self.tokens


@dataclass(frozen=True)
class Inventory:
    """What can unlock one LUKS device."""

    device: str
    version: int
    keyslots: tuple[Keyslot, ...]
    tokens: tuple[Token, ...]

    def token(self, number: int) -> Token:
        for token in self.tokens:
            if token.number == number:
                return token
        raise LuksvmError(
            f"{self.device} has no token {number}",
            fix="see its tokens with luksvm keys",
        )

    def tokens_of(self, kind: str) -> tuple[Token, ...]:
        return tuple(t for t in self.tokens if t.kind == kind)

    def slot_numbers(self) -> tuple[int, ...]:
        return tuple(s.number for s in self.keyslots)

    def salts(self, numbers: Sequence[int] | None = None) -> frozenset[str]:
        """The KDF salts of the keyslots `numbers` (all when None): a header backup that holds
        one of them holds that key."""
        return frozenset(
            s.salt for s in self.keyslots if s.salt and (numbers is None or s.number in numbers)
        )


# --- reading the header ------------------------------------------------------------------------


def read_inventory(device: str) -> Inventory:
    """The keyslots and tokens of the LUKS device (or header backup file) at `device`."""
    result = run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", device], timeout=TIMEOUT, check=False
    )
    if result.returncode == 0:
        try:
            return parse_metadata(device, json.loads(result.stdout))
        except (ValueError, KeyError, TypeError) as error:
            raise LuksvmError(
                f"{device}: cannot read its LUKS2 metadata ({type(error).__name__}: {error})"
            ) from None
    header = cryptsetup.read_header(device)  # LUKS1 (no JSON), or not LUKS: that error
    return Inventory(
        device,
        header.version,
        tuple(Keyslot(s.number, s.kdf, "normal", ()) for s in header.keyslots),
        (),
    )


def parse_metadata(device: str, metadata: dict[str, object]) -> Inventory:
    """Keyslots and tokens from LUKS2 JSON metadata (pure)."""
    raw_slots = jsonshape.objects(jsonshape.member(metadata, "keyslots", "metadata"), "keyslots")
    raw_tokens = jsonshape.objects(metadata.get("tokens", {}), "tokens")
    tokens = tuple(
        sorted((parse_token(int(n), t) for n, t in raw_tokens.items()), key=lambda t: t.number)
    )
    keyslots = []
    for number in sorted(raw_slots, key=int):
        slot = raw_slots[number]
        kdf = jsonshape.obj(slot.get("kdf", {}), f"keyslots[{number}].kdf")
        priority = {0: "ignore", 2: "prefer"}.get(int(str(slot.get("priority", 1))), "normal")
        keyslots.append(
            Keyslot(
                int(number),
                str(kdf.get("type", "")),
                priority,
                tuple(t.number for t in tokens if int(number) in t.keyslots),
                str(kdf.get("salt", "")),
            )
        )
    return Inventory(device, 2, tuple(keyslots), tokens)


def parse_token(number: int, token: dict[str, object]) -> Token:
    kind_name = str(token.get("type", ""))
    what = f"tokens[{number}]"
    keyslots = tuple(
        sorted(int(str(n)) for n in jsonshape.arr(token.get("keyslots", []), f"{what}.keyslots"))
    )
    if kind_name == "systemd-tpm2":
        return Token(
            number,
            kind_name,
            "tpm2",
            keyslots,
            pcrs=tuple(
                int(str(p)) for p in jsonshape.arr(token.get("tpm2-pcrs", []), f"{what}.tpm2-pcrs")
            ),
            pcr_bank=str(token.get("tpm2-pcr-bank", "sha256")),
            policy_hash=str(token.get("tpm2-policy-hash", "")),
            pin=bool(token.get("tpm2-pin", False)),
            public_key=bool(token.get("tpm2_pubkey") or token.get("tpm2-public-key")),
        )
    if kind_name in TOKEN_KINDS:
        return Token(number, kind_name, TOKEN_KINDS[kind_name], keyslots)
    if kind_name == "clevis":
        jwe = jsonshape.obj(token.get("jwe", {}), f"{what}.jwe")
        header = _protected_header(str(jwe.get("protected", "")))
        return _clevis_token(number, keyslots, header.get("clevis", {}))
    return Token(number, kind_name, "other", keyslots)


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _protected_header(text: str) -> dict[str, object]:
    try:
        value = json.loads(_b64url(text))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _clevis_token(number: int, keyslots: tuple[int, ...], clevis: object) -> Token:
    if not isinstance(clevis, dict):
        return Token(number, "clevis", "other", keyslots)
    pin = str(clevis.get("pin", ""))
    if pin == "tang":
        tang = clevis.get("tang", {})
        url = str(tang.get("url", "")) if isinstance(tang, dict) else ""
        adv = tang.get("adv", {}) if isinstance(tang, dict) else {}
        return Token(
            number,
            "clevis",
            "tang",
            keyslots,
            urls=(url,),
            thumbprints=signing_thumbprints(adv),
        )
    if pin == "sss":
        sss = clevis.get("sss", {})
        urls: list[str] = []
        prints: list[str] = []
        for compact in sss.get("jwe", []) if isinstance(sss, dict) else []:
            inner = _clevis_token(
                0, (), _protected_header(str(compact).split(".")[0]).get("clevis")
            )
            urls.extend(inner.urls)
            prints.extend(inner.thumbprints)
        return Token(number, "clevis", "sss", keyslots, urls=tuple(urls), thumbprints=tuple(prints))
    if pin == "tpm2":
        return Token(number, "clevis", "clevis-tpm2", keyslots)
    return Token(number, "clevis", "other", keyslots)


def jwk_thumbprint(jwk: dict[str, object]) -> str:
    """RFC 7638 SHA-256 thumbprint of a JWK, base64url without padding (as `jose jwk thp -a S256`
    and tang-show-keys print it)."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    required = members.get(str(jwk.get("kty", "")), ("kty",))
    canonical = json.dumps(
        {name: jwk.get(name) for name in required}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def signing_thumbprints(adv: object) -> tuple[str, ...]:
    """Thumbprints of the signing keys (key_ops "verify") in a Tang advertisement's key set."""
    keys = adv.get("keys", []) if isinstance(adv, dict) else []
    return tuple(
        jwk_thumbprint(k) for k in keys if isinstance(k, dict) and "verify" in k.get("key_ops", [])
    )


# --- TPM2: the PCR policy, recomputed ---------------------------------------------------------


def pcr_policy_hash(
    bank: str, pcrs: Sequence[int], values: dict[int, bytes], *, pin: bool = False
) -> str:
    """The policy digest systemd-cryptenroll seals a key under: TPM2_PolicyPCR over `pcrs` of
    `bank` with the given values, then TPM2_PolicyAuthValue when a PIN is set (pure)."""
    algorithm = hashlib.new(bank)
    size = algorithm.digest_size
    pcr_digest = hashlib.new(bank, b"".join(values[p] for p in sorted(pcrs))).digest()
    select = bytearray(3)
    for pcr in pcrs:
        select[pcr // 8] |= 1 << (pcr % 8)
    selection = struct.pack(">IHB", 1, TPM_ALG[bank], 3) + bytes(select)
    digest = hashlib.new(
        bank, bytes(size) + struct.pack(">I", TPM_CC_POLICY_PCR) + selection + pcr_digest
    ).digest()
    if pin:
        digest = hashlib.new(bank, digest + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE)).digest()
    return digest.hex()


def tcti(device: str) -> str:
    """The TSS2 TCTI for a crypttab/systemd-cryptenroll `tpm2-device=` value."""
    if device in ("", "auto"):
        return "device:/dev/tpmrm0"
    if device.startswith("/"):
        return f"device:{device}"
    return device  # already DRIVER:CONF, e.g. swtpm:path=/run/swtpm.sock


def read_pcrs(device: str, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
    """The current values of `pcrs`: from sysfs for the kernel's TPM (Linux ≥ 5.12), else with
    tpm2_pcrread (tpm2-tools) through the device's TCTI."""
    if device in ("", "auto", "/dev/tpmrm0", "/dev/tpm0") and os.path.isdir(
        os.path.join(SYSFS_TPM, f"pcr-{bank}")
    ):
        values = {}
        for pcr in pcrs:
            with open(os.path.join(SYSFS_TPM, f"pcr-{bank}", str(pcr)), encoding="ascii") as f:
                values[pcr] = bytes.fromhex(f.read().strip())
        return values
    selection = f"{bank}:{','.join(str(p) for p in pcrs)}"
    result = run(["tpm2_pcrread", "-T", tcti(device), selection], timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
        raise LuksvmError(
            f"cannot read the PCRs of TPM {device or 'auto'} ({why})",
            fix="check that the TPM is present (ls /dev/tpmrm0), or install tpm2-tools",
        )
    return parse_pcrread(result.stdout)


def parse_pcrread(text: str) -> dict[int, bytes]:
    """PCR values from tpm2_pcrread's YAML-like output ("    7 : 0x…")."""
    return {
        int(n): bytes.fromhex(v)
        for n, v in re.findall(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", text, re.MULTILINE)
    }


# --- would it unlock now? ---------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """Whether one unattended source would unlock the volume now: ok, fail or unknown."""

    source: str  # tpm2 | tang | fido2 | pkcs11 | keyfile | keyring
    what: str
    state: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "what": self.what,
            "state": self.state,
            "detail": self.detail,
        }


def check_tpm2(device: str, token: Token, tpm2_device: str) -> Check:
    what = f"token {token.number}: {token.describe()}"
    if token.public_key:
        return Check("tpm2", what, "unknown", "a signed PCR policy: checked only at boot")
    try:
        values = read_pcrs(tpm2_device, token.pcr_bank, token.pcrs)
    except LuksvmError as error:
        return Check("tpm2", what, "fail", error.args[0])
    missing = [p for p in token.pcrs if p not in values]
    if missing:
        return Check("tpm2", what, "fail", f"the TPM did not report PCR {missing[0]}")
    now = pcr_policy_hash(token.pcr_bank, token.pcrs, values, pin=token.pin)
    if now != token.policy_hash:
        return Check(
            "tpm2",
            what,
            "fail",
            "the PCRs changed since enrolment (firmware, boot loader or Secure Boot state): the "
            "TPM will not unseal; re-enrol with luksvm enroll NAME --tpm2 and remove token "
            f"{token.number}",
        )
    if tpm2_device in ("", "auto") and os.path.exists("/dev/tpmrm0") and not token.pin:
        result = run(
            [
                *("cryptsetup", "open", "--test-passphrase", "--token-only"),
                *("--token-id", str(token.number), device),
            ],
            timeout=TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            return Check("tpm2", what, "fail", "the PCR policy matches, but the TPM did not unseal")
        return Check("tpm2", what, "ok", "unsealed by the TPM (nothing opened)")
    return Check("tpm2", what, "ok", "the PCR policy matches the TPM's PCRs now")


def fetch_advertisement(url: str, timeout: float = 10) -> dict[str, object]:
    """A Tang server's advertisement (its JWS payload: the key set)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/adv", timeout=timeout) as response:
            jws = json.loads(response.read())
        payload = json.loads(_b64url(str(jws["payload"])))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LuksvmError(
            f"Tang server {url} did not answer with an advertisement "
            f"({type(error).__name__}: {error})",
            fix="start tangd there, or check the network path to it",
        ) from None
    return payload if isinstance(payload, dict) else {}


def check_tang(device: str, token: Token) -> Check:
    what = f"token {token.number}: {token.describe()}"
    for url in token.urls:
        try:
            advertised = signing_thumbprints(fetch_advertisement(url))
        except LuksvmError as error:
            return Check("tang", what, "fail", error.args[0])
        if token.kind == "tang" and not set(token.thumbprints) & set(advertised):
            return Check(
                "tang",
                what,
                "fail",
                f"{url} no longer advertises the signing key enrolled ({token.thumbprint}): "
                "its keys were rotated; re-enrol with the new thumbprint (tang-show-keys)",
            )
    slot = token.keyslots[0] if token.keyslots else 0
    result = run(
        ["clevis", "luks", "pass", "-d", device, "-s", str(slot)], timeout=TIMEOUT, check=False
    )
    # stdout holds the slot's passphrase: dropped here, never logged or shown
    if result.returncode != 0:
        return Check("tang", what, "fail", "clevis could not recover the key from the server")
    return Check("tang", what, "ok", "the Tang server released the key (nothing opened)")


def check_key(device: str, source: str, what: str, secret: Callable[[], bytes]) -> Check:
    """Whether a configured key (keyfile or keyring secret) opens a keyslot now."""
    try:
        key = secret()
    except LuksvmError as error:
        return Check(source, what, "fail", error.args[0])
    slot = key_slot(device, key)
    if slot is None:
        return Check(source, what, "fail", "it opens no keyslot")
    return Check(source, what, "ok", f"opens keyslot {slot}")


def key_slot(device: str, key: bytes) -> int | None:
    """The keyslot `key` opens (nothing is activated), None when it opens none."""
    result = run(
        ["cryptsetup", "open", "--test-passphrase", "--tries", "1", "-v", "--key-file=-", device],
        stdin=key,
        secret=True,
        timeout=cryptsetup.KEY_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        return None
    match = re.search(r"Key slot (\d+) unlocked", result.stdout + result.stderr)
    return int(match.group(1)) if match else -1
