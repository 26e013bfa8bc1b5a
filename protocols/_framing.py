"""What the framed protocols share: a streaming parser driver and a
protocol base class that draws the behavior mix per request.

A framed protocol describes its two streams with two generators,
``parse_requests`` (client to backend) and ``parse_responses`` (backend to
client).  Each yields *instructions* to a ``StreamParser`` (read a line,
pass N bytes on, mark where a message starts and ends) and gets back what
was read.  Bytes are passed on as soon as they are parsed: a large value is
never held whole in memory, only lines and small headers are.

``FramedProtocol`` turns the parsers' events into exchanges:

- a request's start draws the behavior mix (``Connection.start_exchange``):
  its info (the START instruction's dict) says in ``request`` what it is
  in a few words, for the decision log, and in ``text`` what the option
  ``match`` compares with (see ``vaurien.RequestMatch``);
- for the passive ``dummy`` behavior the request goes on at once, so that
  pipelined requests stay pipelined;
- for an active behavior the answers to every earlier request are relayed
  first (a synthetic error can never overtake them), then the behavior's
  hooks run, and ``_get_data(client)`` serves the bytes of that request
  only; ``HANDLED`` drops the rest of the request;
- each response belongs to the oldest request still waiting for one; push
  messages and greetings belong to none;
- when a parser meets something it cannot frame, the connection falls back
  to plain pass-through for good, with one warning line, and no byte is
  lost.

A parser never sits on bytes it cannot frame: a line is checked as it
arrives (the ``check`` of a LINE instruction), so that bytes that can no
longer start a valid message (a TLS ClientHello on a plain port, a bad
method byte) make it fall back at once, and a line may be no longer than
what the real servers accept before they refuse it.  Waiting for the end of
such a line would stall a client that the server itself answers at once.
"""

import collections
import itertools
import re
import socket

import vaurien
from vaurien import BaseProtocol, HANDLED


# Instructions a parsing generator yields (tuples whose first item is one
# of these); what the generator gets back is noted after each.
LINE = 'line'       # (LINE, limit, emit=True, check=None) -> the line,
                    #   with its b'\n'; while its end is not there,
                    #   check(the line so far) raises FramingError when
                    #   it can no longer become a line the parser takes
                    #   (a whole line is the generator's to judge)
READ = 'read'       # (READ, n, emit=True) -> exactly n bytes
PEEK = 'peek'       # (PEEK, n) -> up to n bytes, not consumed (fewer at EOF)
SKIP = 'skip'       # (SKIP, n) -> None once n bytes were passed on
ALL = 'all'         # (ALL,) -> None at end of stream; passes everything
SCAN = 'scan'       # (SCAN, fn) -> fn's result; fn(buf, pos) returns
                    #   (newpos, done, result): bytes up to newpos pass on
START = 'start'     # (START, info) -> None: a message starts here
END = 'end'         # (END, info) -> None: the message ends here
REPLACE = 'replace'  # (REPLACE, data): what was read unemitted becomes data
FLUSH = 'flush'     # (FLUSH,) -> None: pass on what was read unemitted
PASS = 'pass'       # (PASS, reason): stop framing, plain pass-through
RUN = 'run'         # (RUN, fn) -> None: whole messages at once, see below

# RUN is the fast lane of a parser at a message boundary.  fn(buf, pos)
# returns (newpos, infos): buf[pos:newpos] is a run of whole messages, one
# info each (a 'run' event carries both), or (pos, None) when it takes
# none; or (newpos, None, messages): whole messages each to be its own,
# [(end, start info, end info)] in order, as START, the bytes and END
# would give them (for when behaviors may act: each is an exchange).
# While fn takes every byte there is, the instruction waits for the next
# ones and calls fn again; it hands back to the generator as soon as fn
# stops short of the end (at a message it leaves to the generator: one
# that is not all there yet, or that it does not frame itself), and at the
# end of the stream.  So a run never sits on bytes: the generator gets
# them, checks them and streams them as before.


#: an exchange's plan one way when no behavior acts that way
_IDLE = ((), ())


_SQL_LEAD = re.compile(r'\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*', re.S)


