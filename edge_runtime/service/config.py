"""``--config FILE.yaml`` for long-running commands: the file's keys are the command's options.

``{"device_id": "jetson-07", "keep_running": true, "heartbeat": 10}`` becomes
``--device-id jetson-07 --keep-running --heartbeat 10``, inserted *before* the flags typed on the
command line, so those win. Unknown keys, wrong value kinds and bad YAML are errors naming the
file and the key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from edge_runtime.errors import ConfigError


def config_argv(parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """The options in the YAML file ``path`` as command-line tokens for ``parser``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of option: value, got {type(data).__name__}")
    return options_argv(parser, data, str(path))


def options_argv(parser: argparse.ArgumentParser, data: dict, where: str) -> list[str]:
    """``{option: value}`` as command-line tokens for ``parser``; errors name ``where`` and the key."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(actions))}")
        opt = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
            argv += [opt] if value else []
        elif isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, (dict, list)) for v in values):
                raise ConfigError(f"{where}: {key} must be a value or a list of values")
            if isinstance(action, argparse._AppendAction):
                for v in values:
                    argv += [opt, str(v)]
            else:
                argv += [opt, *map(str, values)]
        else:
            if isinstance(value, (dict, list)) or value is None:
                raise ConfigError(f"{where}: {key} must be a single value, got {value!r}")
            argv += [opt, str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Replace ``--config FILE`` after a subcommand by that file's options (first, so typed flags win)."""
    sub_action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub_action is None:
        return argv
    idx = next((i for i, tok in enumerate(argv) if tok in sub_action.choices), None)
    if idx is None:
        return argv
    rest = argv[idx + 1:]
    path = None
    for i, tok in enumerate(rest):
        if tok == "--config" and i + 1 < len(rest):
            path, rest = rest[i + 1], rest[:i] + rest[i + 2:]
            break
        if tok.startswith("--config="):
            path, rest = tok.split("=", 1)[1], rest[:i] + rest[i + 1:]
            break
    if path is None:
        return argv
    return argv[:idx + 1] + config_argv(sub_action.choices[argv[idx]], Path(path)) + rest


LOG_OPTIONS = (("--log-level", {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"], "default": "INFO",
                                 "help": "what to log"}),
               ("--log-format", {"choices": ["text", "json"], "default": "text",
                                 "help": "one line per event: text (journald-aware) or JSON"}))


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every (sub)command shows its defaults in ``--help``, and takes ``--log-level`` / ``--log-format``
    before or after the subcommand's name (``edge-runtime agent ... --log-format json``)."""
    for opt, kw in LOG_OPTIONS:
        parser.add_argument(opt, **kw)
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        for action in p._actions:
            if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"   # the formatter skips options without a help text
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    taken = {s for a in sub._actions for s in a.option_strings}
                    for opt, kw in LOG_OPTIONS:
                        if opt not in taken:   # SUPPRESS: given here it wins, not given it leaves the top-level value
                            sub.add_argument(opt, **{**kw, "default": argparse.SUPPRESS})
                    parsers.append(sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``--config`` expanded, arguments parsed, logging set up (``--log-level`` / ``--log-format``)."""
    import sys

    from edge_runtime.service.logs import setup_logging

    args = parser.parse_args(expand_config(parser, list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.log_level, args.log_format)
    return args
