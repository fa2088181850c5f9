"""`rtserver say`: placeholder until the client lands."""

from __future__ import annotations

import argparse

from rtserver.settings import Settings


def add_say_args(p: argparse.ArgumentParser, env: Settings) -> None:
    p.add_argument("text")


async def say(args: argparse.Namespace) -> int:
    raise SystemExit("not implemented yet")