def sql_text(sql):
    """An SQL statement (bytes or str) as the option ``match`` sees it:
    decoded, without the comments and blanks before it nor the semicolon
    and blanks after it."""
    text = sql.decode('utf-8', 'replace') if isinstance(sql, bytes) else sql
    text = text[_SQL_LEAD.match(text).end():]
    return text.rstrip().rstrip(';').rstrip()


def words_text(words, limit=16):
    """The first *limit* of a command's *words* (bytes; None for one too
    large to read) as one line of text, for the option ``match``."""
    return ' '.join('...' if word is None else word.decode('latin-1')
                    for word in words[:limit])


class FramingError(Exception):
    """The stream is not what the parser expects."""


class StreamParser(object):
    """Runs a parsing generator over a byte stream fed in chunks.

    ``next_event()`` returns ``('data', bytes)``, ``('start', info)``,
    ``('end', info)``, ``('pass', reason)`` or ``('error', reason)``, or
    None when it needs more bytes.  Bytes read without being emitted are
    *held* and come out right after the next start, end or emitted read.
    """

    def __init__(self, generator):
        self.buf = b''
        self.pos = 0
        self.held = bytearray()
        self.events = collections.deque()
        self.eof = False
        self.finished = False
        self._gen = generator
        self._instr = None
        self._resume = True
        self._value = None

    def feed(self, data):
        # bytes, not a bytearray: a read that is passed on whole (the
        # usual case) is never copied, and slices of it are bytes already
        if type(data) is not bytes:
            data = bytes(data)
        if self.pos >= len(self.buf):
            self.buf = data
        else:
            self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def feed_eof(self):
        self.eof = True

    def start(self):
        """Run the generator to its first instruction before any byte
        comes: a first RUN then takes the first read on the fast lane."""
        if self._instr is None and not self.finished:
            self._step()

    def between_messages(self):
        """Whether the stream is at a message boundary with nothing left
        to frame: the generator waits at a RUN instruction (it yields those
        between messages only) and every byte fed has been passed on."""
        instr = self._instr
        return (instr is not None and instr[0] is RUN and not self._resume
                and not self.events and not self.held and
                self.pos >= len(self.buf))

    def run_now(self):
        """The fast lane of the fast lane: when the generator waits at a
        RUN instruction and nothing else is pending, carry it out; returns
        the run ``(data, infos)`` when its function took every byte there
        (no event: the caller passes them on), else None (and the events
        are what ``_step`` makes of it)."""
        instr = self._instr
        if self._resume or instr is None or instr[0] is not RUN or \
                self.events or self.held or self.finished:
            return None
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            return None
        try:
            result = instr[1](buf, pos)
        except Exception as exc:
            self._failed(exc)
            return None
        if result[0] >= len(buf) and len(result) == 2:
            self.buf, self.pos = b'', 0
            return buf[pos:], result[1]
        self._ran(buf, pos, result)
        if result[0] < len(buf):
            self._done()
        return None

    def _ran(self, buf, pos, result):
        """The events of what a RUN function took (*result*)."""
        newpos = result[0]
        if newpos <= pos:
            return
        self._emit_held()
        events = self.events
        if len(result) > 2:
            for end, start, stop in result[2]:
                events.append(('start', start))
                events.append(('data', buf[pos:end]))
                events.append(('end', stop))
                pos = end
        else:
            events.append(('run', (buf[pos:newpos], result[1])))
        self.pos = newpos

    def unget(self, event):
        self.events.appendleft(event)

    def next_event(self):
        events = self.events
        while not events:
            if self.finished or not self._step():
                return None
        return events.popleft()

    def rest(self):
        """Every byte received and not passed on yet; stops the parser."""
        parts = [value if kind == 'data' else value[0]
                 for kind, value in self.events if kind in ('data', 'run')]
        parts.append(bytes(self.held))
        parts.append(bytes(self.buf[self.pos:]))
        self.events.clear()
        self.held = bytearray()
        self.buf = b''
        self.pos = 0
        self.finished = True
        self._gen.close()
        return b''.join(parts)

    # the driver

    def _emit_held(self):
        if self.held:
            self.events.append(('data', bytes(self.held)))
            self.held = bytearray()

    def _take(self, value, emit):
        if emit:
            self._emit_held()
            self.events.append(('data', value))
        else:
            self.held += value

    def _done(self, value=None):
        self._value = value
        self._resume = True

    def _fail(self, reason):
        self.events.append(('error', reason))
        self.finished = True

    def _failed(self, exc):
        """Fail on *exc*: a FramingError, or a parser bug or a value it
        chokes on (named by its type)."""
        if isinstance(exc, FramingError):
            self._fail(str(exc))
        else:
            self._fail('%s: %s' % (type(exc).__name__, exc))

    def _step(self):
        """Carry out (part of) one instruction; False when stuck."""
        if self._resume:
            self._resume = False
            value, self._value = self._value, None
            try:
                self._instr = self._gen.send(value)
            except StopIteration:
                self._emit_held()
                self.events.append(('pass', 'end of what the parser knows'))
                self.finished = True
                return True
            except Exception as exc:
                self._failed(exc)
                return True
        instr = self._instr
        kind = instr[0]
        buf = self.buf
        pos = self.pos
        avail = len(buf) - pos
        if kind == RUN:
            if not avail:
                if self.eof:
                    self._done()
                    return True
                return False
            try:
                result = instr[1](buf, pos)
            except Exception as exc:
                self._failed(exc)
                return True
            self._ran(buf, pos, result)
            if result[0] < len(buf):
                self._done()
            return True
        if kind == LINE:
            limit = instr[1]
            index = buf.find(b'\n', pos, pos + limit)
            if index < 0:
                # the check first: it names the trouble better
                if len(instr) > 3 and instr[3] is not None and avail:
                    try:
                        instr[3](buf[pos:pos + limit])
                    except Exception as exc:
                        self._failed(exc)
                        return True
                if avail >= limit:
                    self._fail('no end of line within %d bytes' % limit)
                    return True
                return False
            value = buf[pos:index + 1]
            self.pos = index + 1
            self._take(value, len(instr) < 3 or instr[2])
            self._done(value)
            return True
        if kind == SKIP:
            count = instr[1]
            if count <= 0:
                self._done()
                return True
            if not avail:
                return False
            take = min(count, avail)
            self._take(buf[pos:pos + take], True)
            self.pos = pos + take
            if take == count:
                self._done()
            else:
                self._instr = (SKIP, count - take)
            return True
        if kind == SCAN:
            try:
                newpos, done, result = instr[1](buf, pos)
            except Exception as exc:
                self._failed(exc)
                return True
            if newpos > pos:
                self._take(buf[pos:newpos], True)
                self.pos = newpos
            if done:
                self._done(result)
                return True
            return newpos > pos
        if kind == READ:
            count = instr[1]
            if avail < count:
                return False
            value = buf[pos:pos + count]
            self.pos = pos + count
            self._take(value, len(instr) < 3 or instr[2])
            self._done(value)
            return True
        if kind == PEEK:
            count = instr[1]
            if avail < count and not (self.eof and avail):
                return False
            self._done(buf[pos:pos + count])
            return True
        if kind == START:
            self.events.append(('start', instr[1]))
            self._emit_held()
            self._done()
            return True
        if kind == END:
            self._emit_held()
            self.events.append(('end', instr[1]))
            self._done()
            return True
        if kind == FLUSH:
            self._emit_held()
            self._done()
            return True
        if kind == REPLACE:
            self.held = bytearray(instr[1])
            self._done()
            return True
        if kind == ALL:
            if avail:
                self._take(buf[pos:], True)
                self.pos = len(buf)
                return True
            if self.eof:
                self._done()
                return True
            return False
        if kind == PASS:
            self.events.append(('pass', instr[1]))
            self.finished = True
            return True
        self._fail('unknown parser instruction %r' % (kind,))
        return True


