"""memcache's fast lane (issue 14): runs of plain commands and of their
replies taken whole (``Memcache.run_commands``, ``run_replies``) frame the
streams exactly as the parsers do.

Two kinds of tests.  The lane's functions are called on a protocol bound
to a live proxy connection, on every prefix of a stream, and must take
exactly its whole plain messages, with the infos the parser gives them.
And a real proxy in this process, in front of a scripted backend on
127.0.0.1, must pass every byte both ways, count one exchange per command
and stay in step (a probe answered by the ``error`` behavior at the end),
whatever the reads' boundaries, with the parser's path mixed in (noreply,
meta commands, quiet batches, stats), and a behavior switched on in the
middle of a pipelined stream acts from the next command exactly.
Standard library only."""

import os
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import support  # noqa: E402
import test_framing_exact as exact  # noqa: E402
import vaurien  # noqa: E402

vaurien.load_plugins()

from protocols import _framing  # noqa: E402
from protocols.memcache import Memcache  # noqa: E402

# a pause between the pieces of a split stream, so that the proxy reads
# them apart (the loopback delivers at once)
PAUSE = 0.002
PROBE = b'get probe\r\n'
PROBE_ANSWER = b'SERVER_ERROR '


def value(key, data, cas=None):
    """The VALUE block of a get's (or gets') reply."""
    head = b'VALUE %s 0 %d' % (key, len(data))
    if cas is not None:
        head += b' %d' % cas
    return head + b'\r\n' + data + b'\r\n'


# plain commands (the lane's) and their replies; the data and the values
# look like commands and replies, with CRLFs in them
PLAIN = [
    b'get k\r\n',
    b'get k k2 k3\r\n',
    b'gets k2\r\n',
    b'set k 0 0 10\r\nEND\r\nget x\r\n',
    b'add k3 5 60 0\r\n\r\n',
    b'cas k2 0 0 3 77\r\nxyz\r\n',
    b'delete k\r\n',
    b'incr n 1\r\n',
    b'decr n 1\n',
    b'touch k2 10\r\n',
    b'gat 10 k2\r\n',
]
PLAIN_REPLIES = [
    b'END\r\n',
    value(b'k', b'END\r\nVALUE z 0 1\r\n') + value(b'k3', b'') + b'END\r\n',
    value(b'k2', b'xyz', cas=7) + b'END\r\n',
    b'STORED\r\n',
    b'NOT_STORED\r\n',
    b'EXISTS\r\n',
    b'DELETED\r\n',
    b'18446744073709551615\r\n',
    b'NOT_FOUND\r\n',
    b'TOUCHED\r\n',
    value(b'k2', b'\r\n' * 3) + b'END\r\n',
]
# what the lane leaves to the parser (each with its replies, b'' for none)
OTHERS = [
    (b'set k 0 0 3 noreply\r\nabc\r\n', b''),
    (b'delete k2 noreply\r\n', b''),
    (b'GET k\r\n', b'END\r\n'),
    (b'mg k v\r\n', b'VA 2\r\nab\r\n'),
    (b'ms k 2 T0\r\nab\r\n', b'HD\r\n'),
    (b'stats\r\n', b'STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n'),
    (b'version\r\n', b'VERSION 1.6.21\r\n'),
    (b'get\tk\r\n', b'END\r\n'),
    (b'get ' + b'k ' * 1100 + b'\r\n', b'END\r\n'),
]
# replies the lane leaves to the parser, besides those above
OTHER_REPLIES = [
    b'VA 2\r\nab\r\n', b'HD\r\n', b'STAT pid 1\r\nEND\r\n',
    b'VERSION 1.6.21\r\n',
    b'SERVER_ERROR out of memory\r\n',
    b'VALUE k 0 3\r\nabcEND\r\n',       # no CRLF after the value
    b'VALUE k 0 3\r\nab',                 # not all there
    b'ST',
    b'VALUE k 0 1\r\na\r\nVA 1\r\nb\r\n',
]


