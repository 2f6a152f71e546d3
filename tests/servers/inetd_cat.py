"""An inetd-style server: for every connection a child process takes the socket as its standard
input and output and runs `cat` (or the command given after the port) in its place, so the
descriptor it accepted closes at exec, and the connection ends when the command exits, without a
close call."""

import os
import signal
import socket
import sys


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            command = sys.argv[2:] or ["cat"]
            os.execvp(command[0], command)
        conn.close()


if __name__ == "__main__":
    main()
