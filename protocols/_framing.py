"""What the framed protocols share: a streaming parser driver and a
protocol base class that draws the behavior mix per request.

A framed protocol describes its two streams with two generators,
``parse_requests`` (client to backend) and ``parse_responses`` (backend to
client).  Each yields *instructions* to a ``StreamParser`` (read a line,
pass N bytes on, mark where a message starts and ends) and gets back what
was read.  Bytes are passed on as soon as they are parsed: a large value is
never held whole in memory, only lines and small headers are.

``FramedProtocol`` turns the parsers' events into exchanges:

- a request's start draws the behavior mix (``Connection.start_exchange``);
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
"""

import collections
import socket

import vaurien
from vaurien import BaseProtocol, HANDLED


# Instructions a parsing generator yields (tuples whose first item is one
# of these); what the generator gets back is noted after each.
LINE = 'line'       # (LINE, limit, emit=True) -> the line, with its b'\n'
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
        self.buf = bytearray()
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
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def feed_eof(self):
        self.eof = True

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
        parts = [value for kind, value in self.events if kind == 'data']
        parts.append(bytes(self.held))
        parts.append(bytes(self.buf[self.pos:]))
        self.events.clear()
        self.held = bytearray()
        self.buf = bytearray()
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
            except FramingError as exc:
                self._fail(str(exc))
                return True
            except Exception as exc:    # a parser bug or a value it chokes on
                self._fail('%s: %s' % (type(exc).__name__, exc))
                return True
        instr = self._instr
        kind = instr[0]
        buf = self.buf
        pos = self.pos
        avail = len(buf) - pos
        if kind == LINE:
            limit = instr[1]
            index = buf.find(b'\n', pos, pos + limit)
            if index < 0:
                if avail >= limit:
                    self._fail('a line longer than %d bytes' % limit)
                    return True
                return False
            value = bytes(buf[pos:index + 1])
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
            self._take(bytes(buf[pos:pos + take]), True)
            self.pos = pos + take
            if take == count:
                self._done()
            else:
                self._instr = (SKIP, count - take)
            return True
        if kind == SCAN:
            try:
                newpos, done, result = instr[1](buf, pos)
            except FramingError as exc:
                self._fail(str(exc))
                return True
            except Exception as exc:
                self._fail('%s: %s' % (type(exc).__name__, exc))
                return True
            if newpos > pos:
                self._take(bytes(buf[pos:newpos]), True)
                self.pos = newpos
            if done:
                self._done(result)
                return True
            return newpos > pos
        if kind == READ:
            count = instr[1]
            if avail < count:
                return False
            value = bytes(buf[pos:pos + count])
            self.pos = pos + count
            self._take(value, len(instr) < 3 or instr[2])
            self._done(value)
            return True
        if kind == PEEK:
            count = instr[1]
            if avail < count and not (self.eof and avail):
                return False
            self._done(bytes(buf[pos:pos + count]))
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
                self._take(bytes(buf[pos:]), True)
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


def _hooks_act(behavior, to_backend):
    """Whether *behavior* has socket hooks acting on data going this way
    (behaviors may be limited to one direction, or act on the byte stream
    only: those need no hooks, only the outlet)."""
    if behavior is None or behavior.passive:
        return False
    if not getattr(behavior, 'hooks', True):
        return False
    acts = getattr(behavior, 'acts', None)
    return acts is None or acts(to_backend)


