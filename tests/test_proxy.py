"""The engine: pass-through, half-close, many connections, big streams,
unreachable backends, idle timeout, signals, the lone file."""

import hashlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
import unittest

from tests import support
from tests.support import vaurien


class PassThroughTest(unittest.TestCase):

    def setUp(self):
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)

    def test_echo_many_exchanges_on_one_connection(self):
        with support.Proxy(self.echo.address) as proxy:
            with proxy.connect() as sock:
                for i in range(200):
                    payload = ('message %d ' % i).encode() * (i + 1)
                    self.assertEqual(support.exchange(sock, payload), payload)

    def test_quiet_connection_is_not_cut(self):
        with support.Proxy(self.echo.address) as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'ping'), b'ping')
                time.sleep(1.5)
                self.assertEqual(support.exchange(sock, b'pong'), b'pong')

    def test_big_stream_upstream_intact(self):
        size = 200 * 1024 * 1024
        block = os.urandom(1 << 20)
        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)
        with support.ThreadedServer(support.hash_then_reply) as backend, \
                support.Proxy(backend.address) as proxy:
            with support.connect(proxy.address, timeout=120) as sock:
                for _ in range(size // len(block)):
                    sock.sendall(block)
                sock.shutdown(socket.SHUT_WR)   # half-close: answer follows
                answer = support.recv_all(sock).decode()
        self.assertEqual(answer, '%s %d\n' % (expected.hexdigest(), size))

    def test_big_stream_downstream_intact(self):
        size = 64 * 1024 * 1024
        block = os.urandom(1 << 20)

        def send_blocks(server, conn):
            for _ in range(size // len(block)):
                conn.sendall(block)

        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)
        with support.ThreadedServer(send_blocks) as backend, \
                support.Proxy(backend.address) as proxy:
            with support.connect(proxy.address, timeout=60) as sock:
                got = hashlib.sha256()
                count = 0
                while True:
                    data = sock.recv(1 << 20)
                    if not data:
                        break
                    got.update(data)
                    count += len(data)
        self.assertEqual(count, size)
        self.assertEqual(got.hexdigest(), expected.hexdigest())

    def test_backend_half_close_keeps_upstream_flowing(self):
        def greet_then_listen(server, conn):
            conn.sendall(b'hello, then I stop talking')
            conn.shutdown(socket.SHUT_WR)
            hash_part = hashlib.sha256()
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                hash_part.update(data)
            server.received.append(hash_part.hexdigest())

        with support.ThreadedServer(greet_then_listen) as backend, \
                support.Proxy(backend.address) as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.recv_all(sock),
                                 b'hello, then I stop talking')
                payload = os.urandom(300000)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                deadline = time.time() + 5
                while not backend.received and time.time() < deadline:
                    time.sleep(0.01)
        self.assertEqual(backend.received,
                         [hashlib.sha256(payload).hexdigest()])

    def test_three_thousand_concurrent_connections(self):
        support.raise_fd_limit()
        count = 3000
        with support.Proxy(self.echo.address) as proxy:
            socks = []
            try:
                for i in range(count):
                    socks.append(proxy.connect())
                for i, sock in enumerate(socks):
                    sock.sendall(b'%06d' % i)
                for i, sock in enumerate(socks):
                    self.assertEqual(support.recv_exactly(sock, 6),
                                     b'%06d' % i)
                self.assertEqual(len(proxy.server.connections), count)
            finally:
                for sock in socks:
                    sock.close()

    def test_ipv6(self):
        if not socket.has_ipv6:
            self.skipTest('no IPv6 on this machine')
        try:
            echo6 = support.EchoServer(socket.AF_INET6, '::1').start()
        except OSError:
            self.skipTest('no IPv6 loopback on this machine')
        self.addCleanup(echo6.stop)
        with support.Proxy(('::1', echo6.port), proxy=('::1', 0)) as proxy:
            with socket.create_connection(proxy.address[:2], 5) as sock:
                self.assertEqual(support.exchange(sock, b'six'), b'six')


