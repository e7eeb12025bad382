"""A config file's argument: `--config=configs/NAME.py:ARG`, parsed the same way by every config.

ARG is a comma-separated list of items, applied in order to the config `get_config` built:
- `NAME`: a *variant* the file declares (a function that edits the config), e.g. `tiny`;
- `FIELD=VALUE`: sets a field by its dotted path (or by a short alias the file declares, e.g. `res`, which
  may stand for several fields set to the same value, e.g. a term weight's `value` and `end_value`), with
  VALUE read as a Python literal (a bare word is a string); the field keeps its type, as with
  `--config.FIELD=VALUE`.

    --config=configs/stylegan_to_dcgan.py:tiny
    --config=configs/stylegan_to_dcgan.py:tiny,seed=1
    --config=configs/classifier_kd.py:data.resolution=32,student.kwargs.widths=(8,16)

Commas inside brackets or quotes do not split items. A bad item raises ValueError naming the variants and
aliases there are.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Mapping

import ml_collections

Variant = Callable[[ml_collections.ConfigDict], None]


def split_items(arg: str) -> list[str]:
    """Splits `arg` at the commas that are outside brackets and quotes; empty items are dropped."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(arg):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(arg[start:i])
            start = i + 1
    items.append(arg[start:])
    return [item.strip() for item in items if item.strip()]


def parse_value(text: str) -> Any:
    """A Python literal, or the text itself when it is not one (`upsample=transpose`)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """config.PATH = value for a dotted PATH that must already exist (ValueError naming the missing part)."""
    *parents, leaf = path.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ValueError(f"no field {'.'.join(parents[:i + 1])!r} in the config.")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"no field {path!r} in the config.")
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections keeps each field's type
        raise ValueError(f"{path}={value!r}: {e}") from e


def apply_arg(config: ml_collections.ConfigDict, arg: str, variants: Mapping[str, Variant] | None = None,
              aliases: Mapping[str, str | tuple[str, ...]] | None = None,
              where: str = "config") -> ml_collections.ConfigDict:
    """Applies the items of `arg` (module docstring) to `config` in order and returns it.

    Args:
      variants: the file's named variants, name -> function editing the config in place.
      aliases: short names for dotted field paths (e.g. {"res": "data.resolution"}), or for a tuple of paths
        all set to the item's value.
      where: the config file, for messages.
    """
    variants, aliases = variants or {}, aliases or {}
    for item in split_items(arg):
        name, sep, text = item.partition("=")
        name = name.strip()
        try:
            if not sep:
                if name not in variants:
                    raise ValueError(f"unknown variant {name!r}")
                variants[name](config)
            else:
                paths = aliases.get(name, name)
                for path in (paths,) if isinstance(paths, str) else paths:
                    set_field(config, path, parse_value(text.strip()))
        except ValueError as e:
            raise ValueError(f"{where}: bad argument item {item!r}: {str(e).rstrip('.')}. Valid: a variant {sorted(variants)}, "
                             f"an alias {sorted(aliases)}, or FIELD=VALUE with FIELD a dotted config path.") from e
    return config