def parser_infos(data, replies=False):
    """What the parser alone makes of *data* (one stream, whole
    messages): the infos of its messages' starts (each without ``text``,
    which only a match needs), and where each message ends."""
    protocol = Memcache()
    # the lane declines: the parser frames everything
    protocol.run_commands = protocol.run_replies = (
        lambda buf, pos: (pos, None))
    parser = _framing.StreamParser(protocol.parse_responses() if replies
                                   else protocol.parse_requests())
    parser.feed(data)
    infos, ends, at = [], [], 0
    while True:
        event = parser.next_event()
        if event is None:
            break
        kind, info = event
        if kind == 'data':
            at += len(info)
        elif kind == 'start':
            info = dict(info)
            info.pop('text', None)
            infos.append(info)
        elif kind == 'end':
            ends.append(at)
        else:
            raise AssertionError('the parser: %r' % (event,))
    return infos, ends


def record_then_wait(server, conn):
    """A backend that answers nothing (the lane tests only need a live
    connection)."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


class ProxyCase(unittest.TestCase):
    """A proxy speaking memcache (``self.server``) in front of the
    backend ``make_backend()`` returns, the proxy's warnings kept."""

    def make_backend(self):
        raise NotImplementedError

    def setUp(self):
        self.warnings = exact.Warnings()
        vaurien.logger.addHandler(self.warnings)
        self.addCleanup(vaurien.logger.removeHandler, self.warnings)
        self.backend = self.make_backend()
        self.backend.start()
        self.addCleanup(self.backend.stop)
        self.proxy = support.Proxy(self.backend.address, protocol='memcache')
        self.proxy.__enter__()
        self.addCleanup(self.proxy.__exit__, None, None, None)
        self.server = self.proxy.server


