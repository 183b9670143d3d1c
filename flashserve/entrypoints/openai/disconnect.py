"""Cancel a handler's work when its client disconnects.

A streaming response notices a gone client when it next writes; a non-streaming one writes only at
the end, so it would generate to the last token for nobody. Watching the ASGI receive channel for
`http.disconnect` and cancelling the work closes the engine generators inside it, which aborts
their requests and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from starlette.requests import Request


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """`await work`, unless the client goes first: then cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the aborts in its finally blocks run
    if task.cancelled():
        raise ClientGone()
    return task.result()