def number(text, what='number', low=0, high=None):
    """A decimal number from *text* (bytes), within bounds, or
    FramingError."""
    text = text.strip()
    if not text or not (text.isdigit() or (text[:1] == b'-' and
                                           text[1:].isdigit())):
        raise FramingError('malformed %s %r' % (what, text[:40]))
    value = int(text)
    if value < low or (high is not None and value > high):
        raise FramingError('%s %d out of range' % (what, value))
    return value


#: the bytes a TLS stream starts with: a record of type handshake (22) or
#: alert (21), protocol version 3.x (SSL 3.0 to TLS 1.3)
_TLS_TYPES = {22: 'handshake', 21: 'alert'}
_TLS_HANDSHAKES = {1: 'ClientHello', 2: 'ServerHello'}
#: printable ASCII (a regular expression's class): what the first word of
#: a text protocol's line is made of
PRINTABLE = br'\x21-\x7e'


def tls_hint(data):
    """A few words naming the TLS record that *data* (the first bytes of a
    message) starts, e.g. ``'a TLS ClientHello'``, or None when it does
    not look like TLS.  Three bytes are enough to tell."""
    if len(data) < 3 or data[0] not in _TLS_TYPES or data[1] != 3 or \
            data[2] > 4:
        return None
    if data[0] == 21:
        return 'a TLS alert'
    if len(data) > 5 and data[5] in _TLS_HANDSHAKES:
        return 'a TLS ' + _TLS_HANDSHAKES[data[5]]
    return 'a TLS handshake'


