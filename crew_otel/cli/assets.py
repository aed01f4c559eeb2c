"""``crew-otel assets DIR``: write the Collector stack and the Grafana dashboards into ``DIR``.

The wheel carries them as package data (``crew_otel/assets/collector`` and
``crew_otel/assets/dashboards``); in a source checkout they are the repository's ``collector/``
and ``dashboards/``. ``DIR`` gets the same layout as the repository (``DIR/collector`` next to
``DIR/dashboards``), so ``docker compose up`` in ``DIR/collector`` finds everything its mounts name.

A file that already exists with other content (the user changed it) is never overwritten
unless ``force`` is set; identical files are left alone.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

#: The asset trees, by the directory name they get in ``DIR``.
TREES = ("collector", "dashboards")
#: What a tree holds for users; the dashboards' Python build tooling is not an asset.
ASSET_SUFFIXES = frozenset({".yaml", ".yml", ".json", ".md"})


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file to write: its path relative to ``DIR`` and its content."""

    relative: Path
    data: bytes


def _root(tree: str) -> Traversable:
    packaged = resources.files("crew_otel").joinpath("assets").joinpath(tree)
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / tree
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"crew-otel assets: {tree}/ is neither packaged nor in a checkout")


def _walk(node: Traversable, relative: Path) -> Iterator[Asset]:
    for child in sorted(node.iterdir(), key=lambda item: item.name):
        if child.name.startswith(".") or child.name == "__pycache__":
            continue
        if child.is_dir():
            yield from _walk(child, relative / child.name)
        elif Path(child.name).suffix in ASSET_SUFFIXES:
            yield Asset(relative / child.name, child.read_bytes())


def bundled_assets() -> list[Asset]:
    """Every shipped asset file (Collector configs, compose files, provisioning, alert rules,
    Alertmanager config, dashboards), with paths relative to the output directory."""
    return [asset for tree in TREES for asset in _walk(_root(tree), Path(tree))]


@dataclasses.dataclass
class WriteResult:
    """What :func:`write_assets` did (paths relative to the output directory)."""

    written: list[Path] = dataclasses.field(default_factory=list)
    unchanged: list[Path] = dataclasses.field(default_factory=list)
    #: Existing files with other content, left alone because ``force`` was not set.
    refused: list[Path] = dataclasses.field(default_factory=list)


class AssetsError(Exception):
    """``DIR`` cannot take the assets; the message says why in one line."""


def write_assets(directory: Path, *, force: bool = False) -> WriteResult:
    """Write :func:`bundled_assets` under ``directory``.

    Nothing is written when any existing file differs and ``force`` is not set: the result
    then lists those files in ``refused``.

    Raises:
        AssetsError: ``directory`` (or a directory inside it) is a file, a file's place is
            taken by a directory (nothing is written then), or a directory or file cannot be
            created or written.
    """
    assets = bundled_assets()
    try:
        _check_layout(directory, assets)
        result = WriteResult()
        pending: list[Asset] = []
        for asset in assets:
            target = directory / asset.relative
            if target.is_file() and target.read_bytes() == asset.data:
                result.unchanged.append(asset.relative)
            elif target.exists() and not force:
                result.refused.append(asset.relative)
            else:
                pending.append(asset)
    except OSError as exc:
        raise AssetsError(f"cannot read {exc.filename or directory}: {_reason(exc)}") from None
    if result.refused:
        return result
    for asset in pending:
        _write(directory / asset.relative, asset.data)
        result.written.append(asset.relative)
    return result


def _check_layout(directory: Path, assets: list[Asset]) -> None:
    """Refuse, before writing anything, a layout the assets cannot go into."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise AssetsError(f"{existing} is a file, not a directory")
    folders = sorted({parent for a in assets for parent in a.relative.parents if parent.parts})
    for folder in folders:
        if (directory / folder).exists() and not (directory / folder).is_dir():
            raise AssetsError(
                f"{directory / folder} is a file where the directory {folder.as_posix()} goes; "
                "nothing was written"
            )
    for asset in assets:
        if (directory / asset.relative).is_dir():
            raise AssetsError(
                f"{directory / asset.relative} is a directory where the file "
                f"{asset.relative.as_posix()} goes; nothing was written"
            )


def _write(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetsError(
            f"cannot create directory {exc.filename or target.parent}: {_reason(exc)}"
        ) from None
    try:
        target.write_bytes(data)
    except OSError as exc:
        raise AssetsError(f"cannot write {target}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def run(directory: Path, console: Console, *, force: bool = False) -> int:
    """``crew-otel assets DIR [--force]``: 0 when ``DIR`` holds the assets, 1 when it refused
    to overwrite changed files, 2 (one line on stderr) when ``DIR`` cannot take them."""
    errors = Console(stderr=True, soft_wrap=True)
    try:
        result = write_assets(directory, force=force)
    except AssetsError as exc:
        errors.print(f"crew-otel assets: error: {exc}", highlight=False, markup=False)
        return 2
    if result.refused:
        errors.print(
            f"crew-otel assets: error: {len(result.refused)} file(s) in {directory} differ from "
            "the bundled ones; nothing was written (use --force to overwrite):",
            highlight=False,
            markup=False,
        )
        for path in result.refused:
            errors.print(f"  {directory / path}", highlight=False, markup=False)
        return 1
    for path in result.written:
        console.print(f"wrote {directory / path}", highlight=False, markup=False, soft_wrap=True)
    if result.unchanged:
        console.print(
            f"{len(result.unchanged)} file(s) already up to date", highlight=False, soft_wrap=True
        )
    console.print(
        f"Start the stack: cd {shlex.quote(str(directory / 'collector'))} && docker compose up -d",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return 0
