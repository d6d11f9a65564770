"""Print README's newcomer command number N (1: install and run the demo, 2: install and run the
tests), exactly as README's "Two commands for a fresh machine" section shows it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## Two commands for a fresh machine"


def readme_commands(readme: Path) -> list[str]:
    text = readme.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


if __name__ == "__main__":
    commands = readme_commands(Path(__file__).resolve().parents[1] / "README.md")
    if len(commands) != 2:
        sys.exit(f"README's '{SECTION}' section shows {len(commands)} bash blocks; it must show exactly two")
    print(commands[int(sys.argv[1]) - 1])
