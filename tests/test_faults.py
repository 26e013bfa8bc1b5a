"""The faults of behaviors/ over real loopback sockets, measured as a
client sees them: latency moments, bandwidth rates, resets, slice sizes,
byte counts, bit-flip rates, and replays with one --seed."""

import errno
import heapq
import json
import math
import random
import selectors
import socket
import statistics
import threading
import time
import unittest

from tests import support
from tests.support import vaurien

vaurien.load_plugins()

FAULTS = ('latency', 'bandwidth', 'slow_close', 'timeout', 'reset_peer',
          'slicer', 'limit_data', 'corrupt', 'slow_open', 'down')


def blast(size, block=65536):
    """A backend handler: once the client's request (any bytes) came,
    answers *size* bytes, then keeps the connection until the client
    closes it.  Records in ``server.received`` the request and when it
    starts answering (before it does: never late)."""
    payload = b'b' * block

    def handler(server, conn):
        request = conn.recv(65536)
        server.received.append((request, time.monotonic()))
        left = size
        while left > 0:
            conn.sendall(payload if left >= block else payload[:left])
            left -= block
        while conn.recv(65536):
            pass
    return handler


def answer_then_close(data):
    """A backend handler: once the client's request came, answers *data*,
    then closes at once."""
    def handler(server, conn):
        conn.recv(65536)
        conn.sendall(data)
    return handler


def receive_timed(sock, size, deadline=support.TIMEOUT):
    """Read *size* bytes; returns [(time, chunk)] of every recv."""
    events = []
    left = size
    stop = time.monotonic() + deadline
    while left > 0 and time.monotonic() < stop:
        data = sock.recv(min(left, 1 << 20))
        if not data:
            break
        events.append((time.monotonic(), data))
        left -= len(data)
    return events


def mean_sd(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class FaultTestCase(unittest.TestCase):

    def setUp(self):
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)

    def proxy(self, behavior, backend=None, **options):
        """A proxy running *behavior* (one fault) with *options*."""
        seed = options.pop('seed', None)
        proxy = support.Proxy(backend or self.echo.address,
                              behavior=behavior, seed=seed,
                              behavior_options={behavior: options})
        proxy.__enter__()
        self.addCleanup(proxy.__exit__)
        return proxy

    def backend(self, handler):
        server = support.ThreadedServer(handler).start()
        self.addCleanup(server.stop)
        return server


def variance_se(values):
    """The standard error of the sample variance of *values*."""
    mean = sum(values) / len(values)
    m2 = sum((v - mean) ** 2 for v in values) / len(values)
    m4 = sum((v - mean) ** 4 for v in values) / len(values)
    return math.sqrt(max(m4 - m2 * m2, 0.0) / len(values))