class FastPathTest(unittest.TestCase):
    """tcp with the dummy mix skips exchanges and hooks; it must stay
    byte-exact and give way at once when a behavior is switched on."""

    def test_fast_path_then_a_behavior_then_fast_again(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address) as proxy:
            with proxy.connect() as sock:
                payloads = [os.urandom(n) for n in (1, 1000, 65536, 300000)]
                for payload in payloads:
                    self.assertEqual(support.exchange(sock, payload), payload)
                conn, = proxy.server.connections.values()
                self.assertGreaterEqual(conn.behaviors_met['dummy'], len(payloads))
                fast = conn.behaviors_met['dummy']
                proxy.server.set_mix('delay', {'delay': {'sleep': 0.3}})
                start = time.time()
                self.assertEqual(support.exchange(sock, b'slow'), b'slow')
                self.assertGreaterEqual(time.time() - start, 0.3)
                self.assertEqual(conn.behaviors_met['delay'], 1)
                self.assertEqual(conn.behaviors_met['dummy'], fast)
                proxy.server.set_mix('dummy')
                self.assertEqual(support.exchange(sock, b'fast'), b'fast')
                self.assertEqual(conn.behaviors_met['dummy'], fast + 1)
                self.assertEqual(conn.bytes_up, sum(map(len, payloads)) + 8)
            counts = proxy.server.exchange_counts
            self.assertEqual(counts['delay'], 1)
            self.assertEqual(counts['dummy'], fast + 1)

    def test_reads_on_and_counts_each_read(self):
        # one poll may give several reads; each is still an exchange
        got = []

        def sink(server, conn):
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    return
                got.append(len(data))
        size = 8 << 20
        with support.ThreadedServer(sink) as backend, \
                support.Proxy(backend.address) as proxy:
            with proxy.connect() as sock:
                sock.sendall(os.urandom(size))
                deadline = time.time() + 10
                while sum(got) < size and time.time() < deadline:
                    time.sleep(0.01)
                self.assertEqual(sum(got), size)
                conn, = proxy.server.connections.values()
                self.assertGreater(conn.client.reads, 1)
                self.assertEqual(conn.exchanges, conn.client.reads)
                self.assertEqual(conn.behaviors_met, {'dummy': conn.exchanges})
                picker = conn.picker
                self.assertTrue(picker.plain_next())
                proxy.server.set_mix('delay', {'delay': {'sleep': 0}})
                self.assertFalse(picker.plain_next())
                reads = conn.client.reads
                sock.sendall(os.urandom(size))
                while sum(got) < 2 * size and time.time() < deadline:
                    time.sleep(0.01)
                self.assertEqual(sum(got), 2 * size)
                self.assertEqual(conn.behaviors_met['delay'],
                                 conn.client.reads - reads)

    def test_fast_path_half_close(self):
        with support.ThreadedServer(support.hash_then_reply) as backend, \
                support.Proxy(backend.address) as proxy:
            with proxy.connect() as sock:
                payload = os.urandom(5 << 20)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                answer = support.recv_all(sock).decode()
        self.assertEqual(answer, '%s %d\n' % (
            hashlib.sha256(payload).hexdigest(), len(payload)))

    def test_a_subclass_of_tcp_keeps_its_handle(self):
        class Doubler(vaurien.TCP):
            name = 'test-doubler'

            def _handle(self, source, dest, to_backend):
                data = self._get_data(source)
                if not data:
                    return self._end_of_stream(source, dest)
                dest.sendall(data * 2 if to_backend else data)
                return True

        vaurien.Protocol.register(Doubler)
        self.addCleanup(vaurien.Protocol.unregister, 'test-doubler')
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, protocol='test-doubler') as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'ab'), b'ab')
                self.assertEqual(support.recv_exactly(sock, 2), b'ab')


class SpareThreadTest(unittest.TestCase):
    """A connection's thread, once its connection ends, waits for the next
    one (starting a thread per connection costs more than the rest)."""

    def threads(self, proxy):
        name = 'vaurien %s' % vaurien.format_address(proxy.address)
        return [t for t in threading.enumerate() if t.name == name]

    def wait_threads(self, proxy, count):
        deadline = time.time() + 5
        while len(self.threads(proxy)) != count and time.time() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(self.threads(proxy)), count)

    def wait_idle(self, proxy, spares):
        deadline = time.time() + 5
        while time.time() < deadline:
            if not proxy.server.connections and \
                    len(proxy.server._spares) == spares:
                return
            time.sleep(0.01)
        self.fail('connections did not end: %r' % proxy.server.connections)

    def test_one_thread_serves_connection_after_connection(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address) as proxy:
            for i in range(5):
                with proxy.connect() as sock:
                    payload = os.urandom(1000 + i)
                    self.assertEqual(support.exchange(sock, payload), payload)
                self.wait_idle(proxy, 1)
            self.assertEqual(len(self.threads(proxy)), 1)

    def test_spares_are_bounded_and_end_when_idle_or_closed(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address) as proxy:
            proxy.server.spare_threads = 2
            proxy.server.spare_thread_idle = 0.5
            socks = [proxy.connect() for _ in range(4)]
            for sock in socks:
                self.assertEqual(support.exchange(sock, b'x'), b'x')
            self.assertEqual(len(self.threads(proxy)), 4)
            for sock in socks:
                sock.close()
            self.wait_idle(proxy, 2)
            self.wait_threads(proxy, 2)
            self.wait_threads(proxy, 0)                 # idle too long
            proxy.server.spare_thread_idle = 60
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'y'), b'y')
            self.wait_idle(proxy, 1)
        self.wait_threads(proxy, 0)                     # proxy closed


