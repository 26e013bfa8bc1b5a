"""HTTP/1.x: one exchange per request, keep-alive and pipelining intact.

Frames requests and responses by RFC 9112's rules: Content-Length,
chunked bodies with trailers, HEAD, 1xx interim responses (100-continue),
204 and 304, bodies delimited by the server's close.  After a 101
(Upgrade) or a successful CONNECT the connection is plain pass-through.
"""

import re

import vaurien

from ._framing import (ALL, END, LINE, PASS, PEEK, REPLACE, RUN, SKIP,
                       START, FLUSH, FramedProtocol, FramingError,
                       cannot_start, number, template_check)

# Requests: no line is held longer than the servers in front of which the
# proxy sits take it.  nginx (large_client_header_buffers 4 8k) answers 414
# as soon as 8192 bytes of a request line are there without their end, 400
# for a header line, and 400 past four such buffers; Apache's
# LimitRequestLine and LimitRequestFieldSize are 8190 bytes and CRLF.
MAX_REQUEST_LINE = 8 * 1024
MAX_REQUEST_HEAD = 32 * 1024    # the request line and its headers
# Responses: clients take more (Python's http.client 64 KB a line, curl
# 100 KB); a longer one makes the proxy pass the connection through.
MAX_LINE = 16 * 1024
MAX_HEADERS = 64 * 1024

REASONS = {
    400: 'Bad Request', 403: 'Forbidden', 404: 'Not Found',
    408: 'Request Timeout', 413: 'Content Too Large',
    429: 'Too Many Requests', 500: 'Internal Server Error',
    501: 'Not Implemented', 502: 'Bad Gateway', 503: 'Service Unavailable',
    504: 'Gateway Timeout', 507: 'Insufficient Storage',
}
_BLANK = (b'\r\n', b'\n')
_ENDS = (b'', b'\r', b'\r\n', b'\n')
_VERSION = b'HTTP/1.'

# RFC 9112's request line as far as it has come: a method (a token), a
# target (no space, no control byte) and the version, one of them at least
_METHOD = br"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TARGET = br'[^\x00-\x20\x7f]+'
_REQUEST_LINE = re.compile(_METHOD + br'(?:[ \t]+(?:' + _TARGET +
                           br'(?:[ \t]+([^\x00-\x20\x7f]*))?)?)?')
# and a whole one (the quick way for the usual case)
_WHOLE_REQUEST_LINE = re.compile(
    _METHOD + br'[ \t]+' + _TARGET + br'[ \t]+HTTP/1\.[0-9]\r?\n')
_WHOLE_STATUS_LINE = re.compile(br'HTTP/1\.[0-9] [0-9]{3}[ \r\n]')
# a header line as far as it has come: a name (neither space nor control
# byte, nginx refuses both at once) and its value (no NUL, nor that), a
# folded line, or the blank line that ends the block
_HEADER_LINE = re.compile(
    br'[^\x00-\x20\x7f:]+(?::[^\x00]*)?|[ \t][^\x00]*|\r\n?|\n|')
_CHUNK_LINE = re.compile(br'[0-9A-Fa-f]+[ \t]*(?:;[^\x00\n]*)?')

# The fast lane (HTTP.run_requests, run_responses): a head whose lines all
# end in CRLF, no folded line, every header a name and its colon; what it
# does not match, the parsers frame, and judge
_FAST_REQUEST_LINE = re.compile(
    br'(' + _METHOD + br') (' + _TARGET + br') HTTP/1\.([0-9])\r\n')
_FAST_STATUS_LINE = re.compile(br'HTTP/1\.[0-9] ([0-9]{3})[ \r]')
_FAST_HEADERS = re.compile(br'(?:[^\x00-\x20\x7f:]+:[^\x00\r\n]*\r\n)*\r\n')
# the headers the fast lane reads, at a line's start (the CRLF before)
_FAST_LENGTH = re.compile(
    br'\r\ncontent-length:[ \t]*([0-9]{1,15})[ \t]*\r\n', re.I)
_FAST_LENGTHS = re.compile(br'\r\ncontent-length:', re.I)
_FAST_CONNECTION = re.compile(br'\r\nconnection:([^\r]*)', re.I)
_FAST_CHUNKED = re.compile(br'\r\ntransfer-encoding:(?:[ \t]*(chunked)'
                           br'[ \t]*\r\n)?', re.I)
_FAST_CHUNK = re.compile(br'([0-9A-Fa-f]{1,8})\r\n')
#: the headers of requests the fast lane leaves to the parser (their
#: answers change the framing, or wait for the body, or it has no length)
_FAST_NOT = re.compile(br'\r\n(?:transfer-encoding|expect|upgrade):', re.I)
_INFOS_KEPT = 64
# What the fast lane found of a head depends on its bytes alone: kept for
# every connection (a new connection per request meets the same heads),
# a few of them (a dict's get and set need no lock)
_HEADS_KEPT = 64
_REQUEST_HEADS = {}     # request head -> (info, body length)
_RESPONSE_HEADS = {}    # response head -> body length, -1: chunked
_INFOS = {}             # (method, close) -> the fast lane's info (shared)

