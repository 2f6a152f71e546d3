"""A TCP server with a thread per connection: a client that sends "tick" gets "tock" every
50 ms from then on, written without reading anything more; any other input is echoed in upper
case. A thread that writes what no input of its own asked for, as a server whose threads share
what they serve may."""

import socket
import time

import threaded_echo  # beside this file


def serve(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            if data == b"tick":
                while True:
                    conn.sendall(b"tock")
                    time.sleep(0.05)
            conn.sendall(data.upper())


if __name__ == "__main__":
    threaded_echo.main(serve)
