#!/usr/bin/env python3
"""Benchmark harness for vaurien: real backends, real load generators.

    python3 bench/run.py [--rounds N] [--only WORKLOAD[,..]] [--quick]
                         [--proxy-cmd CMD] [--connections N | --10k]
                         [--toxiproxy PATH]

Starts iperf3, redis-server, nginx and a Python echo server on free
loopback ports (state in a temporary directory), then runs each workload
directly, through socat and through vaurien (plus vaurien variants),
interleaving the variants inside each round, and prints a table of medians.
Two variants are servers of Toxiproxy's API (`vaurien.py server`, and
Toxiproxy itself when TOXIPROXY_BIN or --toxiproxy names its binary): the
proxy is made through that API, with one latency toxic of 0 ms.
The table is also written to bench/results-latest.txt.  See bench/README.txt.

Run by hand, never in CI.  Standard library only (Python 3.8+).
"""
import argparse
import csv
import datetime
import grp
import http.client
import io
import json
import os
import pwd
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
VAURIEN = os.path.join(REPO_DIR, "vaurien.py")
RESULTS = os.path.join(BENCH_DIR, "results-latest.txt")
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

# tool -> Debian package that provides it
PACKAGES = {
    "iperf3": "iperf3",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
    "nginx": "nginx-light (or nginx)",
    "wrk": "wrk",
    "socat": "socat",
    "memcached": "memcached",
    "mariadbd": "mariadb-server",
    "sysbench": "sysbench",
}

# Durations/sizes: (full, quick)
SETTINGS = {
    "full": dict(iperf_s=4, wrk_s=4, redis_c1_n=20000, redis_c50_n=30000,
                 redis_p16_n=100000, hold_n=3000, lat_n=20000,
                 redis_big_n=400, redis_lrange_n=10000, kv_s=4),
    "quick": dict(iperf_s=1, wrk_s=1, redis_c1_n=4000, redis_c50_n=6000,
                  redis_p16_n=20000, hold_n=1000, lat_n=4000,
                  redis_big_n=100, redis_lrange_n=2000, kv_s=1),
}


class BenchError(Exception):
    """A single measurement failed; the run goes on."""


# --------------------------------------------------------------------------
# process handling: every child in its own process group, all killed at end

PROCS = []


def spawn(cmd, log_path=None, stdin=subprocess.DEVNULL,
          stdout=None, stderr=None, cwd=None, env=None):
    if log_path is not None:
        log = open(log_path, "ab")
        stdout = stdout if stdout is not None else log
        stderr = stderr if stderr is not None else log
    else:
        log = None
        stdout = stdout if stdout is not None else subprocess.DEVNULL
        stderr = stderr if stderr is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout,
                                stderr=stderr, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        if log is not None:
            log.close()
    PROCS.append(proc)
    return proc


def kill(proc, grace=3.0):
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            # the leader is gone; make sure stragglers in its group are too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break
        except subprocess.TimeoutExpired:
            continue
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    if proc in PROCS:
        PROCS.remove(proc)


def kill_all():
    for proc in list(PROCS):
        kill(proc, grace=1.0)


def run(cmd, timeout, cwd=None):
    """Run a command to completion; returns (rc, stdout, stderr).
    Raises BenchError on timeout (after killing its process group)."""
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc, grace=1.0)
        raise BenchError("timeout after %ss: %s" % (timeout, shlex.join(cmd)))
    finally:
        if proc.poll() is None:
            kill(proc, grace=1.0)
        elif proc in PROCS:
            PROCS.remove(proc)
    return (proc.returncode, out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tcp_sockets(port):
    """The fields of the /proc/net/tcp{,6} lines of the sockets whose local
    port is `port` (any address): [1] local, [2] remote address, [3] state
    (0A: LISTEN), [9] inode."""
    want = ":%04X" % port
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want):
                        yield parts
        except OSError:
            continue


def listening(port):
    """True if some socket is in LISTEN state on `port` (any address)."""
    return any(parts[3] == "0A" for parts in tcp_sockets(port))


