"""Flower app folders that ``flwr run`` submits: fedge's own, or a user's.

``flwr run <folder>`` (flwr >= 1.41) migrates a ``[tool.flwr.federations]`` table it finds in the
folder's ``pyproject.toml`` into ``$FLWR_HOME/config.toml`` and comments the table out, i.e. it
rewrites the file. fedge's ``pyproject.toml`` declares one (so that a plain ``flwr run .`` starts
as many SuperNodes as the default scenario has clients), so when fedge itself submits its app it
submits a staged copy without that table: the repository is never rewritten and the user's
connections are never touched.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

APP_DIR = Path(__file__).resolve().parents[1]  # the folder holding pyproject.toml's [tool.flwr.app]
PYPROJECT = "pyproject.toml"


def read_flower_app(app_dir: Path) -> dict[str, Any]:
    """The parsed ``pyproject.toml`` of a Flower app folder; ValueError saying what is missing."""
    app_dir = Path(app_dir)
    path = app_dir / PYPROJECT
    if not app_dir.is_dir():
        raise ValueError(f"app folder {app_dir} does not exist")
    if not path.is_file():
        raise ValueError(
            f"{app_dir} is not a Flower app: no {PYPROJECT} (a Flower app declares "
            "[tool.flwr.app] with components serverapp/clientapp there)"
        )
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    missing = [k for k in ("serverapp", "clientapp") if k not in components]
    if missing:
        raise ValueError(
            f"{path} declares no [tool.flwr.app.components] {' and '.join(missing)}; "
            'a Flower app names its apps there, e.g. serverapp = "my_app.server_app:app"'
        )
    return config


def app_config_keys(app_dir: Path) -> set[str]:
    """The run-config keys the app declares (``[tool.flwr.app.config]``, nested keys dotted)."""

    def flat(table: dict[str, Any], prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, value in table.items():
            name = f"{prefix}{key}"
            keys |= flat(value, f"{name}.") if isinstance(value, dict) else {name}
        return keys

    config = read_flower_app(app_dir)
    return flat(config.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def stage_app(dest: Path, app_dir: Path = APP_DIR) -> Path:
    """A copy of fedge's app folder for ``flwr run``: its packages and scenarios, and its
    ``pyproject.toml`` without ``[tool.flwr.federations]`` (see the module docstring)."""
    config = read_flower_app(app_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    packages = config.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {})
    names = packages.get("wheel", {}).get("packages", [])
    for name in names:
        shutil.copytree(
            app_dir / name,
            dest / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
    config.get("tool", {}).get("flwr", {}).pop("federations", None)
    (dest / PYPROJECT).write_text(tomli_w.dumps(config))
    readme = config.get("project", {}).get("readme")
    if readme and (app_dir / readme).is_file():
        shutil.copy2(app_dir / readme, dest / readme)
    return dest