class LatencyTest(FaultTestCase):
    """Round trips of 1-byte pings, delayed upstream only: each is one
    delay d plus the time e of the loopback and of the thread scheduler,
    which a loaded machine makes long and erratic.  e is measured
    meanwhile through a dummy proxy (the baseline, e0).  Since e >= 0,
    the lower bounds are exact (up to sampling error): no quantile, mean
    or variance below the distribution's.  The upper bounds allow e up to
    3 e0 + 2 ms (a delayed chunk wakes a thread once more than the
    baseline does): tight on a quiet machine, loose on a loaded one,
    never flaky."""

    def ping_samples(self, proxy, gap, connections=40, rounds=25,
                     base_connections=20):
        """Round-trip times in milliseconds through *proxy* (one ping in
        flight per connection, *connections* x *rounds* samples) and,
        meanwhile, through a dummy proxy every *gap* seconds."""
        baseline = self.proxy('dummy')
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        sent, left, waiting = {}, {}, []
        samples = {True: [], False: []}
        faulty = {}
        start = time.monotonic()
        total = connections + base_connections
        for number in range(total):
            fault = number < connections
            sock = (proxy if fault else baseline).connect()
            self.addCleanup(sock.close)
            sel.register(sock, selectors.EVENT_READ)
            faulty[sock] = fault
            left[sock] = rounds
            # staggered starts: no convoy of pings
            waiting.append((start + gap * number / total, number, sock))
        heapq.heapify(waiting)
        deadline = time.monotonic() + 30
        running = connections
        while running and time.monotonic() < deadline:
            now = time.monotonic()
            while waiting and waiting[0][0] <= now:
                sock = heapq.heappop(waiting)[2]
                sent[sock] = time.monotonic()
                sock.sendall(b'p')
            wait = 0.5 if not waiting else min(
                0.5, max(0.0, waiting[0][0] - time.monotonic()))
            for key, _ in sel.select(wait):
                sock = key.fileobj
                data = sock.recv(16)
                now = time.monotonic()
                self.assertEqual(data, b'p')
                samples[faulty[sock]].append((now - sent[sock]) * 1000.0)
                if not faulty[sock]:
                    heapq.heappush(waiting, (now + gap, id(sock), sock))
                    continue
                left[sock] -= 1
                if left[sock]:
                    sent[sock] = time.monotonic()
                    sock.sendall(b'p')
                else:
                    running -= 1
        self.assertEqual(len(samples[True]), connections * rounds)
        self.assertGreater(len(samples[False]), 100)
        return samples[True], samples[False]

    def check(self, samples, base, mean, sd, quantile_of, least):
        """*samples* (with the *base* line) against a distribution of
        *mean*, standard deviation *sd* (None: not checked) and quantile
        function *quantile_of*, never below *least*."""
        n = len(samples)
        s_mean, s_sd = mean_sd(samples)
        b_mean, b_sd = mean_sd(base)
        report = ('fault: mean %.2f sd %.2f; baseline: mean %.2f sd %.2f'
                  % (s_mean, s_sd, b_mean, b_sd))
        # never early
        self.assertGreaterEqual(min(samples), least, report)
        # the mean, within 5 standard errors
        se = s_sd / math.sqrt(n)
        self.assertGreater(s_mean, mean - 5 * se, report)
        self.assertLess(s_mean, mean + 3 * b_mean + 2.0 + 5 * se, report)
        if sd is not None:
            # the variance (d and e are independent: they add up)...
            se = variance_se(samples)
            self.assertGreater(s_sd ** 2, sd ** 2 - 5 * se, report)
            # ...and the standard deviation (of a sum: at most the sum)
            se = se / (2 * s_sd)
            self.assertLess(s_sd, sd + 3 * b_sd + 1.0 + 5 * se, report)
        for p in (0.1, 0.5, 0.9):
            found = quantile(samples, p)
            self.assertGreaterEqual(found, quantile_of(p - 0.06),
                                    (p, report))
            # the p quantile of a sum is at most the sum of the (1 + p) / 2
            # quantiles of its terms
            upper = min(0.999, (1 + p) / 2 + 0.05)
            self.assertLessEqual(found, quantile_of(upper) + 3 * quantile(
                base, upper) + 2.0, (p, report))

    def test_uniform(self):
        proxy = self.proxy('latency', latency=40, jitter=30,
                           direction='upstream')
        samples, base = self.ping_samples(proxy, 0.04)
        self.check(samples, base, 40.0, 30.0 / math.sqrt(3),
                   lambda p: 40 - 30 + 60 * p, 10.0)

    def test_normal(self):
        proxy = self.proxy('latency', latency=40, jitter=10,
                           distribution='normal', direction='upstream')
        samples, base = self.ping_samples(proxy, 0.04)
        normal = statistics.NormalDist(40, 10)
        self.check(samples, base, 40.0, 10.0, normal.inv_cdf, 0.0)

    def test_pareto(self):
        # shape 3: mean 15 + 10 / 2 = 20 ms; a variance, but no fourth
        # moment to bound the error of a sample variance: not checked
        proxy = self.proxy('latency', latency=15, jitter=10,
                           distribution='pareto', shape=3,
                           direction='upstream')
        samples, base = self.ping_samples(proxy, 0.02)
        self.check(samples, base, 20.0, None,
                   lambda p: 15 + 10 * ((1 - p) ** (-1 / 3.0) - 1), 15.0)
        # a heavy tail: some delays far above the median (17.6 ms); 1 in
        # 1000 is over 105 ms
        self.assertGreater(max(samples), 15 + 10 * (100 ** (1 / 3.0) - 1))

    def test_pipelined_and_in_order(self):
        # 8 chunks sent 25 ms apart through 200 +- 50 ms each way:
        # pipelined, each comes back 300 to 500 ms after it left; one at a
        # time, the last would also wait for the 7 before it (about 2 s
        # more than the first)
        proxy = self.proxy('latency', latency=200, jitter=50, seed=3)
        with proxy.connect() as sock:
            events = []
            reader = threading.Thread(
                target=lambda: events.extend(receive_timed(sock, 80)))
            reader.start()
            sent = []
            for number in range(8):
                sent.append(time.monotonic())
                sock.sendall(b'%09d|' % number)
                time.sleep(0.025)
            reader.join(support.TIMEOUT)
        data = b''.join(chunk for _, chunk in events)
        self.assertEqual(data, b''.join(b'%09d|' % n for n in range(8)))
        arrived = []
        received = 0
        for when, chunk in events:
            received += len(chunk)
            while len(arrived) < received // 10:
                arrived.append(when)
        delays = [a - s for a, s in zip(arrived, sent)]
        self.assertGreaterEqual(min(delays), 0.3)       # 2 x (200 - 50) ms
        self.assertLess(max(delays) - min(delays), 1.0)

    def test_zero_latency_passes_at_once(self):
        proxy = self.proxy('latency', latency=0)
        with proxy.connect() as sock:
            payload = b'z' * 100000
            self.assertEqual(support.exchange(sock, payload), payload)


