"""HTTP/1.x: one exchange per request, keep-alive and pipelining intact.

Frames requests and responses by RFC 9112's rules: Content-Length,
chunked bodies with trailers, HEAD, 1xx interim responses (100-continue),
204 and 304, bodies delimited by the server's close.  After a 101
(Upgrade) or a successful CONNECT the connection is plain pass-through.
"""

import re

import vaurien

from ._framing import (ALL, END, LINE, PASS, PEEK, REPLACE, SKIP, START,
                       FLUSH, FramedProtocol, FramingError, cannot_start,
                       number, template_check)

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

    # requests

    def parse_requests(self):
        while True:
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


def _escape(text):
    return (text.replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


vaurien.Protocol.register(HTTP)
