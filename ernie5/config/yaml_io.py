"""Reading config YAML: files with `base:` includes, and `key.path=value` overrides (plain Python + pyyaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ernie5.errors import ConfigError, UserError


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(str(path), "config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(str(path), f"invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"cannot read: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(str(path), f"top level must be a mapping, got {type(raw).__name__}")
    return raw


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping, merged over the file its `base:` key names (recursively; a cycle is an error)."""
    path = path.resolve()
    if path in seen:
        raise UserError(str(path), "circular `base:` include")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError("base", f"expected a file path, got {base!r}")
    return _merge(load_yaml(path.parent / base, seen + (path,)), raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (`8`, `1e-3`, `true`, `[1, 2]`)."""
    raw = _merge({}, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "override must look like key.path=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            raise ConfigError(key, f"cannot parse value {text!r}") from None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return raw


# -- what a config file is: its top-level `kind:` ----------------------------------------------------------------
# A file without `kind:` is a run config. The values below are the only kinds; each verb of the CLI names the kinds
# it takes and refuses the others with one line (require_kind).
CONFIG_KINDS = {
    "run": "a run config",
    "multimodal": "a multimodal data config",
    "vision": "a tokenizer recipe",
    "audio": "a tokenizer recipe",
    "sweep": "a sweep file",
}


def config_kind(path: str | Path) -> str:
    """The `kind:` of a config file (after its `base:` includes): run (the default), multimodal, vision, audio."""
    kind = load_yaml(Path(path)).get("kind", "run")
    if not isinstance(kind, str) or kind not in CONFIG_KINDS:
        choices = ", ".join(repr(k) for k in CONFIG_KINDS)
        raise UserError(f"{path}: kind", f"{kind!r} is not one of {choices} (no `kind:` means a run config)")
    return kind


def describe_kinds(kinds) -> str:
    """'a run config (kind: run) or a tokenizer recipe (kind: vision | audio)': kinds grouped by what they are."""
    groups: dict[str, list[str]] = {}
    for kind in kinds:
        groups.setdefault(CONFIG_KINDS[kind], []).append(kind)
    parts = [f"{what} (kind: {' | '.join(ks)})" for what, ks in groups.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def require_kind(path: str | Path, kinds, verb: str, also: str = "") -> str:
    """The file's kind if `ernie5 verb` takes it; otherwise a UserError naming the file, its kind and what the verb
    takes (`also`: something else it takes, e.g. 'a shard directory')."""
    kind = config_kind(path)
    if kind not in kinds:
        takes = describe_kinds(kinds) + (f" or {also}" if also else "")
        raise UserError(str(path), f"kind {kind!r} is {CONFIG_KINDS[kind]}; ernie5 {verb} takes {takes}")
    return kind
