"""YAML -> validated ``Config``: parsing, command-line overrides, path resolution and error messages.

Every problem of a file is collected and reported at once, each naming the file, the key and its line,
so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from axlora.config import axolotl
from axlora.config.chat_templates import looks_like_template_file
from axlora.config.datasets import DatasetConfig
from axlora.config.preference_keys import PreferenceDatasetConfig, is_preference_entry
from axlora.config.schema import Config
from axlora.core.errors import ConfigError, UserError
from axlora.core.suggest import did_you_mean

KeyPath = tuple[str | int, ...]
_SEE_SCHEMA = "; `axlora schema` lists every key."
MAX_NESTING = 100
"""The deepest nesting a config may use; real configs use a few levels."""
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _print_note(message: str) -> None:
    print(message, file=sys.stderr)


def load_config(
    path: str | Path, overrides: Sequence[str] = (), log: Callable[[str], None] = _print_note
) -> Config:
    """Read, override, validate and resolve a config file; raise ``ConfigError`` listing every problem.

    Axolotl keys that are not axlora settings go through ``config.axolotl`` first: renamed ones are
    renamed, ones with no effect are dropped with a note passed to ``log``, unsupported ones are problems.
    """
    path = Path(path)
    source = str(path)
    text = _read_text(path)
    data, lines = _parse_yaml(text, source)
    override_values, override_problems = parse_overrides(overrides)
    problems = override_problems + _blank_adapter_problems(data, override_values, lines, source)
    data.update(override_values)
    for key in override_values:
        lines[(key,)] = -1  # -1 marks "from the command line"
    translation = axolotl.translate(data, set(Config.model_fields))
    _carry_lines(lines, translation.renamed)
    problems += [_where(lines, (key,), source) + message for key, message in translation.problems]
    problems += _unknown_key_problems(translation.data, lines, source)
    if problems:
        raise ConfigError(source, problems)
    try:
        config = Config.model_validate(translation.data)
    except ValidationError as exc:
        raise ConfigError(source, _describe_validation_errors(exc, lines, source)) from None
    for key, message in translation.notes:
        log(f"note: {_where(lines, (key,), source)}{message}")
    return resolve_paths(config, config_dir=path.resolve().parent)


def _blank_adapter_problems(
    data: dict[str, Any], overrides: dict[str, Any], lines: dict[KeyPath, int], source: str
) -> list[str]:
    """In Axolotl an empty ``adapter:`` means full fine-tuning: refuse it rather than train a LoRA silently."""
    if ("adapter",) in lines and "adapter" not in data and "adapter" not in overrides:
        return [_where(lines, ("adapter",), source) + "adapter: empty means full fine-tuning in Axolotl; axlora "
                "trains adapters only: set adapter: lora (or qlora)."]
    return []


def _carry_lines(lines: dict[KeyPath, int], renamed: dict[str, str]) -> None:
    """Renamed keys keep pointing at the line where the user wrote them."""
    for old, new in renamed.items():
        for key_path in [k for k in lines if k and k[0] == old]:
            lines[(new, *key_path[1:])] = lines[key_path]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: config file not found.")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a YAML config file.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config file ({exc}).") from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse YAML and remember the line of every key, so errors can point at it.

    What PyYAML lets through silently (a key written twice: the last wins) or fails on with a Python error (a
    key that is a number or null, nesting hundreds deep, an alias inside itself) is refused here with its line.
    """
    node = _compose(text, source)
    if node is None:
        raise ConfigError(source, ["the file is empty; expected a mapping of config keys."])
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(source, ["the top level must be a mapping of keys (key: value), not a list or a value."])
    problems = _structure_problems(node, source)
    if problems:
        raise ConfigError(source, problems)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_syntax_problem(exc, source)]) from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    _collect_lines(node, (), lines, set())
    return _drop_unset(data), lines


def _compose(text: str, source: str) -> yaml.Node | None:
    loader = yaml.SafeLoader(text)
    try:
        return loader.get_single_node()
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_syntax_problem(exc, source)]) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        line = loader.get_mark().line + 1
        raise ConfigError(source, [f"{source}:{line}: lists or mappings nested far too deeply to read (a config nests a "
                                   f"few levels; at most {MAX_NESTING})."]) from None
    finally:
        loader.dispose()


