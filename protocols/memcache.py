"""memcached's text protocol, one exchange per command.

Frames storage commands with their data blocks (set, add, replace,
append, prepend, cas), get/gets/gat/gats over any number of keys,
incr/decr, delete, touch, stats, ``noreply``, and the meta commands (mg,
ms, md, ma, mn, me).  Values are passed on as they arrive.  A client that
speaks the binary protocol gets plain pass-through.

Quiet meta commands (flag ``q``) answer only sometimes; from the first one
until the ``mn`` that closes the batch, answers are not matched to
requests (the behaviors still apply per request).
"""

import re

import vaurien

from ._framing import (END, LINE, PASS, PEEK, READ, RUN, SKIP, START,
                       FramedProtocol, FramingError, number, word_check)
from ._framing import words_text

# memcached closes a connection as soon as 2048 bytes of a command line are
# there without its end, unless the line is a get or gets (of any number
# of keys, after at most 100 spaces: try_read_command_ascii); those, and
# the replies, are held up to 64 KB.
MAX_LINE = 64 * 1024
MAX_COMMAND = 2048
MAX_VALUE = 1024 * 1024 * 1024

_STORAGE = frozenset([b'set', b'add', b'replace', b'append', b'prepend',
                      b'cas'])
_NOREPLY = frozenset([b'incr', b'decr', b'delete', b'touch', b'flush_all',
                      b'verbosity', b'cache_memlimit'])
_META = frozenset([b'mg', b'ms', b'md', b'ma', b'mn', b'me'])
_LISTS = (b'STAT ', b'ITEM ', b'PREFIX ')
_MULTIGET = (b'get ', b'gets ')

# The fast lane (Memcache.run_commands, run_replies): what it does not
# know, the parsers frame, and judge.  A plain command's name, as clients
# send it, gives its shared info (never changed) and how it is framed: a
# line (0), a line whose last word may be noreply (-1), or a storage
# command's line of that many words and its data block
_RUN_COMMANDS = dict(
    (name, ({'cmd': name, 'replies': 1, 'request': name.decode('latin-1')},
            shape))
    for names, shape in (((b'get', b'gets', b'gat', b'gats'), 0),
                         ((b'incr', b'decr', b'delete', b'touch'), -1),
                         ((b'set', b'add', b'replace', b'append',
                           b'prepend'), 5),
                         ((b'cas',), 6))
    for name in names)
#: the one-line replies of plain commands (an incr's number aside)
_RUN_LINES = frozenset([b'END\r\n', b'STORED\r\n', b'NOT_STORED\r\n',
                        b'EXISTS\r\n', b'NOT_FOUND\r\n', b'DELETED\r\n',
                        b'TOUCHED\r\n', b'OK\r\n', b'ERROR\r\n'])
_RUN_NUMBER = re.compile(br'[0-9]{1,20}\r\n')
# a value's line: its key, flags, length and cas, as the parser splits it
# (at ASCII blanks: bytes.split's, and \s of a bytes pattern)
_RUN_VALUE = re.compile(br'VALUE \S{1,250} [0-9]{1,10} ([0-9]{1,10})'
                        br'(?: [0-9]{1,20})?\r\n')
#: the longest one-line reply the fast lane looks for
_RUN_LINE = 32
#: the info of a reply's START and END on the fast lane (shared: never
#: changed)
_REPLY = {}

#: a command's name is printable ASCII (memcached answers ERROR to
#: anything else, a TLS ClientHello included)
_command_word = word_check('a memcached command')
#: a reply starts with an upper-case word (STORED, VALUE, CLIENT_ERROR, HD,
#: ...) or a number (incr, decr)
_reply_line = word_check('a memcached reply', b'A-Z0-9_')


def _command_line(line):
    _command_word(line)
    if len(line) > MAX_COMMAND and not line.endswith(b'\n'):
        start = line.lstrip(b' ')
        if len(line) - len(start) > 100 or not start.startswith(_MULTIGET):
            raise FramingError('a command line over %d bytes, which '
                               'memcached refuses' % MAX_COMMAND)