class LaneAgreesWithParserTest(ProxyCase):
    """The lane's functions, on every prefix of a stream, against the
    parser's framing of the same bytes."""

    def make_backend(self):
        return support.ThreadedServer(record_then_wait)

    def setUp(self):
        super(LaneAgreesWithParserTest, self).setUp()
        self.client = support.connect(self.server.address)
        self.addCleanup(self.client.close)
        deadline = time.time() + support.TIMEOUT
        while not self.server.connections and time.time() < deadline:
            time.sleep(0.005)
        conn = list(self.server.connections.values())[0]
        # a protocol of its own, bound to the live connection (what the
        # lane asks of it: the mix in force, its toxics)
        self.lane = Memcache()
        self.lane.connection = conn
        self.conn = conn

    def test_commands_on_every_prefix(self):
        data = b''.join(PLAIN)
        infos, ends = parser_infos(data)
        self.assertEqual(len(ends), len(PLAIN))
        for size in range(len(data) + 1):
            whole = [end for end in ends if end <= size]
            pos, got = self.lane.run_commands(data[:size], 0)
            self.assertEqual(pos, whole[-1] if whole else 0,
                             'prefix of %d bytes' % size)
            self.assertEqual(got, infos[:len(whole)],
                             'prefix of %d bytes' % size)
        # from any boundary on, too
        for start in ends[:-1]:
            pos, got = self.lane.run_commands(data, start)
            self.assertEqual(pos, len(data))
            self.assertEqual(got, infos[ends.index(start) + 1:])

    def test_the_parser_keeps_the_others(self):
        for command, _ in OTHERS:
            data = PLAIN[0] + command + PLAIN[1]
            pos, got = self.lane.run_commands(data, 0)
            self.assertEqual(pos, len(PLAIN[0]), command)
            self.assertEqual(len(got), 1, command)
        # nor what is not all there, nor a data block without its CRLF
        for rest in (b'get k', b'set k 0 0 3\r\nab', b'set k 0 0 3\r\nabcd'):
            pos, got = self.lane.run_commands(PLAIN[0] + rest, 0)
            self.assertEqual(pos, len(PLAIN[0]), rest)

    def test_replies_on_every_prefix(self):
        data = b''.join(PLAIN_REPLIES)
        _, ends = parser_infos(data, replies=True)
        self.assertEqual(len(ends), len(PLAIN_REPLIES))
        infos, _ = parser_infos(b''.join(PLAIN))
        entries = [(self.conn.plain, info) for info in infos]
        for size in range(len(data) + 1):
            whole = [end for end in ends if end <= size]
            expected = self.lane.expected
            expected.clear()
            expected.extend(entries)
            pos, got = self.lane.run_replies(data[:size], 0)
            self.assertIsNone(got)
            self.assertEqual(pos, whole[-1] if whole else 0,
                             'prefix of %d bytes' % size)
            # one entry each, left as soon as taken
            self.assertEqual(list(expected), entries[len(whole):],
                             'prefix of %d bytes' % size)

    def test_the_parser_keeps_other_replies(self):
        infos, _ = parser_infos(b''.join(PLAIN))
        for reply in OTHER_REPLIES:
            data = PLAIN_REPLIES[0] + reply + PLAIN_REPLIES[0]
            self.lane.expected.clear()
            self.lane.expected.extend((self.conn.plain, info)
                                      for info in infos[:3])
            pos, _ = self.lane.run_replies(data, 0)
            self.assertEqual(pos, len(PLAIN_REPLIES[0]), reply)
            self.assertEqual(len(self.lane.expected), 2, reply)

    def test_one_by_one_while_a_behavior_may_act(self):
        # each command its own message, as the parser frames it
        data = b''.join(PLAIN)
        infos, ends = parser_infos(data)
        self.server.set_mix('error', {'error': {'inject': True}})
        pos, got, messages = self.lane.run_commands(data + b'get', 0)
        self.assertEqual((pos, got), (len(data), None))
        self.assertEqual(messages, list(zip(ends, infos, infos)))
        # and their replies, while the behavior may act on them
        entries = []
        for info in infos:
            exchange = self.conn.start_exchange(info['request'])
            self.assertFalse(self.lane.passes(exchange))
            entries.append((exchange, info))
        data = b''.join(PLAIN_REPLIES)
        _, ends = parser_infos(data, replies=True)
        self.lane.expected.extend(entries)
        pos, got, messages = self.lane.run_replies(data + b'VALUE', 0)
        self.assertEqual((pos, got), (len(data), None))
        self.assertEqual(messages, [(end, {}, {}) for end in ends])
        # their entries leave expected as their ENDs are handled
        self.assertEqual(list(self.lane.expected), entries)

    def test_nothing_while_a_match_is_in_force(self):
        # a match reads the words of each command: the parser's
        self.server.set_mix('error', {'error': {'match': 'get'}})
        pos, got = self.lane.run_commands(b''.join(PLAIN), 0)
        self.assertEqual((pos, got), (0, None))

    def test_no_reply_beyond_the_requests_awaiting_one(self):
        self.lane.expected.clear()
        pos, _ = self.lane.run_replies(b''.join(PLAIN_REPLIES), 0)
        self.assertEqual(pos, 0)
        # nor an answer some behavior acts on, nor one to drop
        infos, _ = parser_infos(b'get k\r\n')
        self.lane.expected.append((self.conn.plain,
                                   dict(infos[0], drop_answer=True)))
        pos, _ = self.lane.run_replies(b'END\r\n', 0)
        self.assertEqual(pos, 0)

    def test_nothing_inside_a_quiet_batch(self):
        # after a quiet meta command, commands await no answer of their
        # own until the mn: the parser frames them
        protocol = Memcache()
        protocol.connection = self.conn
        parser = _framing.StreamParser(protocol.parse_requests())
        parser.feed(b'get a\r\nmg b v q\r\nget c\r\n')
        kinds = []
        while True:
            event = parser.next_event()
            if event is None:
                break
            kinds.append(event[0] if event[0] != 'start' else
                         ('start', event[1]['cmd'], event[1]['replies']))
        self.assertEqual(kinds, ['run', ('start', b'mg', 0), 'data', 'end',
                                 ('start', b'get', 0), 'data', 'end'])


class Script(support.ThreadedServer):
    """A backend that reads exactly ``expect`` bytes, then answers
    ``reply`` in two sends split at ``split`` (a pause between); what it
    read goes to ``self.got``, a list of reads per connection (see
    ``read()``).  With ``steps``
    (a list of ``(expect, reply)``), it reads and answers each in turn."""

    def __init__(self):
        super(Script, self).__init__(self._answer)
        self.expect = self.reply = b''
        self.split = 0
        self.steps = None
        self.got = []

    def read(self):
        """What the last connection read."""
        return b''.join(self.got[-1])

    def _answer(self, server, conn):
        # kept before each answer: the client may look once it has it
        got = []
        self.got.append(got)
        for expect, reply in self.steps or [(self.expect, self.reply)]:
            got.append(support.recv_exactly(conn, len(expect)))
            cut = self.split if not self.steps else 0
            if cut:
                conn.sendall(reply[:cut])
                time.sleep(PAUSE)
                reply = reply[cut:]
            if reply:
                conn.sendall(reply)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


