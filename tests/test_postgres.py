"""The postgres plugin without a real server: its framing over recorded
byte streams (split at every byte), the start-up variants, and the error
behavior's answers, byte for byte as the protocol's documentation lays
them out.  Standard library only."""

import os
import random
import socket
import sys
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import vaurien  # noqa: E402

vaurien.load_plugins()

from protocols import postgres  # noqa: E402
from protocols._framing import StreamParser  # noqa: E402
from tests.test_protocols import (Logs, Pair, mutate,  # noqa: E402
                                  read_some, replay)

TIMEOUT = 5.0


# Messages, built here from the documentation's layouts (not with the
# plugin's own helpers) ###################################################

def msg(kind, payload=b''):
    """Byte1(kind) Int32(length, itself included) payload."""
    return kind + (len(payload) + 4).to_bytes(4, 'big') + payload


def cstr(text):
    return text + b'\x00'


def startup(**params):
    body = (196608).to_bytes(4, 'big') + b''.join(
        cstr(k.encode()) + cstr(v.encode()) for k, v in params.items()) + \
        b'\x00'
    return (len(body) + 4).to_bytes(4, 'big') + body


SSL_REQUEST = b'\x00\x00\x00\x08\x04\xd2\x16\x2f'       # 1234 5679
GSSENC_REQUEST = b'\x00\x00\x00\x08\x04\xd2\x16\x30'    # 1234 5680
CANCEL = b'\x00\x00\x00\x10\x04\xd2\x16\x2e' + b'\x00\x00\x30\x39' + \
    b'\x12\x34\x56\x78'                                 # 1234 5678


def ready(status=b'I'):
    return msg(b'Z', status)


def query(sql):
    return msg(b'Q', cstr(sql))


def command_complete(tag):
    return msg(b'C', cstr(tag))


def row_description(*names):
    fields = b''.join(cstr(name) + b'\x00\x00\x00\x00\x00\x00'
                      b'\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00'
                      for name in names)
    return msg(b'T', len(names).to_bytes(2, 'big') + fields)


def data_row(*values):
    return msg(b'D', len(values).to_bytes(2, 'big') + b''.join(
        len(v).to_bytes(4, 'big') + v for v in values))


def parse(sql, name=b''):
    return msg(b'P', cstr(name) + cstr(sql) + b'\x00\x00')


def bind(statement=b'', portal=b'', *values):
    return msg(b'B', cstr(portal) + cstr(statement) + b'\x00\x00' +
               len(values).to_bytes(2, 'big') + b''.join(
                   len(v).to_bytes(4, 'big') + v for v in values) +
               b'\x00\x00')


def execute(portal=b''):
    return msg(b'E', cstr(portal) + b'\x00\x00\x00\x00')


def describe(kind=b'P', name=b''):
    return msg(b'D', kind + cstr(name))


SYNC = msg(b'S')
FLUSH = msg(b'H')
TERMINATE = msg(b'X')
PARSE_COMPLETE = msg(b'1')
BIND_COMPLETE = msg(b'2')
NO_DATA = msg(b'n')


def notice(text):
    return msg(b'N', b'SNOTICE\x00VNOTICE\x00C00000\x00M' + cstr(text) +
               b'\x00')


def notification(channel, payload):
    return msg(b'A', b'\x00\x00\x30\x39' + cstr(channel) + cstr(payload))


def parameter_status(name, value):
    return msg(b'S', cstr(name) + cstr(value))


LOGIN = [
    ('c', startup(user='app', database='db')),
    ('s', msg(b'R', b'\x00\x00\x00\x05' + b'salt')),    # MD5 password
    ('c', msg(b'p', cstr(b'md5' + b'0' * 32))),
    ('s', msg(b'R', b'\x00\x00\x00\x00') +              # AuthenticationOk
     parameter_status(b'server_version', b'15.0') +
     msg(b'K', b'\x00\x00\x30\x39\x12\x34\x56\x78') + ready()),
]