class BandwidthTest(FaultTestCase):

    def measure(self, kbps, seconds, shared=False, connections=1):
        """Bytes per second the clients get over *seconds*, one figure per
        connection (one for all with *shared*).

        Time runs from when the backend started to answer: the proxy
        cannot have read anything earlier, so a rate is never taken for
        more than it is, even when a thread is late to look at the clock
        (that can only lower it).  The figure is the best over the second
        half of the time, the least thrown off by a late client."""
        size = int(kbps * 1000 * (seconds + 1)) + 65536
        backend = self.backend(blast(size))
        proxy = self.proxy('bandwidth', backend=backend.address, rate=kbps,
                           shared=shared, direction='downstream')
        events = dict((number, []) for number in range(connections))
        socks = [proxy.connect() for _ in range(connections)]
        stop = time.monotonic() + seconds

        def read(sock, events):
            buffer = bytearray(1 << 20)     # no garbage: no GC pauses
            while True:
                sock.settimeout(max(0.001, stop - time.monotonic()))
                try:
                    size = sock.recv_into(buffer)
                except socket.timeout:
                    return
                now = time.monotonic()
                if not size or now > stop:
                    return
                events.append((now, size))
        for number, sock in enumerate(socks):
            sock.sendall(b'%d' % number)
        threads = [threading.Thread(target=read, args=(sock, events[n]))
                   for n, sock in enumerate(socks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + support.TIMEOUT)
        for sock in socks:
            sock.close()
        self.assertEqual(len(backend.received), connections)
        starts = dict((int(request), when)
                      for request, when in backend.received)
        if shared:
            timelines = [(min(starts.values()),
                          sorted(sum(events.values(), [])))]
        else:
            timelines = [(starts[n], events[n]) for n in range(connections)]
        rates = []
        for start, timeline in timelines:
            best, received = 0.0, 0
            for when, size in timeline:
                received += size
                if when - start >= seconds / 2:
                    best = max(best, received / (when - start))
            rates.append(best)
        return rates

    def assertRate(self, rates, kbps, tolerance=0.05, shortfall=0.05):
        """Within *tolerance* above, *shortfall* below."""
        expected = kbps * 1000.0
        for measured in rates:
            self.assertGreater(measured, expected * (1 - shortfall))
            self.assertLess(measured, expected * (1 + tolerance))

    def test_20_kb_per_second(self):
        self.assertRate(self.measure(20, 2.0), 20)

    def test_1_mb_per_second(self):
        self.assertRate(self.measure(1000, 1.5), 1000)

    def test_20_mb_per_second(self):
        self.assertRate(self.measure(20000, 2.0), 20000)

    # three connections at once: on a loaded machine, one of their
    # threads may wait long for a core, so a shortfall of 10% is allowed

    def test_shared_by_all_connections(self):
        # 3 clients share 300 KB/s: together they get 300 KB/s
        self.assertRate(self.measure(300, 1.5, shared=True, connections=3),
                        300, shortfall=0.1)

    def test_per_connection(self):
        # 3 clients get 100 KB/s each
        self.assertRate(self.measure(100, 1.5, connections=3), 100,
                        shortfall=0.1)


class SlowCloseTest(FaultTestCase):

    def test_end_of_stream_comes_late_and_data_does_not(self):
        backend = self.backend(answer_then_close(b'bye'))
        proxy = self.proxy('slow_close', backend=backend.address, delay=300)
        with proxy.connect() as sock:
            sock.sendall(b'?')
            self.assertEqual(support.recv_exactly(sock, 3), b'bye')
            got_data = time.monotonic()
            self.assertEqual(sock.recv(10), b'')
            self.assertGreaterEqual(time.monotonic() - got_data, 0.2)


class TimeoutTest(FaultTestCase):

    def test_swallows_then_closes(self):
        backend = self.backend(support.record_and_wait)
        proxy = self.proxy('timeout', backend=backend.address, timeout=300)
        with proxy.connect() as sock:
            start = time.monotonic()
            sock.sendall(b'anyone there?')
            self.assertEqual(sock.recv(100), b'')       # no data, an end
            self.assertGreaterEqual(time.monotonic() - start, 0.3)
        time.sleep(0.1)     # whatever the backend got, it has it now
        self.assertEqual(backend.connections, 1)
        self.assertEqual(b''.join(b''.join(c) for c in backend.received),
                         b'')

    def test_zero_is_a_black_hole_until_switched_off(self):
        proxy = self.proxy('timeout', timeout=0)
        with proxy.connect() as sock:
            sock.sendall(b'lost')
            self.assertFalse(support.closed_by_peer(sock, wait=0.5))
            proxy.server.set_mix('dummy')
            sock.settimeout(support.TIMEOUT)
            self.assertEqual(support.exchange(sock, b'found'), b'found')


class ResetPeerTest(FaultTestCase):

    def assertReset(self, sock):
        with self.assertRaises(ConnectionResetError) as caught:
            support.recv_all(sock)
        self.assertEqual(caught.exception.errno, errno.ECONNRESET)

    def test_resets_connections_already_open(self):
        proxy = self.proxy('dummy')
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'fine'), b'fine')
            proxy.server.set_mix('reset_peer')
            sock.sendall(b'and now?')
            self.assertReset(sock)

    def test_zero_share_never_resets(self):
        # Toxiproxy's reset_peer resets even at toxicity 0
        proxy = self.proxy('dummy')
        with proxy.connect() as sock:
            proxy.server.set_mix('0:reset_peer')
            for _ in range(3):
                self.assertEqual(support.exchange(sock, b'fine'), b'fine')

    def test_after_a_timeout_data_passes_first(self):
        proxy = self.proxy('reset_peer', timeout=500)
        with proxy.connect() as sock:
            start = time.monotonic()
            self.assertEqual(support.exchange(sock, b'hello'), b'hello')
            self.assertReset(sock)
            self.assertGreaterEqual(time.monotonic() - start, 0.5)


