"""The ``streamer`` command line. Every flag also reads ``STREAMER_<NAME>`` from the environment.

One module per command group: ``serving`` (broker, worker, pipeline, stage, demo), ``clients`` (topics, publish,
results, status, top), ``replay``; ``_common`` holds what they share. This module parses and runs them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import StreamerError
from ..logs import setup_logging
from ._common import Parser, add_kafka
from .clients import add_client_parsers
from .replay import add_replay_parser
from .serving import add_serving_parsers

# Commands that are clients of the cluster for a moment (not long-running members of it), and the demo: they
# say in one line what failed (see kafka.translated_errors), which aiokafka's error log of each failed
# connection attempt would only repeat. Workers and stages quiet it until they first reach the cluster.
_QUIET_COMMANDS = frozenset({"topics", "publish", "results", "status", "top", "replay", "pipeline", "demo"})

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamer", description="Batched PyTorch inference on Apache Kafka.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", default=None, choices=["text", "json"],
                        help="text (default) or json: one JSON object per line (or STREAMER_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serving_parsers(sub)
    add_client_parsers(sub)
    add_replay_parser(sub, add_kafka)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # found by the top-level parser, but the flags belong to the command (`streamer worker --x`)
        prog = args.command_prog
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}; `{prog} --help` lists its arguments",
              file=sys.stderr)
        return 2
    try:
        setup_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"streamer: error: {exc} (--log-level: DEBUG, INFO, WARNING or ERROR; --log-format or "
              "STREAMER_LOG_FORMAT: text or json)", file=sys.stderr)
        return 2
    if args.command in _QUIET_COMMANDS and args.log_level.upper() != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output has gone (`streamer publish ... | head`): stop quietly, as Unix tools do
        # when SIGPIPE ends them, with their exit status (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout would raise again
        return 141
