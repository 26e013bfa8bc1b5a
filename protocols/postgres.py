"""PostgreSQL frontend/backend protocol 3: one exchange per query.

Frames both streams message by message (a type byte, a 4-byte length),
passing each message on as it comes: a large result or COPY is never held
whole.  The start-up packet, SSLRequest and GSSENCRequest (when the server
answers yes, the connection becomes encrypted and is passed through) and
the authentication of any method flow without an exchange; a
CancelRequest connection is passed through.  After start-up, an exchange
is one simple Query (or FunctionCall), or one group of extended-protocol
messages (Parse, Bind, Describe, Execute, Close, Flush) up to its Sync:
pipelined Syncs are as many exchanges.  COPY data from the client belongs
to the exchange of its COPY; NotificationResponse, NoticeResponse and
ParameterStatus may come at any time.  COPY BOTH (replication) is passed
through.

``error`` answers an ErrorResponse with a SQLSTATE (``code`` for one of
digits, e.g. 40001; or a SQLSTATE or condition name first in ``message``,
e.g. ``40P01`` or ``deadlock_detected``), then ReadyForQuery with the
transaction status the client would see from a real server.  The backend
is kept in step: inside a transaction it is made to fail too (or rolled
back, for an error on COMMIT), so that it never commits what the client
was told failed.  A FATAL code (53300, 57P01, 08006...) closes the
connection after the answer, as the server does.
"""

import re
import weakref

import vaurien

from ._framing import (END, PASS, PEEK, READ, SCAN, SKIP, START,
                       FramedProtocol, FramingError, cannot_start, tls_hint)
from ._framing import sql_text

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
#: the server refuses a start-up packet longer than this
MAX_STARTUP = 10000
#: nor does it take a message of 1 GB or more
MAX_MESSAGE = 0x3fffffff
#: bytes of a query kept to describe it (the rest streams)
SQL_HEAD = 1024
#: prepared statements remembered per connection (name -> their SQL)
MAX_STATEMENTS = 1000

#: what a client may send after start-up, and the server
CLIENT_TYPES = frozenset(b'BCDEFHPQSXcdfp')
SERVER_TYPES = frozenset(b'123ACDEGHIKNRSTVWZcdnstv')
_GROUP = frozenset(b'BCDEHPS')
_COPY = frozenset(b'cdf')
#: backend messages a response is scanned up to (ReadyForQuery ends it,
#: see MessageScanner): CopyBothResponse turns to replication
_STOP = frozenset(b'W')
_PUSH = {'push': True}
_ANSWER = {}
_SETUP = {'setup': True, 'replies': 0}

_FIRST_WORD = re.compile(r'\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*([A-Za-z]+)',
                         re.S)
_SQLSTATE = re.compile(r'[0-9A-Z]{5}\Z')

#: condition name -> SQLSTATE: the named choices of the error behavior
CONDITIONS = {
    'serialization_failure': '40001',
    'deadlock_detected': '40P01',
    'lock_not_available': '55P03',
    'query_canceled': '57014',
    'read_only_sql_transaction': '25006',
    'too_many_connections': '53300',
    'admin_shutdown': '57P01',
    'crash_shutdown': '57P02',
    'cannot_connect_now': '57P03',
    'connection_failure': '08006',
    'unique_violation': '23505',
    'out_of_memory': '53200',
    'disk_full': '53100',
    'internal_error': 'XX000',
}
#: SQLSTATE -> the server's own words for it (25006 names the command)
TEXTS = {
    '40001': 'could not serialize access due to concurrent update',
    '40P01': 'deadlock detected',
    '55P03': 'canceling statement due to lock timeout',
    '57014': 'canceling statement due to user request',
    '25006': 'cannot execute %s in a read-only transaction',
    '53300': 'sorry, too many clients already',
    '57P01': 'terminating connection due to administrator command',
    '57P02': 'terminating connection because of crash of another server '
             'process',
    '57P03': 'the database system is starting up',
    '08006': 'connection to client lost',
    '23505': 'duplicate key value violates unique constraint',
    '53200': 'out of memory',
    '53100': 'could not extend file: No space left on device',
    'XX000': 'vaurien: injected error',
}
HINTS = {'40P01': 'See server log for query details.',
         '40001': 'The transaction might succeed if retried.'}