SESSION = LOGIN + [
    # 1: a simple query and its rows
    ('c', query(b'SELECT a, b FROM t')),
    ('s', row_description(b'a', b'b') + data_row(b'1', b'x') +
     notice(b'mid-answer') + data_row(b'2', b'y') +
     command_complete(b'SELECT 2') + ready()),
    # a notification and a parameter's new value, between answers
    ('s', notification(b'chan', b'hello') +
     parameter_status(b'TimeZone', b'UTC')),
    # 2: BEGIN
    ('c', query(b'/* a comment */ BEGIN')),
    ('s', command_complete(b'BEGIN') + ready(b'T')),
    # 3, 4: two pipelined extended-protocol groups, each to its Sync
    ('c', parse(b'INSERT INTO t VALUES ($1)', b's1') + bind(b's1', b'',
                                                            b'7') +
     describe() + execute() + SYNC +
     bind(b's1', b'', b'8') + execute() + SYNC),
    ('s', PARSE_COMPLETE + BIND_COMPLETE + NO_DATA +
     command_complete(b'INSERT 0 1') + ready(b'T') + BIND_COMPLETE +
     command_complete(b'INSERT 0 1') + ready(b'T')),
    # 5: COPY in: its data belongs to its exchange
    ('c', query(b'COPY t FROM STDIN')),
    ('s', msg(b'G', b'\x00\x00\x01\x00\x00')),
    ('c', msg(b'd', b'1\n' * 50) + msg(b'd', b'2\n') + msg(b'c')),
    ('s', command_complete(b'COPY 51') + ready(b'T')),
    # 6: COPY out
    ('c', query(b'COPY t TO STDOUT')),
    ('s', msg(b'H', b'\x00\x00\x01\x00\x00') + msg(b'd', b'1\n' * 30) +
     msg(b'd', b'2\n') + msg(b'c') + command_complete(b'COPY 31') +
     ready(b'T')),
    # 7: COMMIT
    ('c', query(b'COMMIT')),
    ('s', command_complete(b'COMMIT') + ready()),
    # 8: COPY through the extended protocol (libpq adds a Sync after it)
    ('c', parse(b'COPY t FROM STDIN') + bind() + execute() + SYNC),
    ('s', PARSE_COMPLETE + BIND_COMPLETE + msg(b'G', b'\x00\x00\x00')),
    ('c', msg(b'd', b'3\n') + msg(b'c') + SYNC),
    ('s', command_complete(b'COPY 1') + ready()),
    # 9: a bound statement with no Parse: its SQL is known from before
    ('c', bind(b's1', b'', b'9') + execute() + SYNC),
    ('s', BIND_COMPLETE + command_complete(b'INSERT 0 1') + ready()),
    # 10: asyncpg prepares with a Flush and no Sync: no ReadyForQuery
    ('c', parse(b'SELECT 1', b'a1') + describe(b'S', b'a1') + FLUSH),
    ('s', PARSE_COMPLETE + msg(b't', b'\x00\x00') + NO_DATA),
    # 11: and goes on with a Query
    ('c', query(b'SELECT 2')),
    ('s', row_description(b'x') + data_row(b'2') +
     command_complete(b'SELECT 1') + ready()),
    ('c', TERMINATE),
]
SESSION_EXCHANGES = 11


def exchanges_of(steps):
    """Drive the plugin's two parsers over *steps*, each side's bytes fed
    in the pieces given; returns (requests, answers, client bytes, server
    bytes) where requests are the infos of the exchanges started."""
    proto = postgres.Postgres()
    requests = StreamParser(proto.parse_requests())
    responses = StreamParser(proto.parse_responses())
    started, answered = [], []
    out = {'c': [], 's': []}
    for who, pieces in steps:
        parser = requests if who == 'c' else responses
        for piece in pieces:
            parser.feed(piece)
            while True:
                event = parser.next_event()
                if event is None:
                    break
                kind, value = event
                if kind == 'data':
                    out[who].append(value)
                elif kind == 'start' and who == 'c':
                    if not value.get('setup') and not value.get('copy'):
                        started.append(value)
                        for _ in range(value['replies']):
                            proto.expected.append((None, value))
                elif kind == 'end' and who == 's' and not value.get('push'):
                    answered.append(proto.expected.popleft()[1])
                elif kind in ('pass', 'error'):
                    raise AssertionError('%s: %s' % (kind, value))
    return started, answered, b''.join(out['c']), b''.join(out['s'])


