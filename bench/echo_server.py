#!/usr/bin/env python3
"""Minimal single-threaded epoll TCP echo server, used as a benchmark backend.

    python3 bench/echo_server.py --port 9999 [--host 127.0.0.1]

Prints "LISTENING <port>" on stdout once it accepts connections (with
--port 0 the kernel picks a free port).  Handles many thousands of idle
connections cheaply: one selector, non-blocking sockets, per-connection
output buffer only when the peer is slow.  Standard library only.
"""
import argparse
import errno
import resource
import selectors
import signal
import socket
import sys


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve(host, port, backlog):
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(backlog)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    print("LISTENING %d" % lsock.getsockname()[1], flush=True)

    pending = {}  # sock -> bytearray of unsent data

    def close(sock):
        pending.pop(sock, None)
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    while True:
        for key, mask in sel.select():
            sock = key.fileobj
            if sock is lsock:
                for _ in range(256):
                    try:
                        conn, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            sys.stderr.write("echo_server: %s\n" % exc)
                            break
                        raise
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, None)
                continue
            if mask & selectors.EVENT_WRITE:
                buf = pending[sock]
                try:
                    sent = sock.send(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(sock)
                    continue
                del buf[:sent]
                if not buf:
                    del pending[sock]
                    sel.modify(sock, selectors.EVENT_READ, None)
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(sock)
                    continue
                if not data:
                    close(sock)
                    continue
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    close(sock)
                    continue
                if sent < len(data):
                    # Stop reading until the peer drains what we owe it.
                    pending[sock] = bytearray(data[sent:])
                    sel.modify(sock, selectors.EVENT_WRITE, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.host, args.port, args.backlog)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
