"""A server that echoes one input per connection, then ends the connection without a close call
for its descriptor, and reads that descriptor number once more (/dev/null now). How it ends it:
``dup2`` (the default) puts /dev/null over the socket's descriptor; ``close_range`` closes the
descriptor with close_range(2) and opens /dev/null, which takes the lowest free number, its own;
``close_range_wide`` first dups the socket to a number 300 above it, past what the probe looks at
itself, and closes both with one close_range over the numbers between."""

import os
import socket
import sys


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    how = sys.argv[2] if len(sys.argv) > 2 else "dup2"
    devnull = os.open("/dev/null", os.O_RDONLY)
    while True:
        fd = listener.accept()[0].detach()
        os.write(fd, os.read(fd, 65536))
        if how.startswith("close_range"):
            last = fd
            if how == "close_range_wide":
                last = os.dup2(fd, fd + 300)
            os.closerange(fd, last + 1)  # close_range(fd, last, 0)
            if os.open("/dev/null", os.O_RDONLY) != fd:
                raise SystemExit("/dev/null did not take the closed socket's number")
        else:
            os.dup2(devnull, fd)
        os.read(fd, 10)
        os.close(fd)


if __name__ == "__main__":
    main()