def _syntax_problem(exc: yaml.YAMLError, source: str) -> str:
    """Where the parser noticed the error and, when it is elsewhere, where the unclosed construct starts."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    opened = ""
    if context and start is not None and (mark is None or start.line != mark.line):
        construct = context.removeprefix("while parsing ").removeprefix("while scanning ")
        construct = construct.removeprefix("a ").removeprefix("an ")
        opened = f"; the {construct} it belongs to starts at line {start.line + 1}"
    return f"{where}: not valid YAML: {problem}{opened}"


def _structure_problems(root: yaml.MappingNode, source: str) -> list[str]:
    """Keys written twice, config keys that are not names, too deep nesting, aliases inside themselves.

    Walks the nodes without recursion, each node once (aliases share nodes), so no input can exhaust the stack.
    Problems come in file order.
    """
    problems: list[tuple[int, str]] = []
    stack: list[tuple[yaml.Node, KeyPath, frozenset[int]]] = [(root, (), frozenset())]
    seen: set[int] = set()
    while stack:
        node, path, ancestors = stack.pop()
        line = node.start_mark.line + 1
        if id(node) in ancestors:
            problems.append((line, f"{_dotted(path)}: an alias refers to a list or mapping that contains it."))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(path) > MAX_NESTING:
            problems.append((line, f"{_dotted(path[:2])}: nested more than {MAX_NESTING} levels deep."))
            break
        inside = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            problems += _key_problems(node, path)
            stack += [(value, (*path, str(key.value)), inside) for key, value in reversed(node.value)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, (*path, i), inside) for i, item in reversed(list(enumerate(node.value)))]
    return [f"{source}:{line}: {text}" for line, text in sorted(problems)]


def _key_problems(node: yaml.MappingNode, path: KeyPath) -> list[tuple[int, str]]:
    """Duplicates in any mapping; keys that are not strings where they are config keys (top level, datasets)."""
    problems = []
    first_line: dict[tuple[str, str], int] = {}
    config_keys = path == () or (len(path) == 2 and path[0] == "datasets")
    for key, _value in node.value:
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode):
            problems.append((line, f"a key of {_dotted(path) or 'the top level'} is a list or mapping; keys are names."))
            continue
        if config_keys and key.tag not in (_STR_TAG, _MERGE_TAG):
            kind = key.tag.rsplit(":", 1)[-1]
            problems.append((line, f"key {key.value!r} is read as {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
                                   "name; config keys are names (quote it if it is meant as one)."))
        identity = (key.tag, key.value)
        if identity in first_line and key.tag != _MERGE_TAG:
            problems.append((line, f"key '{_dotted((*path, key.value))}' is written twice (lines {first_line[identity]} "
                                   f"and {line}); YAML would silently keep the last value: keep one."))
        first_line.setdefault(identity, line)
    return problems


def _collect_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: its lines are where the anchor was written
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*prefix, index)] = item.start_mark.line + 1
            _collect_lines(item, (*prefix, index), lines, seen)


def _drop_unset(value: Any) -> Any:
    """A key written with no value means "unset" (an Axolotl habit): drop it so its default applies."""
    if isinstance(value, dict):
        return {k: _drop_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_unset(v) for v in value]
    return value


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``["--lora_r", "4", "--bf16=false"]`` into ``{"lora_r": 4, "bf16": False}``.

    Values are read as YAML scalars/lists (``[q_proj, v_proj]``), then type-checked with the file.
    """
    values: dict[str, Any] = {}
    problems: list[str] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            problems.append(f"command line: expected --key value, got {item!r}.")
            i += 1
            continue
        key, eq, raw = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                problems.append(f"command line: --{key} needs a value (--{key} VALUE).")
                i += 1
                continue
            raw = items[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        try:
            values[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            values[key] = raw
    return _drop_unset(values), problems


def _unknown_key_problems(data: dict[str, Any], lines: dict[KeyPath, int], source: str) -> list[str]:
    problems = []
    known = set(Config.model_fields)
    suggestions = known | set(axolotl.NO_OP) | set(axolotl.RENAMED)
    for key in data:
        if key not in known:
            problems.append(_where(lines, (key,), source) + f"unknown key '{key}'{did_you_mean(key, suggestions, _SEE_SCHEMA)}")
    for index, entry in enumerate(data.get("datasets") or []):
        if isinstance(entry, dict):
            kind = PreferenceDatasetConfig if is_preference_entry(entry) else DatasetConfig
            dataset_keys = set(kind.model_fields)
            for key in entry:
                if key not in dataset_keys:
                    where = _where(lines, ("datasets", index, key), source)
                    problems.append(
                        where + f"unknown key 'datasets[{index}].{key}'{did_you_mean(key, dataset_keys, _SEE_SCHEMA)}"
                    )
    return problems


def _where(lines: dict[KeyPath, int], key: KeyPath, source: str) -> str:
    line = lines.get(key)
    while line is None and len(key) > 1:
        key = key[:-1]
        line = lines.get(key)
    if line == -1:
        return "command line: "
    return f"{source}:{line}: " if line else f"{source}: "


def _describe_validation_errors(exc: ValidationError, lines: dict[KeyPath, int], source: str) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if not str(part).startswith(("function-", "union")))
        loc = _strip_union_tags(loc)
        if not loc:
            # A cross-field rule of Config: each line of its message starts with the keys it names.
            for line_text in str(error.get("ctx", {}).get("error", error["msg"])).splitlines():
                key = line_text.split(":", 1)[0].split("/")[0].strip()
                problems.append(_where(lines, (key,), source) + line_text)
            continue
        dotted = _dotted(loc)
        if error["type"] == "missing":
            problems.append(_where(lines, loc, source) + f"{dotted}: required key is missing.")
            continue
        got = error.get("input")
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own words
        problems.append(_where(lines, loc, source) + f"{dotted}: {message} (got {got!r}).")
    return _dedupe(problems)


def _strip_union_tags(loc: KeyPath) -> KeyPath:
    """Pydantic adds the member type (``bool``, ``literal['auto']``) to a union's error location."""
    kept: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and (part in {"bool", "int", "float", "str", "list[str]"} or "[" in part):
            continue
        kept.append(part)
    return tuple(kept)


def _dotted(loc: KeyPath) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _dedupe(problems: list[str]) -> list[str]:
    """Union fields report once per member; keep the first message for each location."""
    seen: set[str] = set()
    kept = []
    for problem in problems:
        head = problem.split(": ", 2)[:2]
        key = "|".join(head)
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def resolve_paths(config: Config, config_dir: Path) -> Config:
    """Make local paths absolute, so later stages and the saved config do not depend on the cwd.

    Relative paths are read from the current directory (as in Axolotl); when nothing exists there but
    the path exists next to the config file, that one is taken, so a config travels with its data.
    """
    updates: dict[str, Any] = {"output_dir": str(Path(config.output_dir).expanduser().resolve())}
    for key in ("lora_model_dir", "dataset_prepared_path", "tokenizer_config", "base_model"):
        value = getattr(config, key)
        if value is not None:
            updates[key] = _resolve_local(value, config_dir, must_be_local=key != "base_model"
                                          and key != "tokenizer_config")
    if config.chat_template_jinja and looks_like_template_file(config.chat_template_jinja):
        updates["chat_template_jinja"] = _resolve_local(config.chat_template_jinja, config_dir, must_be_local=True)
    if config.deepspeed and config.deepspeed.endswith(".json"):
        updates["deepspeed"] = _resolve_local(config.deepspeed, config_dir, must_be_local=True)
    if config.resume_from_checkpoint not in (None, "auto"):
        updates["resume_from_checkpoint"] = _resolve_local(config.resume_from_checkpoint, config_dir, True)
    datasets = [
        dataset.with_local_paths(lambda value: _resolve_local(value, config_dir, must_be_local=False))
        for dataset in config.datasets
    ]
    updates["datasets"] = datasets
    if config.pretraining_dataset:
        updates["pretraining_dataset"] = [_resolve_corpus(entry, config_dir) for entry in config.pretraining_dataset]
    return config.model_copy(update=updates)


def _resolve_corpus(entry, config_dir: Path):
    """A ``pretraining_dataset`` entry with its local path and ``data_files`` made absolute (Hub names kept)."""
    files = entry.data_files
    if files is not None:
        files = ([_resolve_local(name, config_dir, must_be_local=False) for name in files] if isinstance(files, list)
                 else _resolve_local(files, config_dir, must_be_local=False))
    return entry.model_copy(update={"path": _resolve_local(entry.path, config_dir, must_be_local=False),
                                    "data_files": files})


def _resolve_local(value: str, config_dir: Path, must_be_local: bool) -> str:
    """Absolute path for a local path; Hub names and built-in names (``axlora:``) pass through."""
    if ":" in value and not Path(value).exists():
        return value
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    if candidate.exists():
        return str(candidate.resolve())
    beside_config = config_dir / candidate
    if beside_config.exists():
        return str(beside_config.resolve())
    if must_be_local or value.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return value  # a Hub id such as meta-llama/Llama-3.2-1B
