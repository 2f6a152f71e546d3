"""An echo server that reads with readv and recvmsg into two buffers, the first of 8 bytes, so
that an input's bytes must be gathered from both."""

import os
import socket
import sys
import threading


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


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
