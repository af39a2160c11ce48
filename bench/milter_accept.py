"""A trivial milter for the benchmark: it negotiates every step and every action, answers
continue to each step and accept at the end of the message (so the MTA sends the whole message
and pays the full protocol cost), and does nothing else.

    python bench/milter_accept.py PORT        # listens on 127.0.0.1:PORT until killed
"""

from __future__ import annotations

import asyncio
import struct
import sys

CONTINUE = struct.pack("!I", 1) + b"c"
ACCEPT = struct.pack("!I", 1) + b"a"
NO_REPLY = {b"D", b"A", b"Q"}  # macros, abort, quit


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            packet = await reader.readexactly(length)
            code = packet[:1]
            if code == b"O":  # version 6, every action asked for none, every step wanted
                writer.write(struct.pack("!I", 13) + b"O" + struct.pack("!III", 6, 0, 0))
            elif code == b"Q":
                break
            elif code in NO_REPLY:
                continue
            else:
                writer.write(ACCEPT if code == b"E" else CONTINUE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
