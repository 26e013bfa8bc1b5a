"""The framed protocols never sit on bytes they cannot frame: what can no
longer start a message (TLS on a plain port, a bad byte, a line longer
than the real servers take) goes on at once, as plain pass-through, and
TLS from either side is one log line saying so.  Standard library only
(the TLS tests need the openssl command to make a certificate)."""

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import unittest

from tests import support
from tests.test_protocols import TIMEOUT, Logs, Pair, read_some

import vaurien

vaurien.load_plugins()

from protocols import _framing  # noqa: E402
from protocols._framing import LINE, StreamParser  # noqa: E402


def client_hello():
    """The first bytes a real TLS client writes (ssl over memory BIOs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname='x')
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class LineCheckTest(unittest.TestCase):
    """The check of a LINE instruction sees the line while its end is
    missing: it fails the parser at once, and no byte is lost."""

    def test_check_fails_before_the_end(self):
        seen = []

        def check(line):
            seen.append(line)
            if not line.startswith(b'ok'[:len(line)]):
                raise _framing.FramingError('bad start')

        def gen():
            while True:
                yield (LINE, 100, False, check)

        parser = StreamParser(gen())
        parser.feed(b'ok fine\no')
        self.assertIsNone(parser.next_event())
        parser.feed(b'x and more')
        self.assertEqual(parser.next_event(), ('error', 'bad start'))
        # the first line was held (not emitted): it comes out too
        self.assertEqual(parser.rest(), b'ok fine\nox and more')
        # called on what was there of the second line, never on a whole one
        self.assertEqual(seen, [b'o', b'ox and more'])

    def test_tls_is_named(self):
        error = _framing.cannot_start('a line', client_hello())
        self.assertIn('a TLS ClientHello, not a line: this connection '
                      'speaks TLS', str(error))
        self.assertIsNone(_framing.tls_hint(b'\x16\x03'))
        self.assertIsNone(_framing.tls_hint(b'GET / HTTP/1.1'))


class Case(unittest.TestCase):
    """A proxy between a client socket and a backend socket in the test's
    hands, and the warnings it logs."""

    def pair(self, protocol):
        logs = Logs()
        vaurien.logger.addHandler(logs)
        self.addCleanup(vaurien.logger.removeHandler, logs)
        pair = Pair(protocol)
        self.addCleanup(pair.close)
        self.logs = logs
        return pair

    def assert_passes(self, pair, data, to_backend=True):
        """*data* sent by one side reaches the other whole, without the
        sender's stream ending: nothing waits for more."""
        source, dest = ((pair.client, pair.backend) if to_backend
                        else (pair.backend, pair.client))
        source.sendall(data)
        self.assertEqual(read_some(dest, len(data), TIMEOUT), data)

    def warnings(self):
        return [message for level, message in self.logs.lines]

    def assert_fell_back(self, pair, tls=False):
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn('passing this connection through as plain tcp',
                      warnings[0])
        # the line names the connection (its client's address)
        self.assertIn('%s:%d' % pair.client.getsockname()[:2], warnings[0])
        if tls:
            self.assertIn('speaks TLS', warnings[0])
        # and the connection goes on both ways
        self.assert_passes(pair, b'after \x00 the fallback\r\n')
        self.assert_passes(pair, b'and \xff back\r\n', to_backend=False)