class Memcache(FramedProtocol):
    """memcached (text and meta commands): the behavior mix is drawn per
    command, and ``error`` answers ``SERVER_ERROR <message>``."""

    name = 'memcache'
    options = dict(FramedProtocol.options)

    def __init__(self, settings=None, proxy=None):
        super(Memcache, self).__init__(settings, proxy)
        self._loose = False

    # the fast lane: whole runs of plain commands and their replies

    def run_commands(self, buf, pos):
        """RUN function of the client's stream: the complete plain
        commands from *pos* on (get, gets, gat, gats; set, add, replace,
        append, prepend, cas with their data; incr, decr, delete, touch;
        without noreply, outside a batch of quiet meta commands): a run
        while no behavior can act on them, else one message each.  A data
        block is passed over by its length, never read."""
        if self._loose:
            return pos, None
        # while a behavior may act, each command is its own message (an
        # exchange each), as the parser would frame it; a match needs the
        # words the parser reads
        each = self.quiet() is None
        if each and self.described():
            return pos, None
        infos = []
        end = len(buf)
        find = buf.find
        kinds = _RUN_COMMANDS
        while pos < end:
            # (a line as long as a command may be, a get's aside: longer
            # ones are the parser's)
            stop = find(b'\n', pos, pos + MAX_COMMAND) + 1
            if not stop:
                break
            space = find(b' ', pos, stop)
            if space < 0:
                break
            kind = kinds.get(buf[pos:space])
            if kind is None:
                break
            info, shape = kind
            if shape:
                words = buf[pos:stop].split()
                if shape < 0:
                    if words[-1] == b'noreply':
                        break
                else:
                    # fewer words: malformed; more: noreply (or junk)
                    if len(words) != shape or not words[4].isdigit():
                        break
                    size = int(words[4])
                    if size > MAX_VALUE:
                        break
                    stop += size + 2
                    if stop > end or buf[stop - 2:stop] != b'\r\n':
                        break
            if each:
                infos.append((stop, info, info))
            else:
                infos.append(info)
            pos = stop
        if each:
            return pos, None, infos
        return pos, infos

    def run_replies(self, buf, pos):
        """RUN function of the backend's stream: the complete replies
        from *pos* on (values and END, one-line answers, an incr's
        number): a run while no behavior acts on them (their entries leave
        ``expected`` at once), else one message each (they leave it as
        their ENDs are handled).  A value is passed over by its length,
        never read."""
        expected = self.expected
        quick = self.answers_pass() is not None
        end = len(buf)
        find = buf.find
        value = _RUN_VALUE.match
        lines = _RUN_LINES
        run = None          # a run, or messages: the first reply says
        messages = []
        index = 0           # into expected, for messages
        while index < len(expected) and pos < end:
            exchange, info = expected[index]
            if 'barrier' in info or 'drop_answer' in info:
                break
            passes = quick and self.passes(exchange)
            if run is None:
                run = passes
            elif run and not passes:
                break
            # the values, then the line that ends the reply: a reply the
            # lane does not know whole (a break) is the parser's
            at = pos
            while buf.startswith(b'VALUE ', at):
                found = value(buf, at)
                if found is None:
                    break
                size = int(found.group(1))
                if size > MAX_VALUE:
                    break
                at = found.end() + size + 2
                if at > end or buf[at - 2:at] != b'\r\n':
                    break
            else:
                stop = find(b'\n', at, at + _RUN_LINE) + 1
                if stop and (buf[at:stop] in lines or
                             _RUN_NUMBER.match(buf, at, stop)):
                    if run:
                        expected.popleft()
                    else:
                        messages.append((stop, _REPLY, _REPLY))
                        index += 1
                    pos = stop
                    continue
            break
        if messages:
            return pos, None, messages
        return pos, None

    # requests

    def parse_requests(self):
        first = yield (PEEK, 1)
        if first[:1] == b'\x80':
            yield (PASS, 'binary protocol')
        while True:
            yield (RUN, self.run_commands)
            line = yield (LINE, MAX_LINE, False, _command_line)
            _command_word(line)
            words = line.split()
            command = words[0].lower() if words else b''
            info = {'cmd': command, 'replies': 1,
                    'request': command.decode('latin-1'),
                    'text': words_text(words)}
            data = None
            if command in _STORAGE:
                need = 6 if command == b'cas' else 5
                if len(words) < need:
                    raise FramingError('malformed %s line' %
                                       command.decode())
                data = number(words[4], 'data length', 0, MAX_VALUE)
                if len(words) > need and words[need] == b'noreply':
                    info['replies'] = 0
            elif command in _NOREPLY:
                if len(words) > 1 and words[-1] == b'noreply':
                    info['replies'] = 0
            elif command in _META:
                flags = words[3:] if command == b'ms' else words[2:]
                if command == b'ms':
                    if len(words) < 3:
                        raise FramingError('malformed ms line')
                    data = number(words[2], 'data length', 0, MAX_VALUE)
                if b'q' in flags:
                    self._loose = True
                if command == b'mn' and self._loose:
                    self._loose = False
                    info['barrier'] = True
                elif self._loose:
                    info['replies'] = 0
            elif command == b'quit':
                info['replies'] = 0
            elif command in (b'watch', b'lru_crawler'):
                yield (PASS, '%s: plain pass-through' % command.decode())
            if self._loose:
                info['replies'] = 0
            yield (START, info)
            if data is not None:
                yield (SKIP, data)
                end = yield (READ, 2)
                if end != b'\r\n':
                    raise FramingError('a data block without its CRLF')
            yield (END, info)

    # responses (they tell their own shape)

    def parse_responses(self):
        first = yield (PEEK, 1)
        if first[:1] == b'\x81':
            yield (PASS, 'binary protocol')
        while True:
            yield (RUN, self.run_replies)
            yield (PEEK, 1)
            request = self.awaited() or {}
            line = yield (LINE, MAX_LINE, False, _reply_line)
            _reply_line(line)
            if request.get('barrier') and not line.startswith(b'MN'):
                start = {'push': True}      # a quiet command's answer
            else:
                start = {}
            yield (START, start)
            while True:
                if line.startswith(b'VALUE '):
                    words = line.split()
                    if len(words) < 4:
                        raise FramingError('malformed VALUE line')
                    yield (SKIP, number(words[3], 'value length', 0,
                                        MAX_VALUE))
                    end = yield (READ, 2)
                    if end != b'\r\n':
                        raise FramingError('a value without its CRLF')
                elif line.startswith(b'VA '):
                    words = line.split()
                    yield (SKIP, number(words[1], 'value length', 0,
                                        MAX_VALUE))
                    end = yield (READ, 2)
                    if end != b'\r\n':
                        raise FramingError('a value without its CRLF')
                    break
                elif not line.startswith(_LISTS):
                    if not line.endswith(b'\n') or not line.strip():
                        raise FramingError('malformed reply %r' % line[:40])
                    break
                line = yield (LINE, MAX_LINE, True, _reply_line)
                _reply_line(line)
            yield (END, start)

    # the error behavior

    def _error_answer(self, behavior):
        request = self.request or {}
        if not request.get('replies', 1):
            return b''          # noreply: the client reads nothing
        message = ' '.join(str(behavior.option('message') or '').split())
        return ('SERVER_ERROR %s\r\n' % (
            message or 'out of memory storing object')).encode('utf-8')


vaurien.Protocol.register(Memcache)
