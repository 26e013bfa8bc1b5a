"""The proxy must never be the fault: full duplex without deadlock, the
backend's last answer delivered before its reset, clients that leave a
stuck backend released, and what waits bounded in real memory."""

import gc
import hashlib
import os
import platform
import socket
import threading
import time
import unittest
import weakref

from tests import support
from tests.support import vaurien

vaurien.load_plugins()

SIZE = 64 << 20         # each way, in the full-duplex cases
BLOCK = os.urandom(1 << 20)


def _digest(count):
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(BLOCK)
    return digest.hexdigest()


EXPECTED = _digest(SIZE // len(BLOCK))


def read_hash(sock, size):
    """sha256 of exactly *size* bytes read from *sock* (fewer at its
    end), and the count read."""
    digest = hashlib.sha256()
    count = 0
    while count < size:
        data = sock.recv(min(1 << 20, size - count))
        if not data:
            break
        digest.update(data)
        count += len(data)
    return digest.hexdigest(), count


def duplex_backend(head=b''):
    """A backend handler that reads *head* (when given: a request's
    head, up to its blank line) then sends SIZE bytes (after *head*'s
    answer line) while it reads SIZE bytes, at the same time; records the
    hash of what it read."""
    def handler(server, conn):
        conn.settimeout(30)
        if head:
            got = b''
            while b'\r\n\r\n' not in got:
                data = conn.recv(1)
                if not data:
                    return
                got += data
            conn.sendall(head)

        def send():
            try:
                for _ in range(SIZE // len(BLOCK)):
                    conn.sendall(BLOCK)
            except OSError:
                pass
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        server.received.append(read_hash(conn, SIZE))
        sender.join(30)
    return handler


class FullDuplexTest(unittest.TestCase):
    """A client that uploads 64 MB before it reads, while the backend
    sends 64 MB at the same time: the proxy's one thread per connection
    must never block on one direction while the other needs it."""

    def run_duplex(self, request_head=b'', answer_head=b'', **proxy):
        with support.ThreadedServer(duplex_backend(answer_head)) as backend, \
                support.Proxy(backend.address, **proxy) as vaurien_proxy:
            with support.connect(vaurien_proxy.address, timeout=30) as sock:
                sock.sendall(request_head)
                for _ in range(SIZE // len(BLOCK)):
                    sock.sendall(BLOCK)     # times out on a deadlock
                if answer_head:
                    self.assertEqual(support.recv_exactly(
                        sock, len(answer_head)), answer_head)
                got = read_hash(sock, SIZE)
            deadline = time.time() + 10
            while not backend.received and time.time() < deadline:
                time.sleep(0.01)
        self.assertEqual(got, (EXPECTED, SIZE))
        self.assertEqual(backend.received, [(EXPECTED, SIZE)])

    def test_tcp_fast_path(self):
        self.run_duplex()

    def test_behind_socket_hooks(self):
        # delay 0 acts on every exchange: the full path, hooks included
        self.run_duplex(behavior='delay',
                        behavior_options={'delay': {'sleep': 0}})

    def test_behind_a_stream_behavior(self):
        self.run_duplex(behavior='latency',
                        behavior_options={'latency': {'latency': 0}})

    def test_framed_http(self):
        self.run_duplex(
            request_head=(b'POST /upload HTTP/1.1\r\nHost: x\r\n'
                          b'Content-Length: %d\r\n\r\n' % SIZE),
            answer_head=(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n'
                         % SIZE),
            protocol='http')

    def test_framed_protocol_passing_through(self):
        # what redis cannot frame it passes on: the pass-through path
        with self.assertLogs('vaurien', 'WARNING'):
            self.run_duplex(protocol='redis')


def answer_early(line):
    """A backend handler that reads part of a large request, answers
    *line* and closes while the client still uploads (its kernel then
    resets the connection, as the request is still unread)."""
    def handler(server, conn):
        got = 0
        while got < 65536:
            data = conn.recv(65536)
            if not data:
                break
            got += len(data)
        conn.sendall(line)
    return handler


class LastAnswerTest(unittest.TestCase):
    """When one side resets, what it sent first still reaches the other
    side, then the reset is passed on: as TCP itself would."""

    trials = 10

    def upload_then_read(self, address, head, line):
        with support.connect(address) as sock:
            try:
                sock.sendall(head)
                for _ in range(16):
                    sock.sendall(BLOCK)
            except OSError:
                pass        # the reset: expected while uploading
            try:
                return support.recv_exactly(sock, len(line))
            except OSError as exc:
                return exc

    def check(self, line, head=b'', **proxy):
        with support.ThreadedServer(answer_early(line)) as backend:
            direct = self.upload_then_read(backend.address, head, line)
            self.assertEqual(direct, line)      # what TCP gives
            with support.Proxy(backend.address, **proxy) as vaurien_proxy:
                got = [self.upload_then_read(vaurien_proxy.address, head,
                                             line)
                       for _ in range(self.trials)]
        self.assertEqual(got, [line] * self.trials)

    def test_tcp(self):
        self.check(b'-ERR Protocol error: too big inline request\r\n')

    def test_redis(self):
        with self.assertLogs('vaurien', 'WARNING'):    # it cannot frame that
            self.check(b'-ERR Protocol error: too big inline request\r\n',
                       protocol='redis')

    def test_http_413(self):
        self.check(b'HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n'
                   b'Connection: close\r\n\r\n',
                   head=b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: '
                        b'16777216\r\n\r\n', protocol='http')

    def test_client_reset_reaches_the_backend_after_its_data(self):
        # the client sends, then resets: the backend gets the data, then
        # the reset (not a clean end of stream)
        def read_all(server, conn):
            chunks = []
            server.received.append(chunks)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        chunks.append('end')
                        return
                    chunks.append(data)
            except ConnectionResetError:
                chunks.append('reset')
        with support.ThreadedServer(read_all) as backend, \
                support.Proxy(backend.address) as vaurien_proxy:
            sock = support.connect(vaurien_proxy.address)
            sock.sendall(b'last words')
            time.sleep(0.2)
            vaurien._reset(sock)
            deadline = time.time() + 5
            while time.time() < deadline and not (
                    backend.received and backend.received[0] and
                    backend.received[0][-1] in ('end', 'reset')):
                time.sleep(0.01)
        chunks = backend.received[0]
        self.assertEqual(b''.join(chunks[:-1]), b'last words')
        self.assertEqual(chunks[-1], 'reset')


def accept_and_never_read(server, conn):
    server.received.append(conn)
    while not server._stop.is_set():
        time.sleep(0.05)


class StuckBackendTest(unittest.TestCase):
    """A client's end ends its connection, even while what it sent is
    stuck on its way to a backend that reads nothing."""

    def test_clients_that_left_are_released(self):
        with support.ThreadedServer(accept_and_never_read) as backend, \
                support.Proxy(backend.address) as vaurien_proxy:
            vaurien_proxy.server.grace = 0.5
            clients = []
            for _ in range(20):
                sock = support.connect(vaurien_proxy.address)
                sock.settimeout(0.5)
                try:
                    for _ in range(2):
                        sock.sendall(BLOCK)
                except socket.timeout:
                    pass
                clients.append(sock)
            deadline = time.time() + 5
            while (len(vaurien_proxy.server.connections) < 20 and
                   time.time() < deadline):
                time.sleep(0.01)
            self.assertEqual(len(vaurien_proxy.server.connections), 20)
            for sock in clients:
                sock.close()        # they gave up
            deadline = time.time() + 5
            while vaurien_proxy.server.connections and time.time() < deadline:
                time.sleep(0.05)
            self.assertEqual(vaurien_proxy.server.connections, {})

    def test_a_slow_backend_still_gets_everything(self):
        # the client half-closes after its upload; the backend reads
        # slowly, with pauses shorter than the grace: nothing is cut
        def slow_reader(server, conn):
            digest = hashlib.sha256()
            count = 0
            time.sleep(0.3)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                digest.update(data)
                count += len(data)
                if count % (1 << 20) < 65536:
                    time.sleep(0.05)
            conn.sendall(('%s %d' % (digest.hexdigest(), count)).encode())
        with support.ThreadedServer(slow_reader) as backend, \
                support.Proxy(backend.address) as vaurien_proxy:
            with support.connect(vaurien_proxy.address) as sock:
                for _ in range(8):
                    sock.sendall(BLOCK)
                sock.shutdown(socket.SHUT_WR)
                answer = support.recv_all(sock).decode()
        self.assertEqual(answer, '%s %d' % (_digest(8), 8 << 20))


class Stale(vaurien.Dummy):
    """Sleeps after the first request went to the backend (its answer and
    the next request come meanwhile), then answers every later request
    itself."""

    name = 'test-stale'

    def on_before_handle(self, protocol, source, dest, to_backend):
        if to_backend and protocol.connection.exchange.number > 1:
            protocol._get_data(source)
            source.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine')
            return vaurien.HANDLED
        return True

    def on_after_handle(self, protocol, source, dest, to_backend):
        if to_backend and protocol.connection.exchange.number == 1:
            time.sleep(0.3)
        return True


class StaleReadinessTest(unittest.TestCase):
    """A step that reads the other socket (a framed protocol relaying an
    earlier answer before a hook answers) must not leave the loop acting on
    what the poll said of it before: a read there would block for good."""

    def test_next_request_is_served(self):
        vaurien.Behavior.register(Stale)
        self.addCleanup(vaurien.Behavior.unregister, 'test-stale')
        backend = support.http_backend(self, b'back')
        request = b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
        with support.Proxy(backend, protocol='http',
                           behavior='test-stale') as proxy:
            with support.connect(proxy.address, timeout=5) as sock:
                sock.sendall(request)
                time.sleep(0.1)         # while the proxy sleeps
                sock.sendall(request)
                answers = b''
                while answers.count(b'HTTP/1.1') < 2 or not answers.endswith(
                        b'mine'):
                    answers += sock.recv(65536)
                self.assertIn(b'back', answers)
                sock.sendall(request)
                self.assertTrue(sock.recv(65536).endswith(b'mine'))


class MemoryTest(unittest.TestCase):
    """What waits per connection is bounded in real memory, whatever the
    behavior, and goes with the connection."""

    def blast_through(self, behavior, options, seconds=1.5, reads=True):
        """Send as fast as possible for *seconds* through *behavior* to a
        backend that reads everything (or nothing, until the end); returns
        the peak of what waited (bytes with their bookkeeping, and pieces)
        and a weak reference to the connection."""
        done = threading.Event()

        def sink(server, conn):
            if not reads:
                done.wait(seconds + 5)
            while not done.is_set() and conn.recv(1 << 20):
                pass
        with support.ThreadedServer(sink) as backend, \
                support.Proxy(backend.address, behavior=behavior,
                              behavior_options={behavior: options}) as proxy:
            sock = support.connect(proxy.address)
            sock.settimeout(0.2)
            stop = time.time() + seconds
            peak_size = peak_pieces = 0
            conn = None
            while time.time() < stop:
                try:
                    sock.send(BLOCK)
                except socket.timeout:
                    pass
                for conn in list(proxy.server.connections.values()):
                    if conn.backend is not None:
                        peak_size = max(peak_size, conn.backend.size)
                        peak_pieces = max(peak_pieces,
                                          len(conn.backend.queue))
            ref = weakref.ref(conn) if conn is not None else None
            conn = None
            # both ends go: what still waits for the backend goes too
            sock.close()
            done.set()
            deadline = time.time() + 5
            while ref() is not None and time.time() < deadline:
                gc.collect()
                time.sleep(0.05)
        return peak_size, peak_pieces, ref

    def check_bounded(self, behavior, options):
        high = vaurien.Duplex.high_water
        peak_size, peak_pieces, ref = self.blast_through(behavior, options)
        self.assertGreater(peak_size, 0)
        # high water, plus one read of pieces beyond it
        cost = vaurien.Side.piece_cost
        self.assertLessEqual(peak_size, high + 65536 * (1 + cost))
        self.assertLessEqual(peak_pieces, (high + 65536 * (1 + cost)) // cost)
        self.assertIsNone(ref(), 'the connection was not freed')

    @unittest.skipUnless(platform.python_implementation() == 'CPython',
                         'only CPython frees objects by reference counting')
    def test_a_closed_connection_goes_without_the_collector(self):
        # its reference cycles are broken at its end: reference counting
        # frees it (the collector ran twice as often for them)
        with support.EchoServer() as echo, \
                support.Proxy(echo.address) as proxy:
            gc.disable()
            self.addCleanup(gc.enable)
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'ping'), b'ping')
                conn, = proxy.server.connections.values()
                ref = weakref.ref(conn)
                conn = None
            deadline = time.time() + 5
            while ref() is not None and time.time() < deadline:
                time.sleep(0.01)
            self.assertIsNone(ref(), 'the connection waits for the collector')

    def test_one_byte_slices(self):
        self.check_bounded('slicer', {'average_size': 1, 'size_variation': 0,
                                      'delay': 1000})

    def test_slow_bandwidth(self):
        self.check_bounded('bandwidth', {'rate': 1})

    def test_a_full_socket_holds_plain_bytes_at_once(self):
        # plain bytes wait in the kernel, not here: once the backend's
        # socket takes nothing more, the client is not read (one read's
        # rest waits at most); it was up to high water, 4 MiB of memory
        # spread fresh over each read, which made bulk transfer slower
        peak_size, _, ref = self.blast_through('dummy', {}, seconds=1,
                                               reads=False)
        self.assertGreater(peak_size, 0)
        self.assertLessEqual(peak_size, 65536 + vaurien.Side.piece_cost)
        self.assertIsNone(ref(), 'the connection was not freed')

    def test_a_full_socket_holds_a_behaviors_bytes_at_low_water(self):
        # through a behavior's hooks, 1 MiB (and one read) may wait while
        # the kernel takes nothing: room for answers a hook gives itself
        peak_size, _, ref = self.blast_through(
            'delay', {'sleep': 0}, seconds=1, reads=False)
        self.assertGreater(peak_size, 65536 + vaurien.Side.piece_cost)
        self.assertLessEqual(peak_size, vaurien.Duplex.low_water + 65536 +
                             vaurien.Side.piece_cost)
        self.assertIsNone(ref(), 'the connection was not freed')

    @unittest.skipUnless(os.path.exists('/proc/self/status'),
                         'needs /proc to read the memory of a process')
    def test_the_process_stays_small_under_one_byte_slices(self):
        def sink(server, conn):
            while conn.recv(1 << 20):
                pass
        with support.ThreadedServer(sink) as backend, \
                support.vaurien_process([
                    '--backend', '127.0.0.1:%d' % backend.port,
                    '--behavior', 'slicer',
                    '--behavior-slicer-average-size', '1',
                    '--behavior-slicer-size-variation', '0']) as (proc,
                                                                 address):
            before = rss(proc.pid)
            with support.connect(address) as sock:
                sock.settimeout(0.2)
                stop = time.time() + 3
                while time.time() < stop:
                    try:
                        sock.send(BLOCK)
                    except socket.timeout:
                        pass
                grown = rss(proc.pid) - before
        # a few MiB wait, at most; 1-byte pieces counted as 1 byte made
        # it 431 MB
        self.assertLess(grown, 48 << 20)


def rss(pid):
    """Resident memory of process *pid*, in bytes."""
    with open('/proc/%d/status' % pid) as stream:
        for line in stream:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == '__main__':
    unittest.main()
