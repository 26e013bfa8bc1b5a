"""Where and when behaviors apply: gates, clients, direction, scope,
composition, stream stages, the decision log and --seed."""

import threading
import time
import unittest

from tests import support
from tests.support import vaurien


class Mark(vaurien.Dummy):
    """Test behavior: does nothing visible, but is not dummy (so the
    decision log shows where it applied)."""

    name = 'test-mark'

    def on_before_handle(self, protocol, source, dest, to_backend):
        return True


class Upper(vaurien.Dummy):
    """Test stream behavior: upper-cases what passes."""

    name = 'test-upper'

    def on_chunk(self, flow, data, at):
        return [(at, data.upper())]


class Tag(vaurien.Dummy):
    """Test stream behavior: appends its tag option to every chunk."""

    name = 'test-tag'
    options = {'tag': ("Bytes appended to each chunk", str, '!')}

    def on_chunk(self, flow, data, at):
        return [(at, data + self.option('tag').encode())]


class Hold(vaurien.Dummy):
    """Test stream behavior: each chunk waits `ms`, plus a random part
    drawn from the connection's generator."""

    name = 'test-hold'
    options = {'ms': ("Delay of each chunk, in milliseconds", float, 50.0),
               'spread': ("Random extra delay, up to, in ms", float, 0.0)}

    def on_chunk(self, flow, data, at):
        extra = flow.rng.random() * self.option('spread')
        flow.state.setdefault('extras', []).append(extra)
        return [(at + (self.option('ms') + extra) / 1000.0, data)]

    def on_end(self, flow, at):
        return at + self.option('ms') / 1000.0


def setUpModule():
    for cls in (Mark, Upper, Tag, Hold):
        vaurien.Behavior.register(cls)


def tearDownModule():
    for cls in (Mark, Upper, Tag, Hold):
        vaurien.Behavior.unregister(cls.name)


