"""The protocol plugins without any real server: the framing driver, each
plugin's framing and error answers over real loopback sockets, and a
seeded parser fuzz test per plugin (mutations of recorded exchanges).
Standard library only."""

import logging
import os
import random
import socket
import sys
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import vaurien  # noqa: E402

vaurien.load_plugins()

from protocols import _framing  # noqa: E402
from protocols._framing import (END, LINE, READ, REPLACE, SKIP,  # noqa: E402
                                START, FramingError, StreamParser)

TIMEOUT = 5.0
FUZZ_CASES = int(os.environ.get('VAURIEN_FUZZ_CASES', '30'))


# Recorded exchanges: (who, bytes), 'c' the client, 's' the server ########

def _resp(*args):
    out = [b'*%d\r\n' % len(args)]
    for arg in args:
        out.append(b'$%d\r\n%s\r\n' % (len(arg), arg))
    return b''.join(out)


REDIS = [
    ('c', b'PING\r\n'),
    ('s', b'+PONG\r\n'),
    ('c', _resp(b'SET', b'key', b'value')),
    ('s', b'+OK\r\n'),
    ('c', _resp(b'GET', b'key') + _resp(b'GET', b'nokey') +
     _resp(b'LRANGE', b'list', b'0', b'-1')),
    ('s', b'$5\r\nvalue\r\n$-1\r\n*3\r\n$1\r\na\r\n:2\r\n*1\r\n+c\r\n'),
    ('c', _resp(b'SET', b'big', b'x' * 70000)),
    ('s', b'+OK\r\n'),
    ('c', _resp(b'HELLO', b'3')),
    ('s', b'%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n'),
    ('c', _resp(b'HGETALL', b'h') + _resp(b'SMEMBERS', b's')),
    ('s', b'|1\r\n+ttl\r\n:3\r\n%1\r\n+f\r\n,1.5\r\n'
          b'~2\r\n#t\r\n_\r\n'),
    ('s', b'>3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n'),
    ('c', _resp(b'GET', b'x') + _resp(b'BIG')),
    ('s', b'$?\r\n;3\r\nabc\r\n;0\r\n(12345678901234567890\r\n'),
    ('c', _resp(b'CMD')),
    ('s', b'=7\r\ntxt:abc\r\n'),
    ('c', _resp(b'FAIL')),
    ('s', b'!5\r\nERR x\r\n'),
    ('c', _resp(b'SUBSCRIBE', b'news')),
    ('s', b'>3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n'
          b'>3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n'),
]
REDIS_EXCHANGES = 14

