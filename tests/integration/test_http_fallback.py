"""nginx refuses at once what it cannot take (a TLS ClientHello on its
plain port, junk, a bad method byte, an endless request line): through the
http plugin the client gets the same answer, as soon."""

import socket

from tests import support as base
from tests.integration import support
from tests.test_framing_fallback import client_hello


class HTTPFallbackTest(support.ProxiedTestCase):

    PROTOCOL = 'http'

    @classmethod
    def start_backend(cls):
        return support.start_nginx({'small.txt': b'small file\n'})

    def answer(self, address, data):
        """Every byte nginx sends back to *data* until it closes (it does,
        after refusing), the client's stream left open."""
        sock = base.connect(address, support.TIMEOUT)
        try:
            sock.sendall(data)
            return base.recv_all(sock)
        except socket.timeout:
            self.fail('no answer within %ss to %r' % (support.TIMEOUT,
                                                       data[:40]))
        finally:
            sock.close()

    def statuses(self, answer):
        return [line.split(None, 2)[1] for line in answer.split(b'\r\n')
                if line.startswith(b'HTTP/1.')]

    def check(self, data, expected):
        direct = self.statuses(self.answer(self.backend.address, data))
        self.assertEqual(direct, expected)
        with support.captured_warnings() as warnings:
            proxied = self.statuses(self.answer(self.proxy.address, data))
        self.assertEqual(proxied, expected)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn('passing this connection through as plain tcp',
                      warnings[0])
        return warnings[0]

    def test_client_hello(self):
        warning = self.check(client_hello(), [b'400'])
        self.assertIn('speaks TLS', warning)

    def test_junk_after_a_request(self):
        # nginx answers the request, then closes on the junk
        self.check(b'GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n'
                   b'\x16\x03\x01 junk', [b'200'])

    def test_bad_method_byte(self):
        self.check(b'G\x00T /small.txt HTTP/1.1\r\nHost: x\r\n', [b'400'])

    def test_long_request_line(self):
        self.check(b'GET /' + b'a' * 10 * 1024, [b'414'])

    def test_long_header_line(self):
        self.check(b'GET /small.txt HTTP/1.1\r\nHost: x\r\nX-A: ' +
                   b'a' * 9000, [b'400'])