class SlicerTest(FaultTestCase):

    payload = bytes(bytearray(range(256))) * 12        # 3072 bytes

    def slice_ends(self, seed):
        """Where the client's reads end in the stream: a subset of the
        slices' ends (two slices may be read at once)."""
        backend = self.backend(blast(len(self.payload)))
        proxy = self.proxy('slicer', backend=backend.address, seed=seed,
                           average_size=100, size_variation=50,
                           delay=15000, direction='downstream')
        with proxy.connect() as sock:
            start = time.monotonic()
            sock.sendall(b'?')
            events = receive_timed(sock, len(self.payload))
            took = events[-1][0] - start
        sizes = [len(chunk) for _, chunk in events]
        self.assertEqual(sum(sizes), len(self.payload))
        # at least 3072 / 150 = 21 slices, 15 ms apart
        self.assertGreaterEqual(took, 20 * 0.015)
        # most reads are one slice: 50 to 150 bytes
        fitting = sum(1 for size in sizes if 50 <= size <= 150)
        self.assertGreaterEqual(fitting, 0.8 * len(sizes))
        ends, position = set(), 0
        for size in sizes:
            position += size
            ends.add(position)
        return ends

    def gaps(self, ends):
        # the stream's end cuts the last slice short: leave it out
        ends = sorted(ends - set([len(self.payload)]))
        return [b - a for a, b in zip([0] + ends, ends)]

    def test_sizes_and_replay(self):
        first = self.slice_ends(seed=7)
        again = self.slice_ends(seed=7)
        # both runs cut the stream at the same places, so no two ends of
        # the two runs are closer than a slice's smallest size
        self.assertGreaterEqual(min(self.gaps(first | again)), 50)
        other = self.slice_ends(seed=8)
        self.assertLess(min(self.gaps(first | other)), 50)


