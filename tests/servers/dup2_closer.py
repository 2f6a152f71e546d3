"""A server that echoes one input per connection, then ends the connection by dup2-ing
/dev/null over the socket's descriptor, and reads that descriptor once more (/dev/null now)."""

import os
import socket
import sys


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    devnull = os.open("/dev/null", os.O_RDONLY)
    while True:
        fd = listener.accept()[0].detach()
        os.write(fd, os.read(fd, 65536))
        os.dup2(devnull, fd)
        os.read(fd, 10)
        os.close(fd)


if __name__ == "__main__":
    main()