def cannot_start(what, data):
    """The FramingError for bytes *data* that cannot start *what* (e.g.
    ``'an HTTP/1.x request line'``); it says so when they are TLS (a TLS
    client or server on a plain port: encrypted bytes, nothing to frame)."""
    hint = tls_hint(data)
    if hint:
        return FramingError('%s, not %s: this connection speaks TLS'
                            % (hint, what))
    return FramingError('not %s: %r' % (what, bytes(data[:60])))


def refuse(what):
    """A SCAN function that fails on the bytes there: they cannot start
    *what*.  It sees every byte received so far, enough to tell TLS."""
    def scan(buf, pos):
        raise cannot_start(what, buf[pos:pos + 60])
    return scan


def word_check(what, allowed=PRINTABLE):
    """A LINE check for text protocols: after spaces or tabs, the line
    starts with a word of *allowed* bytes (a regular expression's class),
    ended by a space, a tab or the line's end.  A command that starts
    otherwise (a control byte, binary data, TLS) cannot be one."""
    match = re.compile(br'[ \t]*[%s]*(?:[ \t\r\n]|\Z)' % allowed).match

    def check(line):
        if match(line) is None:
            raise cannot_start(what, line)
    return check


def template_check(what, template):
    """A LINE check: the line's first bytes fit *template*, a sequence of
    regular expressions of one byte each (e.g. three ``[0-9]`` and
    ``[- \\r\\n]``), as far as the line goes."""
    pattern = b''
    for atom in reversed(template):
        pattern = atom + (b'(?:%s)?' % pattern if pattern else b'')
    match = re.compile(pattern).match
    size = len(template)

    def check(line):
        found = match(line)
        if found is None or found.end() < min(len(line), size):
            raise cannot_start(what, line)
    return check


