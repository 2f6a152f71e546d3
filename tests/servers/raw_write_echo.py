"""A TCP echo server (upper case, one client at a time) that writes with the raw write syscall,
as a statically linked or Go server would: not through libc's write function."""

import ctypes
import socket
import sys

SYS_WRITE = 1  # x86_64


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                reply = data.upper()
                libc.syscall(SYS_WRITE, conn.fileno(), reply, len(reply))


if __name__ == "__main__":
    main()
