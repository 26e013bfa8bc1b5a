"""Real servers and helpers for the tests: everything on 127.0.0.1, every
receive bounded by a timeout, so no test can hang."""

import contextlib
import hashlib
import http.server
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import vaurien  # noqa: E402

VAURIEN_PY = os.path.join(ROOT, 'vaurien.py')
TIMEOUT = 10.0


def raise_fd_limit():
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def connect(address, timeout=TIMEOUT):
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(timeout)
    return sock


def recv_exactly(sock, size):
    chunks = []
    while size:
        data = sock.recv(min(size, 65536))
        if not data:
            break
        chunks.append(data)
        size -= len(data)
    return b''.join(chunks)


def recv_all(sock):
    """Everything until the peer closes (bounded by the socket timeout)."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b''.join(chunks)
        chunks.append(data)


def closed_by_peer(sock, wait=2.0):
    """True when the peer closed (EOF or reset) within *wait* seconds."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, ConnectionAbortedError):
        return True
    except socket.timeout:
        return False


class _Server(object):
    """A server on a free loopback port, run in a daemon thread."""

    def __init__(self, family=socket.AF_INET, host='127.0.0.1'):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(4096)
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class EchoServer(_Server):
    """Echoes every byte back, any number of connections, one thread.
    The end of a client's stream is echoed too, as a half-close."""

    def __init__(self, *args, **kwargs):
        super(EchoServer, self).__init__(*args, **kwargs)
        self._sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ)
        self.accepted = 0

    def _run(self):
        sel = self._sel
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                if key.fileobj is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    self.accepted += 1
                    conn.setblocking(True)
                    conn.settimeout(TIMEOUT)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(data)
                        continue
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                sel.unregister(conn)
                conn.close()
        for key in list(sel.get_map().values()):
            if key.fileobj is not self.listener:
                key.fileobj.close()
        sel.close()


class ThreadedServer(_Server):
    """Runs ``handler(conn)`` in a thread per connection; records what
    each connection received in ``self.received`` (list of bytes)."""

    def __init__(self, handler, **kwargs):
        super(ThreadedServer, self).__init__(**kwargs)
        self.handler = handler
        self.received = []
        self.connections = 0

    def _run(self):
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(TIMEOUT)
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    def _serve(self, conn):
        try:
            self.handler(self, conn)
        except OSError:
            pass
        finally:
            conn.close()


def hash_then_reply(server, conn):
    """Reads until the end of the client's stream, then answers the sha256
    of what it read and the byte count, and closes."""
    digest = hashlib.sha256()
    count = 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        digest.update(data)
        count += len(data)
    conn.sendall(('%s %d\n' % (digest.hexdigest(), count)).encode())


def record_and_wait(server, conn):
    """Records what the client sends, answers nothing until it closes."""
    chunks = []
    server.received.append(chunks)
    while True:
        data = conn.recv(65536)
        if not data:
            return
        chunks.append(data)


class Proxy(object):
    """A ProxyServer in a background thread of this process."""

    def __init__(self, backend, **kwargs):
        kwargs.setdefault('proxy', ('127.0.0.1', 0))
        self.server = vaurien.ProxyServer(backend=backend, **kwargs)
        self.address = self.server.address
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={'poll_interval': 0.05},
            daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.close_all()
        self._thread.join(5)

    def connect(self):
        return connect(self.address)


def run_vaurien(args, cwd=None, env=None, timeout=30, script=VAURIEN_PY,
                isolated=False):
    """Run vaurien.py to completion; returns (returncode, stdout, stderr)."""
    return run_command((['-I'] if isolated else []) + [script] + args,
                       cwd=cwd, env=env, timeout=timeout)


def run_command(args, cwd=None, env=None, timeout=60):
    """Run this Python with *args*; returns (returncode, stdout, stderr)."""
    cmd = [sys.executable] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout,
                          universal_newlines=True)
    return proc.returncode, proc.stdout, proc.stderr


_LISTEN = re.compile(r'proxying (\S+):(\d+) ->')


@contextlib.contextmanager
def vaurien_process(args, cwd=None, env=None, script=VAURIEN_PY,
                    isolated=False):
    """Start vaurien.py (its proxy on port 0) and yield (proc, address)
    once it listens; stops it at the end."""
    cmd = [sys.executable] + (['-I'] if isolated else []) + [script] + [
        '--log-level', 'info'] + args
    if '--proxy' not in args:
        cmd += ['--proxy', '127.0.0.1:0']
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        deadline = time.time() + TIMEOUT
        lines = []
        address = None
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = _LISTEN.search(line)
            if match:
                address = (match.group(1).strip('[]'), int(match.group(2)))
                break
        if address is None:
            proc.kill()
            raise AssertionError('vaurien did not start: %s%s' % (
                ''.join(lines), proc.stderr.read()))
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


@contextlib.contextmanager
def temp_dir():
    path = tempfile.mkdtemp(prefix='vaurien-test-')
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path, text):
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder)
    with open(path, 'w') as stream:
        stream.write(text)
    return path


def env_with_path(*paths):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(list(paths) + [ROOT])
    env.pop('PYTHONSTARTUP', None)
    return env


def exchange(sock, payload):
    """Send *payload* and read back as many bytes."""
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


class _FixedHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's ``body``."""

    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        body = self.server.body
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def http_backend(test, body=b'hello', version='HTTP/1.1'):
    """An http.server answering *body* to every GET, stopped at the end of
    *test*; returns its address."""
    handler = type('Handler', (_FixedHandler,), {'protocol_version': version})
    httpd = http.server.HTTPServer(('127.0.0.1', 0), handler)
    httpd.body = body
    # clients cut off by abort or blackout are expected here: no tracebacks
    httpd.handle_error = lambda request, address: None
    thread = threading.Thread(target=httpd.serve_forever,
                              kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    test.addCleanup(httpd.server_close)
    test.addCleanup(httpd.shutdown)
    return httpd.server_address[:2]