_status_line = template_check('an HTTP/1.x status line', [
    b'H', b'T', b'T', b'P', b'/', b'1', br'\.', b'[0-9]', b' ', b'[0-9]',
    b'[0-9]', b'[0-9]', b'[ \r\n]'])


def _request_line(line):
    """The LINE check of a request line (or of the blank lines tolerated
    between requests)."""
    if line in _ENDS:
        return
    match = _REQUEST_LINE.match(line)
    if match is not None and line[match.end():] in _ENDS:
        version = match.group(1)
        ended = match.end() < len(line)     # its CR or LF is there
        if version is None:
            if not ended:
                return
        elif ended or len(version) >= 8:
            if len(version) == 8 and version.startswith(_VERSION) and \
                    version[7:].isdigit():
                return
        elif _VERSION.startswith(version):
            return
    raise cannot_start('an HTTP/1.x request line', line)


def _header_line(line):
    """The LINE check of a header line."""
    if _HEADER_LINE.fullmatch(line) is None:
        raise cannot_start('a header line', line)


def _chunk_line(line):
    match = _CHUNK_LINE.match(line)
    if match is None or line[match.end():] not in _ENDS:
        raise cannot_start('a chunk size line', line)


def _crlf(line):
    if line not in _ENDS:
        raise FramingError('a chunk without its CRLF')


def _read_headers(line_limit=MAX_LINE, limit=MAX_HEADERS, size=0):
    """Reads the header block (held, not emitted); returns
    ``(headers, lines)``: ``{lowercase name: [values]}`` and the raw
    lines, the blank one included.  The block may take *limit* bytes with
    the *size* bytes read before it."""
    headers = {}
    lines = []
    name = None
    read = (LINE, line_limit, False, _header_line)
    while True:
        room = limit - size
        if room <= 0:
            raise FramingError('a header block over %d bytes' % limit)
        line = yield (read if room >= line_limit else
                      (LINE, room, False, _header_line))
        # the whole line by the same rule: a name, neither space nor control
        # byte in it, its colon, a value
        if _HEADER_LINE.fullmatch(line) is None:
            raise cannot_start('a header line', line)
        lines.append(line)
        size += len(line)
        if line in _BLANK:
            return headers, lines
        if line[:1] in (b' ', b'\t'):
            if name is None:
                raise FramingError('a folded line before any header')
            headers[name][-1] += b' ' + line.strip()
            continue
        name, _, value = line.partition(b':')
        name = name.lower()
        headers.setdefault(name, []).append(value.strip())


def _tokens(headers, name):
    found = []
    for value in headers.get(name, ()):
        found.extend(t.strip().lower() for t in value.split(b',')
                     if t.strip())
    return found


def _content_length(headers):
    values = set()
    for value in headers.get(b'content-length', ()):
        for part in value.split(b','):
            values.add(number(part, 'Content-Length'))
    if len(values) > 1:
        raise FramingError('conflicting Content-Length values')
    return values.pop() if values else None


