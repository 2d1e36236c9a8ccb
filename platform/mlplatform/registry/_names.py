"""Validation of model names, aliases and `name@selector` references.

Names become directory names under the registry root, so they are checked against a
strict pattern: no '/', no '..', nothing absolute, nothing that could leave the root.
"""

from __future__ import annotations

import re

from mlplatform.errors import InvalidName

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Aliases start with a letter so `name@3` is always a version number, never an alias.
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
# `name@latest` always means the highest version; it cannot be set as an alias.
LATEST = "latest"

Selector = int | str | None  # version number, alias, or None for the latest version


def check_name(name: object, field: str = "name") -> str:
    """Return `name` if it is a valid model name, else raise InvalidName naming `field`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"Got {name!r} for `{field}`; must be 1-64 characters of lowercase letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit, with no '/' or '..' "
            f"(pattern {NAME_PATTERN.pattern}), e.g. 'digits-mlp'."
        )
    return name


def check_alias(alias: object, field: str = "alias") -> str:
    """Return `alias` if it is a valid alias, else raise InvalidName naming `field`."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias) or ".." in alias:
        raise InvalidName(
            f"Got {alias!r} for `{field}`; must be 1-64 characters of lowercase letters, digits, "
            f"'.', '_' or '-', starting with a letter, with no '/' or '..' "
            f"(pattern {ALIAS_PATTERN.pattern}), e.g. 'production' or 'canary'."
        )
    if alias == LATEST:
        raise InvalidName(
            f"Got 'latest' for `{field}`; 'latest' always means the highest version and cannot "
            f"be set. Choose another alias name, e.g. 'production'."
        )
    return alias


def parse_selector(selector: object, field: str = "version") -> Selector:
    """A version number (int or digits), an alias, 'latest' or None -> int | alias | None."""
    if selector is None or selector == LATEST:
        return None
    if isinstance(selector, bool):  # bool is an int subclass; True is not version 1
        selector = repr(selector)
    # ASCII digits only: "²".isdigit() is true but int() rejects it, and "٣" would silently mean 3.
    if isinstance(selector, int) or (isinstance(selector, str) and selector.isascii() and selector.isdigit()):
        number = int(selector)
        if number < 1:
            raise InvalidName(f"Got {selector!r} for `{field}`; version numbers start at 1.")
        return number
    if isinstance(selector, str) and ALIAS_PATTERN.fullmatch(selector) and ".." not in selector:
        return selector
    raise InvalidName(
        f"Got {selector!r} for `{field}`; must be a version number (e.g. 3), an alias "
        f"(e.g. 'production') or 'latest'."
    )


def parse_ref(ref: object, field: str = "ref") -> tuple[str, Selector]:
    """Split 'name', 'name@3', 'name@latest' or 'name@alias' into (name, selector)."""
    if not isinstance(ref, str):
        raise InvalidName(
            f"Got {ref!r} for `{field}`; must be a string like 'digits-mlp', "
            f"'digits-mlp@3' or 'digits-mlp@production'."
        )
    name, sep, selector = ref.partition("@")
    try:
        check_name(name, field)
    except InvalidName:
        raise InvalidName(
            f"Got {ref!r} for `{field}`; the model name before '@' must be 1-64 characters of "
            f"lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, with "
            f"no '/' or '..', e.g. 'digits-mlp@production'."
        ) from None
    if not sep:
        return name, None
    return name, parse_selector(selector, field)
