"""nginx and requests through the http plugin and plain tcp."""

import hashlib
import os
import socket
import time
import unittest

from tests.integration import support

BIG = os.urandom(5 * 1024 * 1024)
TEXT = b'vaurien says hello\n' * 5000


class HTTPTest(support.ProxiedTestCase):

    PROTOCOL = 'http'

    @classmethod
    def start_backend(cls):
        cls.requests = support.need_module('requests', 'requests')
        return support.start_nginx({'small.txt': b'small file\n',
                                    'big.bin': BIG, 'gz': b''})

    @classmethod
    def setUpClass(cls):
        super(HTTPTest, cls).setUpClass()
        folder = os.path.join(cls.backend.folder, 'html', 'gz')
        os.remove(folder)
        os.mkdir(folder)
        with open(os.path.join(folder, 'text.txt'), 'wb') as f:
            f.write(TEXT)

    def url(self, proxy, path):
        return 'http://127.0.0.1:%d%s' % (proxy.port, path)

    def session(self):
        session = self.requests.Session()
        self.addCleanup(session.close)
        return session

    def workload(self, proxy):
        s = self.session()
        get = lambda path, **kw: s.get(self.url(proxy, path),
                                       timeout=support.TIMEOUT, **kw)
        for _ in range(50):
            r = get('/small.txt')
            self.assertEqual((r.status_code, r.content),
                             (200, b'small file\n'))
        r = get('/big.bin')
        self.assertEqual(hashlib.sha1(r.content).digest(),
                         hashlib.sha1(BIG).digest())
        r = s.head(self.url(proxy, '/big.bin'), timeout=support.TIMEOUT)
        self.assertEqual(r.headers['Content-Length'], str(len(BIG)))
        self.assertEqual(get('/small.txt').content, b'small file\n')
        r = s.post(self.url(proxy, '/upload'), data=BIG,
                   timeout=support.TIMEOUT)
        self.assertEqual(r.text, 'got %d' % len(BIG))
        r = s.post(self.url(proxy, '/upload'),
                   data=(BIG[i:i + 100000] for i in range(0, 500000, 100000)),
                   timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 200)
        r = get('/gz/text.txt', headers={'Accept-Encoding': 'gzip'})
        self.assertEqual(r.headers.get('Transfer-Encoding'), 'chunked')
        self.assertEqual(r.content, TEXT)
        self.assertEqual(get('/empty').status_code, 204)
        self.assertEqual(get('/missing').status_code, 404)
        self.assertEqual(get('/small.txt').content, b'small file\n')
        for _ in range(5):      # no keep-alive
            r = self.requests.get(self.url(proxy, '/small.txt'),
                                  headers={'Connection': 'close'},
                                  timeout=support.TIMEOUT)
            self.assertEqual(r.content, b'small file\n')

    def test_workload_plugin(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy)
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 60)

    def test_workload_tcp(self):
        self.workload(self.tcp)

    def test_pipelined(self):
        sock = socket.create_connection(self.proxy.address,
                                        timeout=support.TIMEOUT)
        self.addCleanup(sock.close)
        request = (b'GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n'
                   b'HEAD /big.bin HTTP/1.1\r\nHost: x\r\n\r\n'
                   b'GET /small.txt HTTP/1.1\r\nHost: x\r\n'
                   b'Connection: close\r\n\r\n')
        sock.sendall(request)
        data = b''
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.assertEqual(data.count(b'HTTP/1.1 200 OK'), 3)
        self.assertEqual(data.count(b'small file\n'), 2)
        self.assertEqual(self.proxy.server.exchange_counts['dummy'], 3)

    def test_host_header(self):
        proxy = support.Proxy(self.backend.address, 'http',
                              protocol_options={
                                  'overwrite_host_header': True})
        self.addCleanup(proxy.stop)
        r = self.requests.get(self.url(proxy, '/small.txt'),
                              timeout=support.TIMEOUT)
        self.assertEqual(r.content, b'small file\n')

    # behaviors, as requests reports them

    def test_error_503(self):
        s = self.session()
        self.assertEqual(s.get(self.url(self.proxy, '/small.txt'),
                               timeout=support.TIMEOUT).status_code, 200)
        self.proxy.set('error', {'error': {'code': 503}})
        r = s.get(self.url(self.proxy, '/small.txt'), timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 503)
        r = s.post(self.url(self.proxy, '/upload'), data=BIG,
                   timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 503)
        self.proxy.set('dummy')
        r = s.get(self.url(self.proxy, '/small.txt'), timeout=support.TIMEOUT)
        self.assertEqual((r.status_code, r.content), (200, b'small file\n'))

    def test_error_random_5xx(self):
        self.proxy.set('error')
        r = self.requests.get(self.url(self.proxy, '/small.txt'),
                              timeout=support.TIMEOUT)
        self.assertIn(r.status_code, (500, 501, 502, 503))

    def test_error_429_retry_after(self):
        proxy = support.Proxy(self.backend.address, 'http',
                              protocol_options={'retry_after': 7})
        self.addCleanup(proxy.stop)
        proxy.set('error', {'error': {'code': 429, 'message': 'slow down'}})
        r = self.requests.get(self.url(proxy, '/small.txt'),
                              timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 429)
        self.assertEqual(r.headers['Retry-After'], '7')
        self.assertIn('slow down', r.text)

    def test_head_error(self):
        self.proxy.set('error', {'error': {'code': 502}})
        r = self.requests.head(self.url(self.proxy, '/big.bin'),
                               timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 502)

    def test_hang_third_request(self):
        s = self.session()
        for _ in range(2):
            s.get(self.url(self.proxy, '/small.txt'), timeout=support.TIMEOUT)
        self.proxy.set('hang')
        with self.assertRaises(self.requests.exceptions.ReadTimeout):
            s.get(self.url(self.proxy, '/small.txt'), timeout=0.5)

    def test_delay(self):
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        start = time.time()
        r = self.requests.get(self.url(self.proxy, '/small.txt'),
                              timeout=support.TIMEOUT)
        self.assertEqual(r.status_code, 200)
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_abort(self):
        self.proxy.set('abort')
        with self.assertRaises(self.requests.exceptions.ConnectionError):
            self.requests.get(self.url(self.proxy, '/small.txt'),
                              timeout=support.TIMEOUT)

    def test_blackout(self):
        self.proxy.set('blackout')
        with self.assertRaises(self.requests.exceptions.ConnectionError):
            self.requests.get(self.url(self.proxy, '/small.txt'),
                              timeout=support.TIMEOUT)

    def test_transient(self):
        s = self.session()
        self.proxy.set('transient', {'transient': {'agitate': 2,
                                                   'code': 503}})
        codes = [s.get(self.url(self.proxy, '/small.txt'),
                       timeout=support.TIMEOUT).status_code
                 for _ in range(4)]
        self.assertEqual(codes, [503, 503, 200, 200])


if __name__ == '__main__':
    unittest.main()
