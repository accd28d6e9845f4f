"""``python -m llmswap check-config FILE``: validate a configuration without starting anything."""

from __future__ import annotations

import argparse
import sys

from llmswap.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmswap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a config file and list its models")
    check.add_argument("path")
    args = parser.parse_args(argv)

    try:
        config = load(args.path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.path}: OK, {len(config.models)} models, listen {config.listen}")
    for name, model in config.models.items():
        how = (
            f"container {model.container_name}"
            if model.container_name
            else f"cmd {' '.join(model.cmd or ())}"
        )
        print(f"  {name}: {model.backend_url} ({how}; startup_timeout {model.startup_timeout:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
