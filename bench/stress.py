#!/usr/bin/env python3
"""Stress cases for vaurien: the load and fault cases of a reliability review.

    python3 bench/stress.py [--vaurien PATH] [--only CASE[,CASE]]
                            [--repeat N] [--quick] [--keep-tmp]
                            [--toxiproxy PATH]

Each case starts what it needs (vaurien.py in a subprocess on free ports,
Python backends in threads, bench/echo_server.py, redis-server, nginx),
drives it, takes its figures from the clients' side and from /proc, and
stops it.  One table of every figure is printed at the end.  Every wait
has a deadline and every case a time budget, so a wedged proxy costs one
failed case, never a hung run.  See bench/README.txt, "Stress cases".

Run by hand, never in CI.  Standard library only (Python 3.8+); bench/run.py
lends its process handling, /proc readers and the redis and nginx backends.
"""
import argparse
import collections
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import run as harness

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
VAURIEN = os.path.join(os.path.dirname(BENCH_DIR), "vaurien.py")
HOST = "127.0.0.1"
MB = 1 << 20
monotonic = time.monotonic

# sizes and durations: (full, quick); quick is a smoke test of the script
# itself, its figures are not the review's
SETTINGS = {
    "full": dict(api_s=10, api_clients=20, api_streams=200, slow_n=1000,
                 mem_send_s=10, mem_after_s=30, duplex_mb=64, trials=30,
                 term_runs=5, term_streams=500),
    "quick": dict(api_s=3, api_clients=20, api_streams=50, slow_n=200,
                  mem_send_s=3, mem_after_s=5, duplex_mb=16, trials=5,
                  term_runs=2, term_streams=100),
}


class StressError(Exception):
    """One case (or one of its measurements) failed; the run goes on."""


class CaseTimeout(BaseException):
    """A case overran its time budget (raised by SIGALRM in the main
    thread).  A BaseException, so that no `except Exception` of the case
    swallows it."""


def _join(threads, deadline):
    """Join *threads* until the absolute *deadline*; returns how many are
    still alive (they are daemons: they cannot keep the script alive)."""
    for thread in threads:
        thread.join(max(0.0, deadline - monotonic()))
    return sum(thread.is_alive() for thread in threads)


