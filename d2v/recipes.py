"""The packaged YAML recipes (d2v/configs/*.yaml) and how a `--config` argument finds one.

The recipes ship inside the package, so an installed d2v runs `d2v pretrain --config tiny_image` from
any folder. In a checkout `configs/` is a link to `d2v/configs/`, so `--config configs/tiny_image.yaml`
keeps working there.

`resolve_config_path(name_or_path)`: an existing file wins; else a bare recipe name (`tiny_image`,
`tiny_image.yaml`, or `configs/tiny_image.yaml` given from a folder without that file) is the packaged
recipe; else FileNotFoundError naming the packaged recipes.
"""
from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "configs"
SUFFIXES = (".yaml", ".yml")


def list_recipes() -> list[str]:
    """The packaged recipe names, sorted (`tiny_image`, ...): what `--config NAME` accepts."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.iterdir() if p.suffix in SUFFIXES and p.is_file())


def recipe_path(name: str) -> Path:
    """The file of the packaged recipe `name` (with or without .yaml); FileNotFoundError if none."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in SUFFIXES else name
    for suffix in SUFFIXES:
        p = RECIPES_DIR / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise FileNotFoundError(_not_found(name))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """The recipe file a `--config` argument means.

    1. an existing file, as given (relative to the current folder): a user's own recipe, or
       `configs/tiny_image.yaml` in a checkout;
    2. else a packaged recipe, by its bare name: `tiny_image`, `tiny_image.yaml`, or a path whose folder
       is `configs` (`configs/tiny_image.yaml` given from a folder that has no such file);
    3. else FileNotFoundError listing the packaged recipes.
    A directory is never a recipe."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise FileNotFoundError(f"config {str(name_or_path)!r} is a directory, not a YAML recipe; "
                                f"{_available()}")
    parts = p.parts
    bare = len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs")
    if bare and p.suffix in (*SUFFIXES, ""):
        try:
            return recipe_path(p.name)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(_not_found(str(name_or_path)))


def _available() -> str:
    names = list_recipes()
    if not names:
        return f"no packaged recipes found under {RECIPES_DIR}"
    return "packaged recipes: " + ", ".join(names)


def _not_found(name: str) -> str:
    return (f"config {name!r} not found: not a file, nor a packaged recipe name; {_available()} "
            f"(pass a recipe name like `tiny_image` or the path of a YAML file)")