#: what the server ends the connection with
FATAL = frozenset(['53300', '57P01', '57P02', '57P03', '08006', '08P01',
                   '28000', '28P01', '3D000'])
DEFAULT_STATE = 'XX000'
#: statements that end a transaction (an error on them leaves none)
_ENDS = frozenset([b'COMMIT', b'END', b'ROLLBACK', b'ABORT'])
_TO_SAVEPOINT = re.compile(r'\s*ROLLBACK\s+(?:(?:WORK|TRANSACTION)\s+)?TO\b',
                           re.I)
#: what the backend is sent to fail its transaction as the client is told
#: it failed: a syntax error, so nothing runs (the server logs it)
_FAIL = 'vaurien injected error %s'

_logged_tls = weakref.WeakSet()


def _int32(data, pos=0):
    return int.from_bytes(data[pos:pos + 4], 'big')


def _cstring(data, pos):
    """(the text up to the NUL at *pos* or the end, the next position)."""
    end = data.find(b'\x00', pos)
    if end < 0:
        return data[pos:], len(data)
    return data[pos:end], end + 1


def first_word(sql):
    """The first word of an SQL statement (after comments), upper case,
    or '' when there is none."""
    found = _FIRST_WORD.match(sql)
    return found.group(1)[:32].upper() if found else ''


def message(kind, payload):
    """One protocol message: type byte, length, payload."""
    return kind + (len(payload) + 4).to_bytes(4, 'big') + payload


def error_response(severity, sqlstate, text, hint=None):
    """An ErrorResponse as the server sends it: fields S (severity), V
    (the same, never translated), C (SQLSTATE), M (message), H (hint)."""
    fields = [(b'S', severity), (b'V', severity), (b'C', sqlstate),
              (b'M', text)]
    if hint:
        fields.append((b'H', hint))
    payload = b''.join(code + value.encode('utf-8') + b'\x00'
                       for code, value in fields)
    return message(b'E', payload + b'\x00')


def ready_for_query(status):
    """ReadyForQuery with the transaction status: b'I' (idle), b'T' (in a
    transaction) or b'E' (in a failed transaction)."""
    return message(b'Z', status)


def choose_error(code, text, command=''):
    """(severity, SQLSTATE, message, hint) the error behavior answers, from
    its ``code`` and ``message`` options; ValueError when they disagree."""
    text = ' '.join(str(text or '').split())
    state = None
    word, _, rest = text.partition(' ')
    if word.lower() in CONDITIONS:
        state, text = CONDITIONS[word.lower()], rest
    elif _SQLSTATE.match(word) and any(c.isdigit() for c in word):
        state, text = word, rest
    if code:
        number = '%05d' % code
        if state is not None and state != number:
            raise ValueError("option 'code' %d (SQLSTATE %s) and option "
                             "'message' (SQLSTATE %s) name two errors: give "
                             "one" % (code, number, state))
        state = number
    state = state or DEFAULT_STATE
    if not text:
        text = TEXTS.get(state, 'vaurien: injected error')
        if '%s' in text:
            text = text % (command or 'this statement')
    severity = 'FATAL' if state in FATAL else 'ERROR'
    return severity, state, text, HINTS.get(state)


class _SqlStates(object):
    """The SQLSTATEs of digits only, as the number ``code`` takes (08006 is
    8006); the classes 00 to 02 are not errors."""

    def __contains__(self, code):
        return 3000 <= code <= 99999

    def __str__(self):
        return ('a SQLSTATE of digits from 03000, as a number (8006 for '
                '08006; one with letters, e.g. 40P01, or a condition name '
                'goes first in option message)')