def _start(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


def percentile(values, fraction):
    """The *fraction* percentile of sorted *values* (nearest rank)."""
    if not values:
        return None
    return values[min(len(values) - 1, int(fraction * len(values)))]


# --------------------------------------------------------------------------
# vaurien under test

class Vaurien(object):
    """vaurien.py in a subprocess (its own process group), proxy and API
    on free ports read back from --ready-file."""

    def __init__(self, ctx, backend_port, extra=(), http=False, label="v"):
        folder = os.path.join(ctx.tmp, "vaurien-%d-%s" % (next(ctx.ids),
                                                           label))
        os.makedirs(folder)
        self.log = os.path.join(folder, "vaurien.log")
        self.stderr = os.path.join(folder, "stderr.log")
        ready = os.path.join(folder, "ready.json")
        cmd = ctx.python + [
            ctx.vaurien, "--proxy", "%s:0" % HOST,
            "--backend", "%s:%d" % (HOST, backend_port),
            "--log-level", "warning", "--log-output", self.log,
            "--ready-file", ready]
        if http:
            cmd += ["--http", "--http-port", "0"]
        cmd += list(extra)
        self.cmd = cmd
        self.proc = harness.spawn(cmd, log_path=self.stderr)
        self.pid = self.proc.pid
        deadline = monotonic() + 20
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise StressError("vaurien exited with status %s before it "
                                  "was ready%s" % (self.proc.returncode,
                                                   harness.log_tail(
                                                       self.stderr)))
            if monotonic() > deadline:
                self.stop()
                raise StressError("vaurien not ready after 20 s%s"
                                  % harness.log_tail(self.stderr))
            time.sleep(0.02)
        with open(ready) as stream:
            info = json.load(stream)
        self.port = info["proxy"][1]
        self.address = (HOST, self.port)
        self.http_port = info["http"][1] if info.get("http") else None
        ctx.keep_off(self)

    def alive(self):
        return self.proc.poll() is None

    def fds(self):
        try:
            return len(os.listdir("/proc/%d/fd" % self.pid))
        except OSError:
            return None

    def threads(self):
        try:
            return len(os.listdir("/proc/%d/task" % self.pid))
        except OSError:
            return None

    def held_on(self, port):
        """The peers' ports of the connections on local *port* that vaurien
        has accepted and not closed (CLOSE_WAIT included: the client went,
        vaurien has not let go), as a set.  In /proc/net/tcp a connection
        still in the listen queue has no socket inode yet (0); and a read
        of the table is no snapshot (a line may come twice while sockets
        come and go), hence a set."""
        return set(int(parts[2].rsplit(":", 1)[1], 16)
                   for parts in harness.tcp_sockets(port)
                   if parts[3] != "0A" and parts[9] != "0")

    def memory_kib(self):
        """(RSS, PSS) in KiB from /proc/PID/smaps_rollup (all threads)."""
        found = {}
        try:
            with open("/proc/%d/smaps_rollup" % self.pid) as stream:
                for line in stream:
                    key = line.split(":", 1)[0]
                    if key in ("Rss", "Pss"):
                        found[key] = int(line.split()[1])
        except OSError:
            return None, None
        return found.get("Rss"), found.get("Pss")

    def api(self, method, path, body=None, timeout=5.0):
        """One control API call on a new connection: (status, JSON)."""
        conn = http.client.HTTPConnection(HOST, self.http_port,
                                          timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read().decode("utf-8"))
        finally:
            conn.close()

    def open_connections(self):
        """len(GET /connections), or None when the API does not answer in
        5 s (itself a finding)."""
        try:
            status, answer = self.api("GET", "/connections")
        except (OSError, ValueError, http.client.HTTPException):
            return None
        return len(answer.get("connections", ())) if status == 200 else None

    def stop(self):
        harness.kill(self.proc)


def pin_tasks(pid, cpus):
    """Run every thread of process *pid* on *cpus* (threads it starts
    later inherit it from their parent thread)."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def wait_exit(proc, timeout):
    """Seconds from now until *proc* exits (None after *timeout*).  A pidfd
    wakes the instant it exits; Popen.wait polls every 50 ms."""
    start = monotonic()
    opener = getattr(os, "pidfd_open", None)
    if opener is not None:
        try:
            fd = opener(proc.pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                poller = selectors.DefaultSelector()
                poller.register(fd, selectors.EVENT_READ)
                ready = poller.select(timeout)
                poller.close()
            finally:
                os.close(fd)
            elapsed = monotonic() - start
            if not ready:
                return None
            proc.wait(5)
            return elapsed
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    return monotonic() - start


# --------------------------------------------------------------------------
# backends and load, in this process or as subprocesses

class NiceEcho(harness.EchoBackend):
    """bench/echo_server.py at nice 10: on a 2-core machine the load tools
    should not starve the clients that take the figures."""

    def command(self):
        return ["nice", "-n", "10"] + super(NiceEcho, self).command()


class ThreadServer(object):
    """A Python backend on a free loopback port: ``handler(server, conn)``
    in a daemon thread per connection.  stop() shuts every connection down
    (a handler blocked in recv wakes up) and closes the listener."""

    def __init__(self, handler):
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(1024)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.accepted = 0
        self.conns = []
        self.state = {}
        self._thread = _start(self._accept)

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            _start(self._serve, conn)

    def _serve(self, conn):
        try:
            self.handler(self, conn)
        except OSError:
            pass
        finally:
            _close(conn)

    def stop(self):
        self.stopping.set()
        _close(self.listener)
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2)


class Blaster(object):
    """N connections that write (and read back, from an echo backend) as
    fast as they can, in a subprocess at nice 10 (this script's own
    ``--blast`` mode), so that the clients taking figures here keep their
    GIL and their CPU."""

    def __init__(self, ctx, address, connections, seconds):
        self.buf = [b""]
        self.log = os.path.join(ctx.tmp, "blast-%d.log" % next(ctx.ids))
        self.proc = harness.spawn(
            [sys.executable, os.path.abspath(__file__), "--blast",
             "%s:%d" % address, "--connections", str(connections),
             "--seconds", str(seconds)], log_path=self.log,
            stdout=subprocess.PIPE)
        self.seconds = seconds
        if ctx.spare:
            pin_tasks(self.proc.pid, ctx.spare)

    def ready(self, timeout=30):
        return self._read("READY", timeout)

    def finish(self, timeout=10):
        """Stop it; what it moved ({sent, received, seconds, ...})."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            return self._read("DONE", timeout)
        finally:
            self.stop()

    def _read(self, tag, timeout):
        return harness.read_line(self.proc, (tag,), monotonic() + timeout,
                                 self.buf, self.log, "load generator")[1]

    def stop(self):
        harness.kill(self.proc)


def blast_main(target, connections, seconds):
    """--blast mode: see Blaster.  Prints READY then DONE (JSON)."""
    try:
        os.nice(10)
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    host, _, port = target.rpartition(":")
    poller = selectors.DefaultSelector()
    pending = set()
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, int(port)))
        poller.register(sock, selectors.EVENT_WRITE)
        pending.add(sock)
    connected, failed = [], 0
    deadline = monotonic() + 20
    while pending and monotonic() < deadline and not stop:
        for key, _ in poller.select(0.5):
            sock = key.fileobj
            if sock not in pending:
                continue
            pending.discard(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
                poller.unregister(sock)
                sock.close()
            else:
                connected.append(sock)
                poller.modify(sock, selectors.EVENT_READ |
                              selectors.EVENT_WRITE)
    failed += len(pending)
    for sock in pending:
        poller.unregister(sock)
        sock.close()
    print("READY " + json.dumps({"connected": len(connected),
                                 "failed": failed}), flush=True)
    chunk = memoryview(_pattern(64 * 1024))
    sent = received = errors = 0
    start = monotonic()
    end = start + seconds
    live = len(connected)
    while not stop and live and monotonic() < end:
        for key, mask in poller.select(0.5):
            sock = key.fileobj
            try:
                if mask & selectors.EVENT_READ:
                    data = sock.recv(262144)
                    if not data:
                        raise ConnectionResetError("end of stream")
                    received += len(data)
                if mask & selectors.EVENT_WRITE:
                    sent += sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                errors += 1
                live -= 1
                poller.unregister(sock)
                sock.close()
    print("DONE " + json.dumps({
        "sent": sent, "received": received, "errors": errors, "open": live,
        "seconds": monotonic() - start}), flush=True)
    return 0


def _pattern(size):
    """*size* bytes of no protocol: '*' then bytes 20..219 over and over,
    never a CR nor a LF (the redis parser gives up on the first line and
    passes the stream through, as it does on any garbage)."""
    block = bytes(20 + i % 200 for i in range(size))
    return b"*" + block[1:]


def echo_round_trips(address, count=50, timeout=10.0):
    """*count* clients at once, each a new connection with one payload
    that must come back whole: how many succeeded."""
    done = []

    def one(i):
        payload = ("round trip %d " % i).encode() * 4
        try:
            with socket.create_connection(address, timeout=timeout) as sock:
                sock.settimeout(timeout)
                sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    data = sock.recv(65536)
                    if not data:
                        break
                    got += data
            if got == payload:
                done.append(i)
        except OSError:
            pass
    threads = [_start(one, i) for i in range(count)]
    _join(threads, monotonic() + timeout + 5)
    return len(done)


# --------------------------------------------------------------------------
# case 1: api-latency

API_TIMEOUT = 20.0
# (what the table calls it, method, path, body, the status that answers it)
API_REQUESTS = [("GET /stats", "GET", "/stats", None, 200),
                ("GET /behavior", "GET", "/behavior", None, 200),
                ("PUT /behavior", "PUT", "/behavior", b'{"name": "dummy"}',
                 200)]


def _api_client(port, keep_alive, end, out, requests=API_REQUESTS):
    """*requests* (default GET /stats, GET /behavior, PUT /behavior) in a
    loop until *end*; each request's time goes to out["lat"] and to
    out["calls"][its name] (connecting included when each request has its
    own connection)."""
    conn = None
    i = 0
    while monotonic() < end:
        call, method, path, body, wanted = requests[i % len(requests)]
        i += 1
        start = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port,
                                                  timeout=API_TIMEOUT)
            headers = {"Content-Type": "application/json"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            elapsed = time.perf_counter() - start
            if resp.status == wanted:
                out["lat"].append(elapsed)
                out["calls"].setdefault(call, []).append(elapsed)
            else:
                out["errors"].append("HTTP %d" % resp.status)
            if not keep_alive or resp.will_close:
                conn.close()
                conn = None
        except socket.timeout:
            out["timeouts"] += 1
            conn.close()
            conn = None
        except (OSError, http.client.HTTPException) as exc:
            out["errors"].append(type(exc).__name__)
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)
    if conn is not None:
        conn.close()


def _api_round(port, clients, seconds, requests=None):
    """*clients* API clients for *seconds*: half on a new connection per
    request, half on one keep-alive connection.  *requests(i)*: client
    i's requests (default API_REQUESTS).  {mode: results}."""
    end = monotonic() + seconds
    results = {}
    threads = []
    for i in range(clients):
        mode = "keep-alive" if i % 2 else "new connection"
        out = results.setdefault(mode, {"lat": [], "calls": {},
                                        "timeouts": 0, "errors": []})
        threads.append(_start(_api_client, port, mode == "keep-alive", end,
                              out, requests(i) if requests else
                              API_REQUESTS))
    stuck = _join(threads, end + API_TIMEOUT + 10)
    for out in results.values():
        out["stuck"] = stuck
    return results


def _api_rows(label, results, stream_mbs=None, note="", calls=()):
    """Two rows (new connection, keep-alive) of *results*; *calls*:
    (call name, column prefix) pairs that get a p50 and a p99 column
    each."""
    rows = []
    for mode in ("new connection", "keep-alive"):
        out = results[mode]
        lat = sorted(out["lat"])
        notes = [note] if note else []
        if out["errors"]:
            kinds = collections.Counter(out["errors"])
            notes.append("errors: " + ", ".join(
                "%s x%d" % kv for kv in kinds.most_common(3)))
        if out["stuck"]:
            notes.append("%d clients still stuck at the end" % out["stuck"])
        values = {
            "requests": len(lat),
            "p50": percentile(lat, 0.50) * 1e3 if lat else None,
            "p99": percentile(lat, 0.99) * 1e3 if lat else None,
            "max": lat[-1] * 1e3 if lat else None,
            "timeouts": out["timeouts"], "errors": len(out["errors"]),
            "streams": stream_mbs}
        for call, key in calls:
            times = sorted(out["calls"].get(call, ()))
            for fraction, suffix in ((0.50, "50"), (0.99, "99")):
                values[key + suffix] = percentile(times, fraction) * 1e3 \
                    if times else None
        rows.append(Row("%s, %s" % (label, mode), values, notes))
    return rows