class BackendTroubleTest(unittest.TestCase):

    def test_unreachable_backend_closes_client_and_keeps_serving(self):
        dead = ('127.0.0.1', support.free_port())
        with support.EchoServer() as echo, support.Proxy(dead) as proxy:
            with self.assertLogs('vaurien', logging.WARNING) as logs:
                with proxy.connect() as sock:
                    self.assertTrue(support.closed_by_peer(sock))
            self.assertIn('cannot reach the backend', logs.output[0])
            proxy.server.backend = echo.address
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'alive'), b'alive')

    def test_idle_timeout_cuts_quiet_connections(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, idle_timeout=0.3) as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'x'), b'x')
                start = time.time()
                self.assertTrue(support.closed_by_peer(sock, wait=5))
                self.assertGreaterEqual(time.time() - start, 0.25)

    def test_backend_reset_is_passed_on(self):
        def reset(server, conn):
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            b'\x01\x00\x00\x00\x00\x00\x00\x00')
            conn.close()

        with support.ThreadedServer(reset) as backend, \
                support.Proxy(backend.address) as proxy:
            with proxy.connect() as sock:
                sock.sendall(b'hello')
                with self.assertRaises(ConnectionResetError):
                    sock.settimeout(5)
                    while sock.recv(100):
                        pass


