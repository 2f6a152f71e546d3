"""A single-threaded server that writes its replies with blocking sends: asked for b"bulk N" it
sends N bytes and serves no one else until they are all read; any other input is echoed."""

import select
import socket
import sys


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    conns: list[socket.socket] = []
    while True:
        ready, _, _ = select.select([listener, *conns], [], [])
        for sock in ready:
            if sock is listener:
                conns.append(listener.accept()[0])
                continue
            data = sock.recv(65536)
            if not data:
                conns.remove(sock)
                sock.close()
            elif data.startswith(b"bulk "):
                sock.sendall(b"x" * int(data.split()[1]))
            else:
                sock.sendall(data)


if __name__ == "__main__":
    main()
