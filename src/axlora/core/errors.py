"""Errors that carry what the user must know. Only ``cli.py`` turns them into messages and exit codes."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths): reported as one clear message, exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """One or more problems in a config file, all reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the config:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class RunFailed(Exception):
    """The work itself failed a check (not bad input): one clear message, exit status 1, no traceback."""

    exit_code = 1