class FramingTest(unittest.TestCase):
    """The recorded session, whole, split at every byte, a byte at a time:
    the same exchanges, every byte passed on in order."""

    def check(self, steps):
        whole = exchanges_of([(who, [data]) for who, data in steps])
        started, answered, client, server = whole
        self.assertEqual(client, b''.join(d for w, d in steps if w == 'c'))
        self.assertEqual(server, b''.join(d for w, d in steps if w == 's'))
        self.assertEqual([info for info in started if info['replies']],
                         answered)
        return whole

    def test_session(self):
        started, _, _, _ = self.check(SESSION)
        self.assertEqual([info['request'] for info in started], [
            'SELECT', 'BEGIN', 'INSERT', 'INSERT', 'COPY', 'COPY', 'COMMIT',
            'COPY', 'INSERT', 'SELECT', 'SELECT'])
        self.assertEqual(started[9]['replies'], 0)
        self.assertEqual(started[0]['sql'], 'SELECT a, b FROM t')
        self.assertEqual(started[0]['cmd'], b'SELECT')
        self.assertEqual(started[3]['sql'], 'INSERT INTO t VALUES ($1)')
        self.assertEqual(len(started), SESSION_EXCHANGES)

    def test_split_at_every_byte(self):
        whole = self.check(SESSION)
        for index, (who, data) in enumerate(SESSION):
            for cut in range(1, len(data)):
                steps = [(w, [d]) for w, d in SESSION]
                steps[index] = (who, [data[:cut], data[cut:]])
                self.assertEqual(exchanges_of(steps), whole,
                                 'step %d cut at %d' % (index, cut))

    def test_a_byte_at_a_time(self):
        whole = self.check(SESSION)
        steps = [(who, [data[i:i + 1] for i in range(len(data))])
                 for who, data in SESSION]
        self.assertEqual(exchanges_of(steps), whole)

    def test_first_word(self):
        for sql, word in [('select 1', 'SELECT'), ('  -- hi\n  commit', 'COMMIT'),
                          ('/* a */ /* b */insert', 'INSERT'), ('', ''),
                          ('(select 1)', '')]:
            self.assertEqual(postgres.first_word(sql), word, sql)


class FuzzTest(unittest.TestCase):
    """Seeded mutations of the recorded session through the two parsers:
    every byte comes out, in order, up to where framing stops and the rest
    is passed on whole; the parser never loses one."""

    def test_mutations_keep_every_byte(self):
        rng = random.Random('vaurien-fuzz-postgres')
        stopped = 0
        for case in range(300):
            steps = mutate(rng, SESSION)
            proto = postgres.Postgres()
            parsers = {'c': StreamParser(proto.parse_requests()),
                       's': StreamParser(proto.parse_responses())}
            out = {'c': [], 's': []}
            for who, data in steps:
                parser = parsers[who]
                parser.feed(data)
                while True:
                    event = parser.next_event()
                    if event is None:
                        break
                    kind, value = event
                    if kind == 'data':
                        out[who].append(value)
                    elif kind == 'start' and who == 'c' and not (
                            value.get('setup') or value.get('copy')):
                        for _ in range(value['replies']):
                            proto.expected.append((None, value))
                    elif kind == 'end' and who == 's' and not value.get(
                            'push') and proto.expected:
                        proto.expected.popleft()
                    elif kind in ('pass', 'error'):
                        stopped += 1
                        # both ways fall back together, as the proxy does
                        for other in 'cs':
                            out[other].append(parsers[other].rest())
                            parsers[other] = _Plain()
                        break
            for who in 'cs':
                out[who].append(parsers[who].rest())
                self.assertEqual(b''.join(out[who]), b''.join(
                    d for w, d in steps if w == who), 'case %d' % case)
        self.assertGreater(stopped, 0)


