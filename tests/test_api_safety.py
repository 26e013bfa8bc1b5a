"""The control API against hostile, malformed and slow clients: every
answer is JSON, nothing a web page can send changes the behavior, and no
client holds the API's threads or descriptors past its deadline."""

import errno
import json
import os
import select
import socket
import sys
import threading
import time
import unittest

from tests import support
from tests.support import vaurien


def strict_json(data):
    """Parse *data* as standard JSON only (no NaN, no Infinity)."""
    def refuse(name):
        raise ValueError('not standard JSON: %s' % name)
    return json.loads(data.decode('utf-8'), parse_constant=refuse)


def read_answers(sock, count=None, head=False):
    """The HTTP answers on *sock* until the server closes it, or *count*
    are read, or the socket times out: [(status, {lower-case header:
    value}, body)]; *head*: the first answers a HEAD request (no body)."""
    data, answers = b'', []
    closed = False
    while not closed and (count is None or len(answers) < count):
        head_end = data.find(b'\r\n\r\n')
        if head_end < 0:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ConnectionAbortedError):
                chunk = b''
            except socket.timeout:
                break           # still open: the caller's assertions say
            closed = not chunk
            data += chunk
            continue
        lines = data[:head_end].decode('latin-1').split('\r\n')
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.strip().lower()] = value.strip()
        status = int(lines[0].split()[1])
        length = int(headers.get('content-length', 0))
        if status == 100 or (head and not answers):
            length = 0
        while len(data) < head_end + 4 + length:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
        answers.append((status, headers,
                        data[head_end + 4:head_end + 4 + length]))
        data = data[head_end + 4 + length:]
    return answers


def send_raw(address, data, count=None, head=False):
    """Send *data* on a new connection; the answers until it closes (or
    *count* answers)."""
    with support.connect(address) as sock:
        sock.sendall(data)
        return read_answers(sock, count, head)


def request(address, method, path, body=b'', headers=(), close=True):
    """One request with exactly these headers (plus Host and
    Content-Length); its (status, headers, body)."""
    lines = ['%s %s HTTP/1.1' % (method, path)]
    if 'host' not in [name.lower() for name, _ in headers]:
        lines.append('Host: 127.0.0.1')
    lines += ['%s: %s' % pair for pair in headers]
    if body:
        lines.append('Content-Length: %d' % len(body))
    if close:
        lines.append('Connection: close')
    data = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body
    answers = send_raw(address, data, count=1)
    assert answers, 'no answer to %r' % data[:200]
    return answers[0]


def put(address, body, headers=()):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    status, _, data = request(address, 'PUT', '/behavior', body, headers)
    return status, strict_json(data)


