"""An echo server that reads with readv and recvmsg into two buffers, the first of 8 bytes, so
that an input's bytes must be gathered from both."""

import os
import socket

import threaded_echo  # beside this file


def serve(conn: socket.socket) -> None:
    with conn:
        calls = 0
        while True:
            head, tail = bytearray(8), bytearray(65536)
            if calls % 2:
                n = os.readv(conn.fileno(), [head, tail])
            else:
                n = conn.recvmsg_into([head, tail])[0]
            calls += 1
            if not n:
                return
            conn.sendall(bytes(head + tail)[:n])


if __name__ == "__main__":
    threaded_echo.main(serve)