class ProcessTest(unittest.TestCase):

    def test_sigterm_stops_within_a_second(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with support.EchoServer() as echo:
                args = ['--backend', '127.0.0.1:%d' % echo.port]
                with support.vaurien_process(args) as (proc, address):
                    with support.connect(address) as sock:
                        self.assertEqual(support.exchange(sock, b'a'), b'a')
                        start = time.time()
                        proc.send_signal(signum)
                        self.assertEqual(proc.wait(5), 0)
                        self.assertLess(time.time() - start, 1.0)
                        self.assertTrue(support.closed_by_peer(sock))

    @unittest.skipUnless(hasattr(os, 'sched_getaffinity') and
                         os.path.isdir('/proc/self/task') and
                         len(os.sched_getaffinity(0)) > 1,
                         'needs Linux and two CPUs or more')
    def test_threads_run_on_one_cpu(self):
        mine = os.sched_getaffinity(0)

        def cpus_of_threads(args):
            args = args + ['--backend', '127.0.0.1:%d' % echo.port,
                           '--http', '--http-port', '0']
            with support.vaurien_process(args) as (proc, address):
                with support.connect(address) as sock:
                    self.assertEqual(support.exchange(sock, b'a'), b'a')
                    found = []
                    task = '/proc/%d/task' % proc.pid
                    for tid in os.listdir(task):
                        found.append(os.sched_getaffinity(int(tid)))
            self.assertGreaterEqual(len(found), 3)  # main, control, conn
            return found

        with support.EchoServer() as echo:
            found = cpus_of_threads([])
            self.assertEqual(len(found[0]), 1)
            self.assertTrue(found[0] <= mine)
            self.assertEqual(found, [found[0]] * len(found))
            last = max(mine)
            self.assertEqual(cpus_of_threads(['--cpu', str(last)]),
                             [{last}] * len(found))
            found = cpus_of_threads(['--cpu', 'all'])
            self.assertEqual(found, [mine] * len(found))

    def test_lone_copy_in_an_empty_folder(self):
        with support.temp_dir() as folder, support.EchoServer() as echo:
            lone = os.path.join(folder, 'vaurien.py')
            shutil.copy(support.VAURIEN_PY, lone)
            for flags in (['--help'], ['--list'], ['--version']):
                code, out, err = support.run_vaurien(
                    flags, cwd=folder, script=lone, isolated=True)
                self.assertEqual((code, err), (0, ''))
            self.assertIn('blackout', out + support.run_vaurien(
                ['--list'], cwd=folder, script=lone, isolated=True)[1])
            args = ['--backend', '127.0.0.1:%d' % echo.port,
                    '--behavior', '100:delay', '--behavior-delay-sleep', '0.2']
            with support.vaurien_process(args, cwd=folder, script=lone,
                                         isolated=True) as (proc, address):
                with support.connect(address) as sock:
                    start = time.time()
                    self.assertEqual(support.exchange(sock, b'lone'), b'lone')
                    self.assertGreaterEqual(time.time() - start, 0.2)


class DescriptorTest(unittest.TestCase):

    def test_out_of_descriptors_waits_without_spinning(self):
        import subprocess
        import sys
        try:
            import resource
        except ImportError:
            self.skipTest('no resource module on this platform')

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

        with support.EchoServer() as echo:
            port = support.free_port()
            proc = subprocess.Popen(
                [sys.executable, support.VAURIEN_PY, '--proxy',
                 '127.0.0.1:%d' % port, '--backend',
                 '127.0.0.1:%d' % echo.port, '--log-level', 'warning'],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=low_limit, universal_newlines=True)
            socks = []
            try:
                first = wait_connect(('127.0.0.1', port))
                socks.append(first)
                self.assertEqual(support.exchange(first, b'0'), b'0')
                for _ in range(30):     # more than 48 descriptors allow
                    socks.append(support.connect(('127.0.0.1', port)))
                time.sleep(0.5)
                before = _cpu_seconds(proc.pid)
                time.sleep(1.0)
                spent = _cpu_seconds(proc.pid) - before
                self.assertLess(spent, 0.5)     # waiting, not spinning
                last = socks[-1]
                last.sendall(b'late')
                for sock in socks[1:-1]:
                    sock.close()
                self.assertEqual(support.recv_exactly(last, 4), b'late')
            finally:
                for sock in socks:
                    sock.close()
                proc.terminate()
                err = proc.communicate(timeout=10)[1]
        self.assertEqual(err.count('out of file descriptors'), 1, err)


def _cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as stream:
        fields = stream.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(
        os.sysconf('SC_CLK_TCK'))


class StatsdTest(unittest.TestCase):

    def test_counters_have_bounded_names(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(('127.0.0.1', 0))
            udp.settimeout(5)
            statsd = vaurien._Statsd('127.0.0.1', udp.getsockname()[1],
                                     'chaos')
            self.addCleanup(statsd.close)
            with support.EchoServer() as echo, \
                    support.Proxy(echo.address, statsd=statsd,
                                  behavior='delay',
                                  behavior_options={'delay': {'sleep': 0}}
                                  ) as proxy:
                for _ in range(2):
                    with proxy.connect() as sock:
                        support.exchange(sock, b'x')
                lines = set()
                for _ in range(4):
                    lines.add(udp.recv(1000).decode())
        self.assertEqual(lines, {'chaos.connections:1|c',
                                 'chaos.behavior.delay:1|c'})


class LoggingTest(unittest.TestCase):

    def test_a_line_per_connection_at_debug(self):
        with support.temp_dir() as folder, support.EchoServer() as echo:
            log = os.path.join(folder, 'vaurien.log')
            port = support.free_port()
            proc = vaurien_subprocess(['--backend', '127.0.0.1:%d' % echo.port,
                                       '--proxy', '127.0.0.1:%d' % port,
                                       '--log-output', log,
                                       '--log-level', 'debug'])
            try:
                sock = wait_connect(('127.0.0.1', port))
                with sock:
                    self.assertEqual(support.exchange(sock, b'abc'), b'abc')
                time.sleep(0.3)
            finally:
                proc.terminate()
                proc.wait(5)
            with open(log) as stream:
                text = stream.read()
            self.assertIn('proxying 127.0.0.1:%d -> 127.0.0.1:%d' % (
                port, echo.port), text)
            self.assertRegex(text, r'connection 1 127\.0\.0\.1:\d+ -> '
                                   r'127\.0\.0\.1:\d+ closed after [\d.]+s: '
                                   r'3 bytes up, 3 bytes down, 1 exchanges '
                                   r'\(dummy=1\)')


def vaurien_subprocess(args):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, support.VAURIEN_PY] + args,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_connect(address, timeout=10):
    deadline = time.time() + timeout
    while True:
        try:
            return support.connect(address)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


if __name__ == '__main__':
    unittest.main()
