"""Redis: RESP2 and RESP3, one exchange per command.

Frames commands (RESP arrays or inline lines, any number in one read) and
replies of every RESP type (``+ - : $ *`` and RESP3's ``_ , # ! = ( % ~ >
|``, streamed strings and aggregates included).  Large values are passed
on as they arrive.  Push messages (RESP3 ``>``, and in RESP2 everything
after SUBSCRIBE or MONITOR) flow without a request.
"""

import re

import vaurien

from ._framing import (FLUSH, END, LINE, PASS, PEEK, READ, RUN, SCAN, SKIP,
                       START, FramedProtocol, FramingError, cannot_start,
                       refuse, word_check)
from ._framing import words_text

# Redis refuses an inline command, or the line of a count or a length, as
# soon as 64 KB of it are there without its end (PROTO_INLINE_MAX_SIZE).
MAX_LINE = 64 * 1024
#: bytes of an argument kept to know the command (longer ones stream)
SMALL = 512

_SIMPLE = frozenset(b'+-:_,#(')
_BLOB = frozenset(b'$!=')
_AGGREGATE = frozenset(b'*~>%|')
_TYPES = _SIMPLE | _BLOB | _AGGREGATE
#: the types whose line is a count or a length (or ``?``: streamed)
_SIZED = frozenset(b'$!=*~>%|;')
#: such a line as far as it has come (a 64-bit number has 19 digits)
_SIZE = re.compile(br'(?:-?[0-9]{0,19}|\?)\r?\Z')
# A command's count and lengths: Redis answers "invalid multibulk length"
# or "expected '$'" to anything else
_COUNT = re.compile(br'\*-?[0-9]{0,19}(?:\r\n?)?\Z')
_LENGTH = re.compile(br'\$-?[0-9]{0,19}(?:\r\n?)?\Z')
_SUBSCRIBE = frozenset([b'SUBSCRIBE', b'PSUBSCRIBE', b'SSUBSCRIBE',
                        b'UNSUBSCRIBE', b'PUNSUBSCRIBE', b'SUNSUBSCRIBE'])
_UNSUBSCRIBED = frozenset([b'unsubscribe', b'punsubscribe', b'sunsubscribe'])
#: what client libraries send as they connect, before any other command:
#: the connection's set-up, never an exchange (afterwards, they are)
SET_UP = frozenset([b'HELLO', b'AUTH', b'CLIENT', b'SELECT', b'READONLY'])
#: commands that change how the streams are framed: the fast lane leaves
#: them to the parsers
_FRAMING = _SUBSCRIBE | frozenset([b'MONITOR', b'HELLO', b'CLIENT', b'RESET',
                                   b'SYNC', b'PSYNC'])

# The fast lane's patterns (see Redis.run_commands and run_replies): what
# they do not match, the parsers frame, and judge
_HEAD = re.compile(
    br'\*([1-9][0-9]{0,6})\r\n\$([1-9][0-9]?)\r\n([^\r\n]{1,64})')
_NEXT = re.compile(br'\r\n\$([0-9]{1,10})\r\n')
_BULK = re.compile(br'\$(-1|[0-9]{1,10})\r\n')
_ARRAY = re.compile(br'\*(-1|[0-9]{1,7})\r\n')
#: the info of a plain command's request (shared: never changed)
_NAMES_KEPT = 512


def _count_line(line):
    if _COUNT.match(line) is None:
        raise cannot_start('the argument count of a Redis command', line)


def _length_line(line):
    if _LENGTH.match(line) is None:
        raise cannot_start('the length of a Redis command argument', line)


#: an inline command: its name is printable ASCII (Redis would answer
#: "unknown command" to anything else, as to a TLS ClientHello)
_inline_line = word_check('a Redis command')


def _int(text, what):
    try:
        value = int(text)
    except ValueError:
        raise FramingError('malformed %s %r' % (what, bytes(text[:40])))
    return value


