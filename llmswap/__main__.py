"""``python -m llmswap``: validate a configuration, or print the table of settings.

- ``check-config FILE``: validate without starting anything; list the effective settings (those
  not at their default) and every model with its own; exit 1 with the error otherwise.
- ``settings``: the Markdown table of every setting, as the README shows it.
- ``convert-llama-swap FILE``: a llama-swap configuration as an llmswap one, on stdout; what does
  not carry over is listed at its top and on stderr.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from llmswap.config import convert, settings
from llmswap.config.config import load
from llmswap.config.values import ConfigError
from llmswap.describe import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmswap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file and list its models")
    check.add_argument("path")
    sub.add_parser("settings", help="print the table of every setting (Markdown)")
    conv = sub.add_parser("convert-llama-swap", help="print a llama-swap config as llmswap's")
    conv.add_argument("path")
    args = parser.parse_args(argv)

    if args.command == "settings":
        print(settings.markdown_table())
        return 0
    if args.command == "convert-llama-swap":
        return _convert(args.path)
    try:
        config = load(args.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(describe(config, args.path)))
    return 0


def _convert(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            text, left = convert.render(yaml.safe_load(f), path)
    except (OSError, yaml.YAMLError, ConfigError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    for line in left:
        print(f"not carried over: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
