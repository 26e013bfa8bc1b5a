"""redis-server and redis-py through the redis plugin and plain tcp."""

import time
import unittest

from tests.integration import support


class RedisTest(support.ProxiedTestCase):

    PROTOCOL = 'redis'

    @classmethod
    def start_backend(cls):
        cls.redis = support.need_module('redis', 'redis')
        return support.start_redis()

    def client(self, proxy, **kwargs):
        kwargs.setdefault('socket_timeout', support.TIMEOUT)
        client = self.redis.Redis(host='127.0.0.1', port=proxy.port,
                                  single_connection_client=True, **kwargs)
        self.addCleanup(client.close)
        return client

    # pass-through

    def workload(self, proxy, prefix, protocol=2):
        r = self.client(proxy, protocol=protocol)
        big = bytes(bytearray(range(256))) * 4096        # 1 MB
        for i in range(1000):
            value = big if i % 200 == 0 else ('v%d' % i).encode() * (i % 7)
            key = '%s:%d' % (prefix, i)
            self.assertTrue(r.set(key, value))
            self.assertEqual(r.get(key), value)
        keys = ['%s:%d' % (prefix, i) for i in range(1, 50)]
        self.assertEqual(r.mget(keys), [('v%d' % i).encode() * (i % 7)
                                        for i in range(1, 50)])
        pipe = r.pipeline(transaction=False)
        for i in range(300):
            pipe.incr('%s:counter' % prefix)
            pipe.lpush('%s:list' % prefix, i)
        results = pipe.execute()
        self.assertEqual(results[-2:], [300, 300])
        mapping = dict(('f%d' % i, 'x' * i) for i in range(100))
        r.hset('%s:hash' % prefix, mapping=mapping)
        got = r.hgetall('%s:hash' % prefix)
        self.assertEqual(dict((k.decode(), v.decode())
                              for k, v in got.items()), mapping)
        with r.pipeline(transaction=True) as pipe:
            pipe.set('%s:t' % prefix, 1).incr('%s:t' % prefix)
            self.assertEqual(pipe.execute(), [True, 2])
        self.assertEqual(len(r.lrange('%s:list' % prefix, 0, -1)), 300)

    def test_workload_plugin(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy, 'plugin')
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 2000)

    def test_workload_resp3(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy, 'resp3', protocol=3)
        self.assertEqual(warnings, [])

    def test_workload_tcp(self):
        self.workload(self.tcp, 'tcp')

    def pubsub(self, proxy, protocol=2):
        r = self.client(proxy, protocol=protocol)
        publisher = self.client(proxy, protocol=protocol)
        p = r.pubsub()
        self.addCleanup(p.close)
        p.subscribe('news', 'sport')
        for _ in range(2):
            self.assertEqual(p.get_message(timeout=5)['type'], 'subscribe')
        for i in range(20):
            publisher.publish('news', 'item %d' % i)
        got = []
        deadline = time.time() + 10
        while len(got) < 20 and time.time() < deadline:
            message = p.get_message(timeout=1)
            if message and message['type'] == 'message':
                got.append(message['data'])
        self.assertEqual(got, [('item %d' % i).encode() for i in range(20)])
        p.unsubscribe()
        kinds = []
        while len(kinds) < 2 and time.time() < deadline:
            message = p.get_message(timeout=1)
            if message:
                kinds.append(message['type'])
        self.assertEqual(kinds, ['unsubscribe', 'unsubscribe'])
        self.assertTrue(publisher.set('after-pubsub', 'yes'))
        self.assertEqual(publisher.get('after-pubsub'), b'yes')

    def test_pubsub_plugin(self):
        with support.captured_warnings() as warnings:
            self.pubsub(self.proxy)
            self.pubsub(self.proxy, protocol=3)
        self.assertEqual(warnings, [])

    def test_pubsub_tcp(self):
        self.pubsub(self.tcp)

    def test_monitor(self):
        r = self.client(self.proxy)
        other = self.client(self.proxy)
        with r.monitor() as monitor:
            other.set('watched', 1)
            for command in monitor.listen():
                if 'watched' in command['command']:
                    break

    # behaviors, as redis-py reports them

    def test_error(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('error')
        with self.assertRaises(self.redis.ResponseError) as caught:
            r.get('x')
        self.assertIn('vaurien', str(caught.exception))
        self.proxy.set('dummy')
        self.assertTrue(r.set('x', 'fine'))
        self.assertEqual(r.get('x'), b'fine')

    def test_error_message(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('error', {'error': {
            'message': 'OOM command not allowed when used memory > '
                       "'maxmemory'."}})
        with self.assertRaises(self.redis.exceptions.OutOfMemoryError):
            r.set('x', 'y')
        self.proxy.set('error', {'error': {
            'message': 'READONLY You can\'t write against a read only '
                       'replica.'}})
        with self.assertRaises(self.redis.exceptions.ReadOnlyError):
            r.set('x', 'y')
        self.proxy.set('dummy')
        self.assertTrue(r.ping())

    def test_error_in_pipeline(self):
        """The 3rd command of a pipeline fails, the others succeed, in
        order."""
        r = self.client(self.proxy)
        pipe = r.pipeline(transaction=False)
        self.assertEqual(pipe.ping().execute(), [True])  # connects
        self.proxy.set('error', {'error': {'warmup': 2}})
        for i in range(5):
            pipe.set('p%d' % i, i)
        results = pipe.execute(raise_on_error=False)
        self.assertEqual(results[:2], [True, True])
        self.assertIsInstance(results[2], self.redis.ResponseError)

    def test_transient(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('transient', {'transient': {'agitate': 2}})
        for _ in range(2):
            with self.assertRaises(self.redis.ResponseError):
                r.get('x')
        self.assertTrue(r.set('x', 'back'))
        self.assertEqual(r.get('x'), b'back')

    def test_large_value_error(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('error')
        with self.assertRaises(self.redis.ResponseError):
            r.set('big', b'x' * (3 * 1024 * 1024))
        self.proxy.set('dummy')
        self.assertEqual(r.get('x'), r.get('x'))
        self.assertTrue(r.set('big', b'y' * 1024))

    def test_delay(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        start = time.time()
        self.assertTrue(r.set('d', 1))
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_the_connection_set_up_is_no_exchange(self):
        # a new redis-py client says HELLO, CLIENT SETINFO... as it
        # connects: under a delay, only the GET itself waits
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        for protocol in (2, 3):
            since = len(self.proxy.server.decisions)
            r = self.client(self.proxy, protocol=protocol, db=1,
                            client_name='vaurien-test')
            self.assertIsNone(r.get('no-such-key'))
            decisions = list(self.proxy.server.decisions)[since:]
            self.assertEqual([d['request'] for d in decisions], ['GET'])

    def test_hang_third_command(self):
        r = self.client(self.proxy, socket_timeout=0.5)
        self.assertTrue(r.set('h', 1))
        self.assertEqual(r.get('h'), b'1')
        self.proxy.set('hang')
        with self.assertRaises(self.redis.TimeoutError):
            r.get('h')

    def test_abort(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('abort')
        with self.assertRaises(self.redis.ConnectionError):
            r.set('a', 1)

    def test_blackout(self):
        r = self.client(self.proxy)
        self.assertTrue(r.ping())
        self.proxy.set('blackout')
        with self.assertRaises(self.redis.ConnectionError):
            r.get('a')

    def test_inject(self):
        r = self.client(self.proxy)
        self.assertTrue(r.set('i', 'x' * 1000))
        self.proxy.set('error', {'error': {'inject': True}})
        try:
            value = r.get('i')
        except self.redis.RedisError:
            return
        self.assertNotEqual(value, b'x' * 1000)


if __name__ == '__main__':
    unittest.main()