class ValueScanner(object):
    """Passes *count* whole RESP values on (a SCAN function), streaming the
    payload of large strings.  With *record*, keeps up to that many of the
    first bytes in ``head``.  With *bulk_only*, the values are a command's
    arguments: bulk strings, nothing else."""

    def __init__(self, count=1, record=0, bulk_only=False):
        self.stack = [count]
        self.bulk_only = bulk_only
        self.bulk = 0           # payload bytes left of a string
        self.crlf = False       # the string's CRLF is still to check
        self.chunked = False    # inside a streamed string ($?)
        self.record = record
        self.head = bytearray()

    def _complete(self):
        """One element is complete; True when the whole value is."""
        stack = self.stack
        while True:
            if stack[-1] < 0:
                return False
            stack[-1] -= 1
            if stack[-1] > 0:
                return False
            stack.pop()
            if not stack:
                return True

    def __call__(self, buf, start):
        pos = self._scan(buf, start)
        if self.record and len(self.head) < self.record:
            self.head += buf[start:min(pos, start + self.record)]
        return pos, not self.stack, None

    def _scan(self, buf, pos):
        end = len(buf)
        stack = self.stack
        while stack:
            if self.bulk:
                take = min(self.bulk, end - pos)
                pos += take
                self.bulk -= take
                if self.bulk:
                    return pos
            if self.crlf:
                if end - pos < 2:
                    return pos
                if buf[pos:pos + 2] != b'\r\n':
                    raise FramingError('a string without its CRLF')
                pos += 2
                self.crlf = False
                if not self.chunked and self._complete():
                    return pos
                continue
            if pos >= end:
                return pos
            kind = buf[pos]
            if kind == 36 and stack[-1] > 2 and not self.chunked:
                # elements of an aggregate (or arguments): the whole bulk
                # strings there at once, the last one left to the loop
                taken, at = _bulks(buf, pos, stack[-1] - 1)
                if taken:
                    stack[-1] -= taken
                    pos = at
                    continue
            # the type tells at once whether the bytes can be RESP
            if self.chunked:
                if kind != 59:      # ';'
                    raise FramingError('malformed streamed string')
            elif self.bulk_only:
                if kind != 36:      # '$'
                    raise cannot_start('a bulk string argument',
                                       buf[pos:pos + 60])
            elif kind not in _TYPES and not (kind == 46 and stack[-1] < 0):
                raise cannot_start('a RESP value', buf[pos:pos + 60])
            index = buf.find(b'\r\n', pos, pos + MAX_LINE)
            if index < 0:
                if kind in _SIZED and _SIZE.match(
                        buf, pos + 1, min(end, pos + 24)) is None:
                    raise FramingError('malformed length %r' % bytes(
                        buf[pos:pos + 40]))
                if end - pos >= MAX_LINE:
                    raise FramingError('no end of line within %d bytes'
                                       % MAX_LINE)
                return pos
            arg = buf[pos + 1:index]
            line_end = index + 2
            if self.chunked:
                size = _int(arg, 'chunk size')
                pos = line_end
                if size < 0:
                    raise FramingError('negative chunk size')
                if size == 0:
                    self.chunked = False
                    if self._complete():
                        return pos
                else:
                    self.bulk = size
                    self.crlf = True
                continue
            pos = line_end
            if kind in _SIMPLE:
                if self._complete():
                    return pos
            elif kind in _BLOB:
                if arg == b'?' and not self.bulk_only:
                    self.chunked = True
                    continue
                size = _int(arg, 'string length')
                if size < -1:
                    raise FramingError('string length %d' % size)
                if size == -1:
                    if self._complete():
                        return pos
                else:
                    self.bulk = size
                    self.crlf = True
            elif kind in _AGGREGATE:
                if kind == 124 and stack[-1] > 0:   # '|': not an element
                    stack[-1] += 1
                if arg == b'?':
                    stack.append(-1)
                    continue
                size = _int(arg, 'aggregate length')
                if size < -1:
                    raise FramingError('aggregate length %d' % size)
                if kind in (37, 124):               # '%', '|': pairs
                    size *= 2
                if size <= 0:
                    if self._complete():
                        return pos
                else:
                    stack.append(size)
            elif kind == 46 and stack[-1] < 0:      # '.': end of streamed
                stack.pop()
                if self._complete():
                    return pos
            else:
                raise FramingError('unknown RESP type %r' % bytes([kind]))
        return pos


#: the info of a reply's START and END (shared: never changed)
_REPLY = {}
#: the types of a reply that is one line
_LINES = frozenset(b'+-:')