HTTP = [
    ('c', b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'),
    ('s', b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello'),
    ('c', b'POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
          b'\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n'),
    ('s', b'HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n'
          b'4\r\nabcd\r\n0\r\n\r\n'),
    ('c', b'HEAD /big HTTP/1.1\r\nHost: x\r\n\r\n'
          b'GET /empty HTTP/1.1\r\nHost: x\r\n\r\n'),
    ('s', b'HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n'
          b'HTTP/1.1 204 No Content\r\n\r\n'),
    ('c', b'PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n'
          b'Expect: 100-continue\r\n\r\n'),
    ('s', b'HTTP/1.1 100 Continue\r\n\r\n'),
    ('c', b'data'),
    ('s', b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
    ('c', b'GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
    ('s', b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end'),
]
HTTP_EXCHANGES = 6

MEMCACHE = [
    ('c', b'set k 0 0 5\r\nhello\r\n'),
    ('s', b'STORED\r\n'),
    ('c', b'get k nokey k\r\n'),
    ('s', b'VALUE k 0 5\r\nhello\r\nVALUE k 0 5\r\nhello\r\nEND\r\n'),
    ('c', b'gets k\r\ncas k 0 0 2 77\r\nhi\r\nincr n 1\r\n'),
    ('s', b'VALUE k 0 5 77\r\nhello\r\nEND\r\nSTORED\r\nNOT_FOUND\r\n'),
    ('c', b'set q 0 0 1 noreply\r\nx\r\ndelete k\r\ntouch q 10\r\n'),
    ('s', b'DELETED\r\nTOUCHED\r\n'),
    ('c', b'stats\r\n'),
    ('s', b'STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n'),
    ('c', b'ms mk 2 T0\r\nhi\r\nmg mk v\r\nmg no v q\r\nmn\r\nmg mk s v\r\n'),
    ('s', b'HD\r\nVA 2\r\nhi\r\nMN\r\nVA 2 s2\r\nhi\r\n'),
    ('c', b'version\r\n'),
    ('s', b'VERSION 1.6\r\n'),
]
MEMCACHE_EXCHANGES = 15

SMTP = [
    ('s', b'220 mx.example.com ESMTP ready\r\n'),
    ('c', b'EHLO client\r\n'),
    ('s', b'250-mx.example.com\r\n250-PIPELINING\r\n250-CHUNKING\r\n'
          b'250 SIZE 1000000\r\n'),
    ('c', b'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n'
          b'DATA\r\n'),
    ('s', b'250 OK\r\n250 OK\r\n354 go ahead\r\n'),
    ('c', b'Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n'),
    ('s', b'250 2.0.0 queued\r\n'),
    ('c', b'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n'
          b'BDAT 11 LAST\r\nhello world'),
    ('s', b'250 OK\r\n250 OK\r\n250 2.0.0 queued\r\n'),
    ('c', b'QUIT\r\n'),
    ('s', b'221 bye\r\n'),
]
SMTP_EXCHANGES = 9


def _pkt(seq, payload):
    return len(payload).to_bytes(3, 'little') + bytes([seq]) + payload


def mysql_session(deprecate_eof):
    caps = 0x0200 | 0x8000 | 0x00080000 | 0x00010000
    if deprecate_eof:
        caps |= 1 << 24
    greeting = _pkt(0, b'\x0a5.5.5-10.11.6-MariaDB\x00' + b'\x05\x00\x00\x00'
                    + b'abcdefgh\x00' + (caps & 0xffff).to_bytes(2, 'little')
                    + b'\x21\x02\x00' + (caps >> 16).to_bytes(2, 'little')
                    + b'\x15' + b'\x00' * 10 + b'ijklmnopqrst\x00'
                    + b'mysql_native_password\x00')
    handshake = _pkt(1, caps.to_bytes(4, 'little') + b'\x00\x00\x00\x01\x21'
                     + b'\x00' * 23 + b'root\x00\x14' + b'p' * 20
                     + b'test\x00mysql_native_password\x00')
    ok = b'\x00\x00\x00\x02\x00\x00\x00'

    def column(seq, name):
        return _pkt(seq, b'\x03def\x04test\x01t\x01t' + bytes([len(name)])
                    + name + b'\x00\x0c\x3f\x00\x0b\x00\x00\x00\x08\x00\x00'
                    b'\x00\x00\x00')

    def end(seq, more=False):
        status = 0x000a if more else 0x0002
        if deprecate_eof:
            return _pkt(seq, b'\xfe\x00\x00' + status.to_bytes(2, 'little')
                        + b'\x00\x00')
        return _pkt(seq, b'\xfe\x00\x00' + status.to_bytes(2, 'little'))

    def eof(seq):
        return b'' if deprecate_eof else _pkt(seq, b'\xfe\x00\x00\x02\x00')

    n = 0 if deprecate_eof else 1
    result = (_pkt(1, b'\x02') + column(2, b'a') + column(3, b'b') + eof(4)
              + _pkt(4 + n, b'\x011\x01x') + _pkt(5 + n, b'\x012\xfb')
              + end(6 + n))
    multi = (_pkt(1, b'\x01') + column(2, b'a') + eof(3)
             + _pkt(3 + n, b'\x011') + end(4 + n, more=True)
             + _pkt(5 + n, b'\x00\x01\x00\x02\x00\x00\x00'))
    prepare = (_pkt(1, b'\x00\x01\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00')
               + column(2, b'?') + eof(3) + column(3 + n, b'x')
               + eof(4 + n))
    execute = (_pkt(1, b'\x01') + column(2, b'x') + eof(3)
               + _pkt(3 + n, b'\x00\x00\x05hello') + end(4 + n))
    return [
        ('s', greeting),
        ('c', handshake),
        ('s', _pkt(2, ok)),
        ('c', _pkt(0, b'\x03SELECT a, b FROM t')),
        ('s', result),
        ('c', _pkt(0, b'\x03SELECT 1; INSERT INTO t VALUES (1)')),
        ('s', multi),
        ('c', _pkt(0, b'\x16SELECT ? FROM t')),
        ('s', prepare),
        ('c', _pkt(0, b'\x17\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01'
                   b'\x08\x00\x05\x00\x00\x00\x00\x00\x00\x00')),
        ('s', execute),
        ('c', _pkt(0, b'\x19\x01\x00\x00\x00') + _pkt(0, b'\x0e')),
        ('s', _pkt(1, ok)),
        ('c', _pkt(0, b'\x03' + b'x' * 70000)),
        ('s', _pkt(1, b'\xff\x28\x04#42000You have an error')),
        ('c', _pkt(0, b'\x01')),
    ]


MYSQL_EXCHANGES = 8

SESSIONS = {
    'redis': (REDIS, REDIS_EXCHANGES),
    'http': (HTTP, HTTP_EXCHANGES),
    'memcache': (MEMCACHE, MEMCACHE_EXCHANGES),
    'smtp': (SMTP, SMTP_EXCHANGES),
    'mysql': (mysql_session(False), MYSQL_EXCHANGES),
}


# Harness #################################################################

class Logs(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


class Pair(object):
    """A proxy with a client socket and the backend's accepted socket, both
    in the test's hands."""

    def __init__(self, protocol, behavior='dummy', options=None,
                 protocol_options=None):
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.server = vaurien.ProxyServer(
            ('127.0.0.1', 0), self.listener.getsockname(), protocol=protocol,
            behavior=behavior, behavior_options=options,
            protocol_options=protocol_options, seed='test')
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={'poll_interval': 0.05})
        self.thread.daemon = True
        self.thread.start()
        self.client = socket.create_connection(self.server.address,
                                               timeout=TIMEOUT)
        self.backend = self.listener.accept()[0]
        self.backend.settimeout(TIMEOUT)

    def close(self):
        for sock in (self.client, self.backend, self.listener):
            sock.close()
        self.server.shutdown()
        self.server.close_all()
        self.thread.join(TIMEOUT)


def read_some(sock, size, wait):
    """Up to *size* bytes, waiting at most *wait* seconds for them."""
    sock.settimeout(wait)
    got = b''
    try:
        while len(got) < size:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    except socket.timeout:
        pass
    finally:
        sock.settimeout(TIMEOUT)
    return got


def read_all(sock):
    got = b''
    while True:
        data = sock.recv(65536)
        if not data:
            return got
        got += data


def replay(protocol, steps, wait=2.0):
    """Plays *steps* through the plugin under the dummy behavior; returns
    (what the backend got, what the client got, the proxy server)."""
    pair = Pair(protocol)
    try:
        to_backend = to_client = b''
        for who, data in steps:
            if who == 'c':
                pair.client.sendall(data)
                to_backend += read_some(pair.backend, len(data), wait)
            else:
                pair.backend.sendall(data)
                to_client += read_some(pair.client, len(data), wait)
        pair.client.shutdown(socket.SHUT_WR)
        to_backend += read_all(pair.backend)
        pair.backend.shutdown(socket.SHUT_WR)
        to_client += read_all(pair.client)
        return to_backend, to_client, pair.server
    finally:
        pair.close()


def mutate(rng, steps):
    """A copy of *steps* with one to three random mutations."""
    steps = list(steps)
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(steps))
        who, data = steps[index]
        data = bytearray(data)
        if not data:
            continue
        pos = rng.randrange(len(data))
        kind = rng.randrange(7)
        if kind == 0:
            data[pos] = rng.randrange(256)
        elif kind == 1:
            data[pos:pos] = bytes(rng.randrange(256)
                                  for _ in range(rng.randint(1, 8)))
        elif kind == 2:
            del data[pos:pos + rng.randint(1, 16)]
        elif kind == 3:
            end = min(len(data), pos + rng.randint(1, 32))
            data[pos:pos] = data[pos:end]
        elif kind == 4:
            data[pos:pos] = rng.choice([b'\r\n', b'\n', b'-1', b'999999',
                                        b'?', b'\x00', b'\xff', b'0\r\n'])
        elif kind == 5:
            digits = [i for i, c in enumerate(data) if 48 <= c <= 57]
            if digits:
                data[rng.choice(digits)] = rng.randrange(48, 58)
        else:
            data = data[:pos]
        steps[index] = (who, bytes(data))
    return steps


# Tests ###################################################################

class StreamParserTest(unittest.TestCase):

    def run_parser(self, generator, chunks):
        parser = StreamParser(generator)
        events = []
        for chunk in chunks:
            parser.feed(chunk)
            while True:
                event = parser.next_event()
                if event is None:
                    break
                events.append(event)
        return parser, events

    def test_lines_skip_and_held_bytes(self):
        def gen():
            while True:
                line = yield (LINE, 100, False)
                size = int(line)
                yield (START, size)
                yield (SKIP, size)
                yield (END, size)

        parser, events = self.run_parser(gen(), [b'3\r\nab', b'c5\r', b'\n',
                                                 b'12345'])
        data = [e for e in events if e[0] == 'data']
        self.assertEqual(b''.join(d[1] for d in data), b'3\r\nabc5\r\n12345')
        self.assertEqual([e[0] for e in events if e[0] != 'data'],
                         ['start', 'end', 'start', 'end'])
        # the line comes right after its start, before the body
        self.assertEqual(events[:3], [('start', 3), ('data', b'3\r\n'),
                                      ('data', b'ab')])

    def test_large_skip_streams(self):
        def gen():
            yield (START, None)
            yield (SKIP, 10 ** 9)
        parser = StreamParser(gen())
        sizes = []
        for _ in range(5):
            parser.feed(b'x' * 65536)
            while True:
                event = parser.next_event()
                if event is None:
                    break
                if event[0] == 'data':
                    sizes.append(len(event[1]))
            self.assertLessEqual(len(parser.buf) - parser.pos, 0)
        self.assertEqual(sum(sizes), 5 * 65536)

    def test_replace_and_error_keep_every_byte(self):
        def gen():
            line = yield (LINE, 100, False)
            yield (REPLACE, line.upper())
            yield (START, None)
            yield (READ, 2, False)
            raise FramingError('surprise')

        parser, events = self.run_parser(gen(), [b'abc\nxyz'])
        self.assertEqual(events[:2], [('start', None), ('data', b'ABC\n')])
        self.assertEqual(events[-1], ('error', 'surprise'))
        self.assertEqual(parser.rest(), b'xyz')

    def test_long_line_fails(self):
        def gen():
            yield (LINE, 10)
        parser, events = self.run_parser(gen(), [b'x' * 20])
        self.assertEqual(events[-1][0], 'error')
        self.assertEqual(parser.rest(), b'x' * 20)

    def test_number(self):
        self.assertEqual(_framing.number(b' 12 '), 12)
        for bad in (b'', b'1_0', b'+1', b'x', b'-1'):
            with self.assertRaises(FramingError):
                _framing.number(bad)


class CleanSessionsTest(unittest.TestCase):
    """A recorded session passes byte for byte, one exchange per
    request, no warning.  After a switch to pass-through (TLS, Upgrade),
    an exchange per read of the client, as under tcp."""

    def check(self, protocol, steps=None, exchanges=None):
        if steps is None:
            steps, exchanges = SESSIONS[protocol]
        logs = Logs()
        vaurien.logger.addHandler(logs)
        try:
            to_backend, to_client, server = replay(protocol, steps)
        finally:
            vaurien.logger.removeHandler(logs)
        self.assertEqual(to_backend, b''.join(d for w, d in steps
                                              if w == 'c'))
        self.assertEqual(to_client, b''.join(d for w, d in steps
                                             if w == 's'))
        self.assertEqual(logs.lines, [])
        self.assertEqual(server.exchange_counts['dummy'], exchanges)

    def test_redis(self):
        self.check('redis')

    def test_http(self):
        self.check('http')

    def test_memcache(self):
        self.check('memcache')

    def test_smtp(self):
        self.check('smtp')

    def test_mysql(self):
        self.check('mysql')

    def test_mysql_deprecate_eof(self):
        self.check('mysql', mysql_session(True), MYSQL_EXCHANGES)

    def test_smtp_starttls_passes(self):
        self.check('smtp', [('s', b'220 hi\r\n'), ('c', b'STARTTLS\r\n'),
                            ('s', b'220 go ahead\r\n'),
                            ('c', b'\x16\x03\x01 tls bytes'),
                            ('s', b'\x16\x03\x03 more tls')], 2)

    def test_mysql_ssl_request_passes(self):
        greeting = mysql_session(False)[0]
        self.check('mysql', [greeting,
                             ('c', _pkt(1, b'\x00\x8a\x08\x00' +
                                        b'\x00' * 28)),
                             ('c', b'\x16\x03\x01 tls bytes'),
                             ('s', b'\x16\x03\x03 more tls')], 1)

    def test_http_upgrade_passes(self):
        self.check('http', [
            ('c', b'GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n'
                  b'Connection: Upgrade\r\n\r\n'),
            ('s', b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket'
                  b'\r\nConnection: Upgrade\r\n\r\n\x81\x05hello'),
            ('c', b'\x81\x85frame')], 2)

    def test_memcache_binary_passes(self):
        self.check('memcache', [('c', b'\x80\x0b' + b'\x00' * 22),
                                ('s', b'\x81\x0b' + b'\x00' * 22)], 0)

    def test_malformed_falls_back_with_one_warning(self):
        for protocol in ('redis', 'http', 'smtp', 'mysql', 'memcache'):
            logs = Logs()
            vaurien.logger.addHandler(logs)
            try:
                if protocol in ('smtp', 'mysql'):
                    steps = [('s', b'\x00garbage\r\n\xff\xfe')]
                elif protocol == 'memcache':
                    steps = [('c', b'get k\r\n'),
                             ('s', b'VALUE k 0 x\r\n\xff\xfe')]
                else:
                    steps = [('c', b'$garbage\r\n\r\n'),
                             ('s', b'\x00\xff?\r\n')]
                steps += [('c', b'more \x00 bytes\r\n'), ('s', b'and more')]
                to_backend, to_client, _ = replay(protocol, steps)
            finally:
                vaurien.logger.removeHandler(logs)
            self.assertEqual(to_backend, b''.join(d for w, d in steps
                                                  if w == 'c'))
            self.assertEqual(to_client, b''.join(d for w, d in steps
                                                 if w == 's'))
            warnings = [m for level, m in logs.lines]
            self.assertEqual(len(warnings), 1, (protocol, warnings))
            self.assertIn('passing this connection through as plain tcp',
                          warnings[0])


class ErrorAnswerTest(unittest.TestCase):
    """``error`` answers in each protocol's own words, in order."""

    def pair(self, protocol, options=None, protocol_options=None):
        pair = Pair(protocol, 'error', {'error': options or {}},
                    protocol_options)
        self.addCleanup(pair.close)
        return pair

    def test_redis(self):
        pair = self.pair('redis', {'message': 'LOADING Redis is loading'})
        pair.client.sendall(_resp(b'GET', b'k') + _resp(b'SET', b'k', b'v'))
        expected = b'-LOADING Redis is loading\r\n' * 2
        self.assertEqual(read_some(pair.client, len(expected), TIMEOUT),
                         expected)
        self.assertEqual(read_some(pair.backend, 1, 0.2), b'')

    def test_redis_after_earlier_answers(self):
        """The 2nd command fails: its error comes after the 1st answer."""
        pair = self.pair('redis', {'warmup': 1})
        pair.client.sendall(_resp(b'GET', b'a') + _resp(b'GET', b'b'))
        self.assertEqual(read_some(pair.backend, 100, 0.3), _resp(b'GET',
                                                                  b'a'))
        pair.backend.sendall(b'$1\r\nA\r\n')
        expected = b'$1\r\nA\r\n-ERR vaurien: injected error\r\n'
        self.assertEqual(read_some(pair.client, len(expected), TIMEOUT),
                         expected)

    def test_memcache(self):
        pair = self.pair('memcache')
        pair.client.sendall(b'set k 0 0 1 noreply\r\nx\r\nget k\r\n')
        expected = b'SERVER_ERROR out of memory storing object\r\n'
        self.assertEqual(read_some(pair.client, 100, 0.5), expected)

    def test_http(self):
        pair = self.pair('http', {'code': 429}, {'retry_after': 30})
        pair.client.sendall(b'POST / HTTP/1.1\r\nHost: x\r\n'
                            b'Content-Length: 3\r\n\r\nabc')
        got = read_some(pair.client, 100000, 0.5)
        self.assertTrue(got.startswith(b'HTTP/1.1 429 Too Many Requests\r\n'))
        self.assertIn(b'\r\nRetry-After: 30\r\n', got)
        head, body = got.split(b'\r\n\r\n', 1)
        self.assertIn(b'Content-Length: %d\r\n' % len(body), head + b'\r\n')

    def test_smtp(self):
        pair = self.pair('smtp')
        pair.backend.sendall(b'220 hello\r\n')
        self.assertEqual(read_some(pair.client, 11, TIMEOUT), b'220 hello\r\n')
        pair.client.sendall(b'NOOP\r\n')
        self.assertEqual(read_some(pair.client, 100, 0.5),
                         b'451 4.3.0 Requested action aborted: local error '
                         b'in processing\r\n')

    def test_mysql(self):
        pair = self.pair('mysql', {'code': 1213})
        session = mysql_session(False)
        pair.backend.sendall(session[0][1])
        read_some(pair.client, len(session[0][1]), TIMEOUT)
        pair.client.sendall(session[1][1])
        read_some(pair.backend, len(session[1][1]), TIMEOUT)
        pair.backend.sendall(session[2][1])
        read_some(pair.client, len(session[2][1]), TIMEOUT)
        pair.client.sendall(_pkt(0, b'\x03SELECT 1'))
        got = read_some(pair.client, 1000, 0.5)
        message = b'Deadlock found when trying to get lock; try restarting ' \
                  b'transaction'
        self.assertEqual(got, _pkt(1, b'\xff\xbd\x04#40001' + message))


class HostHeaderTest(unittest.TestCase):

    def test_overwrite_host_header(self):
        pair = Pair('http', protocol_options={'overwrite_host_header': True})
        self.addCleanup(pair.close)
        pair.client.sendall(b'GET / HTTP/1.1\r\nhost: example.com\r\n'
                            b'Accept: */*\r\n\r\n')
        port = pair.listener.getsockname()[1]
        expected = (b'GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
                    b'Accept: */*\r\n\r\n' % port)
        self.assertEqual(read_some(pair.backend, len(expected), TIMEOUT),
                         expected)


class FuzzTest(unittest.TestCase):
    """Seeded mutations of the recorded sessions: nothing escapes, nothing
    hangs, every byte passes, and the fallback engages."""

    def fuzz(self, protocol):
        steps, _ = SESSIONS[protocol]
        rng = random.Random('vaurien-fuzz-%s' % protocol)
        logs = Logs()
        vaurien.logger.addHandler(logs)
        try:
            for case in range(FUZZ_CASES):
                mutated = mutate(rng, steps)
                to_backend, to_client, _ = replay(protocol, mutated,
                                                  wait=0.1)
                self.assertEqual(to_backend, b''.join(
                    d for w, d in mutated if w == 'c'), 'case %d' % case)
                self.assertEqual(to_client, b''.join(
                    d for w, d in mutated if w == 's'), 'case %d' % case)
        finally:
            vaurien.logger.removeHandler(logs)
        errors = [m for level, m in logs.lines if level >= logging.ERROR]
        self.assertEqual(errors, [])
        fallbacks = [m for level, m in logs.lines
                     if 'passing this connection through' in m]
        self.assertGreater(len(fallbacks), 0)

    def test_redis(self):
        self.fuzz('redis')

    def test_http(self):
        self.fuzz('http')

    def test_memcache(self):
        self.fuzz('memcache')

    def test_smtp(self):
        self.fuzz('smtp')

    def test_mysql(self):
        self.fuzz('mysql')


if __name__ == '__main__':
    unittest.main()
