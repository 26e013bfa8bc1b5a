"""Vaurien's behaviors over real loopback sockets, the mix and --seed."""

import socket
import time
import unittest

from tests import support
from tests.support import vaurien


def chunked_answer(server, conn):
    """Answers every read with 'ok:' + data, sent in 5 separate chunks."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        answer = b'ok:' + data
        step = max(1, len(answer) // 5)
        for start in range(0, len(answer), step):
            conn.sendall(answer[start:start + step])
            time.sleep(0.002)


class BehaviorTestCase(unittest.TestCase):

    def setUp(self):
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)

    def proxy(self, behavior='dummy', **kwargs):
        proxy = support.Proxy(self.echo.address, behavior=behavior, **kwargs)
        proxy.__enter__()
        self.addCleanup(proxy.__exit__)
        return proxy


class DummyTest(BehaviorTestCase):

    def test_dummy_passes_everything(self):
        proxy = self.proxy('dummy')
        with proxy.connect() as sock:
            for size in (1, 100, 70000):
                payload = b'd' * size
                self.assertEqual(support.exchange(sock, payload), payload)


class DelayTest(BehaviorTestCase):

    def test_delay_before(self):
        proxy = self.proxy('delay', behavior_options={'delay': {'sleep': 0.3}})
        with proxy.connect() as sock:
            for _ in range(2):
                start = time.time()
                self.assertEqual(support.exchange(sock, b'slow'), b'slow')
                self.assertGreaterEqual(time.time() - start, 0.3)

    def test_delay_after(self):
        proxy = self.proxy('delay', behavior_options={
            'delay': {'sleep': '0.3', 'before': 'false'}})
        with proxy.connect() as sock:
            start = time.time()
            self.assertEqual(support.exchange(sock, b'slow'), b'slow')
            self.assertGreaterEqual(time.time() - start, 0.3)

    def test_negative_sleep_is_refused(self):
        with self.assertRaisesRegex(vaurien.VaurienError, 'sleep'):
            support.Proxy(self.echo.address, behavior='delay',
                          behavior_options={'delay': {'sleep': -1}})


class ErrorTest(BehaviorTestCase):

    def test_error_answers_random_bytes_and_keeps_the_connection(self):
        proxy = self.proxy('error')
        with proxy.connect() as sock:
            sock.sendall(b'GET me something')
            answer = support.recv_exactly(sock, 1000)
            self.assertEqual(len(answer), 1000)
            self.assertNotIn(b'GET me something', answer)
            proxy.server.set_mix('dummy')
            self.assertEqual(support.exchange(sock, b'again'), b'again')
        # the backend never saw the request that erred
        self.assertEqual(proxy.server.exchange_counts['error'], 1)

    def test_warmup_counts_across_the_proxy(self):
        proxy = self.proxy('error', behavior_options={'error': {'warmup': 2}})
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'one'), b'one')
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'two'), b'two')
            sock.sendall(b'three')
            self.assertNotEqual(support.recv_exactly(sock, 1000)[:5], b'three')

    def test_warmup_per_connection(self):
        proxy = self.proxy('error', behavior_options={
            'error': {'warmup': 1, 'per_connection': True}})
        for _ in range(2):
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'one'), b'one')
                sock.sendall(b'two')
                self.assertEqual(len(support.recv_exactly(sock, 1000)), 1000)

    def test_counters_restart_when_set_again(self):
        proxy = self.proxy('error', behavior_options={'error': {'warmup': 1}})
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'one'), b'one')
            sock.sendall(b'two')
            self.assertEqual(len(support.recv_exactly(sock, 1000)), 1000)
            proxy.server.set_mix('error')
            self.assertEqual(support.exchange(sock, b'three'), b'three')

    def test_inject_splices_noise_into_the_real_answer(self):
        proxy = self.proxy('error', behavior_options={'error': {'inject': 1}})
        with proxy.connect() as sock:
            payload = b'A' * 50 + b'B' * 50
            sock.sendall(payload)
            answer = support.recv_exactly(sock, 200)
            self.assertEqual(answer[:50], b'A' * 50)
            self.assertEqual(answer[150:], b'B' * 50)
            self.assertNotEqual(answer[50:150], b'A' * 50 + b'B' * 50)


class TransientTest(BehaviorTestCase):

    def test_errors_then_recovers_even_for_a_new_connection(self):
        proxy = self.proxy('transient', behavior_options={
            'transient': {'agitate': 2}})
        with proxy.connect() as sock:
            for _ in range(2):
                sock.sendall(b'x')
                self.assertEqual(len(support.recv_exactly(sock, 1000)), 1000)
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'healed'), b'healed')


class HangTest(BehaviorTestCase):

    def test_hang_reads_and_never_answers(self):
        proxy = self.proxy('hang', timeout=0.2)
        with proxy.connect() as sock:
            sock.sendall(b'hello?')
            sock.settimeout(1.0)    # longer than --timeout: not cut short
            with self.assertRaises(socket.timeout):
                sock.recv(10)
            sock.sendall(b'still there?')
            with self.assertRaises(socket.timeout):
                sock.recv(10)
        deadline = time.time() + 5
        while proxy.server.connections and time.time() < deadline:
            time.sleep(0.02)
        self.assertEqual(proxy.server.connections, {})


class BlackoutTest(BehaviorTestCase):

    def test_blackout_closes_at_once(self):
        proxy = self.proxy('blackout')
        with proxy.connect() as sock:
            sock.sendall(b'anyone?')
            self.assertTrue(support.closed_by_peer(sock))


class AbortTest(unittest.TestCase):

    def test_abort_forwards_then_cuts_before_the_answer(self):
        def answer_late(server, conn):
            data = conn.recv(100)
            server.received.append(data)
            time.sleep(0.2)
            conn.sendall(b'answer')

        with support.ThreadedServer(answer_late) as backend, \
                support.Proxy(backend.address, behavior='abort') as proxy:
            with proxy.connect() as sock:
                sock.sendall(b'request')
                self.assertEqual(sock.recv(100), b'')
            deadline = time.time() + 5
            while not backend.received and time.time() < deadline:
                time.sleep(0.01)
        self.assertEqual(backend.received, [b'request'])


class MixTest(unittest.TestCase):

    def test_parse(self):
        self.assertEqual(vaurien.parse_mix('20:delay,5:blackout'),
                         [('delay', 20.0), ('blackout', 5.0), ('dummy', 75.0)])
        self.assertEqual(vaurien.parse_mix('delay'), [('delay', 100.0)])
        self.assertEqual(vaurien.parse_mix('12.5:error, 20:dummy'),
                         [('error', 12.5), ('dummy', 87.5)])
        self.assertEqual(vaurien.parse_mix('60:delay,40:error'),
                         [('delay', 60.0), ('error', 40.0)])

    def test_bad_mixes(self):
        for text, message in [('60:delay,50:error', 'adds up to 110%'),
                              ('20:dealy', "unknown behavior 'dealy'"),
                              ('x:delay', 'malformed'), ('', 'empty'),
                              ('-5:delay', 'malformed'),
                              ('10:delay,10:delay', 'twice')]:
            with self.assertRaisesRegex(vaurien.VaurienError, message):
                vaurien.parse_mix(text)

    def run_traffic(self, seed, connections=3, exchanges=30):
        """What each exchange met (answer echoed or not), in order."""
        outcomes = []
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, behavior='50:error',
                              seed=seed) as proxy:
            for _ in range(connections):
                with proxy.connect() as sock:
                    for i in range(exchanges):
                        sock.sendall(b'%04d' % i)
                        answer = support.recv_exactly(sock, 4)
                        if answer != b'%04d' % i:
                            support.recv_exactly(sock, 996)
                        outcomes.append(answer == b'%04d' % i)
        return outcomes

    def test_seed_makes_draws_reproducible(self):
        first = self.run_traffic(seed=42)
        self.assertEqual(first, self.run_traffic(seed=42))
        self.assertNotEqual(first, self.run_traffic(seed=43))
        self.assertTrue(20 < sum(first) < 70, sum(first))

    def test_drawn_per_request_not_per_chunk_or_direction(self):
        with support.ThreadedServer(chunked_answer) as backend, \
                support.Proxy(backend.address, behavior='50:delay',
                              behavior_options={'delay': {'sleep': 0}}
                              ) as proxy:
            with proxy.connect() as sock:
                for i in range(40):
                    payload = b'request %02d ' % i * 20
                    sock.sendall(payload)
                    self.assertEqual(
                        support.recv_exactly(sock, len(payload) + 3),
                        b'ok:' + payload)
            counts = proxy.server.exchange_counts
            self.assertEqual(sum(counts.values()), 40)
            self.assertEqual(set(counts), {'delay', 'dummy'})

    def test_change_reaches_an_open_connection(self):
        with support.EchoServer() as echo, support.Proxy(echo.address) as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'one'), b'one')
                proxy.server.set_mix('blackout')
                sock.sendall(b'two')
                self.assertTrue(support.closed_by_peer(sock))

    def test_dummy_listed_in_a_mix_under_100(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, behavior='20:dummy,10:delay',
                              behavior_options={'delay': {'sleep': 0}}
                              ) as proxy:
            self.assertEqual(proxy.server.mix.shares,
                             [('dummy', 90.0), ('delay', 10.0)])
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'ok'), b'ok')


class FailingPluginTest(unittest.TestCase):

    def test_a_raising_behavior_closes_only_its_connection(self):
        class Boom(vaurien.Dummy):
            name = 'test-boom'

            def on_before_handle(self, protocol, source, dest, to_backend):
                if to_backend and b'boom' in source.recv(100, socket.MSG_PEEK):
                    raise RuntimeError('kaboom')
                return True

        vaurien.Behavior.register(Boom)
        self.addCleanup(vaurien.Behavior.unregister, 'test-boom')
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, behavior='test-boom') as proxy:
            with proxy.connect() as good, proxy.connect() as bad:
                self.assertEqual(support.exchange(good, b'fine'), b'fine')
                with self.assertLogs('vaurien') as logs:
                    bad.sendall(b'boom')
                    self.assertTrue(support.closed_by_peer(bad))
                    deadline = time.time() + 5
                    while not any('raised' in line for line in logs.output) \
                            and time.time() < deadline:
                        time.sleep(0.01)
                self.assertEqual(support.exchange(good, b'still'), b'still')
        errors = [line for line in logs.output if 'raised' in line]
        self.assertEqual(len(errors), 1, logs.output)
        self.assertIn("behavior 'test-boom' raised RuntimeError: kaboom",
                      errors[0])
        self.assertIn('127.0.0.1', errors[0])


if __name__ == '__main__':
    unittest.main()