def _bulks(buf, pos, most):
    """``(count, end)`` of the whole bulk strings (up to *most*, at least
    two) from *pos* on, when they hold no CRLF: split at CRLF, the bytes
    give header and payload in turn, and the headers must be the
    payloads' lengths (then that framing is the only one).  ``(0, pos)``
    when they are not that plain."""
    found = _BULK.match(buf, pos)
    if found is None:
        return 0, pos
    size = int(found[1])
    if size >= 0:
        # strings of one size (LRANGE of alike values, a pipeline's GETs):
        # each byte of their headers and CRLFs checked for all at once, a
        # stride apart
        step = found.end() - pos + size + 2
        count = min(most, (len(buf) - pos) // step)
        if count >= 2:
            run = buf[pos:pos + step * count]
            head = run[:step - size - 2] + b'\r\n'
            if all(run[index::step] == head[index:index + 1] * count
                   for index in range(len(head) - 2)) and \
                    run[step - 2::step] == b'\r' * count and \
                    run[step - 1::step] == b'\n' * count:
                return count, pos + step * count
    parts = buf[pos:].split(b'\r\n', 2 * most)
    pairs = (len(parts) - 1) // 2
    if pairs < 2:
        return 0, pos
    heads = parts[0:2 * pairs:2]
    sizes = tuple(map(len, parts[1:2 * pairs:2]))
    if b'\n'.join(heads) != (b'$%d\n' * pairs % sizes)[:-1]:
        return 0, pos
    return pairs, pos + sum(map(len, heads)) + sum(sizes) + 4 * pairs


def _run_array(buf, pos, end):
    """Where the RESP2 array at *pos* ends (an array of bulk strings,
    integers and simple strings, one level), or -1 when it is not all there
    or not that simple (the parser frames it).  Bulk strings without CRLF
    in them are checked all at once (``_bulks``)."""
    found = _ARRAY.match(buf, pos)
    if found is None:
        return -1
    count = int(found.group(1))
    at = found.end()
    if count <= 0:
        return at
    if count > 8:
        taken, end_at = _bulks(buf, at, count)
        if taken == count:
            return end_at
    bulk = _BULK.match
    while count:
        if at >= end:
            return -1
        kind = buf[at]
        if kind == 36:
            found = bulk(buf, at)
            if found is None:
                return -1
            size = int(found.group(1))
            at = found.end()
            if size >= 0:
                at += size + 2
                if at > end or buf[at - 2:at] != b'\r\n':
                    return -1
        elif kind == 58 or kind == 43:              # ':', '+'
            at = buf.find(b'\r\n', at, at + MAX_LINE) + 2
            if at < 2:
                return -1
        else:
            return -1
        count -= 1
    return at


def decode_small(data):
    """A recorded value's top level: a list of str/int (or one of them),
    or None when it is not complete or not that simple."""
    lines = bytes(data).split(b'\r\n')
    if not lines or not lines[0]:
        return None
    first = lines[0]
    kind, arg = first[:1], first[1:]
    try:
        if kind in (b'+', b'-'):
            return arg
        if kind == b':':
            return int(arg)
        if kind not in (b'*', b'>'):
            return None
        count = int(arg)
        items = []
        index = 1
        while len(items) < count and index < len(lines):
            line = lines[index]
            kind, arg = line[:1], line[1:]
            if kind == b'$':
                if int(arg) < 0:
                    items.append(None)
                    index += 1
                else:
                    items.append(lines[index + 1])
                    index += 2
            elif kind == b':':
                items.append(int(arg))
                index += 1
            elif kind in (b'+', b'-'):
                items.append(arg)
                index += 1
            else:
                return None
        return items if len(items) == count else None
    except (ValueError, IndexError):
        return None


class Redis(FramedProtocol):
    """Redis (RESP2 and RESP3): the behavior mix is drawn per command, and
    ``error`` answers a Redis error reply (``-ERR ...``, or the error code
    that starts the behavior's ``message``, e.g. ``OOM ...``, ``LOADING
    ...``, ``READONLY ...``)."""

    name = 'redis'
    options = dict(FramedProtocol.options)

    def __init__(self, settings=None, proxy=None):
        super(Redis, self).__init__(settings, proxy)
        self.resp3 = False
        self._req_push = False      # commands get push replies only
        self._resp_push = False     # replies are read as push messages
        self._monitor = False
        self._reply = 'on'          # CLIENT REPLY: on, off, skip
        self._set_up = False        # a command past the set-up came
        self._infos = {}            # command name -> its info, or None

    # the fast lane: whole runs of plain commands and their replies

    def run_commands(self, buf, pos):
        """RUN function of the client's stream: the complete commands from
        *pos* on that leave the framing as it is (no SUBSCRIBE, CLIENT
        REPLY...), framed by their lengths alone, their arguments never
        read: a run while no behavior can act on them, else one message
        each."""
        if not self._set_up or self._req_push or self._reply != 'on':
            return pos, None
        # while a behavior may act, each command is its own message (an
        # exchange each), framed as the parser would
        each = self.quiet() is None
        if each and self.described():
            return pos, None
        infos = []
        head, after, kinds = _HEAD.match, _NEXT.match, self._infos
        while True:
            found = head(buf, pos)
            if found is None:
                break
            count, size, name = found[1], found[2], found[3]
            if len(name) != int(size):
                break
            info = kinds.get(name, False)
            if info is False:
                info = self._plain_info(name)
            if info is None:
                break
            # each argument's header starts with the CRLF ending the one
            # before: one match checks both
            at = found.end()
            left = int(count) - 1
            while left:
                found = after(buf, at)
                if found is None:
                    break
                at = found.end() + int(found[1])
                left -= 1
            if left or buf[at:at + 2] != b'\r\n':
                break
            pos = at + 2
            if each:
                infos.append((pos, info, info))
            else:
                infos.append(info)
        if each:
            return pos, None, infos
        return pos, infos

    def _plain_info(self, name):
        """The shared info of command *name* (bytes) on the fast lane, or
        None when the parser must frame it."""
        upper = name.upper()
        info = None
        if upper not in _FRAMING and len(name) <= 64:
            info = {'cmd': upper, 'replies': 1,
                    'request': upper.decode('latin-1')}
        if len(self._infos) < _NAMES_KEPT:
            self._infos[name] = info
        return info

    def run_replies(self, buf, pos):
        """RUN function of the backend's stream: the complete replies
        from *pos* on to plain commands: a run while no behavior acts on
        them (their entries leave ``expected`` at once), else one message
        each (they leave it as their ENDs are handled)."""
        expected = self.expected
        if self._resp_push or not expected:
            return pos, None
        quick = self.answers_pass() is not None
        end = len(buf)
        bulk = _BULK.match
        run = None          # a run, or messages: the first reply says
        messages = []
        index = 0           # into expected, for messages
        # the last exchange and info found to fit (a run's share them)
        known = known_info = None
        while index < len(expected) and pos < end:
            exchange, info = expected[index]
            if exchange is not known or info is not known_info:
                if 'cmd' not in info or 'enter_push' in info or \
                        'hello' in info or 'drop_answer' in info:
                    break
                passes = quick and self.passes(exchange)
                if run is None:
                    run = passes
                elif run and not passes:
                    break
                known, known_info = exchange, info
            kind = buf[pos]
            if kind == 36 and run and len(expected) > 3:
                # a pipeline's replies: as many at once as there are
                # entries alike (checked one by one, cheaper than a reply)
                alike = 0
                for other, other_info in expected:
                    if other is not exchange or other_info is not info:
                        break
                    alike += 1
                    if alike == 1024:
                        break
                taken, at = _bulks(buf, pos, alike)
                if taken:
                    for _ in range(taken):
                        expected.popleft()
                    pos = at
                    continue
            if kind == 36:                          # '$'
                found = bulk(buf, pos)
                if found is None:
                    break
                size = int(found[1])
                at = found.end()
                if size >= 0:
                    at += size + 2
                    if at > end or buf[at - 2:at] != b'\r\n':
                        break
            elif kind in _LINES:
                at = buf.find(b'\r\n', pos, pos + MAX_LINE) + 2
                if at < 2:
                    break
            elif kind == 42:                        # '*'
                at = _run_array(buf, pos, end)
                if at < 0:
                    break
            else:
                break
            if run:
                expected.popleft()
            else:
                messages.append((at, _REPLY, _REPLY))
                index += 1
            pos = at
        if messages:
            return pos, None, messages
        return pos, None

    # requests

    def parse_requests(self):
        while True:
            yield (RUN, self.run_commands)
            first = yield (PEEK, 1)
            if first == b'*':
                line = yield (LINE, MAX_LINE, False, _count_line)
                if not line.endswith(b'\r\n'):
                    raise FramingError('a command line without CRLF')
                count = _int(line[1:-2], 'argument count')
                if count <= 0:
                    yield (FLUSH,)          # redis ignores it: no reply
                    continue
                if count > 1024 * 1024:
                    raise FramingError('%d arguments' % count)
                args = []
                left = count
                streaming = 0
                while left and len(args) < 3:
                    header = yield (LINE, MAX_LINE, False, _length_line)
                    if header[:1] != b'$' or not header.endswith(b'\r\n'):
                        raise FramingError('an argument that is no bulk '
                                           'string: %r' % header[:40])
                    size = _int(header[1:-2], 'argument length')
                    if size < 0:
                        raise FramingError('argument length %d' % size)
                    left -= 1
                    if size > SMALL or not args and size > 64:
                        streaming = size
                        args.append(None)
                        break
                    data = yield (READ, size + 2, False)
                    if data[-2:] != b'\r\n':
                        raise FramingError('an argument without its CRLF')
                    args.append(data[:-2])
                if args[0] is None:
                    raise FramingError('a command name of %d bytes'
                                       % streaming)
                info = self._command(args)
                if info is None:
                    yield (PASS, 'replication stream')
                info['text'] = words_text(args)
                yield (START, info)
                if streaming:
                    yield (SKIP, streaming)
                    check = yield (READ, 2)
                    if check != b'\r\n':
                        raise FramingError('an argument without its CRLF')
                if left:
                    yield (SCAN, ValueScanner(left, bulk_only=True))
                yield (END, info)
            else:
                if first in b'$:+-':        # a reply, not a command
                    yield (SCAN, refuse('a Redis command'))
                line = yield (LINE, MAX_LINE, False, _inline_line)
                _inline_line(line)
                words = line.split()
                if not words:
                    yield (FLUSH,)          # an empty line: no reply
                    continue
                info = self._command(words[:3])
                if info is None:
                    yield (PASS, 'replication stream')
                info['inline'] = True
                info['text'] = words_text(words)
                yield (START, info)
                yield (END, info)

    def _command(self, args):
        name = args[0].upper()
        sub = args[1].upper() if len(args) > 1 and args[1] else b''
        info = {'cmd': name, 'replies': 1,
                'request': name.decode('latin-1')}
        if name in (b'SYNC', b'PSYNC'):
            return None
        if not self._set_up:
            if name in SET_UP:
                info['setup'] = True    # a client library connecting
            else:
                self._set_up = True
        if self._reply != 'on':
            info['replies'] = 0
            info['silent'] = True
            if self._reply == 'skip':
                self._reply = 'on'
        if name == b'CLIENT' and sub == b'REPLY':
            mode = args[2].upper() if len(args) > 2 and args[2] else b''
            if mode == b'ON':
                self._reply = 'on'
                info['replies'] = 1
                info.pop('silent', None)
            elif mode in (b'OFF', b'SKIP'):
                self._reply = mode.decode('ascii').lower()
                info['replies'] = 0
                info['silent'] = True
            return info
        if name == b'RESET':
            self._reply = 'on'
            self.resp3 = False
            if self._req_push:
                info['replies'] = 0     # its +RESET ends the push stream
            return info
        if self._req_push:
            info['replies'] = 0
            return info
        if name in _SUBSCRIBE:
            if self.resp3:
                info['replies'] = 0     # its replies are push messages
            else:
                info['enter_push'] = True
                self._req_push = True
        elif name == b'MONITOR':
            info['enter_push'] = True
            info['monitor'] = True
            self._req_push = True
        elif name == b'HELLO':
            info['hello'] = True
        return info

    # responses

    def parse_responses(self):
        while True:
            yield (RUN, self.run_replies)
            first = yield (PEEK, 1)
            info = self.awaited()
            if self._resp_push or first == b'>':
                yield (START, {'push': True})
                scanner = ValueScanner(1, record=4096 if self._resp_push
                                       else 0)
                yield (SCAN, scanner)
                yield (END, {'push': True})
                if self._resp_push:
                    self._after_push(decode_small(scanner.head))
                continue
            if first not in b'+-:$*_,#!=(%~|':
                yield (SCAN, refuse('a RESP reply'))
            record = 4096 if info and (info.get('enter_push') or
                                       info.get('hello')) else 0
            scanner = ValueScanner(1, record=record)
            yield (START, {})
            yield (SCAN, scanner)
            yield (END, {})
            if info and info.get('hello') and first != b'-':
                self.resp3 = first == b'%'
            if info and info.get('enter_push') and first != b'-':
                self._resp_push = True
                if info.get('monitor'):
                    self._monitor = True
                else:
                    self._after_push(decode_small(scanner.head))

    def _after_push(self, message):
        """Leave push mode on the reply that ends it."""
        done = False
        if message == b'RESET':
            done = True
        elif (not self._monitor and isinstance(message, list) and
              len(message) == 3 and isinstance(message[0], bytes) and
              message[0].lower() in _UNSUBSCRIBED and message[2] == 0):
            done = True
        if done:
            self._resp_push = self._req_push = self._monitor = False
            if message == b'RESET':
                self.resp3 = False

    # the error behavior

    def _error_answer(self, behavior):
        info = self.request or {}
        if info.get('silent'):
            return b''
        message = ' '.join(str(behavior.option('message') or '').split())
        if not message:
            message = 'ERR vaurien: injected error'
        word = message.split()[0]
        if not (word.isupper() and word.isalpha()):
            message = 'ERR ' + message
        return ('-%s\r\n' % message).encode('utf-8')


vaurien.Protocol.register(Redis)
