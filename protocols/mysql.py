"""MySQL / MariaDB client/server protocol: one exchange per command.

Frames packets (3-byte length, sequence id, payloads of 16 MB and more
split over several packets), the handshake (the greeting and the
authentication exchange flow without an exchange), COM_QUERY and
COM_STMT_EXECUTE with their result sets (with and without
CLIENT_DEPRECATE_EOF, several result sets in a row), prepared statements
(COM_STMT_PREPARE, _SEND_LONG_DATA, _CLOSE, _RESET, _FETCH), COM_QUIT and
the simple commands.  After an SSL request (TLS), on a compressed
connection, or for a command it does not know (COM_CHANGE_USER, the
replication commands), the connection is plain pass-through.
"""

import re

import vaurien

from ._framing import (END, PASS, PEEK, READ, SCAN, SKIP, START,
                       FramedProtocol, FramingError, refuse)
from ._framing import sql_text

CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_COMPRESS = 0x20
CLIENT_DEPRECATE_EOF = 1 << 24
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
MAX_PAYLOAD = 0xffffff

COM_QUIT = 0x01
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_FETCH = 0x1c
_NO_ANSWER = frozenset([COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE])
#: commands answered by one packet (OK, ERR, EOF or a string)
_ONE_PACKET = frozenset([
    0x02,   # COM_INIT_DB
    0x05,   # COM_CREATE_DB
    0x06,   # COM_DROP_DB
    0x07,   # COM_REFRESH
    0x08,   # COM_SHUTDOWN
    0x09,   # COM_STATISTICS
    0x0c,   # COM_PROCESS_KILL
    0x0d,   # COM_DEBUG
    0x0e,   # COM_PING
    0x1a,   # COM_STMT_RESET
    0x1b,   # COM_SET_OPTION
    0x1f,   # COM_RESET_CONNECTION
])
_KNOWN = _NO_ANSWER | _ONE_PACKET | frozenset([
    COM_QUERY, COM_FIELD_LIST, COM_STMT_PREPARE, COM_STMT_EXECUTE,
    COM_STMT_FETCH])
#: what the decision log calls a command (a query: its first word)
NAMES = {0x01: 'COM_QUIT', 0x02: 'COM_INIT_DB', 0x04: 'COM_FIELD_LIST',
         0x05: 'COM_CREATE_DB', 0x06: 'COM_DROP_DB', 0x07: 'COM_REFRESH',
         0x08: 'COM_SHUTDOWN', 0x09: 'COM_STATISTICS',
         0x0c: 'COM_PROCESS_KILL', 0x0d: 'COM_DEBUG', 0x0e: 'COM_PING',
         0x16: 'COM_STMT_PREPARE', 0x17: 'COM_STMT_EXECUTE',
         0x18: 'COM_STMT_SEND_LONG_DATA', 0x19: 'COM_STMT_CLOSE',
         0x1a: 'COM_STMT_RESET', 0x1b: 'COM_SET_OPTION',
         0x1c: 'COM_STMT_FETCH', 0x1f: 'COM_RESET_CONNECTION'}
_FIRST_WORD = re.compile(br'\s*(?:/\*.*?\*/\s*)*([A-Za-z]+)', re.S)


def _first_word(sql):
    """The first word of an SQL statement (after comments), upper case."""
    found = _FIRST_WORD.match(sql)
    return found.group(1)[:32].upper().decode('ascii') if found else 'QUERY'


#: error number -> (SQLSTATE, message), for the error behavior
ERRORS = {
    1040: ('08004', 'Too many connections'),
    1053: ('08S01', 'Server shutdown in progress'),
    1105: ('HY000', 'Unknown error'),
    1205: ('HY000', 'Lock wait timeout exceeded; try restarting '
                    'transaction'),
    1213: ('40001', 'Deadlock found when trying to get lock; try '
                    'restarting transaction'),
    1290: ('HY000', 'The server is running with the --read-only option so '
                    'it cannot execute this statement'),
    1317: ('70100', 'Query execution was interrupted'),
    1927: ('70100', 'Connection was killed'),
}


def _length(header):
    return header[0] | header[1] << 8 | header[2] << 16


