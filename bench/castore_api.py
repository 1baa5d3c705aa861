"""castore through its Python API, timed inside the process.

    python bench/castore_api.py save SRC --store URL --key KEY [-o name=value ...]
    python bench/castore_api.py load DEST --store URL --key KEY [-o name=value ...]

Prints one JSON object: ``seconds`` (the ``save_sync``/``load_sync`` call alone),
``import_seconds`` (``import castore``) and what the call returned. The benchmark
runner also times the whole process, so interpreter start-up and imports show up as
the difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any


def _option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            pass
    return name, value


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value) if value is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="time castore save_sync/load_sync")
    parser.add_argument("op", choices=("save", "load"))
    parser.add_argument("path")
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", default="bench")
    parser.add_argument("-o", "--option", type=_option, action="append", default=[])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import castore

    import_seconds = time.perf_counter() - start
    store = castore.CheckpointStore(args.store, key=args.key, **dict(args.option))
    try:
        start = time.perf_counter()
        if args.op == "save":
            result: Any = store.save_sync(args.path)
        else:
            result = store.load_sync(args.path)
        seconds = time.perf_counter() - start
    finally:
        store.close()
    out = {
        "op": args.op,
        "seconds": seconds,
        "import_seconds": import_seconds,
        "result": _jsonable(result),
    }
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
