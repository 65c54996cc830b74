"""How many of Axolotl's example configs `axlora validate` accepts as they are, and which keys refuse the rest.

    python bench/axolotl_examples.py DIR [--text-lora] [--show]

DIR holds Axolotl YAML files (copied from its examples/ folder; nothing is fetched). Each file is validated
in its own `axlora validate` process, exactly as a user would run it; the report counts accepted files and,
for the refused ones, the keys named in the error lines (a file refused for two keys counts under both),
each with one file it refused. `--text-lora` first narrows DIR to the configs issue 16 measures: a LoRA or
QLoRA adapter on a text-only model, trained on a fixed dataset (SFT or preference pairs).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

# "  - file.yml:12: key: message", "  - file.yml:12: key / other_key: message" (a combination),
# "  - file.yml:12: unknown key 'key' (did you mean ...)", or without ":12" for a key that is missing
PROBLEM = re.compile(r"^\s+- \S+?(?::\d+)?: (?:unknown key '(?P<unknown>[^']+)'|(?P<key>[\w.\[\]]+(?: / [\w.\[\]]+)*):)")
OTHER = re.compile(r"^\s+- (?P<text>.*)$")
# A refused plugin is reported by its class name: "plugins" alone would lump different plugins together.
PLUGIN = re.compile(r"(?P<name>\w+Plugin)\b")

# The --text-lora selection. Online RL generates its own samples while training, so it is a different
# workload from fine-tuning on a dataset; multimodal configs need an image/audio processor axlora lacks.
LORA_ADAPTERS = frozenset({"lora", "qlora"})
ONLINE_RL = frozenset({"grpo", "gdpo", "gspo", "online_dpo", "ppo", "gkd", "ebft"})
MULTIMODAL_KEY = re.compile(r"(^|_)(processor|images?|vision|audio|video)(_|$)", re.IGNORECASE)
MULTIMODAL_DATA = re.compile(r"(?<![a-z])(vision|images?|llava|audio|speech|video|vlm)", re.IGNORECASE)
DATASET_FIELDS = ("path", "type", "data_files", "name")


def exclusion(path: Path) -> str | None:
    """Why a config is not a text LoRA/QLoRA config (None when it is one)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "unreadable YAML"
    if not isinstance(config, dict):
        return "unreadable YAML"
    if str(config.get("adapter") or "").lower() not in LORA_ADAPTERS:
        return "not LoRA/QLoRA"
    if str(config.get("rl") or "").lower() in ONLINE_RL:
        return "online RL"
    if any(MULTIMODAL_KEY.search(str(key)) for key in config) or _multimodal_data(config):
        return "multimodal"
    return None


def _multimodal_data(config: dict) -> bool:
    """Whether a dataset entry names image, audio or vision data."""
    entries = [entry for key in ("datasets", "test_datasets") for entry in config.get(key) or []]
    values = (entry.get(field) for entry in entries if isinstance(entry, dict) for field in DATASET_FIELDS)
    return any(MULTIMODAL_DATA.search(str(value)) for value in values if value)


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
            key = match["unknown"] or match["key"]
            plugin = PLUGIN.search(line) if key == "plugins" else None
            keys.append(f"plugins: {plugin['name']}" if plugin else key)
        elif OTHER.match(line):
            keys.append("(other) " + OTHER.match(line)["text"][:80])
    return keys or ["(no problem lines) " + output.strip().splitlines()[-1][:80] if output.strip() else "(no output)"]


def select(files: list[Path], folder: Path, show: bool) -> list[Path]:
    """The text LoRA/QLoRA configs among files, with a count of what was left out and why."""
    reasons = {path: exclusion(path) for path in files}
    left_out = Counter(reason for reason in reasons.values() if reason)
    if show:
        for path, reason in reasons.items():
            if reason:
                print(f"left out: {path.relative_to(folder)} ({reason})")
    detail = ", ".join(f"{count} {reason}" for reason, count in left_out.most_common())
    selected = [path for path, reason in reasons.items() if reason is None]
    print(f"selected {len(selected)}/{len(files)} as text LoRA/QLoRA" + (f" (left out: {detail})" if detail else ""))
    return selected


def report(results: list[tuple[Path, int, str]], folder: Path, show: bool) -> None:
    """Accepted count, then each refusing key with how many files it refused and one of them."""
    by_key: Counter[str] = Counter()
    example: dict[str, Path] = {}
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
        for key in keys:
            example.setdefault(key, path)
        if show:
            print(f"{path.relative_to(folder)}: {', '.join(keys)}")
    print(f"accepted {accepted}/{len(results)} ({100 * accepted / len(results):.0f}%), crashed {len(crashed)}")
    for key, count in by_key.most_common():
        print(f"  {count:3d}  {key}  (e.g. {example[key].relative_to(folder)})")
    for path in crashed:
        print(f"  crashed: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--text-lora", action="store_true",
                        help="only LoRA/QLoRA configs on text models trained on a fixed dataset")
    parser.add_argument("--show", action="store_true", help="print each refused (and left-out) file")
    args = parser.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix in (".yml", ".yaml"))
    if args.text_lora:
        files = select(files, args.folder, args.show)
    if not files:
        print(f"no {'text LoRA/QLoRA ' if args.text_lora else ''}.yml/.yaml files under {args.folder}",
              file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(validate, files))
    report(results, args.folder, args.show)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