class FramedProtocol(BaseProtocol):
    """A protocol that frames both streams into messages, and draws the
    behavior mix once per request instead of once per read."""

    options = dict(BaseProtocol.options)

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
        # what goes out at the next flush: [(behavior, [bytes])] each way
        self._up = []
        self._down = []
        self._req = self._resp = None
        self._req_behavior = None   # behavior of the request being framed
        self._req_ex = None         # its exchange, when hooks act on it
        self._req_mode = 'forward'  # or 'discard' (after HANDLED)
        self._resp_behavior = None
        self._resp_ex = None
        self._resp_assoc = False
        self._resp_drop = False
        self._serving = None
        self._serve_ended = False
        self._serve_lost = False
        self._consumed = []

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

    # the engine's side

    def setup(self, client, backend):
        super(FramedProtocol, self).setup(client, backend)
        self.client, self.backend = client, backend
        self._req = StreamParser(self.parse_requests())
        self._resp = StreamParser(self.parse_responses())

    def __call__(self, source, dest, to_backend):
        data = BaseProtocol._get_data(self, source)
        if self.passthrough:
            dest = self._dest(to_backend)
            if not data:
                return self._end_of_stream(source, dest)
            dest.sendall(data)
            return True
        if to_backend:
            return self._from_client(data)
        return self._from_backend(data)

    def _dest(self, to_backend, behavior=None):
        """The socket to send to, or the engine's outlet for it when stream
        behaviors act on these bytes or earlier pieces still wait."""
        sock = self.backend if to_backend else self.client
        outlet = getattr(self.connection, 'outlet', None)
        if outlet is None:
            return sock
        if behavior is not None and behavior.passive:
            behavior = None
        if behavior is not None:
            acts = getattr(behavior, 'acts', None)
            if acts is not None and not acts(to_backend):
                behavior = None
        return outlet(sock, to_backend, behavior)

    def _out(self, to_backend, behavior, data):
        parts = self._up if to_backend else self._down
        if parts and parts[-1][0] is behavior:
            parts[-1][1].append(data)
        else:
            parts.append((behavior, [data]))

    def _flush(self):
        for to_backend in (True, False):
            parts = self._up if to_backend else self._down
            if not parts:
                continue
            if to_backend:
                self._up = []
            else:
                self._down = []
            for behavior, chunks in parts:
                data = b''.join(chunks)
                if data:
                    self._dest(to_backend, behavior).sendall(data)

    def _get_data(self, sock, buffer=None):
        """While a behavior's hook runs, serve it the bytes of the current
        message only (from what was read already, then from *sock*)."""
        sock = getattr(sock, 'sock', sock)      # an outlet: its socket
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

    # client to backend

    def _from_client(self, data):
        return self._from(True, data)

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

    def _pump_requests(self):
        parser = self._req
        while not self.passthrough:
            event = parser.next_event()
            if event is None:
                break
            kind, value = event
            if kind == 'data':
                if self._req_mode == 'forward':
                    self._out(True, self._req_behavior, value)
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

    def _start_request(self, info):
        conn = self.connection
        exchange = conn.start_exchange()
        self.request = info
        self._req_ex = None
        self._req_mode = 'forward'
        behavior = self._req_behavior = exchange.behavior
        if not _hooks_act(behavior, True):
            self._expect(exchange, info)
            return True
        # every earlier answer goes to the client first
        self._flush()
        if not self._drain():
            return False
        if self.passthrough:
            return True
        conn.exchange = exchange
        self.request = info
        self.close_after_answer = False
        verdict = self._hook(behavior.on_before_handle, self._req,
                             self.client, self.backend, True)
        if verdict is False:
            return False
        if self.passthrough:
            return True
        self._req_ex = exchange
        if verdict is HANDLED and info.get('keep_backend_in_step'):
            # the backend cannot be told to forget this request: it gets
            # it whole, and its answer is dropped (the client has one)
            for data in self._consumed:
                self._out(True, behavior, data)
            self._expect(exchange, dict(info, drop_answer=True))
        elif verdict is HANDLED:
            self._req_mode = 'discard'
            if self.close_after_answer:
                try:
                    self.client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        else:
            self._expect(exchange, info)
        return True

    def _end_request(self):
        exchange, mode = self._req_ex, self._req_mode
        self._req_ex = None
        self._req_behavior = None
        self._req_mode = 'forward'
        if exchange is None or mode == 'discard':
            return True
        self._flush()
        self.connection.exchange = exchange
        if not self._between(self.client, self._dest(True, exchange.behavior),
                             True):
            return False
        return exchange.behavior.on_after_handle(
            self, self.client, self._dest(True, exchange.behavior),
            True) is not False

    def _expect(self, exchange, info):
        for _ in range(info.get('replies', 1)):
            self.expected.append((exchange, info))

    def _drain(self):
        """Relay the backend's answers until none is awaited, and until the
        client got every byte sent its way."""
        while self.expected and not self.passthrough:
            if not self._wait(self.backend):
                return False
            data = BaseProtocol._get_data(self, self.backend)
            if not self._from_backend(data):
                return False
            if not data:
                break
        return self._settle()

    def _settle(self):
        """Wait until pieces that stream behaviors hold for the client are
        sent (so that an answer of a hook cannot overtake them)."""
        return self.connection.wait_sent(False)

    def _wait(self, sock):
        return vaurien.wait_readable(
            sock, getattr(self.proxy, 'idle_timeout', None))

    # backend to client

    def _from_backend(self, data):
        return self._from(False, data)

    def _pump_responses(self):
        parser = self._resp
        while not self.passthrough:
            event = parser.next_event()
            if event is None:
                break
            kind, value = event
            if kind == 'data':
                if not self._resp_drop:
                    self._out(False, self._resp_behavior, value)
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
        self._resp_behavior = None
        self._resp_assoc = False
        self._resp_drop = False
        if info.get('push') or not self.expected:
            return True
        exchange, request = self.expected[0]
        self._resp_assoc = True
        if request.get('drop_answer'):
            self._resp_drop = True
            return True
        self._resp_behavior = exchange.behavior
        if not _hooks_act(exchange.behavior, False):
            return True
        self._resp_ex = exchange
        self._flush()
        return self._response_hook(exchange, 'on_before_handle')

    def _end_response(self, info):
        exchange, assoc = self._resp_ex, self._resp_assoc
        if info.get('interim'):
            return True
        self._resp_ex = None
        self._resp_behavior = None
        self._resp_assoc = False
        self._resp_drop = False
        if not assoc:
            return True
        if self.expected:
            self.expected.popleft()
        if exchange is None:
            return True
        self._flush()
        return self._response_hook(exchange, 'on_after_handle')

    def _response_hook(self, exchange, name):
        conn = self.connection
        current = conn.exchange
        conn.exchange = exchange
        try:
            hook = getattr(exchange.behavior, name)
            dest = self._dest(False, exchange.behavior)
            if name == 'on_before_handle':
                verdict = self._hook(hook, self._resp, self.backend, dest,
                                     False)
            else:
                verdict = hook(self, self.backend, dest, False)
        finally:
            conn.exchange = current
        return verdict is not False

    # shared

    def _hook(self, hook, parser, source, dest, to_backend):
        self._serving = (source, parser)
        self._serve_ended = self._serve_lost = False
        self._consumed = []
        if to_backend:
            dest = self._dest(True, self.connection.exchange.behavior)
        try:
            return hook(self, source, dest, to_backend)
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
                'passing this connection through unchanged', label,
                self.name, where, reason)
        else:
            vaurien.logger.debug('connection %s: protocol %s: %s; plain '
                                 'pass-through from now on', label,
                                 self.name, reason)
        self.expected.clear()
        self._serving = None
        self._out(True, None, self._req.rest())
        self._out(False, None, self._resp.rest())
        self._flush()