class FramedProtocol(BaseProtocol):
    """A protocol that frames both streams into messages, and starts an
    exchange per request instead of per read: the engine calls its
    ``_handle`` for every read (``frames = True``), and it runs each
    exchange's hooks (``Exchange.before``, ``between``, ``after``) at the
    request's and the answer's boundaries."""

    options = dict(BaseProtocol.options)
    frames = True
    matches_requests = True

    def __init__(self, settings=None, proxy=None):
        super(FramedProtocol, self).__init__(settings, proxy)
        self.passthrough = False
        #: ``(exchange, request info)`` of each answer awaited, oldest first
        self.expected = collections.deque()
        #: the info of the request being handled (for ``_error_answer``)
        self.request = None
        #: set by ``_error_answer`` to close after the answer (HTTP)
        self.close_after_answer = False
        self.client = self.backend = None
        # what goes out at the next flush: [(exchange, [bytes])] each way
        self._up = []
        self._down = []
        self._req = self._resp = None
        self._req_ex = None         # exchange of the request being framed
        self._req_hooked = False    # its hooks ran: between, after to come
        self._req_mode = 'forward'  # or 'discard' (after HANDLED)
        self._resp_ex = None        # exchange of the answer being framed
        self._resp_hooked = False
        self._resp_assoc = False
        self._resp_drop = False
        self._serving = None
        self._serve_ended = False
        self._serve_lost = False
        self._consumed = []
        self._single = None         # what quiet() saw last

    # what subclasses write

    def parse_requests(self):
        """Generator of instructions framing the client's stream."""
        raise NotImplementedError

    def parse_responses(self):
        """Generator of instructions framing the backend's stream."""
        raise NotImplementedError

    def awaited(self):
        """The info of the oldest request still waiting for an answer."""
        if self.expected:
            return self.expected[0][1]
        return None

    # what subclasses may use for their fast lanes (RUN instructions)

    def quiet(self):
        """``(name, behavior)`` of the one passive behavior that every
        request of this connection meets now, when no behavior nor toxic
        can act on it: then requests may pass in runs (a RUN function
        returns their infos, each awaiting one answer), counted as
        exchanges of that behavior without a draw; else None.  A RUN
        function of requests asks at each call: a behavior switched on
        meanwhile acts from the next request on."""
        conn = self.connection
        single = conn.server.mix.single
        if single is None or not single[1].passive or \
                conn.toxic_plan is not None:
            return None
        self._single = single
        return single

    def described(self):
        """Whether each request must be described whole now (its info's
        ``text``), because a behavior or a toxic with a match is in force:
        a RUN function that hands requests one by one leaves them to the
        parser then."""
        conn = self.connection
        return conn.server.mix.matching or conn.toxics_matching is not None

    def answers_pass(self):
        """The deque of ``(exchange, request info)`` awaiting answers, when
        answers may pass in runs at all (no toxic acts on this connection);
        else None.  A RUN function of answers takes one only while
        ``passes(exchange)`` says no behavior acts on it, and pops its entry
        (``expected.popleft()``) as it takes it."""
        if self.connection.toxic_plan is not None:
            return None
        return self.expected

    def passes(self, exchange):
        """Whether no behavior acts on *exchange*'s answer."""
        return exchange is self.connection.plain or \
            exchange.plan[False] == _IDLE

    # the engine's side

    def setup(self, client, backend):
        super(FramedProtocol, self).setup(client, backend)
        self.client, self.backend = client, backend
        self._req = StreamParser(self.parse_requests())
        self._resp = StreamParser(self.parse_responses())
        self._req.start()
        self._resp.start()

    def _handle(self, source, dest, to_backend):
        if self.passthrough:
            # as under plain tcp, the engine drawing the exchanges
            return vaurien.TCP._handle(self, source, dest, to_backend)
        return self._from(to_backend, BaseProtocol._get_data(self, source))

    def _dest(self, to_backend, exchange=None):
        """The side to send to, or the outlet of *exchange*'s stream
        behaviors in front of it."""
        side = self.backend if to_backend else self.client
        if exchange is None:
            return side
        return exchange.outlet(side, to_backend)

    def _out(self, to_backend, exchange, data):
        parts = self._up if to_backend else self._down
        if parts and parts[-1][0] is exchange:
            parts[-1][1].append(data)
        else:
            parts.append((exchange, [data]))

    def _flush(self):
        if self._up:
            parts, self._up = self._up, []
            self._send_parts(True, parts)
        if self._down:
            parts, self._down = self._down, []
            self._send_parts(False, parts)

    def _send_parts(self, to_backend, parts):
        for exchange, chunks in parts:
            data = chunks[0] if len(chunks) == 1 else b''.join(chunks)
            if data:
                self._dest(to_backend, exchange).sendall(data)

    def _get_data(self, sock, buffer=None):
        """While a behavior's hook runs, serve it the bytes of the current
        message only (from what was read already, then from *sock*)."""
        sock = getattr(sock, 'side', sock)      # an outlet: its side
        serving = self._serving
        if serving is None or serving[0] is not sock or self.passthrough:
            return BaseProtocol._get_data(self, sock, buffer)
        if self._serve_ended:
            # the hook reads past its message: it takes those bytes, and
            # the framing is lost for the rest of the connection
            self._serve_lost = True
            return BaseProtocol._get_data(self, sock, buffer)
        parser = serving[1]
        chunks = []
        while True:
            event = parser.next_event()
            if event is None:
                if chunks or parser.eof:
                    break
                data = BaseProtocol._get_data(self, sock, buffer)
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
                continue
            if event[0] == 'data':
                chunks.append(event[1])
                continue
            parser.unget(event)
            self._serve_ended = True
            break
        data = b''.join(chunks)
        self._consumed.append(data)
        return data

    def _from(self, to_backend, data):
        """Feed what one side sent (b'': its end of stream) to its parser
        and act on the events."""
        if to_backend:
            parser, pump, source = self._req, self._pump_requests, self.client
        else:
            parser, pump, source = (self._resp, self._pump_responses,
                                    self.backend)
        if data:
            parser.feed(data)
            run = parser.run_now()
            if run is not None and not (self._up or self._down):
                # what a run takes, nothing acts on (no toxic, a passive
                # behavior): straight on, as plain tcp sends it
                if to_backend:
                    self._count_run(run[1])
                    self.backend.sendall(run[0])
                else:
                    self.client.sendall(run[0])
                return True
            if run is not None:
                self._queue_run(to_backend, run)
                self._flush()
                return True
        elif parser.between_messages() and not (self._up or self._down):
            # the end of the stream between two messages: nothing to
            # frame, no hook to run (as when its parser goes to the end)
            return self._end_of_stream(source, self._dest(to_backend))
        else:
            parser.feed_eof()
        if not pump():
            return False
        if not data:
            if not self.passthrough:
                # what the parser still holds (an unfinished message)
                self._out(to_backend, None, parser.rest())
            self._flush()
            return self._end_of_stream(source, self._dest(to_backend))
        return True

    # client to backend

    def _pump_requests(self):
        parser = self._req
        while not self.passthrough:
            event = parser.next_event()
            if event is None:
                break
            kind, value = event
            if kind == 'data':
                if self._req_mode == 'forward':
                    self._out(True, self._req_ex, value)
            elif kind == 'run':
                self._queue_run(True, value)
            elif kind == 'start':
                if not self._start_request(value):
                    return False
            elif kind == 'end':
                if not self._end_request():
                    return False
            else:
                self._fall_back(kind, value, "client's stream")
        self._flush()
        return True

    def _count_run(self, infos):
        """Whole requests that a RUN function took while quiet(): counted
        as exchanges of the passive behavior it saw, each awaiting its
        answer.  Returns the exchange they share."""
        exchange = self.connection.pass_exchanges(len(infos), self._single)
        self.expected.extend(zip(itertools.repeat(exchange), infos))
        return exchange

    def _queue_run(self, to_backend, run):
        """A run ``(data, infos)`` of requests or answers, queued for the
        next flush."""
        if to_backend:
            self._out(True, self._count_run(run[1]), run[0])
        else:
            # answers no behavior acts on (their entries in expected are
            # gone already)
            self._out(False, None, run[0])

    def _start_request(self, info):
        if info.get('setup'):
            # the connection's set-up (a login, a client library's
            # greeting): never an exchange, it passes untouched
            self._req_ex, self._req_hooked = None, False
            self._req_mode = 'forward'
            self._expect(self.connection.plain, info)
            return True
        exchange = self.connection.start_exchange(info.get('request'),
                                                  info.get('text'))
        self.request = info
        self._req_ex = exchange
        self._req_hooked = False
        self._req_mode = 'forward'
        if not exchange.hooks_act(True):
            self._expect(exchange, info)
            return True
        # every earlier answer goes to the client first
        self._flush()
        if not self._drain():
            return False
        if self.passthrough:
            return True
        self.request = info
        self.close_after_answer = False
        verdict = self._serve_hook(exchange.before, self._req, self.client,
                                   self._dest(True, exchange), True)
        if verdict is False:
            return False
        if self.passthrough:
            return True
        self._req_hooked = True
        if verdict is HANDLED and info.get('keep_backend_in_step'):
            # the backend cannot be told to forget this request: it gets
            # it whole, and its answer is dropped (the client has one)
            for data in self._consumed:
                self._out(True, exchange, data)
            self._expect(exchange, dict(info, drop_answer=True))
        elif verdict is HANDLED:
            self._req_mode = 'discard'
            if self.close_after_answer:
                self.client.shutdown(socket.SHUT_WR)
        else:
            self._expect(exchange, info)
        return True

    def _end_request(self):
        exchange, hooked = self._req_ex, self._req_hooked
        discarded = self._req_mode == 'discard'
        self._req_ex = None
        self._req_hooked = False
        self._req_mode = 'forward'
        if not hooked or discarded:
            return True
        self._flush()
        dest = self._dest(True, exchange)
        return (exchange.between(self, self.client, dest, True) and
                exchange.after(self, self.client, dest, True))

    def _expect(self, exchange, info):
        for _ in range(info.get('replies', 1)):
            self.expected.append((exchange, info))

    def _drain(self):
        """Relay the backend's answers until none is awaited (what a hook
        answers then goes to the client after them: the client's side keeps
        the order)."""
        conn = self.connection
        while self.expected and not self.passthrough:
            if not conn.duplex.wait_readable(self.backend,
                                             conn.server.idle_timeout):
                return False
            data = BaseProtocol._get_data(self, self.backend)
            if not self._from(False, data):
                return False
            if not data:
                break
        return True

    # backend to client

    def _pump_responses(self):
        parser = self._resp
        while not self.passthrough:
            event = parser.next_event()
            if event is None:
                break
            kind, value = event
            if kind == 'data':
                if not self._resp_drop:
                    self._out(False, self._resp_ex, value)
            elif kind == 'run':
                self._queue_run(False, value)
            elif kind == 'start':
                if not self._start_response(value):
                    return False
            elif kind == 'end':
                if not self._end_response(value):
                    return False
            else:
                self._fall_back(kind, value, "backend's stream")
        self._flush()
        return True

    def _start_response(self, info):
        self._resp_ex = None
        self._resp_hooked = False
        self._resp_assoc = False
        self._resp_drop = False
        if info.get('push') or not self.expected:
            return True
        exchange, request = self.expected[0]
        self._resp_assoc = True
        if request.get('drop_answer'):
            self._resp_drop = True
            return True
        self._resp_ex = exchange
        if not exchange.hooks_act(False):
            return True
        self._resp_hooked = True
        self._flush()
        return self._serve_hook(exchange.before, self._resp, self.backend,
                                self._dest(False, exchange),
                                False) is not False

    def _end_response(self, info):
        exchange, assoc = self._resp_ex, self._resp_assoc
        hooked = self._resp_hooked
        if info.get('interim'):
            return True
        self._resp_ex = None
        self._resp_hooked = False
        self._resp_assoc = False
        self._resp_drop = False
        if not assoc:
            return True
        if self.expected:
            self.expected.popleft()
        if not hooked:
            return True
        self._flush()
        return exchange.after(self, self.backend, self._dest(False, exchange),
                              False)

    # shared

    def _serve_hook(self, run, parser, source, dest, to_backend):
        """Run hooks (``run``: an Exchange's ``before``) that may read from
        *source*: ``_get_data`` serves them the current message only."""
        self._serving = (source, parser)
        self._serve_ended = self._serve_lost = False
        self._consumed = []
        try:
            return run(self, source, dest, to_backend)
        finally:
            self._serving = None
            if self._serve_lost:
                self._serve_lost = False
                self._fall_back('pass', 'a behavior read past its message',
                                'stream')

    def _fall_back(self, kind, reason, where):
        """Plain pass-through from now on, without losing a byte."""
        if self.passthrough:
            return
        self.passthrough = True
        conn = self.connection
        label = conn.describe() if conn is not None else '?'
        if kind == 'error':
            vaurien.logger.warning(
                'connection %s: protocol %s cannot frame the %s (%s); '
                'passing this connection through as plain tcp', label,
                self.name, where, reason)
        else:
            vaurien.logger.debug('connection %s: protocol %s: %s; plain '
                                 'tcp from now on', label, self.name,
                                 reason)
        # from now on the engine runs the exchanges, a read of the client
        # each, as under tcp; and there are no words to answer in (error
        # sends random bytes)
        self.frames = False
        self._error_answer = lambda behavior: None
        self.expected.clear()
        self._serving = None
        self._out(True, None, self._req.rest())
        self._out(False, None, self._resp.rest())
        self._flush()