class _Plain(object):
    """Plain pass-through after a fall-back: what is fed comes out."""

    finished = True
    events = ()

    def __init__(self):
        self.fed = []

    def feed(self, data):
        self.fed.append(data)

    def next_event(self):
        return None

    def rest(self):
        data, self.fed = b''.join(self.fed), []
        return data


class SessionTest(unittest.TestCase):
    """Through a real proxy: every byte passes, one exchange per query or
    Sync group, the start-up variants, and pass-through when the stream
    cannot be framed."""

    def check(self, steps, exchanges, warnings=0):
        logs = Logs()
        vaurien.logger.addHandler(logs)
        try:
            to_backend, to_client, server = replay('postgres', steps)
        finally:
            vaurien.logger.removeHandler(logs)
        self.assertEqual(to_backend, b''.join(d for w, d in steps
                                              if w == 'c'))
        self.assertEqual(to_client, b''.join(d for w, d in steps
                                             if w == 's'))
        self.assertEqual(len(logs.lines), warnings, logs.lines)
        self.assertEqual(server.exchange_counts['dummy'], exchanges)
        return logs.lines

    def test_session(self):
        self.check(SESSION, SESSION_EXCHANGES)

    def test_ssl_refused_then_plain(self):
        self.check([('c', SSL_REQUEST), ('s', b'N')] + SESSION,
                   SESSION_EXCHANGES)

    def test_gss_then_ssl_refused(self):
        self.check([('c', GSSENC_REQUEST), ('s', b'N'), ('c', SSL_REQUEST),
                    ('s', b'N')] + SESSION, SESSION_EXCHANGES)

    def test_ssl_accepted_passes_through(self):
        # from the server's S on, TLS: an exchange per read, as under tcp
        self.check([('c', SSL_REQUEST), ('s', b'S'),
                    ('c', b'\x16\x03\x01\x00\x05hello'),
                    ('s', b'\x16\x03\x03\x00\x05world'),
                    ('c', b'\x17\x03\x03\x00\x03abc')], 2)

    def test_direct_tls_passes_through(self):
        self.check([('c', b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03'),
                    ('s', b'\x16\x03\x03\x00\x05world')], 0)

    def test_cancel_request(self):
        self.check([('c', CANCEL)], 0)

    def test_malformed_falls_back_with_one_warning(self):
        lines = self.check(LOGIN + [('c', b'\x00garbage'),
                                    ('s', b'and more \xff')], 0, 1)
        self.assertIn('passing this connection through as plain tcp',
                      lines[0][1])

    def test_malformed_answer_falls_back(self):
        lines = self.check(LOGIN + [('c', query(b'SELECT 1')),
                                    ('s', b'\x00\x01 nonsense'),
                                    ('c', query(b'SELECT 2'))], 2, 1)
        self.assertIn("backend's stream", lines[0][1])

    def test_flush_goes_on_before_the_sync(self):
        """A client that sends Flush waits for the answers before its
        Sync: every message of the group goes on at once."""
        pair = Pair('postgres')
        self.addCleanup(pair.close)
        login(pair)
        for sent in (parse(b'SELECT $1', b's2') + describe(b'S', b's2') +
                     FLUSH, bind(b's2') + FLUSH, parse(b'SELECT 2') + FLUSH,
                     execute() + SYNC):
            pair.client.sendall(sent)
            self.assertEqual(read_some(pair.backend, len(sent), TIMEOUT),
                             sent)
            answer = PARSE_COMPLETE
            pair.backend.sendall(answer)
            self.assertEqual(read_some(pair.client, len(answer), TIMEOUT),
                             answer)

    def test_decision_names_the_statement(self):
        pair = Pair('postgres', 'delay', {'delay': {'sleep': 0}})
        self.addCleanup(pair.close)
        login(pair)
        pair.client.sendall(query(b'  update t set a = 1'))
        self.assertEqual(read_some(pair.backend, 25, TIMEOUT),
                         query(b'  update t set a = 1'))
        decisions = list(pair.server.decisions)
        self.assertEqual(decisions[-1]['request'], 'UPDATE')


def login(pair, status=b'I'):
    """The start-up through *pair*, ending with ReadyForQuery(*status*)."""
    for who, data in LOGIN[:-1] + [('s', LOGIN[-1][1][:-6] +
                                    ready(status))]:
        if who == 'c':
            pair.client.sendall(data)
            assert read_some(pair.backend, len(data), TIMEOUT) == data
        else:
            pair.backend.sendall(data)
            assert read_some(pair.client, len(data), TIMEOUT) == data


#: ErrorResponse as the documentation lays it out: Byte1('E'),
#: Int32 length, then fields (a Byte1 code and a String each): S severity,
#: V severity never translated, C SQLSTATE, M message, H hint; a zero byte
#: ends them
def documented_error(severity, state, text, hint=None):
    fields = b'S' + severity + b'\x00' + b'V' + severity + b'\x00' + \
        b'C' + state + b'\x00' + b'M' + text + b'\x00'
    if hint:
        fields += b'H' + hint + b'\x00'
    body = fields + b'\x00'
    return b'E' + (len(body) + 4).to_bytes(4, 'big') + body


class ErrorAnswerTest(unittest.TestCase):
    """``error`` answers ErrorResponse and ReadyForQuery, byte for byte."""

    def pair(self, options=None, behavior='error'):
        pair = Pair('postgres', behavior, {behavior: options or {}})
        self.addCleanup(pair.close)
        return pair

    def answer(self, options, sql=b'SELECT 1', status=b'I', size=None):
        """What the client gets for *sql* (*size* bytes, or what comes
        within half a second)."""
        pair = self.pair(options)
        login(pair, status)
        pair.client.sendall(query(sql))
        if size is None:
            return pair, read_some(pair.client, 1000, 0.5)
        return pair, read_some(pair.client, size, TIMEOUT)

    def test_each_named_code(self):
        cases = [
            ({'code': 40001}, b'ERROR', b'40001', b'could not serialize '
             b'access due to concurrent update', b'The transaction might '
             b'succeed if retried.'),
            ({'message': '40P01'}, b'ERROR', b'40P01', b'deadlock detected',
             b'See server log for query details.'),
            ({'message': 'deadlock_detected'}, b'ERROR', b'40P01',
             b'deadlock detected', b'See server log for query details.'),
            ({'message': 'lock_not_available'}, b'ERROR', b'55P03',
             b'canceling statement due to lock timeout', None),
            ({'code': 57014}, b'ERROR', b'57014',
             b'canceling statement due to user request', None),
            ({'code': 25006}, b'ERROR', b'25006',
             b'cannot execute SELECT in a read-only transaction', None),
            ({}, b'ERROR', b'XX000', b'vaurien: injected error', None),
            ({'message': '42P01 relation "t" does not exist'}, b'ERROR',
             b'42P01', b'relation "t" does not exist', None),
            ({'code': 40001, 'message': 'serialization_failure on t'},
             b'ERROR', b'40001', b'on t', b'The transaction might succeed '
             b'if retried.'),
        ]
        for options, severity, state, text, hint in cases:
            expected = documented_error(severity, state, text, hint) + \
                b'Z\x00\x00\x00\x05I'
            pair, got = self.answer(options, size=len(expected))
            self.assertEqual(got, expected, options)
            self.assertEqual(read_some(pair.client, 1, 0.05), b'')
            # nothing reached the backend
            self.assertEqual(read_some(pair.backend, 1, 0.1), b'')

    def test_fatal_codes_close(self):
        # (53300 refuses the login itself: FaultsTest)
        for options, state, text in [
                ({'message': 'admin_shutdown'}, b'57P01',
                 b'terminating connection due to administrator command'),
                ({'code': 8006}, b'08006', b'connection to client lost')]:
            pair = self.pair(options)
            login(pair)
            pair.client.sendall(query(b'SELECT 1'))
            self.assertEqual(read_some(pair.client, 1000, TIMEOUT),
                             documented_error(b'FATAL', state, text),
                             options)

    def test_in_a_transaction_the_backend_fails_too(self):
        pair, got = self.answer({'code': 40001}, b'UPDATE t SET a = 1',
                                b'T', 129)
        self.assertTrue(got.endswith(b'Z\x00\x00\x00\x05E'), got)
        sent = query(b'vaurien injected error 40001')
        self.assertEqual(read_some(pair.backend, len(sent), TIMEOUT), sent)
        # its answer is the proxy's, not the client's
        pair.backend.sendall(documented_error(b'ERROR', b'42601',
                                              b'syntax error') + ready(b'E'))
        self.assertEqual(read_some(pair.client, 1, 0.2), b'')
        pair.client.sendall(query(b'ROLLBACK'))
        self.assertEqual(read_some(pair.backend, 14, TIMEOUT),
                         query(b'ROLLBACK'))

    def test_error_on_commit_rolls_back(self):
        pair, got = self.answer({'code': 40001}, b'COMMIT', b'T', 129)
        self.assertTrue(got.endswith(b'Z\x00\x00\x00\x05I'), got)
        self.assertEqual(read_some(pair.backend, 14, TIMEOUT),
                         query(b'ROLLBACK'))

    def test_failed_transaction_stays_failed(self):
        _, got = self.answer({'code': 40001}, b'SELECT 1', b'E', 129)
        self.assertTrue(got.endswith(b'Z\x00\x00\x00\x05E'), got)

    def test_extended_group_ready_at_its_sync(self):
        pair = self.pair({'code': 40001})
        login(pair)
        pair.client.sendall(parse(b'SELECT $1') + bind(b'', b'', b'1') +
                            FLUSH)
        expected = documented_error(
            b'ERROR', b'40001', b'could not serialize access due to '
            b'concurrent update', b'The transaction might succeed if '
            b'retried.')
        self.assertEqual(read_some(pair.client, len(expected), TIMEOUT),
                         expected)
        # no ReadyForQuery before the Sync, as from the server
        self.assertEqual(read_some(pair.client, 1, 0.2), b'')
        pair.client.sendall(execute() + SYNC)
        self.assertEqual(read_some(pair.client, 6, TIMEOUT),
                         b'Z\x00\x00\x00\x05I')
        self.assertEqual(read_some(pair.backend, 1, 0.1), b'')

    def test_unsynced_group_then_everything_ignored_to_sync(self):
        """After an error in a group, the server reads nothing but a Sync
        (a Query included), then answers ReadyForQuery."""
        pair = self.pair({'code': 40001})
        login(pair)
        pair.client.sendall(parse(b'SELECT 1', b'a1') + describe(b'S', b'a1')
                            + FLUSH)
        self.assertEqual(read_some(pair.client, 123, TIMEOUT)[:1], b'E')
        pair.client.sendall(query(b'SELECT 2'))
        self.assertEqual(read_some(pair.client, 1, 0.2), b'')
        pair.client.sendall(SYNC)
        self.assertEqual(read_some(pair.client, 6, TIMEOUT),
                         b'Z\x00\x00\x00\x05I')
        self.assertEqual(read_some(pair.backend, 1, 0.1), b'')

    def test_after_earlier_answers(self):
        pair = self.pair({'warmup': 1})
        login(pair)
        pair.client.sendall(query(b'SELECT 1') + query(b'SELECT 2'))
        self.assertEqual(read_some(pair.backend, 14, TIMEOUT),
                         query(b'SELECT 1'))
        answer = data_row(b'1') + command_complete(b'SELECT 1') + ready()
        pair.backend.sendall(answer)
        expected = answer + documented_error(
            b'ERROR', b'XX000', b'vaurien: injected error') + ready()
        self.assertEqual(read_some(pair.client, len(expected), TIMEOUT),
                         expected)

    def test_transient_then_passes(self):
        pair = self.pair({'agitate': 1, 'code': 40001}, 'transient')
        login(pair)
        pair.client.sendall(query(b'SELECT 1'))
        self.assertTrue(read_some(pair.client, 129, TIMEOUT).startswith(
            b'E'))
        pair.client.sendall(query(b'SELECT 2'))
        self.assertEqual(read_some(pair.backend, 14, TIMEOUT),
                         query(b'SELECT 2'))

    def test_login_is_never_an_exchange(self):
        pair = self.pair({'code': 40001})
        login(pair)
        self.assertEqual(pair.server.exchange_counts.get('error', 0), 0)

    def test_conflicting_options_refused(self):
        with self.assertRaises(vaurien.VaurienError) as caught:
            vaurien.ProxyServer(('127.0.0.1', 0), ('127.0.0.1', 9),
                                protocol='postgres', behavior='error',
                                behavior_options={'error': {
                                    'code': 40001, 'message': '40P01'}})
        self.assertIn('name two errors', str(caught.exception))


class FaultsTest(unittest.TestCase):
    """The other behaviors act per query."""

    def test_too_many_connections_refuses_the_login(self):
        pair = Pair('postgres', 'error', {'error': {'code': 53300}})
        self.addCleanup(pair.close)
        pair.client.sendall(LOGIN[0][1])
        got = read_some(pair.client, 1000, TIMEOUT)
        self.assertEqual(got, documented_error(
            b'FATAL', b'53300', b'sorry, too many clients already'))
        pair.client.settimeout(TIMEOUT)
        self.assertEqual(pair.client.recv(100), b'')
        self.assertEqual(read_some(pair.backend, 1, 0.3), b'')
        # any other error leaves the login alone
        other = Pair('postgres', 'error', {'error': {'code': 40001}})
        self.addCleanup(other.close)
        login(other)
        # aimed at the login alone: the queries pass
        aimed = Pair('postgres', 'error', {'error': {
            'code': 53300, 'match': 'STARTUP'}})
        self.addCleanup(aimed.close)
        aimed.client.sendall(LOGIN[0][1])
        self.assertTrue(read_some(aimed.client, 1000, TIMEOUT).startswith(
            b'E'))
        spared = Pair('postgres', 'error', {'error': {
            'code': 53300, 'match': 'COMMIT'}})
        self.addCleanup(spared.close)
        login(spared)
        spared.client.sendall(query(b'SELECT 1'))
        self.assertEqual(read_some(spared.backend, 14, TIMEOUT),
                         query(b'SELECT 1'))

    def test_abort_after_the_query_went(self):
        pair = Pair('postgres', 'abort')
        self.addCleanup(pair.close)
        login(pair)
        pair.client.sendall(query(b'COMMIT'))
        self.assertEqual(read_some(pair.backend, 12, TIMEOUT),
                         query(b'COMMIT'))
        pair.client.settimeout(TIMEOUT)
        self.assertEqual(pair.client.recv(100), b'')

    def test_delay_per_query(self):
        pair = Pair('postgres', 'delay', {'delay': {'sleep': 0.3}})
        self.addCleanup(pair.close)
        login(pair)
        started = time.time()
        pair.client.sendall(query(b'SELECT 1'))
        self.assertEqual(read_some(pair.backend, 14, TIMEOUT),
                         query(b'SELECT 1'))
        self.assertGreaterEqual(time.time() - started, 0.25)

    def test_blackout(self):
        pair = Pair('postgres', 'blackout')
        self.addCleanup(pair.close)
        login(pair)
        pair.client.sendall(query(b'SELECT 1'))
        pair.client.settimeout(TIMEOUT)
        self.assertEqual(pair.client.recv(100), b'')
        self.assertEqual(read_some(pair.backend, 100, 0.2), b'')


if __name__ == '__main__':
    unittest.main()
