"""How many of Axolotl's example configs `axlora validate` accepts as they are, and which keys refuse the rest.

    python bench/axolotl_examples.py DIR [--show]

DIR holds Axolotl YAML files (copied from its examples/ folder; nothing is fetched). Each file is validated
in its own `axlora validate` process, exactly as a user would run it; the report counts accepted files and,
for the refused ones, the keys named in the error lines (a file refused for two keys counts under both).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# "  - file.yml:12: key: message", "  - file.yml:12: key / other_key: message" (a combination) or
# "  - file.yml:12: unknown key 'key' (did you mean ...)"
PROBLEM = re.compile(r"^\s+- .*?:\d+: (?:unknown key '(?P<unknown>[^']+)'|(?P<key>[\w.\[\]]+(?: / [\w.\[\]]+)*):)")
OTHER = re.compile(r"^\s+- (?P<text>.*)$")


def validate(path: Path) -> tuple[Path, int, str]:
    """Run `axlora validate` on one file; the exit status and what it printed."""
    done = subprocess.run([sys.executable, "-m", "axlora.cli", "validate", str(path)],
                          capture_output=True, text=True, check=False)
    return path, done.returncode, done.stdout + done.stderr


def refusing_keys(output: str) -> list[str]:
    """The keys an error report names (one per problem line)."""
    keys = []
    for line in output.splitlines():
        match = PROBLEM.match(line)
        if match:
            keys.append(match["unknown"] or match["key"])
        elif OTHER.match(line):
            keys.append("(other) " + OTHER.match(line)["text"][:80])
    return keys or ["(no problem lines) " + output.strip().splitlines()[-1][:80] if output.strip() else "(no output)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--show", action="store_true", help="print each refused file with its keys")
    args = parser.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix in (".yml", ".yaml"))
    if not files:
        print(f"no .yml/.yaml files under {args.folder}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(validate, files))
    by_key: Counter[str] = Counter()
    crashed = []
    accepted = 0
    for path, status, output in results:
        if status == 0:
            accepted += 1
            continue
        if status != 2 or "Traceback" in output:
            crashed.append(path)
        keys = sorted(set(refusing_keys(output)))
        by_key.update(keys)
        if args.show:
            print(f"{path.name}: {', '.join(keys)}")
    print(f"accepted {accepted}/{len(files)} ({100 * accepted / len(files):.0f}%), crashed {len(crashed)}")
    for key, count in by_key.most_common():
        print(f"  {count:3d}  {key}")
    for path in crashed:
        print(f"  crashed: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