class MessageScanner(object):
    """Passes whole messages on (a SCAN function) up to the first one whose
    type is in *stop* (not passed; its type is the result), or through a
    ReadyForQuery (passed; the result is its transaction status, b'I',
    b'T' or b'E').  Checks each type against *known* and each length."""

    __slots__ = ('stop', 'known', 'left')

    def __init__(self, stop, known):
        self.stop = stop
        self.known = known
        self.left = 0           # bytes of the current message still to go

    def __call__(self, buf, pos):
        end = len(buf)
        stop, known = self.stop, self.known
        while True:
            if self.left:
                take = min(self.left, end - pos)
                pos += take
                self.left -= take
                if self.left:
                    return pos, False, None
            if end - pos < 5:
                if end > pos and buf[pos] not in known:
                    raise cannot_start('a PostgreSQL message',
                                       buf[pos:pos + 60])
                return pos, False, None
            kind = buf[pos]
            if kind == 0x5a:                    # ReadyForQuery
                if end - pos < 6:
                    return pos, False, None
                status = bytes(buf[pos + 5:pos + 6])
                if buf[pos + 1:pos + 5] != b'\x00\x00\x00\x05' or \
                        status not in (b'I', b'T', b'E'):
                    raise FramingError('malformed ReadyForQuery %r'
                                       % bytes(buf[pos:pos + 6]))
                return pos + 6, True, status
            if kind in stop:
                return pos, True, kind
            length = int.from_bytes(buf[pos + 1:pos + 5], 'big')
            if kind not in known or length < 4 or length > MAX_MESSAGE:
                raise cannot_start('a PostgreSQL message', buf[pos:pos + 60])
            self.left = length + 1


def _header(data):
    """(type, length) of a message header, checked."""
    kind = data[0]
    length = _int32(data, 1)
    if length < 4 or length > MAX_MESSAGE:
        raise FramingError('a %r message of length %d'
                           % (bytes(data[:1]), length))
    return kind, length


