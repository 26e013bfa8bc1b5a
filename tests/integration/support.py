"""Real servers, real client libraries, and vaurien in between.

Every server starts on a free port of 127.0.0.1 in a temporary folder and
is stopped at the end of its test class.  A missing server program or
client library skips the test with a line naming what to install, except
with ``CI=true`` in the environment, where it is a failure.
"""

import contextlib
import importlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import vaurien  # noqa: E402

vaurien.load_plugins()

TIMEOUT = 10.0
IN_CI = os.environ.get('CI', '').strip().lower() == 'true'
SBIN = ('/usr/sbin', '/usr/local/sbin', '/sbin')


def missing(what):
    """Skip (or, under CI=true, fail) because *what* is not installed."""
    if IN_CI:
        raise AssertionError('missing under CI=true: ' + what)
    raise unittest.SkipTest('missing: ' + what)


def need_program(names, package):
    """The path of the first of *names* found, else skip naming the Debian
    package to install."""
    if isinstance(names, str):
        names = [names]
    path = os.environ.get('PATH', '') + os.pathsep + os.pathsep.join(SBIN)
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    missing('%s (apt-get install %s)' % (names[0], package))


def need_module(name, package):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing('Python module %s (pip install %s)' % (name, package))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_port(port, process=None, timeout=30.0, what='server'):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError('%s exited with status %s' % (
                what, process.returncode))
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError('%s did not listen on port %d within %gs'
                         % (what, port, timeout))


class Server(object):
    """A server process in a temporary folder."""

    def __init__(self, argv, port, folder, what, env=None, timeout=30.0):
        self.port = port
        self.folder = folder
        self.what = what
        self.log = open(os.path.join(folder, 'server.log'), 'wb')
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=folder, env=env)
        try:
            wait_port(port, self.process, timeout, what)
        except AssertionError:
            self.stop()
            raise AssertionError('%s did not start: %s' % (what,
                                                            self.log_text()))

    @property
    def address(self):
        return ('127.0.0.1', self.port)

    def log_text(self):
        try:
            with open(os.path.join(self.folder, 'server.log'), 'rb') as f:
                return f.read()[-2000:].decode('utf-8', 'replace')
        except OSError:
            return ''

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_redis():
    program = need_program('redis-server', 'redis-server')
    port = free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-redis-')
    return Server([program, '--port', str(port), '--bind', '127.0.0.1',
                   '--save', '', '--appendonly', 'no', '--dir', folder],
                  port, folder, 'redis-server')


def start_memcached():
    program = need_program('memcached', 'memcached')
    port = free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-memcached-')
    argv = [program, '-l', '127.0.0.1', '-p', str(port), '-U', '0',
            '-m', '64', '-I', '4m']
    if os.geteuid() == 0:
        argv += ['-u', 'root']
    return Server(argv, port, folder, 'memcached')


def start_nginx(files):
    """nginx serving *files* ({name: bytes}) and echoing POST bodies."""
    program = need_program('nginx', 'nginx-light')
    port = free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-nginx-')
    root = os.path.join(folder, 'html')
    os.mkdir(root)
    for name, data in files.items():
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    user = 'user root;\n' if os.geteuid() == 0 else ''
    config = """%sdaemon off;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %s/body;
    proxy_temp_path %s/proxy;
    fastcgi_temp_path %s/fastcgi;
    uwsgi_temp_path %s/uwsgi;
    scgi_temp_path %s/scgi;
    client_max_body_size 64m;
    keepalive_requests 10000;
    server {
        listen 127.0.0.1:%d;
        root %s;
        location = /empty { return 204; }
        location /gz/ { gzip on; gzip_min_length 0; gzip_types text/plain; }
        location = /upload {
            client_body_buffer_size 64m;
            if ($request_method = POST) { return 200 "got $content_length"; }
        }
        location / { }
    }
}
""" % ((user, folder) + (folder,) * 6 + (port, root))
    path = os.path.join(folder, 'nginx.conf')
    with open(path, 'w') as f:
        f.write(config)
    return Server([program, '-c', path, '-p', folder], port, folder, 'nginx')