def answer_got(server, conn):
    """Answers each read with b'got:' + what it read; records reads."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        server.received.append(data)
        conn.sendall(b'got:' + data)


class MixTestCase(unittest.TestCase):

    def setUp(self):
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)

    def proxy(self, behavior, backend=None, **options):
        proxy = support.Proxy(backend or self.echo.address, behavior=behavior,
                              **options)
        proxy.__enter__()
        self.addCleanup(proxy.__exit__)
        return proxy

    def exchanges(self, proxy, connections=1, count=10):
        for _ in range(connections):
            with proxy.connect() as sock:
                for i in range(count):
                    self.assertEqual(support.exchange(sock, b'x%d' % i),
                                     b'x%d' % i)

    def marked(self, proxy):
        """(connection, exchange) of every decision, in order."""
        return [(d['connection'], d['exchange'])
                for d in proxy.server.decisions]


class GateTest(MixTestCase):

    def gated(self, **gates):
        proxy = self.proxy('test-mark', behavior_options={'test-mark': gates})
        self.exchanges(proxy, connections=2)
        return self.marked(proxy)

    def test_after(self):
        self.assertEqual(self.gated(after=7),
                         [(1, 8), (1, 9), (1, 10), (2, 8), (2, 9), (2, 10)])

    def test_every(self):
        self.assertEqual(self.gated(every=4),
                         [(1, 4), (1, 8), (2, 4), (2, 8)])

    def test_times(self):
        self.assertEqual(self.gated(times=2), [(1, 1), (1, 2), (2, 1), (2, 2)])

    def test_gates_together(self):
        self.assertEqual(self.gated(after=2, every=2, times=2),
                         [(1, 4), (1, 6), (2, 4), (2, 6)])

    def test_after_then_a_share(self):
        # "100 good requests, then 50% failing"
        proxy = self.proxy('50:test-mark', seed=1, behavior_options={
            'test-mark': {'after': 100}})
        self.exchanges(proxy, count=300)
        numbers = [number for _, number in self.marked(proxy)]
        self.assertGreater(min(numbers), 100)
        self.assertTrue(60 < len(numbers) < 140, len(numbers))


class ClientsTest(MixTestCase):

    def test_only_the_clients_named(self):
        for clients, expected in (('10.0.0.0/8', 0), ('127.0.0.0/8,::1', 3),
                                  ('127.0.0.1', 3), ('192.168.1.1', 0)):
            proxy = self.proxy('test-mark', behavior_options={
                'test-mark': {'clients': clients}})
            self.exchanges(proxy, count=3)
            self.assertEqual(len(self.marked(proxy)), expected, clients)


class DirectionTest(MixTestCase):

    def run_upper(self, direction):
        with support.ThreadedServer(answer_got) as backend:
            proxy = self.proxy('test-upper', backend=backend.address,
                               behavior_options={
                                   'test-upper': {'direction': direction}})
            with proxy.connect() as sock:
                sock.sendall(b'hello')
                answer = support.recv_exactly(sock, 9)
            return backend.received[0], answer

    def test_directions(self):
        self.assertEqual(self.run_upper('both'), (b'HELLO', b'GOT:HELLO'))
        self.assertEqual(self.run_upper('upstream'), (b'HELLO', b'got:HELLO'))
        self.assertEqual(self.run_upper('downstream'),
                         (b'hello', b'GOT:HELLO'))

    def test_request_behaviors_refuse_downstream(self):
        with self.assertRaisesRegex(vaurien.VaurienError,
                                    "'direction' must be both or upstream"):
            self.proxy('delay', behavior_options={
                'delay': {'direction': 'downstream'}})


class ScopeTest(MixTestCase):

    def test_connection_scope_is_all_or_nothing(self):
        proxy = self.proxy('40:test-mark', seed=7, behavior_options={
            'test-mark': {'scope': 'connection'}})
        self.exchanges(proxy, connections=30, count=4)
        per_connection = {}
        for conn, number in self.marked(proxy):
            per_connection.setdefault(conn, []).append(number)
        for numbers in per_connection.values():
            self.assertEqual(numbers, [0, 1, 2, 3, 4])  # 0: from the start
        self.assertTrue(4 <= len(per_connection) <= 22, per_connection)

    def test_exchange_scope_varies_within_a_connection(self):
        proxy = self.proxy('40:test-mark', seed=7)
        self.exchanges(proxy, connections=3, count=30)
        per_connection = {}
        for conn, number in self.marked(proxy):
            per_connection.setdefault(conn, []).append(number)
        self.assertEqual(len(per_connection), 3)
        for numbers in per_connection.values():
            self.assertTrue(4 <= len(numbers) <= 22, numbers)


class CompositionTest(MixTestCase):

    def test_stages_run_in_the_order_written(self):
        with support.ThreadedServer(answer_got) as backend:
            proxy = self.proxy('test-tag+test-upper', backend=backend.address,
                               behavior_options={'test-tag': {'tag': 'z'}})
            with proxy.connect() as sock:
                sock.sendall(b'ab')
                # upstream: 'ab' + 'z' -> 'ABZ'; downstream: 'got:ABZ' + 'z'
                self.assertEqual(support.recv_exactly(sock, 8), b'GOT:ABZZ')
            self.assertEqual(backend.received, [b'ABZ'])

    def test_composite_with_a_share_and_options_per_part(self):
        proxy = self.proxy('100:test-tag+test-mark')
        self.assertEqual(str(proxy.server.mix), 'test-tag+test-mark')
        proxy.server.set_mix('test-upper+test-tag', {'test-tag': {'tag': 'q'}})
        with proxy.connect() as sock:
            sock.sendall(b'a')
            self.assertEqual(support.recv_exactly(sock, 3), b'AQq')
        decision = list(proxy.server.decisions)[-1]
        self.assertEqual(decision['behavior'], 'test-upper+test-tag')
        self.assertEqual(decision['options']['test-tag']['tag'], 'q')

    def test_gates_apply_per_part(self):
        proxy = self.proxy('test-tag+test-upper', behavior_options={
            'test-upper': {'every': 2}})
        with proxy.connect() as sock:
            answers = []
            for _ in range(4):
                sock.sendall(b'a')
                answers.append(support.recv_exactly(sock, 3))
        # tag on both ways every time; upper only on even exchanges
        self.assertEqual(answers, [b'a!!', b'A!!', b'a!!', b'A!!'])

    def test_unknown_part(self):
        with self.assertRaisesRegex(vaurien.VaurienError,
                                    "unknown behavior 'nope'"):
            vaurien.parse_mix('20:test-tag+nope')


class PipelineTest(MixTestCase):

    def test_delays_are_pipelined_and_ordered(self):
        proxy = self.proxy('test-hold', behavior_options={
            'test-hold': {'ms': 100, 'direction': 'downstream'}})
        with support.ThreadedServer(answer_got) as backend:
            proxy.server.backend = backend.address
            with proxy.connect() as sock:
                sock.settimeout(30)     # a loaded machine is slow, not wrong
                start = time.time()
                for i in range(40):
                    sock.sendall(b'%03d;' % i)
                    time.sleep(0.005)
                sent = b''.join(b'%03d;' % i for i in range(40))
                # the backend answers each read; TCP may merge writes, so
                # how many 'got:' there are depends on how it read
                got = b''
                while got.replace(b'got:', b'') != sent:
                    data = sock.recv(65536)
                    self.assertTrue(data, got)
                    got += data
                    self.assertTrue(sent.startswith(got.replace(b'got:', b'')),
                                    got)
                took = time.time() - start
        self.assertTrue(got.startswith(b'got:000;'))
        self.assertGreaterEqual(took, 0.1)
        # 40 chunks each held 100 ms: held one after the other they would
        # take 4 s; pipelined, about 0.1 s plus the 0.2 s of sending
        self.assertLess(took, 40 * 0.1 * 0.75)

    def test_end_of_stream_after_the_held_data(self):
        proxy = self.proxy('test-hold', behavior_options={
            'test-hold': {'ms': 150}})
        with proxy.connect() as sock:
            sock.sendall(b'last words')
            sock.shutdown(support.socket.SHUT_WR)
            start = time.time()
            self.assertEqual(support.recv_all(sock), b'last words')
            self.assertGreaterEqual(time.time() - start, 0.15)

    def test_backpressure_bounds_what_waits(self):
        proxy = self.proxy('test-hold', behavior_options={
            'test-hold': {'ms': 20}})
        payload = b'z' * (24 << 20)
        with proxy.connect() as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            peak = 0
            received = 0
            while received < len(payload):
                received += len(sock.recv(1 << 20))
                for conn in list(proxy.server.connections.values()):
                    if conn.backend is not None:
                        peak = max(peak, conn.client.size + conn.backend.size)
            sender.join(10)
        self.assertEqual(received, len(payload))
        # at most high water per direction, plus one read of each
        self.assertLessEqual(peak, 2 * (vaurien.Duplex.high_water +
                                        (1 << 16)))


class DecisionLogTest(MixTestCase):

    def run_traffic(self, seed):
        proxy = self.proxy('30:test-mark,20:test-hold', seed=seed,
                           behavior_options={'test-hold': {'ms': 1,
                                                           'spread': 3}})
        self.exchanges(proxy, connections=3, count=15)
        decisions = [dict((k, v) for k, v in d.items()
                          if k not in ('time', 'client'))
                     for d in proxy.server.decisions]
        return decisions

    def test_same_seed_same_decisions(self):
        first = self.run_traffic(5)
        self.assertTrue(first)
        self.assertEqual(first, self.run_traffic(5))
        self.assertNotEqual(first, self.run_traffic(6))

    def test_record_and_api(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, behavior='test-mark',
                              http=True) as p:
            with self.assertLogs('vaurien', 'INFO') as logs:
                with support.connect(p.address) as sock:
                    support.exchange(sock, b'1')
                    support.exchange(sock, b'2')
            decisions = p.client().decisions()
            self.assertEqual(len(decisions), 2)
            first = decisions[0]
            self.assertEqual(sorted(first), [
                'behavior', 'client', 'connection', 'direction', 'exchange',
                'id', 'options', 'proxy', 'request', 'time'])
            self.assertEqual((first['behavior'], first['exchange'],
                              first['direction']), ('test-mark', 1, 'both'))
            self.assertEqual(first['options']['test-mark']['every'], 1)
            self.assertEqual(p.decisions(since=first['id']), decisions[1:])
            self.assertIn('decision %d: connection 1' % first['id'],
                          logs.output[0])
            with self.assertRaises(vaurien.ControlError):
                p._call('GET', '/decisions?since=x')

    def test_dummy_is_not_logged(self):
        proxy = self.proxy('dummy')
        self.exchanges(proxy)
        self.assertEqual(list(proxy.server.decisions), [])

    def test_the_log_is_bounded(self):
        proxy = self.proxy('test-mark')
        proxy.server.decisions = vaurien.collections.deque(maxlen=5)
        self.exchanges(proxy, count=12)
        self.assertEqual([d['exchange'] for d in proxy.server.decisions],
                         [8, 9, 10, 11, 12])


class SeedTest(MixTestCase):

    def extras(self, seed):
        proxy = self.proxy('test-hold', seed=seed, behavior_options={
            'test-hold': {'ms': 0, 'spread': 1}})
        seen = []
        with proxy.connect() as sock:
            for i in range(10):
                support.exchange(sock, b'%d' % i)
            conn, = proxy.server.connections.values()
            for flow in conn._flows.values():
                seen.append(tuple(flow.state['extras']))
        return sorted(seen)

    def test_stream_randomness_follows_the_seed(self):
        self.assertEqual(self.extras(3), self.extras(3))
        self.assertNotEqual(self.extras(3), self.extras(4))


if __name__ == '__main__':
    unittest.main()
