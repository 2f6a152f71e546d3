"""A pre-forking TCP server: the parent opens the listening socket and forks workers that take
turns accepting on it, each serving one connection at a time; the parent only waits. Workers
die with the parent."""

import ctypes
import os
import signal
import socket
import sys

WORKERS = 3
PR_SET_PDEATHSIG = 1


def serve(listener: socket.socket) -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    while True:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    for _ in range(WORKERS):
        if os.fork() == 0:
            serve(listener)
    print("ready", flush=True)
    while True:
        os.wait()


if __name__ == "__main__":
    main()
