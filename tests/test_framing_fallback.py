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


if __name__ == '__main__':
    unittest.main()