class LaneThroughProxyTest(ProxyCase):
    """Streams through a real proxy: exact bytes, exact counts, in step."""

    def make_backend(self):
        return Script()

    #: the mix put back after a probe: (text, options)
    mix = ('dummy', None)

    def talk(self, request, cuts, size, probe=True):
        """Send *request* in pieces at *cuts* (a pause between), read
        *size* bytes back; then the probe, under ``error``, on the same
        connection, and ``self.mix`` again."""
        with support.connect(self.server.address) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cuts = sorted(set([0, len(request)] + list(cuts)))
            for start, stop in zip(cuts, cuts[1:]):
                sock.sendall(request[start:stop])
                if stop < len(request):
                    time.sleep(PAUSE)
            answer = support.recv_exactly(sock, size)
            if probe:
                self.server.set_mix('error')
                try:
                    sock.sendall(PROBE)
                    self.assertEqual(support.recv_exactly(
                        sock, len(PROBE_ANSWER)), PROBE_ANSWER,
                        'the probe after cuts at %s' % cuts)
                finally:
                    self.server.set_mix(*self.mix)
            return answer

    def check(self, commands, replies, splits=None, behavior='dummy'):
        """Every split of the joined *commands* and of the joined
        *replies* (at the same place, modulo the shorter's length): the
        bytes pass exactly, each command is one exchange (of
        *behavior*)."""
        request, reply = b''.join(commands), b''.join(replies)
        self.backend.expect, self.backend.reply = request, reply
        if splits is None:
            splits = range(max(len(request), len(reply)))
        for split in splits:
            self.backend.split = split % len(reply)
            before = self.server.exchange_counts[behavior]
            got = self.talk(request, [len(commands[0]),
                                      split % len(request)], len(reply))
            self.assertEqual(got, reply, 'split at %d' % split)
            self.assertEqual(self.warnings.lines, [], 'split at %d' % split)
            self.assertEqual(self.backend.read(), request,
                             'split at %d' % split)
            self.assertEqual(self.server.exchange_counts[behavior] - before,
                             len(commands), 'split at %d' % split)

    def test_every_split_both_ways(self):
        self.check(PLAIN, PLAIN_REPLIES)

    def test_every_split_with_the_parser_in_between(self):
        # plain runs broken by what the parser frames, both ways
        commands, replies = [], []
        for index, (command, reply) in enumerate(OTHERS[:7]):
            commands += [PLAIN[index], command, PLAIN[index + 1]]
            replies += [PLAIN_REPLIES[index], reply,
                        PLAIN_REPLIES[index + 1]]
        self.check(commands, replies,
                   splits=range(0, len(b''.join(commands)), 3))

    def test_pipelined_runs_in_one_read(self):
        commands, replies = PLAIN * 60, PLAIN_REPLIES * 60
        self.check(commands, replies, splits=[0, 1, 700, 4000, 7001])

    def test_one_by_one_under_a_behavior(self):
        # delay acts on every command (sleep 0: it only runs): each is its
        # own message, framed by the lane, the replies a run.  Before a
        # behavior acts, the answers to the earlier commands come back:
        # the backend answers each command in turn
        self.mix = ('delay', {'delay': {'sleep': 0}})
        self.server.set_mix(*self.mix)
        self.backend.steps = list(zip(PLAIN, PLAIN_REPLIES))
        self.check(PLAIN, PLAIN_REPLIES, behavior='delay')

    def test_one_by_one_under_a_toxic(self):
        # a toxic acts on the answers: each reply is its own message
        toxic = vaurien.make_toxic(self.server, {
            'type': 'latency', 'stream': 'downstream',
            'attributes': {'latency': 0}}, self.server.toxics)
        self.server.toxics.add(toxic)
        self.check(PLAIN, PLAIN_REPLIES,
                   splits=range(0, len(b''.join(PLAIN_REPLIES)), 2))

    def test_a_quiet_batch_between_runs(self):
        # get c inside the batch awaits no answer of its own: its END is
        # read as a quiet command's, until the MN
        commands = [b'get a\r\n', b'mg b v q\r\n', b'get c\r\n', b'mn\r\n',
                    b'get d\r\n', b'gets e\r\n']
        replies = [value(b'a', b'1') + b'END\r\n', b'VA 1\r\n2\r\n',
                   b'END\r\n', b'MN\r\n', b'END\r\n',
                   value(b'e', b'3', cas=1) + b'END\r\n']
        self.check(commands, replies)

    def test_behavior_switched_on_between_two_commands(self):
        # five gets pass, the sixth (a set) is on its way, split anywhere;
        # the mix becomes error: every later command gets the error, the
        # backend never sees them; the sixth too, unless its line was all
        # there (its exchange started then: it passes, data and all)
        first = [b'get k%d\r\n' % index for index in range(5)]
        line = b'set key 0 0 10\r\n'
        later = [line + b'get x\r\nEND\r\n', b'get a b\r\n',
                 b'delete k\r\n']
        replies = b'END\r\n' * 5
        error = b'SERVER_ERROR out of memory storing object\r\n'
        for split in range(len(later[0])):
            started = split >= len(line)
            self.server.set_mix('dummy')
            self.backend.steps = [(b''.join(first), replies)]
            if started:
                self.backend.steps.append((later[0], b'STORED\r\n'))
            answer = error * (len(later) - started)
            if started:
                answer = b'STORED\r\n' + answer
            before = self.server.exchange_counts
            with support.connect(self.server.address) as sock:
                sock.sendall(b''.join(first) + later[0][:split])
                self.assertEqual(support.recv_exactly(sock, len(replies)),
                                 replies)
                self.server.set_mix('error')
                sock.sendall(later[0][split:] + b''.join(later[1:]))
                self.assertEqual(support.recv_exactly(sock, len(answer)),
                                 answer, 'split at %d' % split)
            self.assertEqual(self.backend.read(), b''.join(
                first + later[:started]))
            now = self.server.exchange_counts
            self.assertEqual(now['dummy'] - before['dummy'], 5 + started)
            self.assertEqual(now['error'] - before['error'],
                             len(later) - started)

    def test_behavior_switched_off_again(self):
        # error with a warmup: the first two gets of one pipelined write
        # pass, the next ones get the error; then dummy: the lane again
        self.server.set_mix('error', {'error': {'warmup': 2}})
        commands = [b'get k%d\r\n' % index for index in range(5)]
        hit = value(b'k', b'abc') + b'END\r\n'
        self.backend.steps = [(command, hit) for command in commands[:2]]
        error = b'SERVER_ERROR out of memory storing object\r\n'
        answer = hit * 2 + error * 3
        got = self.talk(b''.join(commands), [], len(answer), probe=False)
        self.assertEqual(got, answer)
        self.assertEqual(self.server.exchange_counts['error'], 5)
        self.server.set_mix('dummy')
        self.backend.steps = None
        self.check(commands, [hit] * 5, splits=[0, 3, 20])

    def test_a_broken_value_in_a_run_is_refused(self):
        # a value without its CRLF: the parser refuses it (pass-through
        # from there, one warning), and so must the lane
        commands = [b'get k%d\r\n' % index for index in range(6)]
        for bad in (0, 3, 5):
            replies = [value(b'k', b'abc') + b'END\r\n'] * 6
            replies[bad] = b'VALUE k 0 3\r\nabcXYEND\r\n'
            self.backend.expect = b''.join(commands)
            self.backend.reply = b''.join(replies)
            self.backend.split = 0
            del self.warnings.lines[:]
            got = self.talk(self.backend.expect, [],
                            len(self.backend.reply), probe=False)
            self.assertEqual(got, self.backend.reply)
            self.assertEqual(len(self.warnings.lines), 1,
                             self.warnings.lines)
            self.assertIn('cannot frame', self.warnings.lines[0])

    def test_a_broken_data_block_in_a_run_is_refused(self):
        commands = [b'get k\r\n', b'set k 0 0 3\r\nabcd\r\n', b'get k\r\n']
        self.backend.expect = b''.join(commands)
        self.backend.reply = b'END\r\n'
        got = self.talk(self.backend.expect, [], len(self.backend.reply),
                        probe=False)
        self.assertEqual(got, b'END\r\n')
        deadline = time.time() + support.TIMEOUT
        while not self.warnings.lines and time.time() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(self.warnings.lines), 1, self.warnings.lines)
        self.assertIn('cannot frame', self.warnings.lines[0])
        self.assertEqual(self.backend.read(), self.backend.expect)


if __name__ == '__main__':
    unittest.main()