def _lenenc(data, pos):
    """(value, next position) of a length-encoded integer."""
    first = data[pos]
    if first < 0xfb:
        return first, pos + 1
    size = {0xfc: 2, 0xfd: 3, 0xfe: 8}.get(first)
    if size is None:
        raise FramingError('malformed length-encoded integer')
    if pos + 1 + size > len(data):
        raise FramingError('truncated length-encoded integer')
    return int.from_bytes(data[pos + 1:pos + 1 + size], 'little'), \
        pos + 1 + size


def _packet(want=64, emit=True):
    """Reads one packet (and its continuations); returns ``(first bytes of
    the payload, payload length, sequence id)``."""
    header = yield (READ, 4, emit)
    length = _length(header)
    head = b''
    if length:
        size = min(length, want)
        head = yield (READ, size, emit)
        yield (SKIP, length - size)
    total = length
    while length == MAX_PAYLOAD:
        more = yield (READ, 4)
        length = _length(more)
        total += length
        yield (SKIP, length)
    return head, total, header[3]


class MySQL(FramedProtocol):
    """MySQL and MariaDB: the behavior mix is drawn per command, and
    ``error`` answers an ERR packet (error 1105 by default, or the
    behavior's ``code``, e.g. 1213 deadlock or 1205 lock wait timeout)
    with the right sequence id."""

    name = 'mysql'
    options = dict(FramedProtocol.options)
    #: the error packet carries the number in two bytes
    error_codes = vaurien.Range(1, 65535)

    def __init__(self, settings=None, proxy=None):
        super(MySQL, self).__init__(settings, proxy)
        self._authenticated = False
        self.server_caps = 0
        self.client_caps = 0

    @property
    def deprecate_eof(self):
        return bool(self.server_caps & self.client_caps &
                    CLIENT_DEPRECATE_EOF)

    # requests

    def parse_requests(self):
        header = yield (PEEK, 4)
        if len(header) < 4 or _length(header) > 65536 or header[3] != 1:
            yield (SCAN, refuse('a MySQL handshake response'))
        yield (READ, 4)
        length = _length(header)
        head = yield (READ, min(length, 32))
        if len(head) < 4:
            raise FramingError('a handshake response of %d bytes' % length)
        self.client_caps = int.from_bytes(head[:4], 'little')
        if self.client_caps & CLIENT_SSL and length == 32:
            yield (PASS, 'SSL request: TLS from here')
        if not self.client_caps & CLIENT_PROTOCOL_41:
            raise FramingError('a pre-4.1 client')
        yield (SKIP, length - len(head))
        while True:
            yield (PEEK, 1)
            if not self._authenticated:
                yield from _packet()        # the authentication exchange
                continue
            header = yield (READ, 4, False)
            length = _length(header)
            if not length:
                raise FramingError('an empty command packet')
            command = (yield (READ, 1, False))[0]
            info = {'cmd': command, 'seq': header[3], 'replies': 1,
                    'request': NAMES.get(command, '0x%02x' % command)}
            info['text'] = info['request']
            if command in (COM_QUERY, COM_STMT_PREPARE):
                sql = yield (PEEK, min(length - 1, 1024))
                info['text'] = sql_text(sql)
            if command == COM_QUERY:
                info['request'] = _first_word(sql)
            if command in _NO_ANSWER:
                info['replies'] = 0
            elif command not in _KNOWN:
                yield (PASS, 'command 0x%02x: plain pass-through' % command)
            yield (START, info)
            yield (SKIP, length - 1)
            while length == MAX_PAYLOAD:
                more = yield (READ, 4)
                length = _length(more)
                info['seq'] = more[3]
                yield (SKIP, length)
            yield (END, info)

    # responses

    def parse_responses(self):
        header = yield (PEEK, 4)
        if len(header) < 4 or _length(header) > 4096 or header[3] != 0:
            yield (SCAN, refuse('a MySQL greeting'))
        yield (START, {'push': True})
        head, _, _ = yield from _packet(256)
        yield (END, {'push': True})
        if head[:1] == b'\x0a':
            self.server_caps = self._greeting_caps(head)
        elif head[:1] != b'\xff':
            raise FramingError('not a MySQL greeting')
        while not self._authenticated:
            yield (PEEK, 1)
            yield (START, {'push': True})
            head, _, _ = yield from _packet()
            yield (END, {'push': True})
            if head[:1] == b'\x00':
                self._authenticated = True
                if self.client_caps & CLIENT_COMPRESS:
                    yield (PASS, 'compressed protocol: plain pass-through')
        while True:
            yield (PEEK, 1)
            request = self.awaited()
            if request is None:         # e.g. an ERR before a close
                yield (START, {'push': True})
                yield from _packet()
                yield (END, {'push': True})
                continue
            yield (START, {})
            command = request['cmd']
            if command in (COM_QUERY, COM_STMT_EXECUTE):
                yield from self._results()
            elif command == COM_STMT_PREPARE:
                yield from self._prepared()
            elif command == COM_FIELD_LIST:
                while True:
                    head, total, _ = yield from _packet()
                    if head[:1] == b'\xff' or (head[:1] == b'\xfe' and
                                               total < 9):
                        break
            elif command == COM_STMT_FETCH:
                yield from self._rows()
            else:
                yield from _packet()
            yield (END, {})

    @staticmethod
    def _greeting_caps(head):
        end = head.find(b'\x00', 1)
        if end < 0:
            raise FramingError('malformed greeting')
        pos = end + 1 + 4 + 8 + 1
        caps = int.from_bytes(head[pos:pos + 2], 'little')
        if len(head) >= pos + 7:
            caps |= int.from_bytes(head[pos + 5:pos + 7], 'little') << 16
        return caps

    def _status(self, head):
        """Server status flags of an OK or EOF packet (the first bytes)."""
        if head[:1] == b'\xfe' and not self.deprecate_eof:
            return int.from_bytes(head[3:5], 'little')
        _, pos = _lenenc(head, 1)
        _, pos = _lenenc(head, pos)
        return int.from_bytes(head[pos:pos + 2], 'little')

    def _results(self):
        while True:
            head, total, _ = yield from _packet()
            if not head:
                raise FramingError('an empty reply packet')
            first = head[0]
            if first == 0x00:
                status = self._status(head)
            elif first == 0xff:
                return
            elif first == 0xfb:
                yield (PASS, 'LOCAL INFILE: plain pass-through')
            else:
                columns, _ = _lenenc(head, 0)
                for _ in range(columns):
                    yield from _packet(4)
                if not self.deprecate_eof:
                    head, _, _ = yield from _packet()
                    if self._status(head) & SERVER_STATUS_CURSOR_EXISTS:
                        return          # rows come with COM_STMT_FETCH
                status = yield from self._rows()
                if status is None:
                    return
            if not status & SERVER_MORE_RESULTS_EXISTS:
                return

    def _rows(self):
        """Rows up to their end; the end's status flags (None after an
        ERR)."""
        while True:
            head, total, _ = yield from _packet()
            if head[:1] == b'\xfe' and total < MAX_PAYLOAD:
                return self._status(head)
            if head[:1] == b'\xff':
                return None

    def _prepared(self):
        head, _, _ = yield from _packet()
        if head[:1] != b'\x00':
            return
        if len(head) < 9:
            raise FramingError('malformed COM_STMT_PREPARE answer')
        columns = int.from_bytes(head[5:7], 'little')
        params = int.from_bytes(head[7:9], 'little')
        for count in (params, columns):
            for _ in range(count):
                yield from _packet(4)
            if count and not self.deprecate_eof:
                yield from _packet()

    # the error behavior

    def _error_answer(self, behavior):
        request = self.request or {}
        if not request.get('replies', 1):
            return b''
        code = behavior.option('code') or 1105
        state, text = ERRORS.get(code, ('HY000', 'Unknown error'))
        text = behavior.option('message') or text
        payload = (b'\xff' + min(code, 0xffff).to_bytes(2, 'little') +
                   b'#' + state.encode('ascii') + text.encode('utf-8'))
        seq = (request.get('seq', 0) + 1) & 0xff
        return len(payload).to_bytes(3, 'little') + bytes([seq]) + payload


vaurien.Protocol.register(MySQL)
