"""memcached and pymemcache through the memcache plugin and plain tcp."""

import socket
import time
import unittest

from tests.integration import support


class MemcacheTest(support.ProxiedTestCase):

    PROTOCOL = 'memcache'

    @classmethod
    def start_backend(cls):
        cls.pymemcache = support.need_module('pymemcache', 'pymemcache')
        from pymemcache.client.base import Client
        from pymemcache import exceptions
        cls.Client = Client
        cls.exceptions = exceptions
        return support.start_memcached()

    def client(self, proxy, timeout=support.TIMEOUT):
        client = self.Client(('127.0.0.1', proxy.port), timeout=timeout,
                             connect_timeout=timeout, no_delay=True)
        self.addCleanup(client.close)
        return client

    def workload(self, proxy, prefix):
        c = self.client(proxy)
        big = bytes(bytearray(range(256))) * 4000      # about 1 MB
        for i in range(300):
            value = big if i % 100 == 0 else ('v%d' % i).encode() * (i % 9)
            self.assertTrue(c.set('%s%d' % (prefix, i), value))
            self.assertEqual(c.get('%s%d' % (prefix, i)), value)
        keys = ['%s%d' % (prefix, i) for i in range(0, 300, 3)]
        got = c.get_many(keys)
        self.assertEqual(len(got), len(keys))
        self.assertEqual(got[keys[0]], big)
        value, token = c.gets('%s1' % prefix)
        self.assertTrue(c.cas('%s1' % prefix, b'new', token))
        self.assertFalse(c.cas('%s1' % prefix, b'newer', token))
        self.assertEqual(c.get('%s1' % prefix), b'new')
        c.set('%sn' % prefix, b'10')
        self.assertEqual(c.incr('%sn' % prefix, 5), 15)
        self.assertEqual(c.decr('%sn' % prefix, 3), 12)
        self.assertTrue(c.touch('%sn' % prefix, 100))
        self.assertTrue(c.delete('%sn' % prefix))
        self.assertFalse(c.delete('%sn' % prefix, noreply=False))
        c.set('%sq' % prefix, b'quiet', noreply=True)
        c.add('%sq2' % prefix, b'x', noreply=True)
        self.assertEqual(c.get('%sq' % prefix), b'quiet')
        self.assertIn(b'pid', c.stats())
        self.assertEqual(c.get('%smissing' % prefix), None)

    def test_workload_plugin(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy, 'plugin')
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 600)

    def test_workload_tcp(self):
        self.workload(self.tcp, 'tcp')

    def raw(self, proxy, data, size):
        sock = socket.create_connection(proxy.address,
                                        timeout=support.TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(data)
        got = b''
        while len(got) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got

    def test_meta_commands(self):
        expected = (b'HD\r\nVA 5\r\nhello\r\nVA 5 s5\r\nhello\r\n'
                    b'NF\r\nMN\r\nHD\r\nVA 5\r\nhello\r\n')
        with support.captured_warnings() as warnings:
            got = self.raw(self.proxy, b'ms mk 5 T0\r\nhello\r\n'
                           b'mg mk v\r\nmg nokey v q\r\nmg mk s v q\r\n'
                           b'md nokey q\r\nmn\r\nma mcount N0 J13\r\n'
                           b'mg mk v\r\n', len(expected))
        self.assertEqual(got, expected)
        self.assertEqual(warnings, [])

    def test_binary_protocol_passes(self):
        # a binary "version" request
        request = b'\x80\x0b' + b'\x00' * 22
        sock = socket.create_connection(self.proxy.address,
                                        timeout=support.TIMEOUT)
        self.addCleanup(sock.close)
        sock.sendall(request)
        got = b''
        while len(got) < 24:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        self.assertEqual(got[:2], b'\x81\x0b')

    # behaviors, as pymemcache reports them

    def test_error(self):
        c = self.client(self.proxy)
        self.assertTrue(c.set('e', b'1', noreply=False))
        self.proxy.set('error')
        with self.assertRaises(self.exceptions.MemcacheServerError):
            c.get('e')
        with self.assertRaises(self.exceptions.MemcacheServerError):
            c.set('e', b'x' * 100000, noreply=False)
        self.proxy.set('dummy')
        self.assertEqual(c.get('e'), b'1')
        self.assertTrue(c.set('e', b'2'))

    def test_error_message(self):
        c = self.client(self.proxy)
        self.proxy.set('error', {'error': {'message': 'object too large '
                                                      'for cache'}})
        with self.assertRaises(self.exceptions.MemcacheServerError) as cm:
            c.set('e', b'x', noreply=False)
        self.assertIn('too large', str(cm.exception))

    def test_hang_third_command(self):
        c = self.client(self.proxy, timeout=0.5)
        c.set('h', b'1')
        c.get('h')
        self.proxy.set('hang')
        with self.assertRaises(socket.timeout):
            c.get('h')

    def test_delay(self):
        c = self.client(self.proxy)
        c.set('d', b'1')
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        start = time.time()
        self.assertEqual(c.get('d'), b'1')
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_abort(self):
        c = self.client(self.proxy)
        c.set('a', b'1')
        self.proxy.set('abort')
        with self.assertRaises((self.exceptions.MemcacheUnexpectedCloseError,
                                ConnectionError)):
            c.get('a')

    def test_blackout(self):
        c = self.client(self.proxy)
        c.set('a', b'1')
        self.proxy.set('blackout')
        with self.assertRaises((self.exceptions.MemcacheUnexpectedCloseError,
                                ConnectionError)):
            c.get('a')


if __name__ == '__main__':
    unittest.main()
