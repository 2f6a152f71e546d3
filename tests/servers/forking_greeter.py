"""A TCP server that forks a child process for every connection; the child greets the client
before it reads anything, then echoes."""

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
            conn.sendall(b"hi\n")
            while data := conn.recv(65536):
                conn.sendall(data)
            os._exit(0)
        conn.close()


if __name__ == "__main__":
    main()