def _streaming_round(ctx, address, api_port, requests=None):
    """An _api_round on *api_port* while cfg["api_streams"] connections
    stream to *address* as fast as they can: (results, streams MB/s, a
    note when the streams fell short)."""
    cfg = ctx.cfg
    blaster = Blaster(ctx, address, cfg["api_streams"], cfg["api_s"] + 60)
    info = blaster.ready()
    time.sleep(1.0)     # the streams up to speed before we measure
    results = _api_round(api_port, cfg["api_clients"], cfg["api_s"],
                         requests)
    rate, note = None, ""
    try:
        done = blaster.finish()
        rate = (done["sent"] + done["received"]) / MB / done["seconds"]
        if info["connected"] < cfg["api_streams"] or done["errors"]:
            note = "streams: %d of %d connected, %d errors" % (
                info["connected"], cfg["api_streams"], done["errors"])
    except (StressError, harness.BenchError) as exc:
        note = "streams: %s" % exc
    return results, rate, note


def case_api_latency(ctx):
    cfg = ctx.cfg
    echo = ctx.backend(NiceEcho)
    v = Vaurien(ctx, echo.port, http=True, label="api")
    rows = []
    try:
        results = _api_round(v.http_port, cfg["api_clients"], cfg["api_s"])
        rows += _api_rows("no traffic", results)
        results, rate, note = _streaming_round(ctx, v.address, v.http_port)
        rows += _api_rows("%d streams" % cfg["api_streams"], results, rate,
                          note)
        if not v.alive():
            rows[-1].notes.append("vaurien died (status %s)"
                                  % v.proc.returncode)
    finally:
        v.stop()
    return rows


# --------------------------------------------------------------------------
# case 2: slowloris

SLOW_HEAD = (b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " +
             b"a" * 4096)


