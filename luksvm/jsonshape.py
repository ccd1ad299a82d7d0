"""The shape of JSON that tools print (cryptsetup's LUKS2 metadata, sfdisk's table), checked where
it is read: a surprise becomes a ValueError that names the member, which callers turn into a clear
error, instead of an AttributeError deep inside a parser."""

from __future__ import annotations


def obj(value: object, what: str) -> dict[str, object]:
    """`value` as a JSON object."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def arr(value: object, what: str) -> list[object]:
    """`value` as a JSON array."""
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a JSON array")
    return value


def member(parent: dict[str, object], key: str, what: str) -> object:
    """parent[key]; a KeyError naming `what` when it is absent."""
    if key not in parent:
        raise KeyError(f"{what}: no {key!r}")
    return parent[key]


def objects(value: object, what: str) -> dict[str, dict[str, object]]:
    """A JSON object whose members are all objects (LUKS2 keyslots, tokens, segments)."""
    return {k: obj(v, f"{what}[{k}]") for k, v in obj(value, what).items()}
