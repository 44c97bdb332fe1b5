"""A target root, an empty JSON config and an empty command line in a temporary directory,
and the CLI arguments naming them: for tests that run the commands through click."""

from __future__ import annotations

from pathlib import Path


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.config = tmp_path / "mounts.json"
        self.config.write_text("{}")
        self.cmdline = tmp_path / "cmdline"
        self.cmdline.write_text("")

    def args(self, *extra: str) -> list[str]:
        return [
            "--root", str(self.root), "--config", str(self.config),
            "--cmdline", str(self.cmdline), *extra,
        ]  # fmt: skip
