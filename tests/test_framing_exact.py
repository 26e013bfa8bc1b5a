"""The framing stays exact under the framed protocols' fast lanes (issue
14): runs of whole messages taken at once must frame the streams as the
parsers do, whatever the reads' boundaries, and a behavior switched on in
the middle of a pipelined stream acts from the next request exactly.

Each test drives a real vaurien proxy (in this process) in front of a tiny
scripted backend on 127.0.0.1: the backend checks that it gets the
client's bytes, all of them, and answers a script; the client checks that
it gets the script.  The streams are split at every byte boundary, both
ways.  Standard library only."""

import logging
import os
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import support  # noqa: E402
import vaurien  # noqa: E402

vaurien.load_plugins()

# a pause between the two pieces of a split stream, so that the proxy
# reads them apart (the loopback delivers at once)
PAUSE = 0.002


def resp(*words):
    """A Redis command (a RESP array of bulk strings)."""
    return b'*%d\r\n' % len(words) + b''.join(
        b'$%d\r\n%s\r\n' % (len(word), word) for word in words)


def bulk(value):
    return b'$%d\r\n%s\r\n' % (len(value), value)


class Script(support.ThreadedServer):
    """A backend that reads exactly ``expect`` bytes, then answers
    ``reply``, split at ``split`` (two sends with a pause between); what
    it read goes to ``self.got`` (a list, one item per connection).  With
    ``steps`` (a list of ``(expect, reply)``), it reads and answers each
    in turn instead (an active behavior relays the earlier answers before
    it acts: no pipeline then)."""

    def __init__(self):
        super(Script, self).__init__(self._answer)
        self.expect = b''
        self.reply = b''
        self.split = 0
        self.steps = None
        self.got = []

    def _answer(self, server, conn):
        steps = self.steps or [(self.expect, self.reply)]
        got = []
        for expect, reply in steps:
            got.append(support.recv_exactly(conn, len(expect)))
            split = self.split
            if split and not self.steps:
                conn.sendall(reply[:split])
                time.sleep(PAUSE)
                conn.sendall(reply[split:])
            elif reply:
                conn.sendall(reply)
        self.got.append(b''.join(got))
        # until the client is done (its end of stream)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def talk(address, request, split, answer_size, case=None, first=0):
    """Send *request* split at *split* (and at *first*: the end of the
    first message, which may set the connection up; a pause between the
    pieces) and read *answer_size* bytes back; then, given an ExactCase,
    probe that the framing kept in step (see ExactCase)."""
    with support.connect(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cuts = sorted(set([0, first, split, len(request)]))
        for start, stop in zip(cuts, cuts[1:]):
            sock.sendall(request[start:stop])
            if stop < len(request):
                time.sleep(PAUSE)
        answer = support.recv_exactly(sock, answer_size)
        if case is not None and case.probe is not None:
            server = case.server
            server.set_mix('error')
            try:
                sock.sendall(case.probe)
                case.assertEqual(support.recv_exactly(
                    sock, len(case.probe_answer)), case.probe_answer,
                    'the probe after a split at %d' % split)
            finally:
                server.set_mix('dummy')
        return answer


class Warnings(logging.Handler):
    """Keeps the proxy's warnings (a stream it cannot frame says so)."""

    def __init__(self):
        super(Warnings, self).__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class ExactCase(unittest.TestCase):
    """A scripted backend behind a proxy speaking *protocol*.  After a
    script, the ``error`` behavior is switched on and *probe* sent on the
    same connection: *probe_answer* comes back, in the protocol's words,
    only when the framing kept in step to the end."""

    protocol = None
    probe = probe_answer = None

    def setUp(self):
        self.warnings = Warnings()
        vaurien.logger.addHandler(self.warnings)
        self.addCleanup(vaurien.logger.removeHandler, self.warnings)
        self.backend = Script()
        self.backend.start()
        self.addCleanup(self.backend.stop)
        self.proxy = support.Proxy(self.backend.address,
                                   protocol=self.protocol)
        self.proxy.__enter__()
        self.addCleanup(self.proxy.__exit__, None, None, None)
        self.server = self.proxy.server

    def counts(self):
        return self.server.exchange_counts

    def check_splits(self, requests, replies, count, steps=None):
        """Every split of the joined *requests* (and, at the same time,
        of the joined *replies*): the bytes pass exactly, each request is
        one exchange (*count* of them)."""
        request, reply = b''.join(requests), b''.join(replies)
        self.backend.expect, self.backend.reply = request, reply
        splits = range(len(request)) if steps is None else steps
        for split in splits:
            self.backend.split = split % len(reply)
            before = self.counts()['dummy']
            got = talk(self.server.address, request, split, len(reply),
                       self, len(requests[0]))
            self.assertEqual(got, reply, 'split at %d' % split)
            self.assertEqual(self.warnings.lines, [], 'split at %d' % split)
            self.assertEqual(self.backend.got[-1], request,
                             'split at %d' % split)
            self.assertEqual(self.counts()['dummy'] - before, count,
                             'split at %d' % split)


class RedisExactTest(ExactCase):
    protocol = 'redis'
    probe = resp(b'GET', b'probe')
    probe_answer = b'-ERR vaurien: injected error\r\n'

    # values that look like RESP, with CRLF in them; one long argument;
    # runs of alike GETs (the replies framed at once), one of them nil;
    # arrays of more than 8 bulk strings, plain and with CRLF inside
    COMMANDS = [
        resp(b'SET', b'k1', b'v\r\n$3\r\nxyz'),
        resp(b'GET', b'k1'),
        resp(b'set', b'k2', b'x' * 600),
        resp(b'MGET', b'k1', b'k2', b'k3', b'k4'),
        b'PING\r\n',
        resp(b'LRANGE', b'l', b'0', b'-1'),
        resp(b'LRANGE', b'm', b'0', b'-1'),
        resp(b'LRANGE', b'n', b'0', b'-1'),
    ] + [resp(b'GET', b'k%d' % i) for i in range(6)]
    REPLIES = [
        b'+OK\r\n',
        bulk(b'v\r\n$3\r\nxyz'),
        b'+OK\r\n',
        b'*4\r\n' + bulk(b'v\r\n$3\r\nxyz') + bulk(b'x' * 600) +
        b'$-1\r\n$-1\r\n',
        b'+PONG\r\n',
        b'*12\r\n' + bulk(b'ab') * 12,
        b'*9\r\n' + bulk(b'a') * 8 + bulk(b'a\r\nb'),
        b'*10\r\n' + bulk(b'$1\r\n') * 5 + b':7\r\n' + bulk(b'') * 4,
        bulk(b'abc'), bulk(b'abc'), b'$-1\r\n', bulk(b'abc'),
        bulk(b'\r\n'), bulk(b'abc'),
    ]

    def test_every_split_both_ways(self):
        self.check_splits(self.COMMANDS, self.REPLIES, len(self.COMMANDS))

    def test_pipelined_runs_in_one_read(self):
        # the same pipeline many times over in one write: runs of
        # hundreds of commands and replies
        commands, replies = self.COMMANDS * 40, self.REPLIES * 40
        self.check_splits(commands, replies, len(commands),
                          steps=[0, 1, 1000, 5000, 9999])

    def test_behavior_switched_on_between_two_commands(self):
        # five commands pass (the fast lane), the sixth is on its way
        # (split anywhere), the mix becomes error: the sixth and every
        # later one get the error, the backend never sees them
        first = [resp(b'GET', b'k%d' % i) for i in range(5)]
        later = [resp(b'GET', b'key'), resp(b'SET', b'a', b'b'),
                 resp(b'GET', b'zz')]
        sixth = later[0]
        replies = bulk(b'abc') * 5
        error = b'-ERR vaurien: injected error\r\n'
        for split in range(len(sixth)):
            self.server.set_mix('dummy')
            self.backend.expect = b''.join(first)
            self.backend.reply, self.backend.split = replies, 0
            decisions = self.server.decision_count
            met = self.counts()
            with support.connect(self.server.address) as sock:
                sock.sendall(b''.join(first) + sixth[:split])
                self.assertEqual(support.recv_exactly(sock, len(replies)),
                                 replies)
                self.server.set_mix('error')
                sock.sendall(sixth[split:] + b''.join(later[1:]))
                self.assertEqual(support.recv_exactly(
                    sock, len(error) * len(later)), error * len(later),
                    'split at %d' % split)
            self.assertEqual(self.backend.got[-1], b''.join(first))
            self.assertEqual(self.server.decision_count - decisions,
                             len(later))
            now = self.counts()
            self.assertEqual(now['dummy'] - met['dummy'], 5)
            self.assertEqual(now['error'] - met['error'], len(later))

    def test_behavior_switched_off_again(self):
        # error with a warmup: the first two commands of one pipelined
        # write pass, the next ones get the error, each drawn on its own
        self.server.set_mix('error', {'error': {'warmup': 2}})
        commands = [resp(b'GET', b'k%d' % i) for i in range(5)]
        self.backend.steps = [(command, bulk(b'abc'))
                              for command in commands[:2]]
        error = b'-ERR vaurien: injected error\r\n'
        answer = bulk(b'abc') * 2 + error * 3
        got = talk(self.server.address, b''.join(commands), 0, len(answer))
        self.assertEqual(got, answer)
        self.assertEqual(self.counts()['error'], 5)
        # then dummy again: the fast lane takes over, every command counted
        self.server.set_mix('dummy')
        self.backend.steps = None
        self.backend.expect = b''.join(commands)
        self.backend.reply = bulk(b'abc') * 5
        before = self.counts()['dummy']
        got = talk(self.server.address, b''.join(commands), 0,
                   len(self.backend.reply))
        self.assertEqual(got, self.backend.reply)
        self.assertEqual(self.counts()['dummy'] - before, 5)

    def test_a_broken_reply_in_a_run_is_refused(self):
        # bulk strings of one size, one of them without its CRLF: the
        # parser refuses it (pass-through from there, one warning), and so
        # must the fast lane, however it checks runs
        commands = [resp(b'GET', b'k%d' % i) for i in range(6)]
        for bad in (2, 5):
            replies = [bulk(b'abc')] * 6
            replies[bad] = b'$3\r\nabcXY'
            self.backend.expect = b''.join(commands)
            self.backend.reply, self.backend.split = b''.join(replies), 0
            del self.warnings.lines[:]
            got = talk(self.server.address, self.backend.expect, 0,
                       len(self.backend.reply))
            self.assertEqual(got, self.backend.reply)
            self.assertEqual(len(self.warnings.lines), 1,
                             self.warnings.lines)
            self.assertIn('cannot frame', self.warnings.lines[0])

    def test_exchanges_in_the_connection_summary(self):
        # the fast lane counts per request, as the connection's summary
        # and statistics tell
        commands = [resp(b'GET', b'k%d' % i) for i in range(16)] * 4
        self.backend.expect = b''.join(commands)
        self.backend.reply = bulk(b'abc') * len(commands)
        self.backend.split = 0
        got = talk(self.server.address, self.backend.expect, 0,
                   len(self.backend.reply))
        self.assertEqual(got, self.backend.reply)
        conns = list(self.server.connections.values())
        deadline = time.time() + support.TIMEOUT
        while conns and time.time() < deadline:
            conns = list(self.server.connections.values())
            time.sleep(0.01)
        self.assertEqual(self.counts()['dummy'], len(commands))


class HTTPExactTest(ExactCase):
    protocol = 'http'
    probe = b'GET /probe HTTP/1.1\r\nHost: x\r\n\r\n'
    probe_answer = b'HTTP/1.1 50'

    HEAD_A = b'GET /a HTTP/1.1\r\nHost: x\r\n\r\n'
    REQUESTS = [
        HEAD_A,
        # a body with a blank line and a request line in it
        b'POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 39\r\n\r\n'
        b'a\r\n\r\nGET /x HTTP/1.1\r\nHost: y\r\n\r\nzzzz',
        b'POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
        b'\r\n5\r\nhello\r\n0\r\n\r\n',
        b'HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n',
        b'GET /e HTTP/1.1\r\nhost: x\r\nconnection: keep-alive\r\n\r\n',
        HEAD_A,
        b'GET /f HTTP/1.1\r\nHost: x\r\n\r\n',
        HEAD_A,
    ]
    OK_A = b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello'
    RESPONSES = [
        OK_A,
        # chunks with an extension (the parser's), then plain ones
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
        b'4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n',
        b'HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n'
        b'3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n',
        # HEAD: a length, no body
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n',
        # trailers
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
        b'2\r\nab\r\n0\r\nX-Trailer: 1\r\n\r\n',
        OK_A,
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        # a body that looks like a response
        b'HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\n'
        b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n',
    ]

    def test_every_split_both_ways(self):
        self.check_splits(self.REQUESTS, self.RESPONSES, len(self.REQUESTS))

    def test_keep_alive_runs(self):
        requests = [self.HEAD_A] * 50
        responses = [self.OK_A] * 50
        self.check_splits(requests, responses, 50,
                          steps=[0, 1, 27, 28, 29, 700])

    def test_behavior_switched_on_between_two_requests(self):
        first = [self.HEAD_A] * 3
        later = [self.HEAD_A] * 2
        for split in (0, 1, 10, len(self.HEAD_A) - 1):
            self.server.set_mix('dummy')
            self.backend.expect = b''.join(first)
            self.backend.reply, self.backend.split = self.OK_A * 3, 0
            met = self.counts()
            with support.connect(self.server.address) as sock:
                sock.sendall(b''.join(first) + later[0][:split])
                self.assertEqual(support.recv_exactly(
                    sock, len(self.OK_A) * 3), self.OK_A * 3)
                self.server.set_mix('error', {'error': {'code': 503}})
                sock.sendall(later[0][split:] + later[1])
                answers = b''
                while answers.count(b'HTTP/1.1 503') < 2:
                    data = sock.recv(65536)
                    self.assertTrue(data, answers)
                    answers += data
            self.assertEqual(self.backend.got[-1], b''.join(first))
            now = self.counts()
            self.assertEqual(now['dummy'] - met['dummy'], 3)
            self.assertEqual(now['error'] - met['error'], 2)


class MemcacheExactTest(ExactCase):
    protocol = 'memcache'
    probe = b'get probe\r\n'
    probe_answer = b'SERVER_ERROR '

    COMMANDS = [
        b'set k 0 0 6\r\na\r\nEND\r\n',
        b'get k\r\n',
        b'get k k2\r\n',
        b'set k2 0 0 3 noreply\r\nxyz\r\n',
        b'delete k\r\n',
        b'incr n 1\r\n',
        b'gets k2\r\n',
    ]
    REPLIES = [
        b'STORED\r\n',
        b'VALUE k 0 6\r\na\r\nEND\r\nEND\r\n',
        b'VALUE k 0 6\r\na\r\nEND\r\nVALUE k2 0 3\r\nxyz\r\nEND\r\n',
        b'DELETED\r\n',
        b'2\r\n',
        b'VALUE k2 0 3 7\r\nxyz\r\nEND\r\n',
    ]

    def test_every_split_both_ways(self):
        self.check_splits(self.COMMANDS, self.REPLIES, len(self.COMMANDS))


if __name__ == '__main__':
    unittest.main()
