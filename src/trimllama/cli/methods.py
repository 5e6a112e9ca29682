"""`trimllama methods`: the registered selection methods, their settings and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..methods import METHODS
from ..methods.base import setting_fields


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("methods", help="list the registered selection methods")
    parser.add_argument("--json", action="store_true", help="print a machine-readable list")
    return parser


def describe() -> list[dict]:
    """One record per registered method: name, class, description, parameters with defaults."""
    records = []
    for name, cls in METHODS.items():
        parameters = {field.name: _default(field) for field in setting_fields(cls)}
        records.append(dict(name=name, cls=cls.__name__, description=cls.description, parameters=parameters))
    return records


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def run(args: argparse.Namespace) -> int:
    records = describe()
    if args.json:
        print(json.dumps(records, indent=2, default=repr))
        return 0
    width = max(len(record["name"]) for record in records)
    for record in records:
        settings = ", ".join(f"{key}={value!r}" for key, value in record["parameters"].items()) or "no settings"
        print(f"{record['name']:<{width}}  {record['description']}")
        print(f"{'':<{width}}  {record['cls']}({settings})")
    return 0
