"""``slipform patch check|apply|revert``: the explicit form of Slipform's OpenCLIP extension points.

The import hook needs no edit of OpenCLIP. Teams that prefer to see every change in OpenCLIP's source can
apply the unified diffs in ``slipform_plugin/patches`` instead. ``apply`` touches the installed files only
when every one of them has exactly the sha256 the diffs were made against (open_clip_torch 3.3.0), keeps a
backup beside them, and checks the result's hash; ``revert`` restores the backup (or reverse-applies the
diffs) and checks the hash again. Either all files change or none does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

BACKUP_DIR = ".slipform-patch-backup"
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A patch cannot be applied or reverted safely."""


@dataclass(frozen=True)
class PatchTarget:
    path: str
    diff: str
    sha256_original: str
    sha256_patched: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest() -> tuple[str, list[PatchTarget]]:
    """The OpenCLIP version the diffs target and the list of patched files."""
    manifest = json.loads((files("slipform_plugin.patches") / "manifest.json").read_text())
    return manifest["open_clip_torch"], [PatchTarget(**entry) for entry in manifest["files"]]


def read_diff(name: str) -> str:
    return (files("slipform_plugin.patches") / name).read_text()


def default_site_packages() -> Path:
    """The directory holding the installed ``open_clip`` and ``open_clip_train`` packages (not imported)."""
    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError(
            "open_clip is not installed; expected open_clip_torch 3.3.0 "
            "(pip install 'open_clip_torch[training]==3.3.0')"
        )
    return Path(next(iter(spec.submodule_search_locations))).parent


def apply_unified_diff(original: str, diff: str, reverse: bool = False) -> str:
    """Apply a unified diff to ``original`` strictly: every context and removed line must match exactly.

    Args:
        original: the file's text.
        diff: a single-file unified diff (``---``/``+++`` headers and ``@@`` hunks).
        reverse: undo the diff instead (added lines are removed, removed lines restored).
    Raises:
        PatchError: when a hunk does not match the text.
    """
    source = original.splitlines(keepends=True)
    output: list[str] = []
    position = 0  # next unread line of source (0-based)
    lines = diff.splitlines(keepends=True)
    index = 0
    while index < len(lines) and not lines[index].startswith("@@"):
        index += 1
    while index < len(lines):
        match = _HUNK.match(lines[index])
        if not match:
            raise PatchError(f"malformed hunk header: {lines[index]!r}")
        start = int(match.group(3 if reverse else 1))
        length = int(match.group(4 if reverse else 2) or 1)
        index += 1
        hunk_start = start - 1 if length else start
        if hunk_start < position:
            raise PatchError("overlapping hunks")
        output.extend(source[position:hunk_start])
        position = hunk_start
        while index < len(lines) and not lines[index].startswith("@@"):
            line = lines[index]
            index += 1
            if line.startswith("\\"):
                continue
            tag, body = line[:1], line[1:]
            if reverse and tag in "+-":
                tag = "-" if tag == "+" else "+"
            if tag in (" ", "-"):
                if position >= len(source) or source[position] != body:
                    found = source[position] if position < len(source) else "<end of file>"
                    raise PatchError(
                        f"line {position + 1} does not match the patch: expected {body!r}, found {found!r}"
                    )
                position += 1
                if tag == " ":
                    output.append(body)
            elif tag == "+":
                output.append(body)
            else:
                raise PatchError(f"malformed diff line: {line!r}")
    output.extend(source[position:])
    return "".join(output)


def file_states(site: Path) -> dict[str, str]:
    """State of each target file: ``original``, ``patched``, ``modified`` or ``missing``."""
    _, targets = load_manifest()
    states = {}
    for target in targets:
        path = site / target.path
        if not path.exists():
            states[target.path] = "missing"
            continue
        digest = _sha256(path.read_bytes())
        states[target.path] = (
            "original"
            if digest == target.sha256_original
            else "patched"
            if digest == target.sha256_patched
            else "modified"
        )
    return states


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".slipform-tmp")
    temporary.write_text(text)
    shutil.copymode(path, temporary)
    os.replace(temporary, path)


