"""A TCP server that forks a child process for every connection, which replies to each input
reversed; given a greeting after the port, the child first sends that, before it reads."""

import os
import signal
import socket
import sys


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            if len(sys.argv) > 2:
                conn.sendall(sys.argv[2].encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data[::-1])
            os._exit(0)
        conn.close()


if __name__ == "__main__":
    main()
