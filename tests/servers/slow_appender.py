"""A thread per connection appends to one shared list: ``add WORD MILLISECONDS`` waits that long
(a nanosleep: not a wait for input) before it appends WORD; ``list`` answers the words, in order.
Two connections' adds race unless the second is sent only once the first's thread is done."""

import socket
import threading
import time

from threaded_echo import main  # beside this file

WORDS: list[str] = []
LOCK = threading.Lock()


def serve(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            command = line.split()
            if command[0] == b"add":
                time.sleep(int(command[2]) / 1000)
                with LOCK:
                    WORDS.append(command[1].decode())
                conn.sendall(b"ok\n")
            elif command[0] == b"list":
                with LOCK:
                    conn.sendall((" ".join(WORDS) + "\n").encode())


if __name__ == "__main__":
    main(serve)