class SlowClients(object):
    """*n* connections to the control API, each sending one byte of a
    request head per second, from its connection on, a head that never
    ends.  One thread feeds them all and notices which ones the server
    closed (EOF, reset, or an answer followed by the close)."""

    def __init__(self, port, n, accepted, timeout=60.0, batch=4):
        self.open = {}          # sock -> bytes sent
        self.closed = 0
        self.answered = 0
        self.refused = 0
        self.paced = True
        self._new = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = selectors.DefaultSelector()
        self._thread = _start(self._feed)
        self._connect(port, n, accepted, timeout, batch)
        self.connected_at = monotonic()

    def _connect(self, port, n, accepted, timeout, batch):
        # a few at a time, each batch once the server has accepted the one
        # before: the API's listen queue holds 6, and a handshake it drops
        # leaves a client that believes it is connected while its server
        # side waits for a retransmission (1 s, 3 s, 7 s...); that would
        # blur what this case counts, the connections the server holds
        poller = selectors.DefaultSelector()
        deadline = monotonic() + timeout
        started = 0
        while started < n and monotonic() < deadline:
            # once the server accepts no more (out of descriptors), the
            # rest go at once: they can only wait in its listen queue
            size = batch if self.paced else n - started
            flying = set()
            for _ in range(min(size, n - started)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex((HOST, port))
                poller.register(sock, selectors.EVENT_WRITE)
                flying.add(sock)
                started += 1
            until = min(deadline, monotonic() + 3)
            ports = set()
            while flying and monotonic() < until:
                for key, _ in poller.select(0.2):
                    sock = key.fileobj
                    flying.discard(sock)
                    poller.unregister(sock)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self.refused += 1
                        sock.close()
                    else:
                        ports.add(sock.getsockname()[1])
                        with self._lock:
                            self._new.append(sock)
            for sock in flying:
                poller.unregister(sock)
                sock.close()
            # wait until the server has accepted these very ones; give up
            # pacing when it accepts none of them for 5 s
            left, since = len(ports), monotonic()
            while self.paced and ports:
                ports -= accepted()
                if len(ports) < left:
                    left, since = len(ports), monotonic()
                elif monotonic() - since > 5.0 or monotonic() > deadline:
                    self.paced = False
                else:
                    time.sleep(0.002)
        poller.close()
        with self._lock:
            self.connected = len(self.open) + len(self._new) + self.closed

    def _gone(self, sock):
        self._poller.unregister(sock)
        del self.open[sock]
        self.closed += 1
        sock.close()

    def _feed(self):
        tick = monotonic()
        while not self._stop.is_set():
            with self._lock:
                new, self._new = self._new, []
            for sock in new:
                self.open[sock] = 0
                self._poller.register(sock, selectors.EVENT_READ)
            for sock in list(self.open):
                sent = self.open[sock]
                try:
                    self.open[sock] += sock.send(SLOW_HEAD[sent:sent + 1])
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._gone(sock)
            # newcomers start at once (the next tick comes sooner), so no
            # client is quiet for more than a second
            tick = min(tick + 1.0, monotonic() + 1.0)
            while not self._stop.is_set() and monotonic() < tick:
                if self._new:
                    break
                for key, _ in self._poller.select(
                        max(0, min(0.05, tick - monotonic()))):
                    sock = key.fileobj
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self.answered += 1
                        continue
                    self._gone(sock)

    def held(self):
        return len(self.open)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for sock in list(self.open) + self._new:
            sock.close()
        self._poller.close()


def _wait_until(when):
    delay = when - monotonic()
    if delay > 0:
        time.sleep(delay)


def case_slowloris(ctx):
    cfg = ctx.cfg
    n = cfg["slow_n"]
    echo = ctx.backend(NiceEcho)
    rows = []

    def slow_round(v, label, checkpoints):
        """The slow clients against *v*: its figures at each checkpoint
        (seconds after the last one connected); echo round trips at 5 s."""
        def accepted():
            return v.held_on(v.http_port)
        start = monotonic()
        slow = SlowClients(v.http_port, n, accepted)
        try:
            values = {"accepted": len(accepted()),
                      "connect": slow.connected_at - start}
            notes = [] if slow.connected == n else [
                "%d/%d connected" % (slow.connected, n)]
            if not slow.paced:
                notes.append("vaurien accepted none of a batch for 5 s: "
                             "the rest were left in its listen queue")
            t0 = slow.connected_at
            for at in sorted(set(checkpoints) | {5}):
                _wait_until(t0 + at)
                if at == 5:
                    values["echo"] = echo_round_trips(v.address)
                    values["fds"], values["threads"] = v.fds(), v.threads()
                if at in checkpoints:
                    values["held%d" % at] = len(accepted())
            if max(checkpoints) > 5:
                values["fds"], values["threads"] = v.fds(), v.threads()
            if slow.closed:
                notes.append("%d closed by vaurien (client side)"
                             % slow.closed)
            if slow.answered:
                notes.append("%d answered" % slow.answered)
            if not v.alive():
                notes.append("vaurien died (status %s)" % v.proc.returncode)
            rows.append(Row(label, values, notes))
        finally:
            slow.close()

    v = Vaurien(ctx, echo.port, http=True, label="slow")
    try:
        slow_round(v, "%d slow clients, default fd limit" % n, (12, 25))
    finally:
        v.stop()

    v = Vaurien(ctx, echo.port, http=True, label="slow400")
    try:
        # vaurien raises its own limit at start (as root past any hard
        # limit, so prlimit before the exec would not hold): set it on the
        # running process instead
        resource.prlimit(v.pid, resource.RLIMIT_NOFILE, (400, 400))
        rows.append(Row("fd limit 400, no slow clients", {
            "echo": echo_round_trips(v.address), "fds": v.fds(),
            "threads": v.threads()}))
        slow_round(v, "fd limit 400, %d slow clients" % n, (12,))
        time.sleep(2)
        rows.append(Row("fd limit 400, 2 s after they closed", {
            "echo": echo_round_trips(v.address), "fds": v.fds(),
            "threads": v.threads()}))
    finally:
        v.stop()
    return rows


# --------------------------------------------------------------------------
# case 3: memory

def _drain(server, conn, key):
    """Reads everything, as fast as it comes, until the end of the
    stream; counts the bytes in server.state[key]."""
    conn.settimeout(0.5)
    while not server.stopping.is_set():
        try:
            data = conn.recv(1 << 20)
        except socket.timeout:
            continue
        if not data:
            return
        server.state[key] = server.state.get(key, 0) + len(data)


def _sink(server, conn):
    _drain(server, conn, "received")


def _fast_sender(address, done, out, most=None):
    """Sends as fast as the proxy takes it until ``done()`` (or *most*
    bytes were sent: then it waits for done() without sending), then
    closes; ("sent", bytes) and any ("error", text) go to *out*."""
    chunk = memoryview(_pattern(65536))
    sent = 0
    try:
        sock = socket.create_connection(address, timeout=5)
    except OSError as exc:
        out.append(("error", str(exc)))
        return
    sock.settimeout(0.2)
    try:
        while not done():
            if most is not None and sent >= most:
                time.sleep(0.05)
                continue
            try:
                sent += sock.send(chunk if most is None else
                                  chunk[:most - sent])
            except socket.timeout:
                continue
    except OSError as exc:
        out.append(("error", str(exc)))
    finally:
        out.append(("sent", sent))
        sock.close()


def _memory_cap_kib():
    """Stop the senders past this RSS: a third of the memory available,
    at most 6 GiB (a leak must not take the machine down)."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) // 3, 6 << 20)
    except OSError:
        pass
    return 2 << 20


def case_memory(ctx):
    cfg = ctx.cfg
    behaviors = [
        ("slicer 1 B / 1 ms", ["--behavior", "slicer",
                               "--behavior-slicer-average-size", "1",
                               "--behavior-slicer-size-variation", "0",
                               "--behavior-slicer-delay", "1000"]),
        ("bandwidth 1 KB/s", ["--behavior", "bandwidth",
                              "--behavior-bandwidth-rate", "1"]),
    ]
    cap = _memory_cap_kib()
    rows = []
    for label, extra in behaviors:
        for count in (1, 4):
            sink = ThreadServer(_sink)
            v = Vaurien(ctx, sink.port, extra, http=True, label="mem")
            try:
                time.sleep(0.5)
                rss0, pss0 = v.memory_kib()
                stop = threading.Event()
                out = []
                senders = [_start(_fast_sender, v.address, stop.is_set, out)
                           for _ in range(count)]
                end = monotonic() + cfg["mem_send_s"]
                peak, capped = rss0, None
                while monotonic() < end:
                    time.sleep(0.25)
                    rss, _ = v.memory_kib()
                    peak = max(peak, rss or 0)
                    if rss and rss > cap:
                        capped = cfg["mem_send_s"] - (end - monotonic())
                        break
                rss1, pss1 = v.memory_kib()
                stop.set()
                _join(senders, monotonic() + 5)
                closed_at = monotonic()
                while monotonic() < closed_at + cfg["mem_after_s"]:
                    time.sleep(0.5)
                    peak = max(peak, v.memory_kib()[0] or 0)
                rss2, pss2 = v.memory_kib()
                sent = sum(x for kind, x in out if kind == "sent")
                notes = []
                errors = [x for kind, x in out if kind == "error"]
                if errors:
                    notes.append("sender errors: %s" % errors[0])
                if capped is not None:
                    notes.append("senders stopped at %.1f s: RSS over the "
                                 "%d MB cap" % (capped, cap // 1024))
                if not v.alive():
                    notes.append("vaurien died (status %s)"
                                 % v.proc.returncode)
                rows.append(Row("%s, %d sender%s" % (
                    label, count, "s" if count > 1 else ""), {
                    "rss0": rss0 / 1024.0, "rss1": rss1 / 1024.0,
                    "grow": (rss1 - rss0) / 1024.0 / count,
                    "pgrow": (pss1 - pss0) / 1024.0 / count,
                    "peak": peak / 1024.0,
                    "held": (rss2 - rss0) / 1024.0,
                    "pheld": (pss2 - pss0) / 1024.0,
                    "open": v.open_connections(), "sent": sent / MB,
                    "got": sink.state.get("received", 0) / 1e3}, notes))
            finally:
                v.stop()
                sink.stop()
    return rows


# --------------------------------------------------------------------------
# case 4: full-duplex

def _duplex_backend(server, conn):
    """Reads everything and, at the same time, sends server.state["size"]
    bytes, then ends its side."""
    state = server.state
    size = state["size"]
    conn.settimeout(0.5)

    def writer():
        chunk = memoryview(_pattern(MB))
        sent = 0
        try:
            while sent < size and not server.stopping.is_set():
                try:
                    sent += conn.send(chunk[:min(MB, size - sent)])
                except socket.timeout:
                    continue
                state["down_sent"] = sent
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    thread = _start(writer)
    _drain(server, conn, "up")
    thread.join(30)


def _duplex_client(address, size, deadline, state):
    """Uploads *size* bytes before reading anything, then reads *size*
    bytes; returns (seconds or None on stall, sent, received)."""
    chunk = memoryview(_pattern(MB))
    start = monotonic()
    sock = socket.create_connection(address, timeout=5)
    sock.setblocking(False)
    poller = selectors.DefaultSelector()
    sent = received = 0
    try:
        poller.register(sock, selectors.EVENT_WRITE)
        while sent < size and monotonic() < deadline:
            if poller.select(min(0.5, max(0, deadline - monotonic()))):
                try:
                    sent += sock.send(chunk[:min(MB, size - sent)])
                except (BlockingIOError, InterruptedError):
                    pass
        if sent < size:
            return None, sent, received
        sock.shutdown(socket.SHUT_WR)
        poller.modify(sock, selectors.EVENT_READ)
        while monotonic() < deadline:
            if received >= size and state.get("up", 0) >= size:
                return monotonic() - start, sent, received
            if not poller.select(min(0.2, max(0, deadline - monotonic()))):
                continue
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                # the end: the backend's counter may lag its last read
                time.sleep(0.2)
                if received >= size and state.get("up", 0) >= size:
                    return monotonic() - start, sent, received
                return None, sent, received
            received += len(data)
        return None, sent, received
    finally:
        poller.close()
        sock.close()


def case_full_duplex(ctx):
    size = ctx.cfg["duplex_mb"] * MB
    deadline_s = 20.0
    rows = []
    for label, extra in (("direct", None), ("vaurien tcp", []),
                         ("vaurien redis", ["--protocol", "redis"])):
        server = ThreadServer(_duplex_backend)
        server.state.update(size=size)
        v = None
        try:
            address = (HOST, server.port)
            if extra is not None:
                v = Vaurien(ctx, server.port, extra, label="duplex")
                address = v.address
            try:
                seconds, sent, received = _duplex_client(
                    address, size, monotonic() + deadline_s, server.state)
                notes = []
            except OSError as exc:
                seconds, sent, received = None, 0, 0
                notes = ["client: %s" % exc]
            up = server.state.get("up", 0)
            down_sent = server.state.get("down_sent", 0)
            # up: what reached the backend; down: what left it (the
            # client reads nothing before its upload is done)
            rows.append(Row(label, {
                "seconds": seconds,
                "result": "ok" if seconds is not None else
                "stall (%.0f s)" % deadline_s,
                "sent": sent / MB, "up": up / MB,
                "down": max(received, down_sent) / MB}, notes))
        finally:
            if v is not None:
                v.stop()
            server.stop()
    return rows


# --------------------------------------------------------------------------
# case 5: last-answer

REDIS_TOO_BIG = b"-ERR Protocol error: too big inline request\r\n"
HTTP_413 = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 18\r\nConnection: close\r\n\r\n"
            b"Payload Too Large\n")


def _read_then_refuse(answer, head_end=None):
    """A backend that reads 64 KB (after the head, for HTTP), answers one
    line and closes, with the rest of the upload unread (hence a RST)."""
    def handler(server, conn):
        conn.settimeout(5)
        got = b""
        want = 65536
        while len(got) < want:
            data = conn.recv(65536)
            if not data:
                break
            got += data
            if head_end is not None and head_end in got and want == 65536:
                want = got.index(head_end) + len(head_end) + 65536
        conn.sendall(answer)
    return handler


def _upload_for_answer(address, payload, expect, timeout=5.0):
    """Upload *payload* while reading; the outcome: 'got' (the answer
    arrived), 'reset', 'eof' (closed without it) or 'timeout'."""
    end = monotonic() + timeout
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError:
        return "refused"
    sock.setblocking(False)
    poller = selectors.DefaultSelector()
    poller.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view = memoryview(payload)
    sent = 0
    got = b""
    try:
        while expect not in got:
            left = end - monotonic()
            if left <= 0:
                return "timeout"
            for _, mask in poller.select(min(left, 0.5)):
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        return "got" if expect in got else "reset"
                    if data == b"":
                        return "got" if expect in got else "eof"
                    if data:
                        got += data
                if mask & selectors.EVENT_WRITE and sent < len(view):
                    try:
                        sent += sock.send(view[sent:sent + 262144])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        sent = len(view)    # the peer is gone: read on
                    if sent >= len(view):
                        poller.modify(sock, selectors.EVENT_READ)
        return "got"
    finally:
        poller.close()
        sock.close()


def case_last_answer(ctx):
    trials = ctx.cfg["trials"]
    upload = 16 * MB
    redis_payload = b"a" * upload        # one inline command, no newline
    http_head = (b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % upload)
    http_payload = http_head + b"x" * upload
    rows = []
    setups = [
        ("Python -ERR backend", "redis", redis_payload, REDIS_TOO_BIG,
         lambda: ThreadServer(_read_then_refuse(REDIS_TOO_BIG))),
        ("redis-server", "redis", redis_payload, REDIS_TOO_BIG,
         lambda: ctx.backend(harness.RedisBackend)),
        ("Python 413 backend", "http", http_payload, b"HTTP/1.1 413",
         lambda: ThreadServer(_read_then_refuse(HTTP_413, b"\r\n\r\n"))),
    ]
    for name, proto, payload, expect, make in setups:
        try:
            backend = make()
        except (harness.BenchError, OSError) as exc:
            rows.append(Row("%s: cannot start" % name, {}, [str(exc)]))
            continue
        try:
            for label, extra in (("direct", None), ("vaurien tcp", []),
                                 ("vaurien %s" % proto,
                                  ["--protocol", proto])):
                v = None
                try:
                    address = (HOST, backend.port)
                    if extra is not None:
                        v = Vaurien(ctx, backend.port, extra, label="last")
                        address = v.address
                    outcomes = collections.Counter()
                    budget = monotonic() + 90
                    for _ in range(trials):
                        if monotonic() > budget:
                            break
                        outcomes[_upload_for_answer(address, payload,
                                                    expect)] += 1
                    done = sum(outcomes.values())
                    notes = [] if done == trials else [
                        "only %d trials in the 90 s budget" % done]
                    if outcomes["refused"]:
                        notes.append("%d refused" % outcomes["refused"])
                    rows.append(Row("%s, %s" % (name, label), {
                        "got": outcomes["got"], "trials": done,
                        "reset": outcomes["reset"], "eof": outcomes["eof"],
                        "timeout": outcomes["timeout"]}, notes))
                finally:
                    if v is not None:
                        v.stop()
        finally:
            if isinstance(backend, ThreadServer):
                backend.stop()
    return rows


# --------------------------------------------------------------------------
# case 6: stuck-backend

def _never_read(server, conn):
    """Accepts, never reads, never closes (until the case ends)."""
    server.stopping.wait(300)


def case_stuck_backend(ctx):
    clients = 20
    rows = []
    # two kinds of clients: some send until the proxy takes no more (their
    # own kernel then holds the rest, and their close: the proxy cannot
    # see it), others send 1 MB, then give up (their close reaches it)
    for label, most in (("sent until blocked", None), ("sent 1 MB", MB)):
        server = ThreadServer(_never_read)
        v = Vaurien(ctx, server.port, http=True, label="stuck")
        try:
            time.sleep(0.3)
            fds0, threads0 = v.fds(), v.threads()
            out = []
            give_up = monotonic() + 2.0
            senders = [_start(_fast_sender, v.address,
                              lambda: monotonic() > give_up, out, most)
                       for _ in range(clients)]
            _join(senders, monotonic() + 10)
            time.sleep(5)
            sent = [x for kind, x in out if kind == "sent"]
            notes = ["before: %s fds, %s threads" % (fds0, threads0)]
            errors = [x for kind, x in out if kind == "error"]
            if errors:
                notes.append("client errors: %s" % errors[0])
            rows.append(Row("%d clients %s, gave up, +5 s" % (clients, label),
                            {"fds": v.fds(), "threads": v.threads(),
                             "conns": v.open_connections(),
                             "backend": server.accepted,
                             "sent": statistics.median(sent) / MB
                             if sent else None}, notes))
            # and once the stuck backend lets go of its ends too
            server.stop()
            time.sleep(5)
            rows.append(Row("  then the backend closed, +5 s (%s)"
                            % label.split()[-1], {
                "fds": v.fds(), "threads": v.threads(),
                "conns": v.open_connections()}))
        finally:
            v.stop()
            server.stop()
    return rows


# --------------------------------------------------------------------------
# case 7: sigterm

def case_sigterm(ctx):
    cfg = ctx.cfg
    streams = cfg["term_streams"]
    echo = ctx.backend(NiceEcho)
    times, statuses, notes = [], [], []
    threads, held, accept = [], [], []
    for run in range(cfg["term_runs"]):
        v = Vaurien(ctx, echo.port, label="term")
        blaster = Blaster(ctx, v.address, streams, 300)
        try:
            info = blaster.ready()
            if info["connected"] != streams:
                notes.append("run %d: %d of %d connected" % (
                    run + 1, info["connected"], streams))
            # connected is not accepted: under load vaurien takes a while
            # to accept them all; the signal comes 1 s after it has
            ready = monotonic()
            while len(v.held_on(v.port)) < info["connected"] and \
                    monotonic() < ready + 30:
                time.sleep(0.1)
            accept.append(monotonic() - ready)
            time.sleep(1.0)
            threads.append(v.threads())
            held.append(len(v.held_on(v.port)))
            v.proc.send_signal(signal.SIGTERM)
            elapsed = wait_exit(v.proc, 30)
            if elapsed is None:
                notes.append("run %d: still running 30 s after SIGTERM "
                             "(killed)" % (run + 1))
            else:
                times.append(elapsed)
                statuses.append(v.proc.returncode)
        finally:
            v.stop()
            blaster.stop()
    if statuses:
        notes.append("exit status %s" % ", ".join(
            str(s) for s in sorted(set(statuses))))
    return [Row("%d streams, SIGTERM" % streams, {
        "min": min(times) if times else None,
        "median": statistics.median(times) if times else None,
        "max": max(times) if times else None,
        "exited": "%d/%d" % (len(times), cfg["term_runs"]),
        "threads": statistics.median(threads) if threads else None,
        "held": statistics.median(held) if held else None,
        "accept": statistics.median(accept) if accept else None}, notes)]


# --------------------------------------------------------------------------
# case 8: http-holding

def client_hello():
    """The first bytes a real TLS client sends: a ClientHello, taken from
    an ssl.SSLContext over memory BIOs (no socket, no server)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def http_payloads():
    valid = b"GET /small.html HTTP/1.1\r\nHost: localhost\r\n\r\n"
    return [
        ("TLS ClientHello", client_hello()),
        ("valid request + junk", valid + b"\x16\x03\x01 junk, not a "
         b"request"),
        ("method byte 0xff", b"\xff" + valid),
        ("10 KB line, no end", b"GET /" + b"a" * 10240),
    ]


def _send_and_watch(address, payload, deadline_s, out):
    """Sends *payload*, keeps its side open, and records when the first
    answer byte came and when the connection closed (seconds after the
    payload went), and the status codes seen."""
    try:
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(payload)
    except OSError as exc:
        out["error"] = str(exc)
        return
    start = monotonic()
    got = b""
    sock.settimeout(0.25)
    try:
        while monotonic() - start < deadline_s:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                out["closed"] = monotonic() - start
                out["how"] = "reset"
                break
            if not data:
                out["closed"] = monotonic() - start
                out["how"] = "closed"
                break
            if not got:
                out["answer"] = monotonic() - start
            got += data
    finally:
        sock.close()
    codes = re.findall(rb"HTTP/1\.[01] (\d{3})", got)
    out["codes"] = "+".join(c.decode() for c in codes) or (
        "%d bytes" % len(got) if got else "none")


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def case_http_holding(ctx):
    deadline_s = 15.0
    nginx = ctx.backend(harness.NginxBackend)
    v = Vaurien(ctx, nginx.port, ["--protocol", "http"], label="http")
    rows = []
    try:
        for label, address in (("direct", (HOST, nginx.port)),
                               ("vaurien http", v.address)):
            found = []
            threads = []
            for name, payload in http_payloads():
                out = {}
                found.append((name, out))
                threads.append(_start(_send_and_watch, address, payload,
                                      deadline_s, out))
            _join(threads, monotonic() + deadline_s + 10)
            for name, out in found:
                notes = [out["error"]] if "error" in out else []
                if "closed" not in out and "error" not in out:
                    notes.append("still open at %.0f s" % deadline_s)
                rows.append(Row("%s, %s" % (label, name), {
                    "answer": _ms(out.get("answer")),
                    "closed": _ms(out.get("closed")),
                    "codes": out.get("codes"),
                    "how": out.get("how", "open")}, notes))
    finally:
        v.stop()
    return rows


# --------------------------------------------------------------------------
# case 9: toxiproxy-api

# the calls of a Toxiproxy user's test: (the table's name, column prefix)
TOXI_CALLS = [("GET /proxies", "get"), ("POST toxics", "post"),
              ("DELETE toxics", "del")]
# the toxics the streams go through: they cost what a toxic in the path
# costs, and delay nothing
STREAM_TOXICS = [
    {"name": "latency_down", "type": "latency", "stream": "downstream",
     "attributes": {"latency": 0}},
    {"name": "latency_up", "type": "latency", "stream": "upstream",
     "attributes": {"latency": 0}}]


def _toxi_requests(i):
    """Client i's loop: list the proxies, add its own toxic (a latency of
    0 ms) to the streaming proxy, remove it."""
    body = json.dumps({"name": "client%d" % i, "type": "latency",
                       "attributes": {"latency": 0}}).encode()
    return [("GET /proxies", "GET", "/proxies", None, 200),
            ("POST toxics", "POST", "/proxies/stream/toxics", body, 200),
            ("DELETE toxics", "DELETE", "/proxies/stream/toxics/client%d"
             % i, None, 204)]


class ToxiproxyServer(object):
    """A server of Toxiproxy's API in a subprocess, its API on a free
    port: `vaurien.py server` (kind "vaurien"), or Toxiproxy's binary on
    every CPU ("toxiproxy") or on one, with GOMAXPROCS=1 ("toxiproxy 1
    CPU", like vaurien's --cpu auto)."""

    def __init__(self, ctx, kind):
        folder = os.path.join(ctx.tmp, "server-%d" % next(ctx.ids))
        os.makedirs(folder)
        self.stderr = os.path.join(folder, "stderr.log")
        self.api_port = harness.free_port()
        where = ["-host", HOST, "-port", str(self.api_port)]
        env = None
        if kind == "vaurien":
            cmd = ctx.python + [ctx.vaurien, "server"] + where + [
                "--log-level", "warning", "--log-output",
                os.path.join(folder, "vaurien.log")]
        else:
            cmd = [ctx.toxiproxy] + where
            env = harness.toxiproxy_env()
            if kind != "toxiproxy":
                cmd = ["taskset", "-c", str(max(ctx.cpus))] + cmd
                env["GOMAXPROCS"] = "1"
        self.cmd = cmd
        self.proc = harness.spawn(cmd, log_path=self.stderr, env=env)
        self.pid = self.proc.pid
        harness.wait_listen(self.api_port, self.proc, 20, kind,
                            self.stderr)
        ctx.keep_off(self)

    def proxy(self, name, upstream_port, toxics):
        """Proxy *name* on a free port to *upstream_port*, with *toxics*:
        the address it listens on."""
        listen = harness.toxiproxy_proxy(
            self.api_port, name, "%s:0" % HOST,
            "%s:%d" % (HOST, upstream_port), toxics)
        host, _, port = listen.rpartition(":")
        return (HOST, int(port))

    def remove_client_toxics(self, clients):
        """Remove what the clients left (a round can end between a POST
        and its DELETE), so that the next round's streams go through the
        proxy's own toxics only."""
        for i in range(clients):
            harness.toxiproxy_call(self.api_port, "DELETE",
                                   "/proxies/stream/toxics/client%d" % i,
                                   timeout=API_TIMEOUT)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        harness.kill(self.proc)


def case_toxiproxy_api(ctx):
    cfg = ctx.cfg
    echo = ctx.backend(NiceEcho)
    kinds = ["vaurien"]
    if ctx.toxiproxy:
        kinds += ["toxiproxy", "toxiproxy 1 CPU"]
    rows = []
    for kind in kinds:
        label = "vaurien server" if kind == "vaurien" else kind
        server = ToxiproxyServer(ctx, kind)
        try:
            address = server.proxy("stream", echo.port, STREAM_TOXICS)
            results = _api_round(server.api_port, cfg["api_clients"],
                                 cfg["api_s"], _toxi_requests)
            rows += _api_rows("%s, no traffic" % label, results,
                              calls=TOXI_CALLS)
            server.remove_client_toxics(cfg["api_clients"])
            results, rate, note = _streaming_round(
                ctx, address, server.api_port, _toxi_requests)
            rows += _api_rows("%s, %d streams" % (label, cfg["api_streams"]),
                              results, rate, note, TOXI_CALLS)
            if not server.alive():
                rows[-1].notes.append("%s died (status %s)"
                                      % (label, server.proc.returncode))
        finally:
            server.stop()
            # the next server picks its CPUs anew: the tools go back on all
            ctx.unpin()
            for proc in harness.PROCS:
                if proc.poll() is None:
                    pin_tasks(proc.pid, ctx.cpus)
    if not ctx.toxiproxy:
        rows[0].notes.append("Toxiproxy not run: TOXIPROXY_BIN or "
                             "--toxiproxy names its binary")
    return rows


# --------------------------------------------------------------------------
# the cases and the table

class Row(object):
    def __init__(self, variant, values, notes=None):
        self.variant = variant
        self.values = values
        self.notes = [n for n in (notes or []) if n]


class Case(object):
    def __init__(self, name, title, columns, func, budget, headline):
        self.name, self.title, self.func = name, title, func
        self.columns = columns      # [(key, header)]
        self.budget = budget        # seconds, full settings
        self.headline = headline    # the column whose range --repeat notes


CASES = [
    Case("api-latency", "control API latency, {api_clients} clients (GET /stats, GET "
         "/behavior, PUT /behavior), client timeout 20 s",
         [("requests", "requests"), ("p50", "p50 ms"), ("p99", "p99 ms"),
          ("max", "max ms"), ("timeouts", "timeouts"),
          ("errors", "errors"), ("streams", "streams MB/s")],
         case_api_latency, 180, "p99"),
    Case("slowloris", "control API clients sending 1 header byte per "
         "second (documented limit: 10 s per request)",
         [("accepted", "accepted"), ("held12", "held@12s"),
          ("held25", "held@25s"), ("echo", "echo ok/50"), ("fds", "fds"),
          ("threads", "threads"), ("connect", "connect s")],
         case_slowloris, 240, "held12"),
    Case("memory", "vaurien RSS/PSS, fast senders for 10 s to a backend "
         "that reads everything, then 30 s after they closed (MB)",
         [("rss0", "RSS0"), ("rss1", "RSS@10s"), ("grow", "RSS/conn"),
          ("pgrow", "PSS/conn"), ("peak", "peak"), ("held", "RSS held"),
          ("pheld", "PSS held"), ("open", "open conns"),
          ("sent", "sent MB"), ("got", "backend KB")],
         case_memory, 300, "grow"),
    Case("full-duplex", "client uploads all before reading while the "
         "backend sends as much at once, deadline 20 s",
         [("seconds", "seconds"), ("result", "result"),
          ("sent", "client sent MB"), ("up", "up MB"), ("down", "down MB")],
         case_full_duplex, 120, "seconds"),
    Case("last-answer", "backend reads 64 KB of a 16 MB upload, answers one "
         "line, closes: trials that got the line",
         [("got", "got line"), ("trials", "trials"), ("reset", "reset"),
          ("eof", "eof"), ("timeout", "timeout")], case_last_answer, 900,
         "got"),
    Case("stuck-backend", "20 clients upload to a backend that never reads, "
         "give up after 2 s and close",
         [("fds", "fds"), ("threads", "threads"),
          ("conns", "/connections"), ("backend", "backend conns"),
          ("sent", "MB/client")], case_stuck_backend, 90, "fds"),
    Case("sigterm", "SIGTERM while streams run to an echo backend: seconds "
         "until the process exits (accept s: until vaurien held them all)",
         [("min", "min s"), ("median", "median s"), ("max", "max s"),
          ("exited", "exited"), ("threads", "threads"),
          ("held", "conns held"), ("accept", "accept s")], case_sigterm,
         300, "median"),
    Case("http-holding", "--protocol http in front of nginx: time until "
         "an answer / the close, deadline 15 s",
         [("answer", "answer ms"), ("closed", "closed ms"),
          ("codes", "status"), ("how", "end")], case_http_holding, 120,
         "answer"),
    Case("toxiproxy-api", "Toxiproxy's API, {api_clients} clients (GET /proxies, POST "
         "a toxic, DELETE it), while streams run through a proxy with a "
         "0 ms latency toxic each way, client timeout 20 s",
         [("requests", "requests"), ("get50", "GET p50"),
          ("get99", "GET p99"), ("post50", "POST p50"),
          ("post99", "POST p99"), ("del50", "DELETE p50"),
          ("del99", "DELETE p99"), ("max", "max ms"),
          ("timeouts", "timeouts"), ("errors", "errors"),
          ("streams", "streams MB/s")], case_toxiproxy_api, 300,
         "post99"),
]


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return harness.fmt(value).strip()
    return str(value)


def merge_runs(runs, first):
    """Rows of several runs of one case, by variant: numbers become their
    median (a run without the number is noted: "seconds in 1 of 3 runs"),
    texts are kept when all agree, else counted ("stall x2, ok x1"), notes
    are pooled; with 2 runs or more, the range of column *first* is
    noted."""
    order, by_variant = [], {}
    for rows in runs:
        for row in rows:
            if row.variant not in by_variant:
                order.append(row.variant)
            by_variant.setdefault(row.variant, []).append(row)
    merged = []
    for variant in order:
        rows = by_variant[variant]
        values, notes = {}, []
        keys = []
        for row in rows:
            keys += [k for k in row.values if k not in keys]
            notes += [n for n in row.notes if n not in notes]
        for key in keys:
            seen = [row.values.get(key) for row in rows]
            numbers = [x for x in seen if isinstance(x, (int, float)) and
                       not isinstance(x, bool)]
            texts = [x for x in seen if x is not None and x not in numbers]
            if numbers and not texts:
                med = statistics.median(numbers)
                if all(isinstance(x, int) for x in numbers) and \
                        med == int(med):
                    med = int(med)
                values[key] = med
                if len(numbers) < len(seen):
                    notes.insert(0, "%s in %d of %d runs" % (
                        key, len(numbers), len(seen)))
                if len(numbers) > 1 and key == first and \
                        min(numbers) != max(numbers):
                    notes.insert(0, "%s range %s-%s" % (
                        key, cell(min(numbers)), cell(max(numbers))))
            else:
                counts = collections.Counter(cell(x) for x in seen)
                values[key] = next(iter(counts)) if len(counts) == 1 else \
                    ", ".join("%s x%d" % item for item in counts.items())
        row = Row(variant, values, notes)
        row.runs = len(rows)
        merged.append(row)
    return merged


def table(results, repeat, cfg):
    """One table: per case a title line, its column headers, its rows."""
    lines = []
    width = 46
    for case, runs in results:
        lines.append("")
        lines.append("%s: %s" % (case.name, case.title.replace(
            "{api_clients}", str(cfg["api_clients"]))))
        heads = [h for _, h in case.columns]
        widths = [max(len(h), 7) for h in heads]
        rows = merge_runs(runs, case.headline)
        for row in rows:
            for i, (key, _) in enumerate(case.columns):
                widths[i] = max(widths[i], len(cell(row.values.get(key))))
        extra = ["n"] if repeat > 1 else []
        lines.append("  " + "".ljust(width) + "  ".join(
            h.rjust(w) for h, w in zip(heads, widths)) +
            "".join("  %2s" % e for e in extra) + "  notes")
        for row in rows:
            cells = [cell(row.values.get(key)).rjust(w)
                     for (key, _), w in zip(case.columns, widths)]
            if not row.values:
                cells = [""]
            text = "  " + row.variant[:width - 1].ljust(width) + \
                "  ".join(cells)
            if repeat > 1:
                text += "  %2d" % row.runs
            if row.notes:
                text += "  " + "; ".join(row.notes)
            lines.append(text.rstrip())
    return lines


def header(ctx):
    def sh(cmd):
        try:
            return harness.run(cmd, timeout=10)[1].strip()
        except (harness.BenchError, OSError):
            return "?"
    with open(ctx.vaurien, "rb") as stream:
        digest = hashlib.sha256(stream.read()).hexdigest()[:12]
    folder = os.path.dirname(ctx.vaurien)
    git = sh(["git", "-C", folder, "log", "-1", "--format=%h %cd",
              "--date=short"])
    if git not in ("", "?") and sh(["git", "-C", folder, "status",
                                    "--porcelain", "--", ctx.vaurien]):
        git += " + changes"
    version = sh(ctx.python + ["-c", "import sys, platform; print("
                               "platform.python_implementation(), "
                               "sys.version.split()[0])"])
    return [
        "vaurien stress cases  %s" % datetime.datetime.now().strftime(
            "%Y-%m-%d %H:%M:%S"),
        "uname: %s  cpu: %s  nproc: %s" % (" ".join(platform.uname()[0:3:2]),
                                          harness.cpu_model(),
                                          os.cpu_count()),
        "vaurien: %s (sha256 %s%s)  python: %s" % (
            ctx.vaurien, digest, ", git " + git if git not in ("", "?")
            else "", version),
        "toxiproxy: %s" % ("%s (%s)" % (ctx.toxiproxy, sh(
            [ctx.toxiproxy, "-version"])) if ctx.toxiproxy else
            "none (TOXIPROXY_BIN unset)"),
        "settings: %s%s" % ("quick" if ctx.quick else "full",
                            ", repeat %d" % ctx.repeat if ctx.repeat > 1
                            else ""),
    ]


class Ctx(object):
    """What the cases share: settings, the temp dir, and the backends a
    case started (echo, redis-server, nginx; stopped after each case)."""

    def __init__(self, args):
        self.vaurien = os.path.abspath(args.vaurien)
        self.python = [args.python]
        self.quick = args.quick
        self.repeat = args.repeat
        self.cfg = dict(SETTINGS["quick" if args.quick else "full"])
        if args.api_clients:
            self.cfg["api_clients"] = args.api_clients
        self.tmp = tempfile.mkdtemp(prefix="vaurien-stress-")
        os.makedirs(os.path.join(self.tmp, "logs"))
        self.ids = iter(range(1, 1 << 30))
        self.backends = {}
        self.cpus = os.sched_getaffinity(0)
        self.spare = None
        self.toxiproxy = harness.toxiproxy_bin(args.toxiproxy)

    def keep_off(self, v):
        """vaurien runs on one CPU by default (--cpu auto): keep this
        script and its load tools (echo server, blasters, redis, nginx) on
        the others, so that where the scheduler happens to put them does
        not decide the figures.  A vaurien that uses every CPU is left to
        share them."""
        try:
            mine = os.sched_getaffinity(v.pid)
        except (AttributeError, OSError):
            return
        spare = self.cpus - mine
        self.spare = spare or None
        if spare:
            pin_tasks(os.getpid(), spare)
            for proc in harness.PROCS:
                if proc is not v.proc and proc.poll() is None:
                    pin_tasks(proc.pid, spare)

    def unpin(self):
        self.spare = None
        pin_tasks(os.getpid(), self.cpus)

    def backend(self, cls):
        backend = self.backends.get(cls)
        if backend is None:
            backend = cls(self.tmp)
            backend.start()
            self.backends[cls] = backend
        else:
            backend.ensure()
        return backend

    def close(self):
        for backend in self.backends.values():
            backend.stop()


def _on_alarm(signum, frame):
    raise CaseTimeout()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="vaurien stress cases (see bench/README.txt)",
        epilog="cases: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--vaurien", default=VAURIEN, metavar="PATH",
                        help="the vaurien.py to test (default: %s)"
                        % os.path.relpath(VAURIEN))
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs vaurien.py (default: "
                        "this one)")
    parser.add_argument("--only", default=None, metavar="CASE[,CASE]",
                        help="run only these cases")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each case N times; the table shows "
                        "medians")
    parser.add_argument("--quick", action="store_true",
                        help="short and small (a smoke test of this "
                        "script; not the review's figures)")
    parser.add_argument("--toxiproxy", default=None, metavar="PATH",
                        help="Toxiproxy server binary for the toxiproxy-api "
                        "case (default: $TOXIPROXY_BIN)")
    parser.add_argument("--api-clients", type=int, default=None,
                        metavar="N", help="API clients of api-latency and "
                        "toxiproxy-api, half of them on a new connection "
                        "per call (default 20)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="also write the report to FILE")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (vaurien logs)")
    parser.add_argument("--blast", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=200,
                        help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blast:
        return blast_main(args.blast, args.connections, args.seconds)
    if not os.path.isfile(args.vaurien):
        parser.error("no vaurien.py at %s (give --vaurien PATH)"
                     % args.vaurien)
    if args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    names = [c.name for c in CASES]
    wanted = harness.only(parser, args.only, names, "case") if args.only \
        else names
    cases = [c for c in CASES if c.name in wanted]

    # 1000 slow clients and 500 streams: the script's own descriptors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(hard, 65536), max(hard, 65536)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, _on_alarm)

    ctx = Ctx(args)
    head = header(ctx)
    print("\n".join(head))
    print("temp dir: %s" % ctx.tmp, flush=True)
    results = []
    start = monotonic()
    try:
        for case in cases:
            runs = []
            results.append((case, runs))
            for run in range(args.repeat):
                t0 = monotonic()
                print("%s (run %d/%d) ..." % (case.name, run + 1,
                                               args.repeat), flush=True)
                signal.alarm(case.budget)
                try:
                    rows = case.func(ctx)
                except CaseTimeout:
                    rows = [Row("FAILED", {}, ["over its %d s budget"
                                               % case.budget])]
                except Exception as exc:   # one case fails, the run goes on
                    traceback.print_exc(file=sys.stdout)
                    rows = [Row("FAILED", {}, ["%s: %s" % (
                        type(exc).__name__, exc)])]
                finally:
                    signal.alarm(0)
                    harness.kill_all()
                    ctx.unpin()
                    ctx.backends = dict(
                        (k, b) for k, b in ctx.backends.items()
                        if b.proc is not None and b.proc.poll() is None)
                for row in rows:
                    print("  %-46s %s%s" % (row.variant, " ".join(
                        "%s=%s" % (k, cell(x)) for k, x in
                        row.values.items()), "  (%s)" % "; ".join(row.notes)
                        if row.notes else ""), flush=True)
                runs.append(rows)
                print("  (%.0f s)" % (monotonic() - t0), flush=True)
    except KeyboardInterrupt as exc:
        print("\ninterrupted (%s): reporting what was measured"
              % (exc or "^C"))
    finally:
        ctx.close()
        harness.kill_all()
        if args.keep_tmp:
            print("kept %s" % ctx.tmp)
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    text = "\n".join(head + table(results, args.repeat, ctx.cfg) + [
        "", "total run time: %.0f s" % (monotonic() - start)]) + "\n"
    print()
    print(text, end="")
    if args.output:
        with open(args.output, "w") as stream:
            stream.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