class Postgres(FramedProtocol):
    """PostgreSQL: the behavior mix is drawn per query (or per
    extended-protocol group up to Sync), and ``error`` answers an
    ErrorResponse (SQLSTATE XX000 by default; ``code`` for a SQLSTATE of
    digits, e.g. 40001, or a SQLSTATE or condition name starting
    ``message``, e.g. ``40P01``, ``lock_not_available``) and
    ReadyForQuery."""

    name = 'postgres'
    options = dict(FramedProtocol.options)
    error_codes = _SqlStates()

    @classmethod
    def check_behavior(cls, behavior):
        super(Postgres, cls).check_behavior(behavior)
        if isinstance(behavior, vaurien.Error):
            choose_error(behavior.option('code'), behavior.option('message'))

    def __init__(self, settings=None, proxy=None):
        super(Postgres, self).__init__(settings, proxy)
        #: the transaction status of the server's last ReadyForQuery
        self.status = b'I'
        self._negotiating = 0       # SSL/GSS requests awaiting their byte
        self._statements = {}       # prepared statement name -> SQL
        #: the COPY came from a group that reached its Sync: the server
        #: ignored that Sync (it came during the COPY) and answers the one
        #: the client sends after CopyDone
        self._copy_syncs = False
        self._copy_ex = None        # the exchange COPY data belongs to
        self._synced = True         # the group being read reached its Sync
        self._ready_at_sync = None  # ReadyForQuery owed at that Sync

    # requests

    def parse_requests(self):
        while True:
            head = yield (PEEK, 8)
            if tls_hint(head):
                yield (PASS, 'TLS from the first byte (direct SSL)')
            if len(head) < 8:
                raise cannot_start('a PostgreSQL start-up packet', head)
            length, code = _int32(head), _int32(head, 4)
            if length < 8 or length > MAX_STARTUP:
                raise cannot_start('a PostgreSQL start-up packet', head)
            if code == CANCEL_REQUEST:
                yield (PASS, 'CancelRequest: plain pass-through')
            if code in (SSL_REQUEST, GSSENC_REQUEST) and length == 8:
                self._negotiating += 1
                yield (START, _SETUP)
                yield (READ, 8)
                yield (END, _SETUP)
                continue
            if code >> 16 != 3:
                raise FramingError('protocol version %d.%d'
                                   % (code >> 16, code & 0xffff))
            info = self._startup()
            yield (START, info)
            yield (SKIP, length)
            yield (END, info)
            break
        while True:
            header = yield (PEEK, 5)
            if len(header) < 5 or header[0] not in CLIENT_TYPES:
                raise cannot_start('a PostgreSQL message', header)
            kind, length = _header(header)
            if kind in (0x51, 0x46):            # Query, FunctionCall
                yield from self._query(kind, length)
            elif kind in _GROUP:
                yield from self._group()
            elif kind in _COPY:
                yield from self._copy()
            else:                               # Terminate, password
                yield (START, _SETUP)
                yield (SKIP, length + 1)
                yield (END, _SETUP)

    def _startup(self):
        """The start-up packet's info: no exchange, unless the mix in force
        has an error of 53300 (too_many_connections), which a full server
        answers to the start-up packet: then it is one, that the error
        answers with its FATAL (the other behaviors drawn for it act on the
        login)."""
        if self.connection is None:     # a parser alone, in a test
            return _SETUP
        for behavior in self.connection.server.mix.behaviors():
            if isinstance(behavior, vaurien.Error) and choose_error(
                    behavior.option('code'),
                    behavior.option('message'))[1] == '53300':
                return {'cmd': b'STARTUP', 'request': 'start-up',
                        'text': 'STARTUP', 'replies': 0}
        return _SETUP

    def _query(self, kind, length):
        # most queries are read whole here: no SKIP step left
        head = yield (READ, 1 + min(length, SQL_HEAD), False)
        if kind == 0x51:
            sql = _cstring(head, 5)[0]
            info = self._describe(sql)
        else:
            info = {'cmd': b'FUNCTIONCALL', 'request': 'FunctionCall',
                    'sql': '', 'text': 'FunctionCall'}
        info['replies'] = 1
        self._copy_syncs = False
        yield (START, info)
        if length + 1 > len(head):
            yield (SKIP, length + 1 - len(head))
        yield (END, info)

    def _describe(self, sql):
        sql = sql.decode('utf-8', 'replace')
        word = first_word(sql)
        return {'cmd': word.encode('ascii'), 'request': word or 'QUERY',
                'sql': sql, 'text': sql_text(sql)}

    def _group(self):
        """Extended-protocol messages up to Sync: one exchange, answered
        by one ReadyForQuery.  A group the client leaves at a Flush, going
        on with a Query, COPY data or Terminate (asyncpg prepares so), has
        no ReadyForQuery of its own: it ends there, awaiting none."""
        info = None
        while True:
            header = yield (PEEK, 5)
            if len(header) < 5 or header[0] not in CLIENT_TYPES:
                raise cannot_start('a PostgreSQL message', header)
            kind, length = _header(header)
            if kind not in _GROUP:
                if self._ready_at_sync:
                    # after an error the server ignores all but a Sync
                    yield (SKIP, length + 1)
                    continue
                self._unexpect(info)
                self._copy_syncs = False
                yield (END, info)
                return
            # held back only until the group's start: a message that is
            # all there must go on before the client's next one comes
            emit = info is not None
            if kind in (0x50, 0x42):            # Parse, Bind: which SQL
                head = yield (READ, 5 + min(length - 4, SQL_HEAD), emit)
                sql = self._named(kind, head)
            else:
                head = yield (READ, 5, emit)
                sql = None
            if info is None:
                if sql is None:
                    info = {'cmd': b'', 'request': 'EXTENDED', 'sql': '',
                            'text': ''}
                else:
                    info = self._describe(sql)
                info['replies'] = 1
                info['group'] = True
                self._synced = False
                yield (START, info)
            if kind == 0x53:                    # Sync
                self._synced = True
                self._copy_syncs = True
                yield (SKIP, length + 1 - len(head))
                yield (END, info)
                if self._ready_at_sync:
                    # what an error answered owes the client, as the
                    # server sends it once it reads the Sync
                    self._out(False, None, self._ready_at_sync)
                    self._ready_at_sync = None
                return
            yield (SKIP, length + 1 - len(head))

    def _unexpect(self, info):
        """The request *info* awaits no answer after all."""
        info['replies'] = 0
        for index, (_, entry) in enumerate(self.expected):
            if entry is info:
                del self.expected[index]
                return

    def _named(self, kind, head):
        """The SQL a Parse defines (remembered under its name) or a Bind
        uses (b'' when unknown)."""
        first, pos = _cstring(head, 5)
        if kind == 0x50:
            sql = _cstring(head, pos)[0]
            statements = self._statements
            if len(statements) >= MAX_STATEMENTS and first not in statements:
                statements.clear()
            statements[first] = sql
            return sql
        statement = _cstring(head, pos)[0]
        return self._statements.get(statement, b'')

    def _copy(self):
        """CopyData up to CopyDone or CopyFail: part of the exchange of
        their COPY (after a group that reached its Sync, with the Sync
        that follows: libpq sends one)."""
        info = {'copy': True, 'replies': 0}
        yield (START, info)
        while True:
            header = yield (READ, 5)
            kind, length = _header(header)
            yield (SKIP, length - 4)
            if kind in (0x63, 0x66):            # CopyDone, CopyFail
                break
            header = yield (PEEK, 5)
            if len(header) < 5 or header[0] not in b'cdfHS':
                raise cannot_start('a COPY message', header)
        if self._copy_syncs:
            header = yield (PEEK, 5)
            if header[:1] == b'S':
                _, length = _header(header)
                yield (SKIP, length + 1)
        yield (END, info)

    def _start_request(self, info):
        if info.get('copy'):
            # COPY data goes on through the stream behaviors of its COPY
            self._req_ex, self._req_hooked = self._copy_ex, False
            self._req_mode = 'forward'
            return True
        verdict = super(Postgres, self)._start_request(info)
        if not info.get('setup'):
            self._copy_ex = self._req_ex
        return verdict

    # responses

    def parse_responses(self):
        while True:                             # start-up
            first = yield (PEEK, 1)
            if self._negotiating and first in (b'S', b'N', b'G'):
                self._negotiating -= 1
                yield (START, _PUSH)
                yield (READ, 1)
                yield (END, _PUSH)
                if first == b'S':
                    self._log_tls('TLS (SSLRequest)')
                    yield (PASS, 'the server accepted TLS: encrypted')
                if first == b'G':
                    self._log_tls('GSSAPI encryption (GSSENCRequest)')
                    yield (PASS, 'the server accepted GSSAPI encryption')
                continue
            kind = yield from self._push()
            if kind == 0x5a:                    # ReadyForQuery: logged in
                break
        while True:
            yield (PEEK, 5)
            if self.awaited() is None:
                # nothing asked: a notification, a notice, a parameter's
                # new value, or a FATAL before the server closes
                yield from self._push()
                continue
            yield (START, _ANSWER)
            status = yield (SCAN, MessageScanner(_STOP, SERVER_TYPES))
            if status == 0x57:                  # CopyBothResponse
                yield (PASS, 'COPY BOTH (replication): plain pass-through')
            self.status = status
            yield (END, _ANSWER)

    def _push(self):
        """One message that answers no request; its type."""
        header = yield (PEEK, 5)
        if len(header) < 5 or header[0] not in SERVER_TYPES:
            raise cannot_start('a PostgreSQL message', header)
        kind, length = _header(header)
        yield (START, _PUSH)
        if kind == 0x5a:
            yield from self._ready()
        else:
            yield (SKIP, length + 1)
        yield (END, _PUSH)
        return kind

    def _ready(self):
        data = yield (READ, 6)
        if data[1:5] != b'\x00\x00\x00\x05' or data[5:] not in (
                b'I', b'T', b'E'):
            raise FramingError('malformed ReadyForQuery %r' % data)
        self.status = data[5:]

    def _log_tls(self, what):
        server = self.connection.server if self.connection else None
        if server is None or server in _logged_tls:
            return
        _logged_tls.add(server)
        vaurien.logger.info(
            'protocol postgres: the server accepted %s on connection %s: '
            'such connections are passed through as plain tcp (the stream '
            'behaviors still apply; logged once)', what,
            self.connection.describe())

    # the error behavior

    def _error_answer(self, behavior):
        info = self.request or {}
        command = info.get('cmd', b'').decode('ascii')
        severity, state, text, hint = choose_error(
            behavior.option('code'), behavior.option('message'), command)
        answer = error_response(severity, state, text, hint)
        if severity == 'FATAL':
            # the server closes after a FATAL: so does the proxy (and the
            # backend's transaction, if any, dies with its connection)
            self.close_after_answer = True
            return answer
        status = self.status
        if status != b'I' and info.get('cmd') in _ENDS and \
                not _TO_SAVEPOINT.match(info.get('sql', '')):
            # an error on COMMIT: the transaction is gone
            self._tell_backend('ROLLBACK')
            status = b'I'
        elif status == b'T':
            # the client sees a failed transaction: so must the backend,
            # or a later COMMIT would commit what the client saw fail
            self._tell_backend(_FAIL % state)
            status = b'E'
        ready = ready_for_query(status)
        if info.get('group') and not self._synced:
            self._ready_at_sync = ready
            return answer
        return answer + ready

    def _tell_backend(self, sql):
        """Send the backend a Query of the proxy's own; its answer is
        dropped."""
        self._out(True, None, message(b'Q', sql.encode('ascii') + b'\x00'))
        self.expected.append((self.connection.plain,
                              {'drop_answer': True, 'replies': 1}))


vaurien.Protocol.register(Postgres)
