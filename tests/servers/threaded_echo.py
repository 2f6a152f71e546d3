"""A TCP server that starts a new thread for every connection: threads appear after attach."""

import signal
import socket
import sys
import threading
from collections.abc import Callable


def serve(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data.upper())


def main(handler: Callable[[socket.socket], None] = serve) -> None:
    """Serve each connection with ``handler`` on a thread of its own (other test servers pass
    theirs)."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # handlers for tests to signal its threads with
        signal.signal(sig, lambda *_: None)
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:  # a supervisor refused the connection
            continue
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