def apply(site: Path) -> list[str]:
    """Apply every diff to the OpenCLIP under ``site``; returns the patched paths."""
    version, targets = load_manifest()
    states = file_states(site)
    if all(state == "patched" for state in states.values()):
        return []
    bad = {path: state for path, state in states.items() if state != "original"}
    if bad:
        raise PatchError(
            f"refusing to patch: expected the files of open_clip_torch {version} unmodified, got {bad} under {site}"
        )
    results = {}
    for target in targets:
        text = (site / target.path).read_text()
        patched = apply_unified_diff(text, read_diff(target.diff))
        if _sha256(patched.encode()) != target.sha256_patched:
            raise PatchError(f"{target.path}: the patched file does not have the expected hash")
        results[target] = patched
    backup = site / BACKUP_DIR
    backup.mkdir(exist_ok=True)
    for target in targets:
        destination = backup / target.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / target.path, destination)
    written: list[PatchTarget] = []
    try:
        for target, patched in results.items():
            _write_atomic(site / target.path, patched)
            written.append(target)
    except OSError:
        for target in written:
            shutil.copy2(backup / target.path, site / target.path)
        raise
    return [target.path for target in targets]


def revert(site: Path, force: bool = False) -> list[str]:
    """Undo :func:`apply`; returns the restored paths."""
    _, targets = load_manifest()
    states = file_states(site)
    if all(state == "original" for state in states.values()):
        return []
    bad = {path: state for path, state in states.items() if state != "patched"}
    if bad and not force:
        raise PatchError(f"refusing to revert: expected every file patched by Slipform, got {bad} (use --force)")
    backup = site / BACKUP_DIR
    restored = []
    for target in targets:
        path = site / target.path
        saved = backup / target.path
        if states[target.path] == "original":
            continue
        if saved.exists() and _sha256(saved.read_bytes()) == target.sha256_original:
            text = saved.read_text()
        else:
            text = apply_unified_diff(path.read_text(), read_diff(target.diff), reverse=True)
        if _sha256(text.encode()) != target.sha256_original:
            raise PatchError(f"{target.path}: the restored file does not have the original hash")
        _write_atomic(path, text)
        restored.append(target.path)
    shutil.rmtree(backup, ignore_errors=True)
    return restored


def main(argv: list[str] | None = None) -> int:
    """``slipform patch check|apply|revert [--site-packages DIR] [--force]``."""
    parser = argparse.ArgumentParser(prog="slipform patch", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("check", "apply", "revert"))
    parser.add_argument("--site-packages", type=Path, default=None, help="where open_clip is installed")
    parser.add_argument("--force", action="store_true", help="revert even if some files are not in patched state")
    args = parser.parse_args(argv)
    try:
        site = args.site_packages or default_site_packages()
        if not (site / "open_clip").is_dir():
            raise PatchError(f"--site-packages: expected a directory containing open_clip/, got {site}")
        version, _ = load_manifest()
        if args.action == "check":
            states = file_states(site)
            for path, state in states.items():
                print(f"{state:>9}  {site / path}")
            summary = set(states.values())
            if summary == {"original"}:
                print(f"OpenCLIP {version} unpatched: `slipform patch apply` can patch it")
            elif summary == {"patched"}:
                print("OpenCLIP carries Slipform's explicit patches")
            else:
                print("OpenCLIP files differ from the ones the patches expect: apply/revert will refuse")
                return 1
            return 0
        changed = apply(site) if args.action == "apply" else revert(site, force=args.force)
        verb = "patched" if args.action == "apply" else "restored"
        print(f"{verb} {len(changed)} files under {site}" if changed else f"nothing to do: already {verb}")
        return 0
    except PatchError as error:
        print(f"slipform patch: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