class LimitDataTest(FaultTestCase):

    def test_downstream_byte_count(self):
        backend = self.backend(blast(100000))
        proxy = self.proxy('limit_data', backend=backend.address,
                           bytes=1000, direction='downstream')
        with proxy.connect() as sock:
            sock.sendall(b'?')
            self.assertEqual(len(support.recv_all(sock)), 1000)

    def test_upstream_byte_count(self):
        backend = self.backend(support.record_and_wait)
        proxy = self.proxy('limit_data', backend=backend.address,
                           bytes=1234, direction='upstream')
        with proxy.connect() as sock:
            try:
                for _ in range(10):
                    sock.sendall(b'u' * 1000)
                    time.sleep(0.01)
            except OSError:
                pass        # the proxy closed: that is the point
            self.assertTrue(support.closed_by_peer(sock))
        deadline = time.monotonic() + support.TIMEOUT
        while backend.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        self.assertEqual(len(b''.join(backend.received[0])), 1234)


class CorruptTest(FaultTestCase):

    size = 200000
    probability = 0.01

    def corrupted(self, seed):
        proxy = self.proxy('corrupt', probability=self.probability,
                           seed=seed, direction='upstream')
        payload = random.Random(1).getrandbits(8 * self.size).to_bytes(
            self.size, 'little')
        with proxy.connect() as sock:
            threading.Thread(target=sock.sendall, args=(payload,),
                             daemon=True).start()
            answer = support.recv_exactly(sock, self.size)
        self.assertEqual(len(answer), self.size)
        flips = {}
        for position, (a, b) in enumerate(zip(payload, answer)):
            if a != b:
                flips[position] = a ^ b
        return flips

    def test_rate_and_replay(self):
        flips = self.corrupted(seed=11)
        # one bit per corrupted byte
        self.assertTrue(all(bin(x).count('1') == 1 for x in flips.values()))
        # binomial: 2000 expected, standard deviation 44.5; 5 of them
        expected = self.size * self.probability
        sd = math.sqrt(expected * (1 - self.probability))
        self.assertLess(abs(len(flips) - expected), 5 * sd)
        # every bit position is hit (about 250 times each)
        bits = [0] * 8
        for x in flips.values():
            bits[x.bit_length() - 1] += 1
        self.assertGreater(min(bits), 150)
        # one seed, the same corruption; another seed, another one
        self.assertEqual(self.corrupted(seed=11), flips)
        self.assertNotEqual(self.corrupted(seed=12), flips)

    def test_zero_probability_passes_everything(self):
        proxy = self.proxy('corrupt', probability=0)
        with proxy.connect() as sock:
            payload = b'c' * 50000
            self.assertEqual(support.exchange(sock, payload), payload)


class SlowOpenTest(FaultTestCase):

    def test_backend_connection_held_back(self):
        accepted = []

        def handler(server, conn):
            accepted.append(time.monotonic())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        backend = self.backend(handler)
        proxy = self.proxy('slow_open', backend=backend.address, delay=300)
        start = time.monotonic()
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'hi'), b'hi')
            self.assertGreaterEqual(time.monotonic() - start, 0.3)
        self.assertGreaterEqual(accepted[0] - start, 0.3)


class DownTest(FaultTestCase):

    def assertRefused(self, address):
        with self.assertRaises(ConnectionRefusedError):
            support.connect(address, timeout=2).close()

    def test_down_and_up_again(self):
        proxy = self.proxy('dummy')
        address = proxy.address
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'up'), b'up')
            proxy.server.set_mix('down')
            self.assertTrue(support.closed_by_peer(sock))
        self.assertRefused(address)
        proxy.server.set_mix('dummy')
        with support.connect(address) as sock:
            self.assertEqual(support.exchange(sock, b'up again'),
                             b'up again')

    def test_started_down(self):
        proxy = self.proxy('down')
        self.assertRefused(proxy.address)
        proxy.server.set_mix('dummy')
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'up'), b'up')

    def test_zero_share_stays_up(self):
        proxy = self.proxy('dummy')
        proxy.server.set_mix('0:down')
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'up'), b'up')

    def test_only_alone(self):
        proxy = self.proxy('dummy')
        for mix in ('50:down', 'down+latency'):
            with self.assertRaises(vaurien.VaurienError):
                proxy.server.set_mix(mix)
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'still up'),
                             b'still up')