def _chunked(line_limit=MAX_LINE):
    """Passes a chunked body and its trailers on."""
    while True:
        line = yield (LINE, line_limit, True, _chunk_line)
        size_text = line.split(b';', 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            size = -1
        if size < 0 or not size_text or size_text[:1] in b'+-':
            raise FramingError('malformed chunk size %r' % line[:40])
        if size == 0:
            break
        yield (SKIP, size)
        end = yield (LINE, 8, True, _crlf)
        _crlf(end)
    while True:                             # trailers
        line = yield (LINE, line_limit, True, _header_line)
        if line in _BLANK:
            return


class HTTP(FramedProtocol):
    """HTTP/1.1 (and 1.0): the behavior mix is drawn per request, and
    ``error`` answers an HTTP error page (a random one of 500-503 as in
    Vaurien 1.x, or the behavior's ``code``, e.g. 429 or 503)."""

    name = 'http'
    options = dict(FramedProtocol.options)
    options.update({
        'overwrite_host_header': (
            "Rewrite each request's Host header to the backend's address",
            bool, False),
        'retry_after': (
            "Seconds put in a Retry-After header of the error behavior's "
            "answers; 0 sends none", int, 0,
            vaurien.Range(0, 86400, 'seconds')),
    })
    #: a final answer: a 1xx would leave the client waiting for another
    error_codes = vaurien.Range(200, 599)

    # the fast lane: whole runs of plain requests and their responses

    def run_requests(self, buf, pos):
        """RUN function of the client's stream: the whole requests from
        *pos* on (head and Content-Length body) that no behavior can act
        on, when their heads are plain (HTTP/1.1, CRLF lines, no chunked
        body, no Expect, no Upgrade, no CONNECT, no Host to rewrite)."""
        if self.quiet() is None or self.option('overwrite_host_header'):
            return pos, None
        infos = []
        end = len(buf)
        heads = _REQUEST_HEADS
        while pos < end:
            # (a head shorter than a line may be: within every limit)
            stop = buf.find(b'\r\n\r\n', pos, pos + MAX_REQUEST_LINE) + 4
            if stop < 4:
                break
            # clients repeat their heads: one seen is framed as before
            head = buf[pos:stop]
            known = heads.get(head)
            if known is None:
                known = _request_head(head, _INFOS)
                if known is None:
                    break
                _keep(heads, head, known)
            at = stop + known[1]
            if at > end:
                break
            infos.append(known[0])
            pos = at
        return pos, infos

    def run_responses(self, buf, pos):
        """RUN function of the backend's stream: the whole responses from
        *pos* on (a Content-Length or a plain chunked body) to requests no
        behavior acts on; interim, 101, 204, 304 and answers to HEAD are
        left to the parser."""
        expected = self.answers_pass()
        if not expected:
            return pos, None
        end = len(buf)
        heads = _RESPONSE_HEADS
        while expected and pos < end:
            exchange, info = expected[0]
            method = info.get('method')
            if method == b'HEAD' or method == b'CONNECT' or \
                    not self.passes(exchange):
                break
            stop = buf.find(b'\r\n\r\n', pos, pos + MAX_LINE) + 4
            if stop < 4:
                break
            head = buf[pos:stop]
            length = heads.get(head)
            if length is None:
                length = _response_head(head)
                if length is None:
                    break
                _keep(heads, head, length)
            if length < 0:
                at = _chunks(buf, stop, end)
                if at < 0:
                    break
            else:
                at = stop + length
                if at > end:
                    break
            expected.popleft()
            pos = at
        return pos, None

    # requests

    def parse_requests(self):
        while True:
            yield (RUN, self.run_requests)
            line = yield (LINE, MAX_REQUEST_LINE, False, _request_line)
            if _WHOLE_REQUEST_LINE.fullmatch(line) is None:
                _request_line(line)         # a blank line, or it raises
            if line in _BLANK:
                yield (FLUSH,)      # tolerated between requests
                continue
            parts = line.split()
            method, version = parts[0].upper(), parts[2]
            headers, lines = yield from _read_headers(
                MAX_REQUEST_LINE, MAX_REQUEST_HEAD, len(line))
            connection = _tokens(headers, b'connection')
            info = {
                'method': method,
                # the request line, then its header lines
                'text': b'\n'.join([line.rstrip()] + [
                    header.rstrip() for header in lines[:-1]]).decode(
                        'latin-1'),
                'request': '%s %s' % (method.decode('latin-1'),
                                      parts[1][:200].decode('latin-1')),
                'close': b'close' in connection or (
                    version == b'HTTP/1.0' and b'keep-alive' not in
                    connection),
                'continue': b'100-continue' in _tokens(headers, b'expect'),
            }
            if self.option('overwrite_host_header'):
                yield (REPLACE, line + self._host(lines))
            yield (START, info)
            codings = _tokens(headers, b'transfer-encoding')
            if codings:
                if codings[-1] != b'chunked':
                    raise FramingError('a request body with no length')
                yield from _chunked(MAX_REQUEST_LINE)
            else:
                length = _content_length(headers)
                if length:
                    yield (SKIP, length)
            yield (END, info)

    def _host(self, lines):
        host, port = self.connection.backend_address[:2]
        if ':' in host:
            host = '[%s]' % host
        value = host if port == 80 else '%s:%d' % (host, port)
        out = []
        seen = False
        for line in lines:
            if line.split(b':', 1)[0].strip().lower() == b'host':
                if not seen:
                    out.append(b'Host: ' + value.encode('ascii') + b'\r\n')
                seen = True
                continue
            out.append(line)
        if not seen:
            out.insert(0, b'Host: ' + value.encode('ascii') + b'\r\n')
        return b''.join(out)

    # responses

    def parse_responses(self):
        while True:
            yield (RUN, self.run_responses)
            yield (PEEK, 1)
            line = yield (LINE, MAX_LINE, False, _status_line)
            if _WHOLE_STATUS_LINE.match(line) is None:
                raise cannot_start('an HTTP/1.x status line', line)
            status = number(line[9:12], 'status code', 100, 999)
            headers, _ = yield from _read_headers()
            request = self.awaited() or {}
            method = request.get('method')
            interim = 100 <= status < 200 and status != 101
            yield (START, {'interim': interim})
            if status == 101 or (method == b'CONNECT' and
                                 200 <= status < 300):
                yield (END, {})
                yield (PASS, 'HTTP %d: plain pass-through' % status)
            if interim:
                yield (END, {'interim': True})
                continue
            codings = _tokens(headers, b'transfer-encoding')
            if method == b'HEAD' or status in (204, 304):
                pass
            elif codings:
                if codings[-1] == b'chunked':
                    yield from _chunked()
                else:
                    yield (ALL,)
            else:
                length = _content_length(headers)
                if length is None:
                    yield (ALL,)
                elif length:
                    yield (SKIP, length)
            yield (END, {})

    # the error behavior

    def _error_answer(self, behavior):
        request = self.request or {}
        code = behavior.option('code')
        if not code:
            code = self.connection.rng.choice((500, 501, 502, 503))
        reason = REASONS.get(code, 'Error')
        message = behavior.option('message') or reason
        body = ('<html><head><title>%d %s</title></head><body><h1>%d %s'
                '</h1><p>%s</p></body></html>\n' % (
                    code, reason, code, reason, _escape(message))
                ).encode('utf-8')
        head = ['HTTP/1.1 %d %s' % (code, reason),
                'Content-Type: text/html; charset=utf-8',
                'Content-Length: %d' % len(body)]
        if self.option('retry_after'):
            head.append('Retry-After: %d' % self.option('retry_after'))
        if request.get('close') or request.get('continue'):
            # the client may not send the body it announced: end here
            head.append('Connection: close')
            self.close_after_answer = True
        if request.get('method') == b'HEAD' or code in (204, 304):
            body = b''
        return ('\r\n'.join(head) + '\r\n\r\n').encode('latin-1') + body


def _request_head(head, infos):
    """``(info, body length)`` of a request *head* (bytes, its blank line
    included) the fast lane takes, or None; *infos* keeps the infos, one
    per method and close (shared: never changed)."""
    found = _FAST_REQUEST_LINE.match(head)
    if found is None:
        return None
    method = found[1]
    line_end = found.end() - 2
    if method == b'CONNECT' or found[3] == b'0' or \
            _FAST_HEADERS.fullmatch(head, found.end()) is None or \
            _FAST_NOT.search(head, line_end):
        return None
    length = _body_length(head, line_end, 0)
    if length < 0:
        return None
    close = False
    for found in _FAST_CONNECTION.finditer(head, line_end):
        if b'close' in [token.strip().lower() for token in
                        found[1].split(b',')]:
            close = True
    info = infos.get((method, close))
    if info is None:
        info = {'method': method.upper(), 'close': close,
                'continue': False, 'request': method.decode('latin-1')}
        if len(infos) < _INFOS_KEPT:
            infos[(method, close)] = info
    return info, length


def _response_head(head):
    """The body length of a response *head* the fast lane takes, -1 for
    a plain chunked body, or None."""
    found = _FAST_STATUS_LINE.match(head)
    if found is None:
        return None
    status = int(found[1])
    line_end = head.find(b'\r\n') + 2
    if status < 200 or status in (204, 304) or \
            _FAST_HEADERS.fullmatch(head, line_end) is None:
        return None
    coding = _FAST_CHUNKED.search(head, line_end - 2)
    if coding is not None:
        if coding[1] is None or _FAST_CHUNKED.search(head,
                                                     coding.end() - 2):
            return None
        return -1
    # none: the body ends with the connection
    length = _body_length(head, line_end - 2, None)
    return None if length < 0 else length


def _body_length(head, start, missing):
    """The one Content-Length of the header lines of *head* from *start*
    on (CRLF before each), *missing* when there is none, or -1 when it
    is not that plain."""
    found = _FAST_LENGTH.search(head, start)
    if found is None:
        if missing is None or _FAST_LENGTHS.search(head, start):
            return -1
        return missing
    if _FAST_LENGTHS.search(head, found.end() - 2):
        return -1
    return int(found[1])


def _keep(cache, key, value):
    """Keep *value* for *key* in a small *cache* (a dict)."""
    if len(cache) >= _HEADS_KEPT:
        cache.clear()
    cache[key] = value


def _chunks(buf, pos, end):
    """Where the plain chunked body at *pos* ends (chunk sizes alone on
    their lines, no trailer), or -1 when it is not all there or not that
    plain."""
    chunk = _FAST_CHUNK.match
    while True:
        found = chunk(buf, pos)
        if found is None:
            return -1
        size = int(found.group(1), 16)
        pos = found.end() + size
        if buf[pos:pos + 2] != b'\r\n':
            return -1
        pos += 2
        if not size:
            return pos


def _escape(text):
    return (text.replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


vaurien.Protocol.register(HTTP)
