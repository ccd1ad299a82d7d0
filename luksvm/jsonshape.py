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


def member(parent: dict[str, object], key: str, what: str, default: object = None) -> object:
    """parent[key]; `default` when it is absent, KeyError naming `what` when that is None too."""
    if key in parent:
        return parent[key]
    if default is None:
        raise KeyError(f"{what}: no {key!r}")
    return default


def objects(value: object, what: str) -> dict[str, dict[str, object]]:
    """A JSON object whose members are all objects (LUKS2 keyslots, tokens, segments)."""
    return {k: obj(v, f"{what}[{k}]") for k, v in obj(value, what).items()}
