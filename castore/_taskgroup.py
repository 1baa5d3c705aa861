"""Structured concurrency that raises plain exceptions.

anyio task groups raise an ExceptionGroup, even for a single failure. Callers of
castore expect one CastoreError, so pipelines use :func:`task_group`, which re-raises
the most meaningful leaf: an interrupt first, then a castore error, then anything
else (the first in each class).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup

from ._errors import CastoreError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["for_each", "task_group"]

T = TypeVar("T")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


def _most_meaningful(leaves: list[BaseException]) -> BaseException:
    for wanted in (KeyboardInterrupt, SystemExit, CastoreError, Exception):
        for exc in leaves:
            if isinstance(exc, wanted):
                return exc
    return leaves[0]


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not leaves:
            raise
        chosen = _most_meaningful(leaves)
        # Keep the leaf's own cause (say, the obstore error behind a StorageError).
        raise chosen from chosen.__cause__


async def for_each(items: Iterable[T], action: Callable[[T], Awaitable[None]], limit: int) -> None:
    """Run ``action`` on every item, at most ``limit`` at a time. Tasks are started only
    as slots free up, so a million items never become a million pending tasks."""
    slots = anyio.Semaphore(limit)

    async def run(item: T) -> None:
        try:
            await action(item)
        finally:
            slots.release()

    async with task_group() as tg:
        for item in items:
            await slots.acquire()
            tg.start_soon(run, item)