def wait_listen(port, proc, timeout, what, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError("%s exited with status %s before listening%s"
                             % (what, proc.returncode, log_tail(log_path)))
        time.sleep(0.05)
    raise BenchError("%s not listening on port %d after %ss%s"
                     % (what, port, timeout, log_tail(log_path)))


def proxy_said_something(path):
    """True if the proxy log has more than the "$ command" line we wrote."""
    try:
        with open(path, "rb") as f:
            return len(f.read(65536).strip().splitlines()) > 1
    except OSError:
        return False


def log_tail(path, lines=5):
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = f.read()[-4000:].decode("utf-8", "replace")
    tail = [l for l in data.splitlines() if l.strip()][-lines:]
    return ("; log %s:\n    " % path + "\n    ".join(tail)) if tail else ""


# --------------------------------------------------------------------------
# Toxiproxy's API: how the server variants get their proxy

# the toxic every server variant's proxy has: it costs what a toxic in the
# path costs, and delays nothing
LATENCY_0 = {"name": "latency0", "type": "latency", "stream": "downstream",
             "attributes": {"latency": 0, "jitter": 0}}


def toxiproxy_call(api_port, method, path, body=None, timeout=10.0):
    """One call of a Toxiproxy API on 127.0.0.1:*api_port*, on a new
    connection: (status, the JSON answer or None)."""
    conn = http.client.HTTPConnection(HOST, api_port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"User-Agent": "vaurien-bench"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        return resp.status, None


def toxiproxy_proxy(api_port, name, listen, upstream, toxics=()):
    """Create proxy *name* (POST /proxies) with *toxics* (POST each);
    returns where it listens, read back.  BenchError when the server says
    no."""
    status, answer = toxiproxy_call(api_port, "POST", "/proxies", {
        "name": name, "listen": listen, "upstream": upstream,
        "enabled": True})
    if status != 201 or not answer:
        raise BenchError("POST /proxies: HTTP %s %s" % (status, answer))
    for toxic in toxics:
        got, reply = toxiproxy_call(api_port, "POST",
                                    "/proxies/%s/toxics" % name, toxic)
        if got != 200:
            raise BenchError("POST /proxies/%s/toxics: HTTP %s %s"
                             % (name, got, reply))
    return answer["listen"]


def toxiproxy_bin(path=None):
    """The Toxiproxy server binary to compare with: *path*, else
    $TOXIPROXY_BIN; None when neither names one."""
    path = path or os.environ.get("TOXIPROXY_BIN") or None
    if path and not os.access(path, os.X_OK):
        path = shutil.which(path)
    return path


def toxiproxy_env():
    """Toxiproxy logs every request at debug level unless LOG_LEVEL says
    otherwise: warn, as the vaurien variants run with --log-level
    warning."""
    env = dict(os.environ)
    env["LOG_LEVEL"] = "warn"
    return env


# --------------------------------------------------------------------------
# /proc accounting: CPU seconds and PSS of a process and its descendants

def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rfind(")") + 2:].split()  # fields[0] is field 3 (state)


def descendants(pid):
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, ()):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pid):
    """user+sys of pid (all its threads), of its reaped children, and of its
    live descendants (socat forks one process per connection)."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return None
    ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    for c in descendants(pid):
        try:
            cf = _stat_fields(c)
            ticks += int(cf[11]) + int(cf[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / CLK_TCK


def cpu_by_process(pid):
    """{pid: user+sys CPU seconds} of pid and each live descendant (the
    workers of vaurien --workers N), each its own threads only."""
    out = {}
    for p in [pid] + descendants(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        out[p] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def cpu_seconds_settled(pid, max_wait=5.0):
    """cpu_seconds() once the process tree is quiet: forked children that
    are exiting (zombies) have not yet been added to the parent's cutime,
    and a proxy may still be tearing connections down, so wait (at most
    max_wait s) until no zombie is left and two readings 0.1 s apart
    agree.  Returns (seconds, True if it went quiet in time)."""
    deadline = time.monotonic() + max_wait
    prev = None
    while True:
        cur = cpu_seconds(pid)
        zombies = 0
        for c in descendants(pid):
            try:
                zombies += _stat_fields(c)[0] == "Z"
            except (OSError, IndexError):
                pass
        if cur is None or (cur == prev and not zombies):
            return cur, True
        if time.monotonic() > deadline:
            return cur, False
        prev = cur
        time.sleep(0.1)


def pss_kib(pid):
    """PSS (KiB) of pid plus its live descendants.  smaps_rollup covers all
    threads of a process since they share one address space."""
    total = 0
    for p in [pid] + descendants(pid):
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------
# backends

class Backend:
    name = "?"

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None
        self.port = None
        self.log = os.path.join(tmp, "logs", self.name + ".log")

    def command(self):
        raise NotImplementedError

    def start(self):
        self.port = free_port()
        self.proc = spawn(self.command(), log_path=self.log, cwd=self.tmp)
        wait_listen(self.port, self.proc, 15, self.name, self.log)
        self.after_start()

    def after_start(self):
        pass

    def ensure(self):
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                print("  (%s backend had exited, restarting)" % self.name)
            self.restart()

    def restart(self):
        self.stop()
        self.start()

    def stop(self):
        kill(self.proc)
        self.proc = None


class EchoBackend(Backend):
    name = "echo"

    def command(self):
        return [sys.executable, os.path.join(BENCH_DIR, "echo_server.py"),
                "--host", HOST, "--port", str(self.port)]


class IperfBackend(Backend):
    name = "iperf3"

    def command(self):
        return ["iperf3", "-s", "-B", HOST, "-p", str(self.port)]


# redis-benchmark -t get without -r reads this literal key; the backend
# stores a 3-byte value there (redis-benchmark's default -d) so GET hits
REDIS_KEY = b"key:__rand_int__"
REDIS_VALUE = b"xxx"
# a 1 MB value and a list of 600 elements (redis-benchmark's lrange_600)
REDIS_BIG_KEY, REDIS_BIG_SIZE = b"big", 1 << 20
REDIS_LIST, REDIS_LIST_SIZE = b"list600", 600


def resp_command(*words):
    return b"*%d\r\n" % len(words) + b"".join(
        b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


class RedisBackend(Backend):
    name = "redis"

    def command(self):
        return ["redis-server", "--bind", HOST, "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--protected-mode", "no", "--dir", self.tmp,
                "--maxclients", "10000"]

    def after_start(self):
        cmds = [resp_command(b"SET", REDIS_KEY, REDIS_VALUE),
                resp_command(b"SET", REDIS_BIG_KEY, b"v" * REDIS_BIG_SIZE),
                resp_command(b"DEL", REDIS_LIST),
                resp_command(b"RPUSH", REDIS_LIST,
                             *[REDIS_VALUE] * REDIS_LIST_SIZE)]
        want = b"+OK\r\n+OK\r\n:0\r\n:%d\r\n" % REDIS_LIST_SIZE
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            s.sendall(b"".join(cmds))
            reply = b""
            while len(reply) < len(want):
                more = s.recv(100)
                if not more:
                    break
                reply += more
        if reply != want:
            raise BenchError("redis set-up failed: %r" % reply)


class MemcachedBackend(Backend):
    name = "memcached"

    def command(self):
        cmd = ["memcached", "-l", HOST, "-p", str(self.port), "-U", "0",
               "-m", "64", "-c", "4096"]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]
        return cmd

    def after_start(self):
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            s.sendall(b"set key 0 0 %d\r\n%s\r\n" % (len(REDIS_VALUE),
                                                      REDIS_VALUE))
            reply = s.recv(100)
        if reply != b"STORED\r\n":
            raise BenchError("memcached set failed: %r" % reply)


class MariadbBackend(Backend):
    """A throw-away MariaDB (user vaurien/vaurien, database sbtest) with
    sysbench's oltp tables prepared."""
    name = "mariadb"

    def command(self):
        data = os.path.join(self.tmp, "mariadb")
        user = ["--user=root"] if os.geteuid() == 0 else []
        if not os.path.isdir(data):
            install = tool_path("mariadb-install-db") or \
                tool_path("mysql_install_db")
            rc, out, err = run([install, "--no-defaults", "--datadir=" + data,
                                "--auth-root-authentication-method=normal",
                                "--skip-test-db"] + user, timeout=120)
            if rc != 0:
                raise BenchError("mariadb-install-db failed: %s"
                                 % (out + err)[-300:])
        init = os.path.join(self.tmp, "mariadb-init.sql")
        with open(init, "w") as f:
            f.write("CREATE DATABASE IF NOT EXISTS sbtest;\n"
                    "CREATE USER IF NOT EXISTS 'vaurien'@'%' IDENTIFIED BY "
                    "'vaurien';\nGRANT ALL ON *.* TO 'vaurien'@'%';\n")
        return [tool_path("mariadbd") or tool_path("mysqld"), "--no-defaults",
                "--datadir=" + data,
                "--socket=" + os.path.join(self.tmp, "mariadb.sock"),
                "--port=%d" % self.port, "--bind-address=" + HOST,
                "--pid-file=" + os.path.join(self.tmp, "mariadb.pid"),
                "--skip-log-bin", "--innodb-buffer-pool-size=64M",
                "--max-connections=1000", "--init-file=" + init] + user

    def start(self):
        self.port = free_port()
        self.proc = spawn(self.command(), log_path=self.log, cwd=self.tmp)
        wait_listen(self.port, self.proc, 60, self.name, self.log)
        self.after_start()

    def after_start(self):
        rc, out, err = run(sysbench_cmd(self.port, "prepare"), timeout=120)
        if rc != 0:
            raise BenchError("sysbench prepare failed: %s"
                             % (out + err).strip()[-300:])