class HTTPTest(Case):

    def test_client_hello(self):
        pair = self.pair('http')
        self.assert_passes(pair, client_hello())
        self.assert_fell_back(pair, tls=True)

    def test_junk_after_a_request(self):
        pair = self.pair('http')
        self.assert_passes(pair, b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
                                 b'\x16\x03\x01 junk')
        self.assert_fell_back(pair)

    def test_bad_method_byte(self):
        pair = self.pair('http')
        # a whole request line, its headers still to come: nginx refuses it
        self.assert_passes(pair, b'G\x00T / HTTP/1.1\r\nHost: x\r\n')
        self.assert_fell_back(pair)

    def test_bad_bytes_in_a_line_so_far(self):
        for data in (b'GE\x00', b'GET /a\x00', b'GET /a XTTP/1.1',
                     b'GET /a HTTP/1.1 x',
                     b'GET / HTTP/1.1\r\nHost: x\r\nX-Y\x00',
                     b'GET / HTTP/1.1\r\nHost: x\r\nX Y: z'):
            with self.subTest(data=data):
                pair = self.pair('http')
                self.assert_passes(pair, data)
                self.assert_fell_back(pair)

    def test_long_request_line(self):
        # nginx answers 414 once 8192 bytes are there without their end
        pair = self.pair('http')
        self.assert_passes(pair, b'GET /' + b'a' * 10 * 1024)
        self.assert_fell_back(pair)

    def test_request_lines_up_to_the_limit_frame(self):
        pair = self.pair('http')
        line = b'GET /' + b'a' * (8192 - 16) + b' HTTP/1.1\r\n'
        self.assertEqual(len(line), 8192)
        self.assert_passes(pair, line + b'Host: x\r\n\r\n')
        self.assert_passes(pair, b'HTTP/1.1 204 No Content\r\n\r\n',
                           to_backend=False)
        self.assertEqual(self.warnings(), [])
        self.assertEqual(pair.server.exchange_counts['dummy'], 1)

    def test_long_header_line(self):
        pair = self.pair('http')
        self.assert_passes(pair, b'GET / HTTP/1.1\r\nX-A: ' + b'a' * 9000)
        self.assert_fell_back(pair)

    def test_large_header_block(self):
        # nginx refuses past its four 8 KB buffers
        pair = self.pair('http')
        self.assert_passes(pair, b'GET / HTTP/1.1\r\n' +
                           (b'X-A: ' + b'a' * 4000 + b'\r\n') * 9)
        self.assert_fell_back(pair)

    def test_bad_status_line(self):
        pair = self.pair('http')
        self.assert_passes(pair, b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assert_passes(pair, b'\x00\xff not HTTP', to_backend=False)
        self.assert_fell_back(pair)

    def test_bad_chunk_size(self):
        pair = self.pair('http')
        self.assert_passes(pair, b'POST / HTTP/1.1\r\nHost: x\r\n'
                                 b'Transfer-Encoding: chunked\r\n\r\nzz')
        self.assert_fell_back(pair)


class RedisTest(Case):

    def test_client_hello(self):
        pair = self.pair('redis')
        self.assert_passes(pair, client_hello())
        self.assert_fell_back(pair, tls=True)

    def test_bad_count(self):
        # Redis answers "invalid multibulk length" once the CR comes
        pair = self.pair('redis')
        self.assert_passes(pair, b'*1x')
        self.assert_fell_back(pair)

    def test_count_of_too_many_digits(self):
        pair = self.pair('redis')
        self.assert_passes(pair, b'*' + b'1' * 30)
        self.assert_fell_back(pair)

    def test_bad_length(self):
        pair = self.pair('redis')
        self.assert_passes(pair, b'*2\r\n$x')
        self.assert_fell_back(pair)

    def test_argument_that_is_no_bulk_string(self):
        # past the first three arguments too: Redis says "expected '$'"
        pair = self.pair('redis')
        self.assert_passes(pair, b'*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv'
                                 b'\r\n:1')
        self.assert_fell_back(pair)

    def test_long_inline_command(self):
        # Redis: "too big inline request" past 64 KB (as before)
        pair = self.pair('redis')
        self.assert_passes(pair, b'SET k ' + b'v' * (64 * 1024))
        self.assert_fell_back(pair)

    def test_bad_reply(self):
        pair = self.pair('redis')
        self.assert_passes(pair, b'*1\r\n$4\r\nPING\r\n')
        self.assert_passes(pair, b'\x00 not RESP', to_backend=False)
        self.assert_fell_back(pair)

    def test_bad_length_in_a_reply(self):
        pair = self.pair('redis')
        self.assert_passes(pair, b'*2\r\n$3\r\nGET\r\n$1\r\nk\r\n')
        self.assert_passes(pair, b'*2\r\n$3\r\nabc\r\n$x',
                           to_backend=False)
        self.assert_fell_back(pair)

    def test_unknown_type_in_a_reply(self):
        pair = self.pair('redis')
        self.assert_passes(pair, b'*2\r\n$3\r\nGET\r\n$1\r\nk\r\n')
        self.assert_passes(pair, b'*2\r\n$3\r\nabc\r\n\x16\x03\x01',
                           to_backend=False)
        self.assert_fell_back(pair)


class MemcacheTest(Case):

    def test_client_hello(self):
        pair = self.pair('memcache')
        self.assert_passes(pair, client_hello())
        self.assert_fell_back(pair, tls=True)

    def test_long_command_line(self):
        # memcached closes the connection past 2048 bytes without the end
        pair = self.pair('memcache')
        self.assert_passes(pair, b'set k 0 0 1 ' + b'9' * 3000)
        self.assert_fell_back(pair)

    def test_long_multiget_is_framed(self):
        # ... but a get line may be long: memcached takes any number of keys
        pair = self.pair('memcache')
        line = b'get' + b' k' * 3000 + b'\r\n'
        pair.client.sendall(line[:-2])
        pair.client.sendall(line[-2:])
        self.assertEqual(read_some(pair.backend, len(line), TIMEOUT), line)
        self.assert_passes(pair, b'END\r\n', to_backend=False)
        self.assertEqual(self.warnings(), [])
        self.assertEqual(pair.server.exchange_counts['dummy'], 1)

    def test_bad_reply(self):
        pair = self.pair('memcache')
        self.assert_passes(pair, b'get k\r\n')
        self.assert_passes(pair, b'\x00junk', to_backend=False)
        self.assert_fell_back(pair)


class SMTPTest(Case):

    def greeted(self):
        pair = self.pair('smtp')
        self.assert_passes(pair, b'220 mx ESMTP\r\n', to_backend=False)
        return pair

    def test_client_hello(self):
        pair = self.pair('smtp')
        self.assert_passes(pair, client_hello())
        self.assert_fell_back(pair, tls=True)

    def test_bad_command_byte(self):
        pair = self.greeted()
        self.assert_passes(pair, b'MA\x00IL')
        self.assert_fell_back(pair)

    def test_long_command_line(self):
        # Postfix acts on the first 2048 bytes of a line
        pair = self.greeted()
        self.assert_passes(pair, b'MAIL FROM:<' + b'a' * 3000)
        self.assert_fell_back(pair)

    def test_bad_reply(self):
        pair = self.pair('smtp')
        self.assert_passes(pair, b'22x not a greeting', to_backend=False)
        self.assert_fell_back(pair)

    def test_tls_alert_from_the_server(self):
        # a TLS server's answer to a plain client
        pair = self.pair('smtp')
        self.assert_passes(pair, b'\x15\x03\x03\x00\x02\x02\x46',
                           to_backend=False)
        self.assert_fell_back(pair, tls=True)


class MySQLTest(Case):

    def test_client_hello(self):
        pair = self.pair('mysql')
        self.assert_passes(pair, client_hello())
        self.assert_fell_back(pair, tls=True)


# TLS end to end: a real TLS server, a real TLS client, the plugin between

def make_certificate(folder):
    """A self-signed certificate for localhost; skips without openssl."""
    openssl = shutil.which('openssl')
    if openssl is None:
        raise unittest.SkipTest('missing: the openssl command (apt-get '
                                'install openssl), to make a certificate')
    cert = os.path.join(folder, 'cert.pem')
    key = os.path.join(folder, 'key.pem')
    result = subprocess.run(
        [openssl, 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
         'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
         '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost',
         '-keyout', key, '-out', cert],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if result.returncode != 0:
        raise AssertionError('openssl req failed: %s' % result.stdout)
    return cert, key


class TLSTest(unittest.TestCase):
    """An implicit-TLS server (SMTP on port 465 style, HTTPS) behind a
    framed protocol: the handshake completes and data flows."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix='vaurien-tls-')
        try:
            cls.cert, cls.key = make_certificate(cls.folder)
        except BaseException:
            shutil.rmtree(cls.folder, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def server(self, dialog):
        """A TLS server running *dialog(tls_socket)* per connection."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)

        def handler(server, conn):
            with context.wrap_socket(conn, server_side=True) as tls:
                dialog(tls)

        server = support.ThreadedServer(handler).start()
        self.addCleanup(server.stop)
        return server

    def client(self, protocol, server):
        """A TLS client through the plugin (its handshake done), its socket
        and the proxy's warnings."""
        logs = Logs()
        vaurien.logger.addHandler(logs)
        self.addCleanup(vaurien.logger.removeHandler, logs)
        proxy = support.Proxy(server.address, protocol=protocol)
        proxy.__enter__()
        self.addCleanup(proxy.__exit__)
        sock = proxy.connect()
        self.addCleanup(sock.close)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.cert)
        tls = context.wrap_socket(sock, server_hostname='localhost')
        self.addCleanup(tls.close)
        return tls, logs

    def check_log(self, logs, tls):
        lines = [message for level, message in logs.lines]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn('speaks TLS', lines[0])
        self.assertIn('%s:%d' % tls.getsockname()[:2], lines[0])

    def test_smtp(self):
        def dialog(tls):
            tls.sendall(b'220 tls.example ESMTP\r\n')
            reader = tls.makefile('rb')
            line = reader.readline()
            tls.sendall(b'250 hello ' + line.split()[1] + b'\r\n')
            reader.readline()
            tls.sendall(b'221 bye\r\n')

        tls, logs = self.client('smtp', self.server(dialog))
        self.assertTrue(tls.version().startswith('TLS'))
        reader = tls.makefile('rb')
        self.assertEqual(reader.readline(), b'220 tls.example ESMTP\r\n')
        tls.sendall(b'EHLO me\r\n')
        self.assertEqual(reader.readline(), b'250 hello me\r\n')
        tls.sendall(b'QUIT\r\n')
        self.assertEqual(reader.readline(), b'221 bye\r\n')
        self.check_log(logs, tls)

    def test_http(self):
        body = b'over TLS\n' * 1000

        def dialog(tls):
            reader = tls.makefile('rb')
            while reader.readline() not in (b'\r\n', b''):
                pass
            tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s'
                        % (len(body), body))

        tls, logs = self.client('http', self.server(dialog))
        tls.sendall(b'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n')
        reader = tls.makefile('rb')
        self.assertEqual(reader.readline(), b'HTTP/1.1 200 OK\r\n')
        self.assertEqual(reader.readline(),
                         b'Content-Length: %d\r\n' % len(body))
        self.assertEqual(reader.readline(), b'\r\n')
        self.assertEqual(reader.read(len(body)), body)
        self.check_log(logs, tls)


if __name__ == '__main__':
    unittest.main()