class OptionsTest(FaultTestCase):

    bad = [
        ('latency', {'latency': -1}), ('latency', {'jitter': -5}),
        ('latency', {'distribution': 'poisson'}), ('latency', {'shape': 0}),
        ('latency', {'latency': 'nan'}),
        ('bandwidth', {'rate': 0}), ('bandwidth', {'rate': -10}),
        ('bandwidth', {'rate': 'inf'}),
        ('slow_close', {'delay': -1}), ('timeout', {'timeout': -1}),
        ('reset_peer', {'timeout': -0.5}),
        ('slicer', {'average_size': 0}), ('slicer', {'size_variation': -1}),
        ('slicer', {'average_size': 10, 'size_variation': 10}),
        ('slicer', {'delay': -1}),
        ('limit_data', {'bytes': 0}), ('limit_data', {'bytes': 1.5}),
        ('corrupt', {'probability': -0.1}), ('corrupt', {'probability': 2}),
        ('slow_open', {'delay': -100}),
    ]

    def test_refused_at_start_up(self):
        for name, options in self.bad:
            with self.assertRaises(vaurien.VaurienError) as caught:
                vaurien.ProxyServer(proxy=('127.0.0.1', 0),
                                    backend=self.echo.address, behavior=name,
                                    behavior_options={name: options})
            self.assertIn(name, str(caught.exception))
            self.assertIn(sorted(options)[-1], str(caught.exception))

    def test_refused_live(self):
        proxy = self.proxy('dummy')
        controller = vaurien.Controller(proxy.server)
        for name, options in self.bad:
            with self.assertRaises(vaurien.VaurienError):
                proxy.server.set_mix(name, {name: options})
            body = dict(options, name=name)
            status, answer = controller.call(
                'PUT', '/behavior', json.dumps(body).encode())
            self.assertEqual(status, 400, (name, options, answer))
        self.assertEqual(str(proxy.server.mix), 'dummy')
        with proxy.connect() as sock:
            self.assertEqual(support.exchange(sock, b'ok'), b'ok')

    def test_listed_with_their_options(self):
        code, out, err = support.run_vaurien(['--list'])
        self.assertEqual(code, 0, err)
        for name in FAULTS:
            cls = vaurien.Behavior.get(name)
            self.assertIn('\n  %s ' % name, out)
            self.assertTrue(cls.__doc__.strip())
            for option in cls.options:
                self.assertIn('      %s = ' % option, out)


class CompositionTest(FaultTestCase):

    def compose(self, behavior, **options):
        proxy = support.Proxy(self.echo.address, behavior=behavior,
                              seed=5, behavior_options=options)
        proxy.__enter__()
        self.addCleanup(proxy.__exit__)
        return proxy

    def test_latency_then_limit_data(self):
        # the bytes delayed before the limit are passed on before the close
        proxy = self.compose('latency+limit_data',
                             latency={'latency': 50,
                                      'direction': 'downstream'},
                             limit_data={'bytes': 1000,
                                         'direction': 'downstream'})
        with proxy.connect() as sock:
            sock.sendall(b'x' * 5000)
            self.assertEqual(len(support.recv_all(sock)), 1000)

    def test_latency_then_corrupt(self):
        proxy = self.compose('latency+corrupt',
                             latency={'latency': 100,
                                      'direction': 'upstream'},
                             corrupt={'probability': 1,
                                      'direction': 'upstream'})
        with proxy.connect() as sock:
            start = time.monotonic()
            answer = support.exchange(sock, b'\x00' * 100)
            self.assertGreaterEqual(time.monotonic() - start, 0.1)
        self.assertEqual(len(answer), 100)
        self.assertTrue(all(bin(x).count('1') == 1
                            for x in bytearray(answer)))


if __name__ == '__main__':
    unittest.main()