def sysbench_cmd(port, action, threads=1, secs=1):
    return ["sysbench", "oltp_point_select", "--db-driver=mysql",
            "--mysql-host=" + HOST, "--mysql-port=%d" % port,
            "--mysql-user=vaurien", "--mysql-password=vaurien",
            "--mysql-db=sbtest", "--tables=1", "--table-size=10000",
            "--threads=%d" % threads, "--time=%d" % secs, action]


class NginxBackend(Backend):
    name = "nginx"
    body_size = 1024

    def command(self):
        root = os.path.join(self.tmp, "www")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "small.html"), "w") as f:
            line = "<p>vaurien benchmark payload</p>\n"
            f.write((line * (self.body_size // len(line) + 1))[:self.body_size])
        user = ""
        if os.geteuid() == 0:
            # as root, nginx workers would switch to "nobody", which cannot
            # read our 0700 temp dir: keep them as the current user instead
            user = "user %s %s;" % (pwd.getpwuid(os.getuid()).pw_name,
                                    grp.getgrgid(os.getgid()).gr_name)
        t = self.tmp
        conf = """\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {t}/nginx.pid;
error_log {t}/logs/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {t}/nginx-body;
    proxy_temp_path {t}/nginx-proxy;
    fastcgi_temp_path {t}/nginx-fastcgi;
    uwsgi_temp_path {t}/nginx-uwsgi;
    scgi_temp_path {t}/nginx-scgi;
    default_type text/html;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen {host}:{port} backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
""".format(user=user, t=t, host=HOST, port=self.port, root=root)
        path = os.path.join(t, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        cmd = [tool_path("nginx"), "-p", t + "/", "-c", path]
        rc, out, err = run([tool_path("nginx"), "-h"], timeout=10)
        if "-e filename" in out + err:  # nginx >= 1.19.5
            cmd += ["-e", os.path.join(t, "logs", "nginx-error.log")]
        return cmd


# --------------------------------------------------------------------------
# workloads: each returns {"value": primary figure (higher is better),
#                          other keys: secondary figures}

def tool_path(name):
    found = shutil.which(name)
    if not found:
        for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
            p = os.path.join(d, name)
            if os.access(p, os.X_OK):
                return p
    return found


def w_iperf(ctx, port, proxy, reverse):
    secs = ctx.cfg["iperf_s"]
    cmd = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(secs), "-J",
           "-P", "1", "--connect-timeout", "5000"]
    if reverse:
        cmd.append("-R")
    last = None
    for attempt in range(2):
        try:
            rc, out, err = run(cmd, timeout=secs + 25)
            data = json.loads(out) if out.strip() else {}
            if data.get("error") or rc != 0:
                raise BenchError("iperf3 rc=%s: %s" % (
                    rc, data.get("error") or err.strip()[-200:]))
            bps = data["end"]["sum_received"]["bits_per_second"]
            return {"value": bps / 1e9}
        except (BenchError, ValueError, KeyError) as exc:
            last = exc
            # a failed/aborted test can leave iperf3 -s wedged: restart it
            ctx.backends["iperf3"].restart()
            if proxy is not None:
                break  # the proxy points at the old port; give up this run
    raise BenchError(str(last))


def w_redis(ctx, port, proxy, clients, pipeline, n_key, command=None):
    n = ctx.cfg[n_key]
    cmd = ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(clients),
           "-n", str(n), "--csv"]
    cmd += command or ["-t", "get"]
    if pipeline > 1:
        cmd += ["-P", str(pipeline)]
    # redis-benchmark keeps retrying when connections are reset: bound it
    rc, out, err = run(cmd, timeout=60 + n // 2000)
    for row in csv.DictReader(io.StringIO(out)):
        if row.get("test") == "GET" or (command and row.get("rps")):
            res = {"value": float(row["rps"])}
            if clients == 1:
                res["p50_ms"] = float(row["p50_latency_ms"])
                res["p99_ms"] = float(row["p99_latency_ms"])
            return res
    raise BenchError("redis-benchmark rc=%s, no GET row: %s"
                     % (rc, (out + err).strip()[-300:]))


def w_latency(ctx, port, proxy):
    """GET after GET on one connection, each timed to the microsecond
    (redis-benchmark's histogram counts in steps of 8 us and more): the
    client is this harness, the same for every variant."""
    n, warm = ctx.cfg["lat_n"], 1000
    req = resp_command(b"GET", REDIS_KEY)
    answer = b"$%d\r\n%s\r\n" % (len(REDIS_VALUE), REDIS_VALUE)
    times = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clock = time.perf_counter
        start = clock()
        for _ in range(n + warm):
            t = clock()
            s.sendall(req)
            got = s.recv(64)
            while len(got) < len(answer):
                more = s.recv(64)
                if not more:
                    raise BenchError("connection closed after %r" % got)
                got += more
            times.append(clock() - t)
            if got != answer:
                raise BenchError("unexpected answer %r" % got[:40])
        elapsed = clock() - start
    times = sorted(times[warm:])

    def pct(p):
        return times[min(len(times) - 1, int(p * len(times)))] * 1e6
    return {"value": (n + warm) / elapsed, "p50_us": pct(0.50),
            "p99_us": pct(0.99), "p999_us": pct(0.999)}


def w_memcache(ctx, port, proxy, conns):
    """GET after GET on *conns* connections at once, for kv_s seconds: the
    client is a child process of this harness (one thread, a selector),
    the same for every variant."""
    secs = ctx.cfg["kv_s"]
    rc, out, err = run([sys.executable, os.path.abspath(__file__),
                        "--memcache-load", "%d,%d,%d" % (port, conns, secs)],
                       timeout=secs + 30)
    m = re.match(r"ops (\d+) secs ([\d.]+) bad (\d+)", out)
    if rc != 0 or not m:
        raise BenchError("memcache load rc=%s: %s" % (rc, (out + err)[-300:]))
    if int(m.group(3)):
        raise BenchError("memcache load: %s bad answers" % m.group(3))
    return {"value": int(m.group(1)) / float(m.group(2))}


def memcache_load(port, conns, secs):
    """The memcache client (run in a child process): prints its count."""
    request = b"get key\r\n"
    answer = b"VALUE key 0 %d\r\n%s\r\nEND\r\n" % (len(REDIS_VALUE),
                                                      REDIS_VALUE)
    sel = selectors.DefaultSelector()
    got = {}
    for _ in range(conns):
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    ops = bad = 0
    start = time.monotonic()
    deadline = start + secs
    for s in got:
        s.send(request)
    while time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise SystemExit("connection closed")
            got[s] += data
            while len(got[s]) >= len(answer):
                if got[s][:len(answer)] != answer:
                    bad += 1
                got[s] = got[s][len(answer):]
                ops += 1
                s.send(request)
    print("ops %d secs %.3f bad %d" % (ops, time.monotonic() - start, bad))


def w_sysbench(ctx, port, proxy, threads):
    secs = ctx.cfg["kv_s"]
    rc, out, err = run(sysbench_cmd(port, "run", threads, secs),
                       timeout=secs + 60)
    m = re.search(r"queries:\s+\d+\s+\(([\d.]+) per sec", out)
    if rc != 0 or not m:
        raise BenchError("sysbench rc=%s: %s" % (rc, (out + err)[-300:]))
    res = {"value": float(m.group(1))}
    m = re.search(r"95th percentile:\s+([\d.]+)", out)
    if m:
        res["p95_ms"] = float(m.group(1))
    return res


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else None


def w_wrk(ctx, port, proxy, close):
    secs = ctx.cfg["wrk_s"]
    cmd = ["wrk", "-t", "2", "-c", "50", "-d", "%ds" % secs,
           "--timeout", "5s", "--latency",
           "http://%s:%d/small.html" % (HOST, port)]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    rc, out, err = run(cmd, timeout=secs + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rc != 0 or not m:
        raise BenchError("wrk rc=%s: %s" % (rc, (out + err).strip()[-300:]))
    res = {"value": float(m.group(1))}
    lat = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)$", out, re.M))
    if "99" in lat:
        res["p99_ms"] = _wrk_ms(lat["99"])
    total = re.search(r"(\d+) requests in", out)
    total = int(total.group(1)) if total else 0
    bad = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        bad += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", out)
    if m:
        bad += sum(int(x) for x in m.groups())
    res["errors"] = bad
    if not total or bad > total * 0.01:
        raise BenchError("wrk: %d errors for %d requests" % (bad, total))
    return res


def read_line(proc, prefixes, deadline, buf, log, what="hold.py"):
    """Read lines from proc.stdout until one starts with a prefix and a
    space: (prefix, the JSON after it).  BenchError, naming *what* (and
    the last line of *log*), when *deadline* passes or proc ends first."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            while b"\n" in buf[0]:
                line, buf[0] = buf[0].split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                for p in prefixes:
                    if text.startswith(p + " "):
                        return p, json.loads(text[len(p) + 1:])
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("%s: timeout%s" % (what, log_tail(log, 1)))
            if sel.select(timeout=min(left, 1.0)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError("%s exited (status %s) early"
                                     % (what, proc.wait(timeout=5)))
                buf[0] += chunk
    finally:
        sel.close()


def w_hold(ctx, port, proxy):
    n = ctx.connections
    timeout = int(60 + n / 50.0)  # per phase (open+check, second check)
    pss0 = pss_kib(proxy.pid) if proxy is not None else None
    log = os.path.join(ctx.tmp, "logs", "hold-%s.log" % ctx.tag)
    cmd = [sys.executable, os.path.join(BENCH_DIR, "hold.py"),
           "--host", HOST, "--port", str(port), "-n", str(n),
           "--wait-stdin", "--timeout", str(timeout)]
    with open(log, "ab") as errf:
        proc = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=errf)
    try:
        buf = [b""]
        deadline = time.monotonic() + timeout + 15
        kind, info = read_line(proc, ("HELD", "RESULT"), deadline, buf,
                                log)
        pss1 = None
        if kind == "HELD":
            if proxy is not None:
                pss1 = pss_kib(proxy.pid)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            deadline = time.monotonic() + timeout + 15
            kind, info = read_line(proc, ("RESULT",), deadline, buf, log)
    finally:
        kill(proc)
    if not info.get("all_ok"):
        raise BenchError("hold: %d/%d connected, %d+%d echoed ok: %s" % (
            info.get("connected", 0), n, info.get("echo1_ok", 0),
            info.get("echo2_ok", 0), info.get("error")))
    res = {"value": n / info["open_echo_s"], "open_s": info["open_echo_s"]}
    if pss0 is not None and pss1 is not None:
        res["pss_kib_conn"] = (pss1 - pss0) / n
    return res


class Workload:
    def __init__(self, name, title, unit, tools, backend, proto, func,
                 **kwargs):
        self.name, self.title, self.unit = name, title, unit
        self.tools, self.backend, self.proto = tools, backend, proto
        self.func, self.kwargs = func, kwargs

    def run(self, ctx, port, proxy):
        return self.func(ctx, port, proxy, **self.kwargs)


WORKLOADS = [
    Workload("iperf-up", "iperf3 1 stream", "Gbit/s", ["iperf3"], "iperf3",
             None, w_iperf, reverse=False),
    Workload("iperf-down", "iperf3 1 stream -R", "Gbit/s", ["iperf3"],
             "iperf3", None, w_iperf, reverse=True),
    Workload("redis-c1", "redis GET -c1", "req/s",
             ["redis-server", "redis-benchmark"], "redis", "redis", w_redis,
             clients=1, pipeline=1, n_key="redis_c1_n"),
    Workload("redis-lat", "redis GET 1 by 1", "req/s", ["redis-server"],
             "redis", "redis", w_latency),
    Workload("redis-c50", "redis GET -c50", "req/s",
             ["redis-server", "redis-benchmark"], "redis", "redis", w_redis,
             clients=50, pipeline=1, n_key="redis_c50_n"),
    Workload("redis-c50-p16", "redis GET -c50 -P16", "req/s",
             ["redis-server", "redis-benchmark"], "redis", "redis", w_redis,
             clients=50, pipeline=16, n_key="redis_p16_n"),
    Workload("wrk-keepalive", "wrk keep-alive c50", "req/s",
             ["nginx", "wrk"], "nginx", "http", w_wrk, close=False),
    Workload("wrk-close", "wrk Conn:close c50", "req/s",
             ["nginx", "wrk"], "nginx", "http", w_wrk, close=True),
    Workload("redis-1mb", "redis GET 1MB -c4", "req/s",
             ["redis-server", "redis-benchmark"], "redis", "redis", w_redis,
             clients=4, pipeline=1, n_key="redis_big_n",
             command=["GET", REDIS_BIG_KEY.decode()]),
    Workload("redis-lrange600", "redis LRANGE 600 -c50", "req/s",
             ["redis-server", "redis-benchmark"], "redis", "redis", w_redis,
             clients=50, pipeline=1, n_key="redis_lrange_n",
             command=["LRANGE", REDIS_LIST.decode(), "0", "599"]),
    Workload("memcache-get", "memcache get c20", "req/s", ["memcached"],
             "memcached", "memcache", w_memcache, conns=20),
    Workload("mysql-select", "sysbench point_select t8", "q/s",
             ["mariadbd", "sysbench"], "mariadb", "mysql", w_sysbench,
             threads=8),
    Workload("hold", "hold N conns", "conn/s", [], "echo", None, w_hold),
]

BACKENDS = {"echo": EchoBackend, "iperf3": IperfBackend,
            "redis": RedisBackend, "nginx": NginxBackend,
            "memcached": MemcachedBackend, "mariadb": MariadbBackend}


# --------------------------------------------------------------------------
# variants (direct, socat, vaurien...)

class Variant:
    def __init__(self, name, argv_fn, proto=None, api=False, env=None):
        self.name = name
        self.argv_fn = argv_fn  # (listen_port, backend_port) -> argv | None
        self.proto = proto      # only for workloads speaking this protocol
        # a Toxiproxy API server: argv_fn gets the API's port instead, and
        # the proxy is made through that API (see measure)
        self.api = api
        self.env = env

    def applies(self, wl):
        return self.proto is None or self.proto == wl.proto

    @property
    def is_vaurien(self):
        return self.name.startswith(("vaurien", "v+"))

    @property
    def is_proxy(self):
        """A proxy compared with socat (vaurien's variants, Toxiproxy)."""
        return self.argv_fn is not None and self.name != "socat"


def protocols_listed(listing):
    """Protocol names from `vaurien.py --list`: the names indented by two
    spaces under a "Protocols:" heading (behavior descriptions mention
    Redis and HTTP too, so a plain word search would be fooled)."""
    names, inside, found = set(), False, False
    for line in listing.splitlines():
        if re.match(r"^protocols\s*:", line.strip()):
            inside = found = True
            continue
        if inside:
            if line.strip() and not line.startswith(" "):
                inside = False
                continue
            m = re.match(r"^ {1,4}([a-z0-9_.-]+)(\s|$)", line)
            if m:
                names.add(m.group(1))
    if not found:  # unknown format: fall back to a word search
        names = set(re.findall(r"\b(redis|http)\b", listing))
    return names


def build_variants(args, notes):
    variants = [Variant("direct", None)]
    if tool_path("socat"):
        variants.append(Variant("socat", lambda p, b: [
            "socat", "TCP-LISTEN:%d,reuseaddr,fork,backlog=1024" % p,
            "TCP:%s:%d" % (HOST, b)]))

    template = args.proxy_cmd if args.proxy_cmd and "{" in args.proxy_cmd \
        else None
    if args.proxy_cmd and not template:
        prefix = shlex.split(args.proxy_cmd)
    elif not args.proxy_cmd:
        if not os.path.exists(VAURIEN):
            notes.append("vaurien.py not found at %s: vaurien variants "
                         "skipped" % VAURIEN)
            return variants
        prefix = ["python3", VAURIEN]
    else:
        prefix = None

    def make(extra):
        if template is not None:
            def argv(p, b):
                return shlex.split(template.format(
                    port=p, backend_port=b, proxy="%s:%d" % (HOST, p),
                    backend="%s:%d" % (HOST, b),
                    extra=" ".join(shlex.quote(a) for a in extra)))
        else:
            def argv(p, b):
                return prefix + ["--proxy", "%s:%d" % (HOST, p),
                                 "--backend", "%s:%d" % (HOST, b),
                                 "--log-level", "warning"] + extra
        return argv

    variants.append(Variant("vaurien", make([])))
    # issue 16: worker processes behind one port
    variants.append(Variant("vaurien-w2", make(["--workers", "2"])))
    variants.append(Variant("vaurien-wauto", make(["--workers", "auto"])))
    if template is None:
        def server(extra):
            return lambda api, b: prefix + [
                "server", "-host", HOST, "-port", str(api),
                "--log-level", "warning"] + extra
        variants.append(Variant("vaurien-server", server([]), api=True))
        variants.append(Variant("vaurien-server-w2",
                                server(["--workers", "2"]), api=True))
    toxiproxy = toxiproxy_bin(args.toxiproxy)
    if toxiproxy:
        variants.append(Variant("toxiproxy", lambda api, b: [
            toxiproxy, "-host", HOST, "-port", str(api)], api=True,
            env=toxiproxy_env()))
    elif args.toxiproxy or os.environ.get("TOXIPROXY_BIN"):
        notes.append("no Toxiproxy binary at %s: toxiproxy variant skipped"
                     % (args.toxiproxy or os.environ.get("TOXIPROXY_BIN")))
    for label, path in args.compare:
        # another vaurien.py (a worktree of main...), plain, side by side
        variants.append(Variant("vaurien@" + label, lambda p, b, path=path: [
            "python3", path, "--proxy", "%s:%d" % (HOST, p),
            "--backend", "%s:%d" % (HOST, b), "--log-level", "warning"]))
    if template is not None and "{extra}" not in template:
        notes.append("--proxy-cmd template has no {extra}: vaurien+delay "
                     "and protocol variants skipped")
        return variants
    variants.append(Variant("vaurien+delay", make(
        ["--behavior", "100:delay", "--behavior-delay-sleep", "0"])))
    variants.append(Variant("vaurien+delay-w2", make(
        ["--behavior", "100:delay", "--behavior-delay-sleep", "0",
         "--workers", "2"])))

    listing = ""
    if prefix is not None:
        try:
            rc, out, err = run(prefix + ["--list"], timeout=30)
            listing = (out + err).lower()
        except BenchError as exc:
            notes.append("`--list` failed: %s" % exc)
    protos = protocols_listed(listing)
    for proto in ("redis", "http", "memcache", "mysql"):
        if proto in protos:
            variants.append(Variant("vaurien+" + proto,
                                    make(["--protocol", proto]), proto=proto))
        else:
            notes.append("protocol %r not in `vaurien.py --list`: "
                         "vaurien+%s skipped" % (proto, proto))
    if "redis" in protos:
        # a behavior active on every exchange that does nothing (issue 14)
        variants.append(Variant("v+redis+delay0", make(
            ["--protocol", "redis", "--behavior", "100:delay",
             "--behavior-delay-sleep", "0"]), proto="redis"))
        variants.append(Variant("v+redis+errwarm", make(
            ["--protocol", "redis", "--behavior", "100:error",
             "--behavior-error-warmup", "1000000000"]), proto="redis"))
    return variants


# --------------------------------------------------------------------------
# one measurement

class Ctx:
    pass


def measure(ctx, wl, variant, rnd):
    backend = ctx.backends[wl.backend]
    backend.ensure()
    proxy = None
    cpu0 = None
    ctx.tag = "%s-%s-r%d" % (variant.name, wl.name, rnd)
    try:
        if variant.argv_fn is None:
            port = backend.port
        else:
            port = free_port()
            api_port = free_port() if variant.api else None
            argv = variant.argv_fn(api_port or port, backend.port)
            log = os.path.join(ctx.tmp, "logs", "proxy-%s-%s-r%d.log" % (
                variant.name, wl.name, rnd))
            with open(log, "ab") as f:
                f.write(("$ %s\n" % shlex.join(argv)).encode())
            proxy = spawn(argv, log_path=log, env=variant.env)
            if variant.api:
                wait_listen(api_port, proxy, 20, variant.name + " API", log)
                toxiproxy_proxy(api_port, "bench", "%s:%d" % (HOST, port),
                                "%s:%d" % (HOST, backend.port), [LATENCY_0])
            wait_listen(port, proxy, 20, variant.name, log)
            cpu0 = cpu_seconds(proxy.pid)
            procs0 = cpu_by_process(proxy.pid)
        # what the load generator (the harness's children reaped meanwhile)
        # and the backend used: they share the machine with the proxy
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        backend0 = cpu_seconds(backend.proc.pid)
        try:
            res = wl.run(ctx, port, proxy)
        except BenchError as exc:
            # the proxy's own complaint (a traceback...) is often the cause
            if proxy is not None and proxy_said_something(log):
                raise BenchError("%s%s" % (exc, log_tail(log, 3)))
            raise
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res["cpu_client"] = (client1.ru_utime + client1.ru_stime -
                             client0.ru_utime - client0.ru_stime)
        backend1 = cpu_seconds(backend.proc.pid)
        if backend0 is not None and backend1 is not None:
            res["cpu_backend"] = backend1 - backend0
        if proxy is not None:
            cpu1, quiet = cpu_seconds_settled(proxy.pid)
            procs1 = cpu_by_process(proxy.pid)
            if len(procs1) > 1:
                # each process's share, the busiest first
                res["cpu_procs"] = sorted(
                    (procs1[p] - procs0.get(p, 0) for p in procs1),
                    reverse=True)
            if not quiet:
                res["busy"] = 1  # still burning CPU 5 s after the load
            if proxy.poll() is not None:
                raise BenchError("%s exited with status %s during the run%s"
                                 % (variant.name, proxy.returncode,
                                    log_tail(log)))
            if cpu0 is not None and cpu1 is not None:
                res["cpu_s"] = cpu1 - cpu0
        return res
    finally:
        kill(proxy)


# --------------------------------------------------------------------------
# report

def fmt(x, width=0):
    if x is None:
        s = "-"
    elif abs(x) >= 10000:
        s = "{:,.0f}".format(x)
    elif abs(x) >= 100:
        s = "%.0f" % x
    elif abs(x) >= 10:
        s = "%.1f" % x
    elif abs(x) >= 1:
        s = "%.2f" % x
    else:
        s = "%.3f" % x
    return s.rjust(width)


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def cpu_model():
    """The first CPU's model name from /proc/cpuinfo, or "?"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def header_lines(ctx):
    def sh(cmd):
        try:
            return run(cmd, timeout=10)[1].strip()
        except (BenchError, OSError):
            return "?"
    cpu = cpu_model()
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    versions = []
    for tool, cmd, pat in (
            ("socat", ["socat", "-V"], r"socat version (\S+)"),
            ("iperf3", ["iperf3", "--version"], r"iperf (\S+)"),
            ("redis", ["redis-server", "--version"], r"v=(\S+)"),
            ("nginx", [tool_path("nginx") or "nginx", "-v"],
             r"nginx/(\S+)"),
            ("wrk", ["wrk", "--version"], r"wrk (\S+)")):
        if not tool_path(cmd[0]):
            continue
        try:
            rc, out, err = run(cmd, timeout=10)
        except (BenchError, OSError):
            continue
        m = re.search(pat, out + err)
        versions.append("%s %s" % (tool, m.group(1) if m else "?"))
    git = sh(["git", "-C", REPO_DIR, "log", "-1", "--format=%h"]) or "?"
    dirty = sh(["git", "-C", REPO_DIR, "status", "--porcelain", "--",
                "vaurien.py"])
    dirty = {"??": " (vaurien.py untracked)", "": ""}.get(
        dirty[:2], " (vaurien.py modified)" if dirty not in ("", "?") else "")
    return [
        "vaurien benchmark  %s" % datetime.datetime.now().strftime(
            "%Y-%m-%d %H:%M:%S %z").strip(),
        "uname: %s" % sh(["uname", "-srm"]),
        "cpu: %s  nproc: %s  python: %s" % (cpu, nproc,
                                           platform_python()),
        "tools: %s" % ", ".join(versions),
        "vaurien: %s" % (ctx.proxy_desc),
        "git: %s%s  rounds: %d%s  hold N: %d" % (
            git, dirty,
            ctx.rounds, " (quick)" if ctx.quick else "", ctx.connections),
    ]


def platform_python():
    try:
        return run(["python3", "-c", "import sys; print(sys.version.split()"
                    "[0])"], timeout=10)[1].strip()
    except (BenchError, OSError):
        return "?"


def notes_for(wl, vname, runs, direct_runs):
    parts = []
    if wl.name == "redis-c1":
        p50, p99 = median_of(runs, "p50_ms"), median_of(runs, "p99_ms")
        d50, d99 = median_of(direct_runs, "p50_ms"), \
            median_of(direct_runs, "p99_ms")
        if p50 is not None:
            if vname == "direct" or d50 is None:
                parts.append("p50 %.3f p99 %.3f ms" % (p50, p99))
            else:
                parts.append("p50 %+.3f p99 %+.3f ms" % (p50 - d50,
                                                          p99 - d99))
    elif wl.name == "redis-lat":
        keys = ("p50_us", "p99_us", "p999_us")
        mine = [median_of(runs, k) for k in keys]
        base = [median_of(direct_runs, k) for k in keys]
        if None not in mine:
            if vname == "direct" or None in base:
                parts.append("p50 %.1f p99 %.1f p99.9 %.1f us" % tuple(mine))
            else:
                parts.append("p50 %+.1f p99 %+.1f p99.9 %+.1f us" % tuple(
                    m - b for m, b in zip(mine, base)))
    elif wl.name.startswith("wrk"):
        p99 = median_of(runs, "p99_ms")
        if p99 is not None:
            parts.append("p99 %s ms" % fmt(p99).strip())
        errs = sum(r.get("errors", 0) for r in runs)
        if errs:
            parts.append("%d errors" % errs)
    elif wl.name == "hold":
        pss = median_of(runs, "pss_kib_conn")
        if pss is not None:
            parts.append("PSS %s KiB/conn" % fmt(pss).strip())
    procs = [r["cpu_procs"] for r in runs if "cpu_procs" in r]
    if procs:
        # the median of each rank (busiest process, next...)
        ranks = max(len(p) for p in procs)
        parts.append("cpu/proc %s" % "+".join(
            "%.1f" % statistics.median(p[i] for p in procs if len(p) > i)
            for i in range(ranks)))
    client = median_of(runs, "cpu_client")
    backend = median_of(runs, "cpu_backend")
    if client is not None and backend is not None:
        parts.append("load %.1f backend %.1f cpu s" % (client, backend))
    return ", ".join(parts)


def table(ctx):
    cols = [("workload", 20, "<"), ("variant", 15, "<"), ("median", 9, ">"),
            ("unit", 6, "<"), ("/direct", 7, ">"), ("v/socat", 7, ">"),
            ("/vaurien", 8, ">"),
            ("cpu s", 6, ">"), ("+-%", 4, ">"), ("n", 2, ">"),
            ("notes", 0, "<")]

    def row(vals):
        out = []
        for (name, w, align), v in zip(cols, vals):
            out.append(v.ljust(w) if align == "<" else v.rjust(w))
        return "  ".join(out).rstrip()

    lines = [row([c[0] for c in cols]),
             row(["-" * max(c[1], len(c[0])) for c in cols])]
    for wl in ctx.workloads:
        title = wl.title
        if wl.name == "hold":
            title = "hold %d conns" % ctx.connections
        direct = ctx.results.get((wl.name, "direct"), [])
        socat = ctx.results.get((wl.name, "socat"), [])
        dmed = median_of(direct, "value")
        smed = median_of(socat, "value")
        vmed = median_of(ctx.results.get((wl.name, "vaurien"), []), "value")
        # a behavior's variant against the protocol's pass-through
        pmed = median_of(ctx.results.get((wl.name, "vaurien+" + str(
            wl.proto)), []), "value")
        first = True
        for v in ctx.variants:
            if not v.applies(wl):
                continue
            runs = ctx.results.get((wl.name, v.name), [])
            errs = ctx.errors.get((wl.name, v.name), [])
            if not runs and not errs:
                continue
            med = median_of(runs, "value")
            vals = [r["value"] for r in runs]
            spread = (None if not vals or not med else
                      (max(vals) - min(vals)) / 2 / med * 100)
            note = notes_for(wl, v.name, runs, direct)
            tmed = median_of(ctx.results.get((wl.name, "toxiproxy"), []),
                             "value")
            if v.is_vaurien and med and tmed:
                note = "%.2fx toxiproxy" % (med / tmed) + (
                    ", " + note if note else "")
            busy = sum(r.get("busy", 0) for r in runs)
            if busy:
                note = (note + ", " if note else "") + \
                    "busy>5s after %d/%d" % (busy, len(runs))
            if errs:
                note = (note + ", " if note else "") + \
                    "%d failed" % len(errs)
            if v.name.startswith("v+") and med and pmed:
                note = (note + ", " if note else "") + \
                    "%.3f of vaurien+%s" % (med / pmed, wl.proto)
            lines.append(row([
                title if first else "", v.name, fmt(med),
                wl.unit,
                "%.3f" % (med / dmed) if med and dmed else "-",
                "%.3f" % (med / smed) if (v.is_proxy and med and smed)
                else "-",
                "%.3f" % (med / vmed) if (v.is_vaurien and v.name !=
                                          "vaurien" and med and vmed)
                else "-",
                fmt(median_of(runs, "cpu_s")) if v.argv_fn else "-",
                "%.0f" % spread if spread is not None else "-",
                str(len(runs)), note]))
            first = False
    return lines


LEGEND = """\
median: median over rounds (higher is better; conn/s = N / time to open N
  connections and get every unique payload echoed).  /direct: median / the
  direct median.  v/socat: a proxy's median (vaurien variants, toxiproxy)
  / socat median.  /vaurien: variant median / plain vaurien's median (the
  protocol modes' cost; "of vaurien+P": a behavior's variant / the
  protocol's pass-through, issue 14).  vaurien-server, toxiproxy: a proxy
  made through Toxiproxy's API, with one latency toxic of 0 ms; "Nx
  toxiproxy": a vaurien variant's median / the toxiproxy median.  cpu s:
  user+sys CPU seconds of the proxy process (threads, children) from the
  start of the workload until the proxy is quiet again (at most 5 s after
  the load ends; "busy>5s after k/n": not quiet by then), median.  +-%:
  half the min-max range, % of median.  n: rounds that succeeded.
  redis -c1 notes: p50/p99 latency (direct), latency added (proxies);
  redis 1 by 1: the same, timed in microseconds by the harness itself.
  PSS KiB/conn: proxy PSS growth while N connections are held, / N.
  vaurien-w2, vaurien-wauto, vaurien+delay-w2: --workers 2 or auto
  (issue 16); "cpu/proc a+b+c": the CPU seconds of each of the proxy's
  processes, the busiest first (the supervisor last, near 0).  "load L
  backend B cpu s": what the load generator and the backend used
  meanwhile (they share the machine with the proxy)."""


# --------------------------------------------------------------------------

def compare_arg(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not os.path.isfile(path):
        raise argparse.ArgumentTypeError(
            "expected NAME=PATH to a vaurien.py, got %r" % text)
    return name, os.path.abspath(path)


def only(parser, text, names, what):
    """The names of a comma-separated --only; an unknown one is a usage
    error naming the known ones."""
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in wanted if x not in names]
    if bad:
        parser.error("unknown %s(s) %s; choose from %s"
                     % (what, ", ".join(bad), ", ".join(names)))
    return wanted


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memcache-load"]:
        memcache_load(*[int(x) for x in argv[1].split(",")])
        return 0
    parser = argparse.ArgumentParser(
        description="vaurien benchmark harness (see bench/README.txt)",
        epilog="workloads: " + ", ".join(w.name for w in WORKLOADS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--only", default=None,
                        help="comma-separated workloads to run")
    parser.add_argument("--quick", action="store_true",
                        help="short durations (smoke test, ~1-2 minutes)")
    parser.add_argument("--proxy-cmd", default=None,
                        help="command used instead of 'python3 vaurien.py'; "
                        "--proxy/--backend/--log-level are appended, unless "
                        "it contains {port}/{backend_port}/{proxy}/{backend}"
                        " placeholders (then also {extra} for variants)")
    parser.add_argument("--compare", action="append", default=[],
                        metavar="NAME=PATH", type=compare_arg,
                        help="also run the vaurien.py at PATH, as variant "
                        "vaurien@NAME (repeatable)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to run (default: "
                        "all), e.g. direct,socat,vaurien,vaurien@main")
    parser.add_argument("--connections", type=int, default=None,
                        help="connections for the hold workload "
                        "(default 3000, 1000 with --quick)")
    parser.add_argument("--10k", dest="ten_k", action="store_true",
                        help="hold 10000 connections")
    parser.add_argument("--toxiproxy", default=None, metavar="PATH",
                        help="Toxiproxy server binary, run as variant "
                        "toxiproxy (default: $TOXIPROXY_BIN)")
    parser.add_argument("--output", default=RESULTS,
                        help="where to write the report (default "
                        "bench/results-latest.txt)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)

    ctx = Ctx()
    ctx.quick = args.quick
    ctx.cfg = SETTINGS["quick" if args.quick else "full"]
    ctx.rounds = args.rounds or (1 if args.quick else 3)
    ctx.connections = 10000 if args.ten_k else (
        args.connections or ctx.cfg["hold_n"])
    ctx.results, ctx.errors = {}, {}
    ctx.proxy_desc = (args.proxy_cmd + "  (--proxy-cmd)") if args.proxy_cmd \
        else "python3 %s" % os.path.relpath(VAURIEN)

    names = [w.name for w in WORKLOADS]
    wanted = only(parser, args.only, names, "workload") if args.only \
        else names

    # fds: hold N through a proxy needs 2N sockets in the proxy, and more if
    # it uses pipes or wakeup fds per connection; children inherit this
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * ctx.connections + 1024
    for lim in ((max(hard, need), max(hard, need)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue

    start = time.monotonic()
    ctx.tmp = tempfile.mkdtemp(prefix="vaurien-bench-")
    os.makedirs(os.path.join(ctx.tmp, "logs"))

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    notes = []
    head = []
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if "hold" in wanted and limit != resource.RLIM_INFINITY and \
            limit < 2 * ctx.connections + 100:
        line = ("RLIMIT_NOFILE is %d and cannot be raised here: a proxy "
                "holding %d connections needs more than %d descriptors, "
                "expect 'too many open files' (raise the hard limit: "
                "ulimit -Hn, limits.conf, LimitNOFILE=)"
                % (limit, ctx.connections, 2 * ctx.connections))
        print(line)
        notes.append(line)
    try:
        missing = {}
        for t in PACKAGES:
            if not tool_path(t):
                missing[t] = PACKAGES[t]
        for t, pkg in missing.items():
            users = [w.name for w in WORKLOADS if t in w.tools
                     and w.name in wanted]
            what = ("skipping " + ", ".join(users)) if users else (
                "socat variant skipped" if t == "socat" else "not needed")
            line = "missing %s: apt-get install %s  (%s)" % (t, pkg, what)
            print(line)
            notes.append(line)
        ctx.workloads = [w for w in WORKLOADS if w.name in wanted and
                         not any(t in missing for t in w.tools)]
        before = len(notes)
        ctx.variants = build_variants(args, notes)
        if args.variants:
            keep = set(x.strip() for x in args.variants.split(","))
            bad = keep - set(v.name for v in ctx.variants)
            if bad:
                parser.error("unknown variant(s) %s; choose from %s" % (
                    ", ".join(sorted(bad)),
                    ", ".join(v.name for v in ctx.variants)))
            ctx.variants = [v for v in ctx.variants if v.name in keep]
        for n in notes[before:]:
            print(n)
        head = header_lines(ctx)
        print("\n".join(head))
        print("variants: %s" % ", ".join(v.name for v in ctx.variants))
        for v in ctx.variants:
            if v.argv_fn:
                print("  %-14s $ %s" % (v.name, shlex.join(v.argv_fn(0, 0))))
                if v.api:
                    print("  %-14s   then POST /proxies, POST /proxies/bench"
                          "/toxics %s" % ("", json.dumps(LATENCY_0)))
        print("temp dir: %s" % ctx.tmp)

        ctx.backends = {}
        for wl in list(ctx.workloads):
            if wl.backend in ctx.backends:
                continue
            b = BACKENDS[wl.backend](ctx.tmp)
            try:
                b.start()
            except BenchError as exc:
                line = "backend %s failed to start, skipping its workloads:" \
                    " %s" % (b.name, exc)
                print(line)
                notes.append(line)
                ctx.workloads = [w for w in ctx.workloads
                                 if w.backend != wl.backend]
                continue
            ctx.backends[wl.backend] = b

        for rnd in range(1, ctx.rounds + 1):
            for wl in ctx.workloads:
                for v in ctx.variants:
                    if not v.applies(wl):
                        continue
                    key = (wl.name, v.name)
                    t0 = time.monotonic()
                    try:
                        res = measure(ctx, wl, v, rnd)
                    except (BenchError, OSError, ValueError, KeyError,
                            subprocess.SubprocessError) as exc:
                        if not isinstance(exc, BenchError):
                            exc = "%s: %s" % (type(exc).__name__, exc)
                        ctx.errors.setdefault(key, []).append(str(exc))
                        print("round %d/%d  %-14s %-14s FAILED: %s" % (
                            rnd, ctx.rounds, wl.name, v.name, exc))
                        continue
                    ctx.results.setdefault(key, []).append(res)
                    extra = " ".join(
                        "%s=%s" % (k, "+".join(fmt(y).strip() for y in x)
                                   if isinstance(x, list) else fmt(x).strip())
                        for k, x in sorted(res.items()) if k != "value")
                    print("round %d/%d  %-14s %-14s %10s %-6s %s  (%.1fs)" % (
                        rnd, ctx.rounds, wl.name, v.name, fmt(res["value"]),
                        wl.unit, extra, time.monotonic() - t0), flush=True)
                    time.sleep(0.2)
    except KeyboardInterrupt as exc:
        print("\ninterrupted (%s): reporting what was measured" % (exc or
                                                                   "^C"))
        notes.append("INTERRUPTED: partial results")
    finally:
        kill_all()
        if args.keep_tmp:
            print("kept %s" % ctx.tmp)
        else:
            shutil.rmtree(ctx.tmp, ignore_errors=True)

    if not ctx.results:
        print("no results")
        return 1
    elapsed = time.monotonic() - start
    out = head + [""] + table(ctx) + [""] + LEGEND.splitlines()
    if notes:
        out += [""] + ["note: " + n for n in notes]
    for (wname, vname), errs in sorted(ctx.errors.items()):
        for e in errs:
            e = " ".join(e.split())
            if len(e) > 240:  # keep the start and the end (the exception)
                e = e[:100] + " ... " + e[-135:]
            out.append("failed: %s / %s: %s" % (wname, vname, e))
    out.append("total run time: %.0f s" % elapsed)
    text = "\n".join(out) + "\n"
    print()
    print(text, end="")
    with open(args.output, "w") as f:
        f.write(text)
    print("written to %s" % os.path.relpath(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
