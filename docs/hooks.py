"""mkdocs hook: the figures of the committed reports (``results/<study>/*.png``) become files of the site at
``results/<study>/``, so the results pages show them without a copy under docs/ that could go stale."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def on_files(files, config):
    for png in sorted((ROOT / "results").glob("*/*.png")):
        uri = png.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
