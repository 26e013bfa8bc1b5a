#!/usr/bin/env python3
"""Open many TCP connections to an echo service, hold them, check each echoes.

    python3 bench/hold.py --port PORT [-n 3000 | --10k] [--hold SECONDS]

Steps:
  1. raise the RLIMIT_NOFILE soft limit to the hard limit;
  2. open N connections (non-blocking, at most --parallel connects in
     flight so the listen backlog is not overrun);
  3. send a unique payload on every connection and check that exactly that
     payload comes back on that connection (round 1);
  4. print "HELD <json>" and keep every connection open, either until a
     line arrives on stdin (--wait-stdin, used by bench/run.py to measure
     the proxy's memory while all connections are open) or --hold seconds;
  5. check every connection again with a new unique payload (round 2),
     which proves they all survived being held;
  6. print "RESULT <json>" and close everything.

Exit status 0 only if all N connections echoed correctly twice.
Standard library only.
"""
import argparse
import errno
import json
import os
import resource
import selectors
import socket
import sys
import time


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        want = soft
    if want != resource.RLIM_INFINITY and want < need:
        sys.stderr.write(
            "hold.py: RLIMIT_NOFILE is %d, need about %d; expect failures\n"
            % (want, need))
    return want


class Failure(Exception):
    pass


class Progress:
    """Report progress on stderr every few seconds (bench/run.py keeps it
    in its log, and quotes the last line if this run times out)."""

    def __init__(self, every=5.0):
        self.every = every
        self.start = self.last = time.monotonic()

    def __call__(self, what, done, total):
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            sys.stderr.write("hold.py: %s %d/%d after %.1f s\n"
                             % (what, done, total, now - self.start))
            sys.stderr.flush()


PROGRESS = Progress()


def open_all(host, port, n, parallel, deadline):
    """Return (list of connected sockets, number of errors)."""
    sel = selectors.DefaultSelector()
    conns = []
    errors = 0
    started = 0
    inflight = 0
    first_error = None
    while len(conns) + errors < n:
        PROGRESS("connected", len(conns), n)
        if time.monotonic() > deadline:
            raise Failure("timeout while connecting: %d/%d connected"
                          % (len(conns), n), conns)
        while started < n and inflight < parallel:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            started += 1
            if rc in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE)
                inflight += 1
            else:
                errors += 1
                first_error = first_error or os.strerror(rc)
                s.close()
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            sel.unregister(s)
            inflight -= 1
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                errors += 1
                first_error = first_error or os.strerror(err)
                s.close()
            else:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns.append(s)
    sel.close()
    return conns, errors, first_error


def echo_round(conns, tag, deadline):
    """Send a unique payload on every connection; return number that echoed
    exactly their own payload, and a sample error."""
    token = os.urandom(6).hex()
    sel = selectors.DefaultSelector()
    expect = {}
    got = {}
    bad = 0
    sample = None
    for i, s in enumerate(conns):
        payload = ("%s-%s-%06d\n" % (tag, token, i)).encode()
        try:
            sent = s.send(payload)
        except OSError as exc:
            bad += 1
            sample = sample or "send: %s" % exc
            continue
        if sent != len(payload):  # tiny payload: never happens in practice
            bad += 1
            sample = sample or "short send"
            continue
        expect[s] = payload
        got[s] = b""
        sel.register(s, selectors.EVENT_READ)
    ok = 0
    while expect:
        PROGRESS("echoed " + tag, ok, len(conns))
        if time.monotonic() > deadline:
            bad += len(expect)
            sample = sample or ("timeout: %d connections did not echo"
                                % len(expect))
            break
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                data = None
                sample = sample or "recv: %s" % exc
            if not data:
                bad += 1
                sample = sample or "connection closed by peer"
                sel.unregister(s)
                del expect[s]
                continue
            got[s] += data
            want = expect[s]
            if len(got[s]) >= len(want):
                sel.unregister(s)
                if got[s] == want:
                    ok += 1
                else:
                    bad += 1
                    sample = sample or ("wrong echo: %r != %r"
                                        % (got[s][:40], want[:40]))
                del expect[s]
    sel.close()
    return ok, bad, sample


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="hold many connections open through a proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", "--connections", type=int, default=3000)
    parser.add_argument("--10k", dest="ten_k", action="store_true",
                        help="shorthand for -n 10000")
    parser.add_argument("--parallel", type=int, default=256,
                        help="connects in flight at once (default 256)")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds to hold all connections (default 0)")
    parser.add_argument("--wait-stdin", action="store_true",
                        help="hold until a line (or EOF) arrives on stdin")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="time limit in seconds for opening and checking"
                        " all connections, and again for the second check "
                        "(default 120)")
    args = parser.parse_args(argv)
    n = 10000 if args.ten_k else args.connections
    raise_nofile(n + 64)
    start = time.monotonic()
    deadline = start + args.timeout
    result = {"n": n, "connected": 0, "connect_errors": 0,
              "echo1_ok": 0, "echo2_ok": 0, "error": None}
    conns = []
    try:
        conns, errors, first_error = open_all(
            args.host, args.port, n, args.parallel, deadline)
        t_conn = time.monotonic()
        result.update(connected=len(conns), connect_errors=errors,
                      connect_s=round(t_conn - start, 4))
        if first_error:
            result["error"] = "connect: %s" % first_error
        ok, bad, sample = echo_round(conns, "a", deadline)
        t_echo = time.monotonic()
        result.update(echo1_ok=ok, echo1_s=round(t_echo - t_conn, 4),
                      open_echo_s=round(t_echo - start, 4))
        result["error"] = result["error"] or sample
        print("HELD " + json.dumps(result), flush=True)
        if args.wait_stdin:
            sys.stdin.readline()
        elif args.hold > 0:
            time.sleep(args.hold)
        t_hold = time.monotonic()
        ok, bad, sample = echo_round(conns, "b", t_hold + args.timeout)
        result.update(echo2_ok=ok,
                      echo2_s=round(time.monotonic() - t_hold, 4))
        result["error"] = result["error"] or sample
    except Failure as exc:
        result["error"] = str(exc.args[0])
        conns = exc.args[1]
        result["connected"] = len(conns)
    finally:
        for s in conns:
            s.close()
    result["all_ok"] = (result["echo1_ok"] == n and result["echo2_ok"] == n)
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