def start_mariadb():
    """A throw-away MariaDB with user vaurien/vaurien and database test."""
    server = need_program(['mariadbd', 'mysqld'], 'mariadb-server')
    install = need_program(['mariadb-install-db', 'mysql_install_db'],
                           'mariadb-server')
    port = free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-mariadb-')
    data = os.path.join(folder, 'data')
    user = ['--user=root'] if os.geteuid() == 0 else []
    result = subprocess.run(
        [install, '--no-defaults', '--datadir=' + data,
         '--auth-root-authentication-method=normal',
         '--skip-test-db'] + user,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise AssertionError('mariadb-install-db failed: %s' % result.stdout[
            -2000:].decode('utf-8', 'replace'))
    init = os.path.join(folder, 'init.sql')
    with open(init, 'w') as f:
        f.write("CREATE DATABASE IF NOT EXISTS test;\n"
                "CREATE USER IF NOT EXISTS 'vaurien'@'%' IDENTIFIED BY "
                "'vaurien';\n"
                "GRANT ALL ON *.* TO 'vaurien'@'%';\n")
    argv = [server, '--no-defaults', '--datadir=' + data,
            '--socket=' + os.path.join(folder, 'mysqld.sock'),
            '--port=%d' % port, '--bind-address=127.0.0.1',
            '--pid-file=' + os.path.join(folder, 'mysqld.pid'),
            '--skip-log-bin', '--innodb-buffer-pool-size=32M',
            '--max-allowed-packet=64M', '--init-file=' + init] + user
    return Server(argv, port, folder, 'mariadbd', timeout=60.0)


class SMTPServer(object):
    """aiosmtpd in a thread, keeping every message it receives."""

    def __init__(self):
        need_module('aiosmtpd', 'aiosmtpd')
        from aiosmtpd.controller import Controller
        self.messages = []
        outer = self

        class Handler(object):
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append((envelope.mail_from,
                                       list(envelope.rcpt_tos),
                                       envelope.original_content or
                                       envelope.content))
                return '250 OK message accepted'

        self.port = free_port()
        self.controller = Controller(Handler(), hostname='127.0.0.1',
                                     port=self.port)
        self.controller.start()
        wait_port(self.port, what='aiosmtpd')

    @property
    def address(self):
        return ('127.0.0.1', self.port)

    def stop(self):
        self.controller.stop()


class Proxy(object):
    """vaurien's ProxyServer in this process, in a thread."""

    def __init__(self, backend, protocol, behavior='dummy',
                 protocol_options=None, behavior_options=None):
        self.server = vaurien.ProxyServer(
            ('127.0.0.1', 0), backend, protocol=protocol, behavior=behavior,
            protocol_options=protocol_options,
            behavior_options=behavior_options, seed='integration')
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={'poll_interval': 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def address(self):
        return self.server.address

    @property
    def port(self):
        return self.server.address[1]

    def set(self, mix, options=None):
        self.server.set_mix(mix, options)

    def stop(self):
        self.server.shutdown()
        self.server.close_all()


@contextlib.contextmanager
def captured_warnings():
    """The lines vaurien logs at warning level and above."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.WARNING)
    vaurien.logger.addHandler(handler)
    try:
        yield lines
    finally:
        vaurien.logger.removeHandler(handler)


class ProxiedTestCase(unittest.TestCase):
    """Starts one backend (``start_backend``) for the class, and a proxy
    per test (``self.proxy`` through the plugin, ``self.tcp`` through plain
    tcp).  ``PROTOCOL`` names the plugin."""

    PROTOCOL = None
    PROTOCOL_OPTIONS = None

    @classmethod
    def start_backend(cls):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        cls.backend = cls.start_backend()

    @classmethod
    def tearDownClass(cls):
        cls.backend.stop()

    def setUp(self):
        self.proxy = Proxy(self.backend.address, self.PROTOCOL,
                           protocol_options=self.PROTOCOL_OPTIONS)
        self.addCleanup(self.proxy.stop)
        self.tcp = Proxy(self.backend.address, 'tcp')
        self.addCleanup(self.tcp.stop)