class ApiCase(unittest.TestCase):
    """An in-process proxy with its control API on a free loopback port;
    ``handler_attributes`` and ``server_attributes`` change the API's
    handler (``timeout``) and server (``max_connections``) for the test."""

    token = None
    handler_attributes = {}
    server_attributes = {}

    def setUp(self):
        self.backend = support.http_backend(self)
        manager = vaurien.proxy(self.backend)
        self.proxy = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        handler = type('Handler', (vaurien.ControlHandler,),
                       dict(self.handler_attributes))
        attributes = dict(self.server_attributes, handler_class=handler)
        server_class = type('Server', (vaurien.ControlServer,), attributes)
        self.control = server_class(('127.0.0.1', 0), self.proxy.server,
                                    self.token)
        thread = threading.Thread(target=self.control.serve_forever,
                                  kwargs={'poll_interval': 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.control.server_close)
        self.addCleanup(self.control.shutdown)
        self.api = self.control.address

    def behavior(self):
        return self.proxy.server.mix.__str__()

    def assertJsonError(self, answer, status, closed=True):
        """*answer* is an error of *status* in _error()'s shape."""
        got, headers, body = answer
        self.assertEqual(got, status, body[:300])
        self.assertEqual(headers.get('content-type'), 'application/json')
        data = strict_json(body)
        self.assertEqual(data['status'], 'error')
        self.assertEqual(sorted(data['errors'][0]),
                         ['description', 'location', 'name'])
        if closed:
            self.assertEqual(headers.get('connection'), 'close')
        return data['errors'][0]


BLACKOUT = (b'PUT /behavior HTTP/1.1\r\nHost: 127.0.0.1\r\n'
            b'Content-Length: 20\r\n\r\n{"name": "blackout"}')


class NumbersAndDepthTest(ApiCase):
    """Finding 5: values JSON or Python cannot take are a 400, never a
    connection closed without an answer."""

    def test_non_finite_and_huge_numbers_are_refused(self):
        for option in ('sleep', 'after'):
            for value in ('Infinity', '-Infinity', 'NaN', '1e400', '-1e400',
                          '1' * 60):
                body = '{"name": "delay", "%s": %s}' % (option, value)
                status, answer = put(self.api, body.encode())
                self.assertEqual(status, 400, body)
                self.assertEqual(answer['status'], 'error')
        self.assertEqual(self.behavior(), 'dummy')

    def test_deep_nesting_is_refused(self):
        for body in (b'[' * 100000 + b']' * 100000,
                     b'{"name": "delay", "sleep": ' + b'[' * 100000 +
                     b']' * 100000 + b'}'):
            status, answer = put(self.api, body)
            self.assertEqual(status, 400)
            self.assertIn('nested', answer['errors'][0]['description'])

    def test_since_takes_ascii_digits_only(self):
        for since in ('%C2%B2', '%D9%A3', '\u00b2'.encode().decode('latin-1'),
                      '9' * 5000, '-1', '+1', '%201', '1e3', '0x10'):
            status, _, body = request(self.api, 'GET',
                                      '/decisions?since=' + since)
            self.assertEqual(status, 400, since)
            self.assertEqual(strict_json(body)['errors'][0]['name'], 'since')
        status, _, body = request(self.api, 'GET', '/decisions?since=007')
        self.assertEqual((status, strict_json(body)), (200,
                                                       {'decisions': []}))

    def test_a_key_given_twice_is_refused(self):
        status, answer = put(self.api, b'{"name": "dummy", "name": '
                                       b'"blackout"}')
        self.assertEqual(status, 400)
        self.assertIn('twice', answer['errors'][0]['description'])
        self.assertEqual(self.behavior(), 'dummy')


class BodyTypesTest(ApiCase):
    """Finding 7: every field of a PUT /behavior body has its type."""

    def test_options_must_be_objects_of_scalars(self):
        for body in ({'behavior': 'delay', 'options': []},
                     {'behavior': 'delay', 'options': 0},
                     {'behavior': 'delay', 'options': ''},
                     {'behavior': 'delay', 'options': None},
                     {'behavior': 'delay', 'options': {'delay': []}},
                     {'behavior': 'delay', 'options': {'delay': 5}},
                     {'behavior': 'delay', 'options': {'delay':
                                                       {'sleep': [1]}}},
                     {'behavior': 'delay', 'options': {'delay':
                                                       {'sleep': None}}},
                     {'behavior': ['delay']},
                     {'name': 'delay', 'sleep': {'a': 1}},
                     {'name': 'delay', 'direction': ['both']},
                     {'name': 'delay', 'clients': ['127.0.0.1']},
                     {'name': 'delay', 'sleep': None},
                     {'name': 5}, {'name': None}):
            status, answer = put(self.api, body)
            self.assertEqual(status, 400, body)
            self.assertEqual(answer['status'], 'error')
        self.assertEqual(self.behavior(), 'dummy')
        status, _ = put(self.api, {'behavior': '50:delay', 'options':
                                   {'delay': {'sleep': 0, 'before': True}}})
        self.assertEqual(status, 200)


class SharedStateTest(unittest.TestCase):
    """One Controller answers every API thread: each request's query is
    its own."""

    def test_concurrent_queries_do_not_mix(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, behavior='delay',
                              behavior_options={'delay': {'sleep': 0}}
                              ) as local:
            for _ in range(3):
                with support.connect(local.address) as sock:
                    support.exchange(sock, b'x')
            deadline = time.time() + support.TIMEOUT
            while len(local.decisions()) < 3 and time.time() < deadline:
                time.sleep(0.01)
            controller = local._controller
            mixed = []

            def ask(since, expected):
                for _ in range(500):
                    status, answer = controller.call(
                        'GET', '/decisions?since=%d' % since)
                    if len(answer['decisions']) != expected:
                        mixed.append(since)
                        return

            previous = sys.getswitchinterval()
            sys.setswitchinterval(1e-6)
            try:
                threads = [threading.Thread(target=ask,
                                            args=(since, 3 - since))
                           for since in (0, 1, 2, 3)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
            finally:
                sys.setswitchinterval(previous)
            self.assertEqual(mixed, [])


if __name__ == '__main__':
    unittest.main()
