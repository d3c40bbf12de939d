"""Reading recipes: YAML (a key written twice refused), ``--set`` overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from tether.config.recipe import Recipe


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the key."""


# ----------------------------------------------------------------------------- loading


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        # an optional section (``LoraConfig | None``): its keys are the section's
        ann = next((a for a in get_args(ann) if a is not type(None)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc))
            parts.append(f"{key}: unknown key (allowed: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
            parts.append(f"{key}: {msg}{got}" if key else msg)
    return "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise RecipeError(f"--set {text!r}: empty part in key {key!r}")
    if any(c.isspace() for part in path for c in part):
        # no recipe key has one, and the key is echoed in one-line errors
        raise RecipeError(f"--set {text!r}: the key {key.strip()!r} holds a space or line break")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


PACKAGED_RECIPES = Path(__file__).parent.parent / "recipes"


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml"))


def first_line(err: BaseException) -> str:
    """An exception's first non-blank line, for one-line error messages (its type if empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the
    last one silently, so a second ``train:`` section would replace the first)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (a path, or the name of a packaged recipe);
    raise RecipeError with a one-line message."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists() and (PACKAGED_RECIPES / f"{path}.yaml").is_file():
            p = PACKAGED_RECIPES / f"{path}.yaml"
        source = str(p)
        if not p.is_file():
            known = ", ".join(packaged_recipes())
            raise RecipeError(f"{source}: no such recipe file (packaged recipes: {known})")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{source}: not valid YAML ({first_line(err)}{where})") from err
        if data is None:
            raise RecipeError(
                f"{source}: the recipe is empty (`tether train` without a recipe runs the "
                "defaults; a recipe names at least one section)"
            )
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source}: {_format_error(err)}") from err


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
