"""SMTP (RFC 5321): one exchange per command, and one per message.

Frames the greeting, commands and their (multi-line) replies, the message
after DATA up to ``<CRLF>.<CRLF>``, BDAT chunks (RFC 3030) and PIPELINING
(any number of commands in one read).  After STARTTLS's 220 the
connection is plain pass-through.
"""

import vaurien

from ._framing import (END, LINE, PASS, PEEK, SCAN, SKIP, START,
                       FramedProtocol, FramingError, number, template_check,
                       word_check)
from ._framing import words_text

# Commands and replies: RFC 5321 allows 512 bytes; Postfix takes a command
# as soon as 2048 bytes of it are there (line_length_limit) and answers
# what follows as another one, aiosmtpd refuses lines over 512 bytes.  A
# longer line makes the proxy pass the connection through.
MAX_LINE = 2048

_TEXTS = {
    421: '4.3.2 Service not available, closing transmission channel',
    450: '4.2.1 Requested mail action not taken: mailbox unavailable',
    451: '4.3.0 Requested action aborted: local error in processing',
    452: '4.3.1 Requested action not taken: insufficient system storage',
    550: '5.7.1 Requested action not taken: mailbox unavailable',
    554: '5.3.0 Transaction failed',
}


#: a command's verb (or an AUTH exchange's base64 line) is printable ASCII
_command_line = word_check('an SMTP command')
#: a reply line: three digits, then a space, a dash or its end
_reply_line = template_check('an SMTP reply line', (
    b'[0-9]', b'[0-9]', b'[0-9]', b'[- \r\n]'))


class MessageScanner(object):
    """Passes a DATA message on, up to and including ``<CRLF>.<CRLF>``."""

    def __init__(self):
        self.tail = b'\r\n'     # the message starts at the start of a line

    def __call__(self, buf, pos):
        end = len(buf)
        if pos >= end:
            return pos, False, None
        window = self.tail + bytes(buf[pos:end])
        index = window.find(b'\r\n.\r\n')
        if index >= 0:
            return pos + index + 5 - len(self.tail), True, None
        self.tail = window[-4:]
        return end, False, None


class _ReplyCodes(object):
    """The reply codes RFC 5321 allows: three digits, the first 2 to 5,
    the second 0 to 5."""

    def __contains__(self, code):
        return 200 <= code <= 559 and code // 10 % 10 <= 5

    def __str__(self):
        return 'a reply code from 200 to 559 whose second digit is 0 to 5'


class SMTP(FramedProtocol):
    """SMTP: the behavior mix is drawn per command and per message, and
    ``error`` answers an SMTP reply (451 by default, or the behavior's
    ``code``, e.g. 421 or 452)."""

    name = 'smtp'
    options = dict(FramedProtocol.options)
    error_codes = _ReplyCodes()

    def __init__(self, settings=None, proxy=None):
        super(SMTP, self).__init__(settings, proxy)
        self._in_data = False

    def parse_requests(self):
        while True:
            yield (PEEK, 1)
            if self._in_data:
                self._in_data = False
                # the backend is in DATA mode already: under ``error`` it
                # still gets the message, and its answer is replaced
                info = {'cmd': b'message', 'replies': 1,
                        'request': 'the message (DATA)', 'text': 'MESSAGE',
                        'keep_backend_in_step': True}
                yield (START, info)
                yield (SCAN, MessageScanner())
                yield (END, info)
                continue
            line = yield (LINE, MAX_LINE, False, _command_line)
            _command_line(line)
            words = line.split()
            verb = words[0].upper() if words else b''
            info = {'cmd': verb, 'replies': 1,
                    'request': verb.decode('latin-1'),
                    'text': words_text(words)}
            if verb == b'BDAT':
                info['keep_backend_in_step'] = True
            yield (START, info)
            if verb == b'BDAT':
                if len(words) < 2:
                    raise FramingError('BDAT without a size')
                yield (SKIP, number(words[1], 'BDAT size'))
            yield (END, info)

    def parse_responses(self):
        greeting = True
        while True:
            yield (PEEK, 1)
            request = {} if greeting else (self.awaited() or {})
            start = {'push': True} if greeting else {}
            greeting = False
            yield (START, start)
            while True:
                line = yield (LINE, MAX_LINE, True, _reply_line)
                _reply_line(line)
                code = line[:3]
                if not code.isdigit() or line[3:4] not in (b'-', b' ', b'\r',
                                                            b'\n'):
                    raise FramingError('malformed reply line %r' % line[:40])
                if line[3:4] != b'-':
                    break
            code = int(code)
            verb = request.get('cmd')
            if verb == b'DATA' and code == 354:
                self._in_data = True
            yield (END, start)
            if verb == b'STARTTLS' and code == 220:
                yield (PASS, 'STARTTLS: plain pass-through')

    def _error_answer(self, behavior):
        code = behavior.option('code') or 451
        text = ' '.join(str(behavior.option('message') or '').split())
        if not text:
            text = _TEXTS.get(code, 'Requested action aborted')
        if code == 421:
            self.close_after_answer = True
        return ('%03d %s\r\n' % (code, text)).encode('utf-8')


vaurien.Protocol.register(SMTP)
