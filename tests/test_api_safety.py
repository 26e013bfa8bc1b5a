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


def serve(test, server):
    """Run *server* (a ControlServer) in a thread until *test* ends."""
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return server.address


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
        self.api = serve(self, self.control)

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


class RefusalClosesTest(ApiCase):
    """Finding 1: a refused request's body, posing as a second request on
    the same connection, is never served."""

    def test_a_browser_post_cannot_smuggle_a_request_in_its_body(self):
        # what fetch(url, {method: 'POST', mode: 'no-cors', body}) sends
        forged = (b'POST /behavior HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n'
                  b'Origin: http://evil.example\r\n'
                  b'User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n'
                  b'Sec-Fetch-Mode: no-cors\r\n'
                  b'Content-Type: text/plain;charset=UTF-8\r\n'
                  b'Content-Length: %d\r\n\r\n' % (self.api[1],
                                                   len(BLACKOUT))) + BLACKOUT
        answers = send_raw(self.api, forged)
        self.assertEqual([answer[0] for answer in answers], [403])
        self.assertJsonError(answers[0], 403)
        self.assertEqual(self.behavior(), 'dummy')

    def test_too_large_a_body_closes_the_connection(self):
        answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\nContent-Length: 2000000\r\n\r\n' +
                           BLACKOUT)
        self.assertEqual([answer[0] for answer in answers], [413])
        self.assertEqual(self.behavior(), 'dummy')


class TokenRefusalClosesTest(ApiCase):

    token = 's3cret'

    def test_a_request_without_the_token_closes_the_connection(self):
        behind = BLACKOUT.replace(b'\r\n\r\n',
                                  b'\r\nAuthorization: Bearer s3cret\r\n\r\n')
        answers = send_raw(self.api, b'GET /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\n\r\n' + behind)
        self.assertEqual([answer[0] for answer in answers], [401])
        self.assertEqual(answers[0][1].get('www-authenticate'), 'Bearer')
        self.assertEqual(self.behavior(), 'dummy')

    def test_the_scheme_is_case_insensitive(self):
        """Finding 8."""
        for value in ('bearer s3cret', 'BEARER s3cret', 'Bearer  s3cret '):
            status, _, body = request(self.api, 'GET', '/behavior',
                                      headers=[('Authorization', value)])
            self.assertEqual(status, 200, value)
        for value in ('Bearer s3cre', 'Bearer s3cretx', 'Basic s3cret',
                      's3cret', 'Bearer', 'bearers3cret'):
            status, _, _ = request(self.api, 'GET', '/behavior',
                                   headers=[('Authorization', value)])
            self.assertEqual(status, 401, value)
        twice = send_raw(self.api, b'GET /behavior HTTP/1.1\r\nHost: '
                         b'127.0.0.1\r\nAuthorization: Bearer s3cret\r\n'
                         b'Authorization: Bearer other\r\n\r\n')
        self.assertEqual(twice[0][0], 401)


class HostTest(ApiCase):
    """Finding 2: only loopback addresses, localhost and the API's own
    address pass the DNS-rebinding check."""

    def test_names_that_only_start_like_loopback_are_refused(self):
        port = self.api[1]
        for host in ('127.0.0.1.nip.io', '127.0.0.1.nip.io:%d' % port,
                     '127.attacker.example', 'localhost.attacker.example',
                     'localhost.', '[::1].evil.example', 'evil.example',
                     '::1', '[127.0.0.1]', '127.0.0.1:http', '10.0.0.1',
                     '0.0.0.0', '127.0.0.1:80:80', '[::1', 'ip6-localhost'):
            status, _, body = request(self.api, 'GET', '/behavior',
                                      headers=[('Host', host)])
            self.assertEqual(status, 403, host)
            self.assertEqual(strict_json(body)['errors'][0]['name'], 'Host')

    def test_loopback_addresses_and_localhost_are_accepted(self):
        port = self.api[1]
        for host in ('127.0.0.1', '127.0.0.1:%d' % port, '127.9.8.7:1',
                     'localhost', 'LocalHost:%d' % port, '[::1]',
                     '[::1]:%d' % port, '[::ffff:127.0.0.1]', '127.0.0.1:'):
            status, _, _ = request(self.api, 'GET', '/behavior',
                                   headers=[('Host', host)])
            self.assertEqual(status, 200, host)

    def test_the_name_the_api_was_told_to_listen_on_is_accepted(self):
        name = socket.gethostname()
        try:
            address = socket.gethostbyname(name)
        except OSError:
            address = ''
        if not address.startswith('127.'):
            self.skipTest('this host name is not a loopback name')
        address = serve(self, vaurien.ControlServer((name, 0),
                                                    self.proxy.server))
        for host, status in ((name.upper(), 200),
                             ('%s:%d' % (name, address[1]), 200),
                             (name + '.evil.example', 403)):
            answer = request(address, 'GET', '/health',
                             headers=[('Host', host)])
            self.assertEqual(answer[0], status, host)

    def test_one_host_header_and_only_one(self):
        answers = send_raw(self.api, b'GET /health HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\nHost: evil.example\r\n\r\n')
        self.assertJsonError(answers[0], 400)
        answers = send_raw(self.api, b'GET /health HTTP/1.1\r\n\r\n')
        self.assertJsonError(answers[0], 400)
        # HTTP/1.0 has no Host header to give
        answers = send_raw(self.api, b'GET /health HTTP/1.0\r\n\r\n')
        self.assertEqual(answers[0][0], 200)


class BacklogTest(unittest.TestCase):
    """Finding 3: connections wait in a real listen queue while the
    accepting thread is busy, instead of being dropped."""

    def test_connections_queue_while_none_is_accepted(self):
        with vaurien.proxy(('127.0.0.1', 9)) as local:
            control = vaurien.ControlServer(('127.0.0.1', 0), local.server)
            self.addCleanup(control.server_close)
            # nobody accepts: only the listen queue holds the connections
            pending = []
            for _ in range(100):
                sock = socket.socket()
                self.addCleanup(sock.close)
                sock.setblocking(False)
                code = sock.connect_ex(control.address)
                self.assertIn(code, (0, errno.EINPROGRESS, errno.EAGAIN))
                pending.append(sock)
            connected = 0
            deadline = time.time() + support.TIMEOUT
            while pending and time.time() < deadline:
                _, ready, _ = select.select([], pending, [], 0.5)
                if not ready:
                    break
                for sock in ready:
                    pending.remove(sock)
                    if not sock.getsockopt(socket.SOL_SOCKET,
                                           socket.SO_ERROR):
                        connected += 1
            self.assertEqual(connected, 100)


class DeadlineTest(ApiCase):
    """Finding 4: the deadline bounds a whole request, not each read."""

    handler_attributes = {'timeout': 1.0}

    def trickle(self, sock, data, every=0.2, most=8.0):
        """Send *data* a byte at a time; True if the server closed the
        connection within *most* seconds."""
        started = time.time()
        for byte in data:
            if time.time() - started > most:
                return False
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return True
            if select.select([sock], [], [], every)[0]:
                return True
        return False

    def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline(self):
        with support.connect(self.api) as sock:
            self.assertTrue(self.trickle(
                sock, b'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n' +
                b'X-Slow: ' + b'a' * 100))
            answers = read_answers(sock)
        self.assertJsonError(answers[0], 408)

    def test_a_body_sent_slowly_is_cut_too(self):
        with support.connect(self.api) as sock:
            sock.sendall(b'PUT /behavior HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                         b'Content-Length: 60\r\n\r\n')
            self.assertTrue(self.trickle(sock, b'{"name": "dummy"' +
                                         b' ' * 43 + b'}'))
            self.assertJsonError(read_answers(sock)[0], 408)

    def test_an_idle_kept_alive_connection_is_closed(self):
        with support.connect(self.api) as sock:
            sock.sendall(b'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
            self.assertEqual(read_answers(sock, 1)[0][0], 200)
            self.assertTrue(support.closed_by_peer(sock, wait=8.0))

    def test_kept_alive_requests_each_get_the_whole_deadline(self):
        with support.connect(self.api) as sock:
            for _ in range(3):
                time.sleep(0.6)
                sock.sendall(b'GET /health HTTP/1.1\r\nHost: 127.0.0.1'
                             b'\r\n\r\n')
                self.assertEqual(read_answers(sock, 1)[0][0], 200)


class CapTest(ApiCase):
    """Finding 4: at most max_connections API connections at once, in
    threads and descriptors; beyond them, a 503 and a close at once."""

    server_attributes = {'max_connections': 4}

    def test_connections_beyond_the_cap_are_closed_at_once(self):
        before = threading.active_count()
        held = [support.connect(self.api) for _ in range(4)]
        for sock in held:
            self.addCleanup(sock.close)
        deadline = time.time() + support.TIMEOUT
        while (threading.active_count() < before + 4 and
               time.time() < deadline):
            time.sleep(0.01)
        with self.assertLogs('vaurien', 'WARNING') as logs:
            for _ in range(20):
                with support.connect(self.api) as sock:
                    sock.sendall(b'GET /health HTTP/1.1\r\nHost: '
                                 b'127.0.0.1\r\n\r\n')
                    answer = read_answers(sock, 1)[0]
                    self.assertJsonError(answer, 503)
                    self.assertTrue(support.closed_by_peer(sock))
        self.assertEqual(len(logs.output), 1)     # once, not 20 times
        self.assertLessEqual(threading.active_count(), before + 4)
        self.assertEqual(self.control.active, 4)
        deadline = time.time() + support.TIMEOUT
        # the proxy's traffic does not notice
        with support.connect(self.proxy.address) as sock:
            sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            self.assertEqual(read_answers(sock, 1)[0][2], b'hello')
        for sock in held:
            sock.close()
        while self.control.active and time.time() < deadline:
            time.sleep(0.01)
        status, _, _ = request(self.api, 'GET', '/health')
        self.assertEqual(status, 200)


@unittest.skipUnless(sys.platform.startswith('linux'), 'needs RLIMIT_NOFILE')
class DescriptorStarvationTest(unittest.TestCase):
    """Finding 4, end to end: with 400 descriptors, hundreds of stuck API
    clients leave the proxy's traffic its descriptors."""

    def test_stuck_api_clients_do_not_starve_the_proxy(self):
        support.raise_fd_limit()
        api_port = support.free_port()
        with support.temp_dir() as folder, support.EchoServer() as echo:
            wrapper = support.write(os.path.join(folder, 'limited.py'), (
                'import resource, runpy, sys\n'
                'resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))\n'
                'sys.argv[0] = %r\n'
                'runpy.run_path(%r, run_name="__main__")\n') % (
                    support.VAURIEN_PY, support.VAURIEN_PY))
            args = ['--backend', '%s:%d' % echo.address, '--http',
                    '--http-port', str(api_port)]
            with support.vaurien_process(args, script=wrapper) as (_, proxy):
                stuck = []
                try:
                    for _ in range(500):
                        try:
                            sock = socket.create_connection(
                                ('127.0.0.1', api_port), 1.0)
                        except OSError:
                            break       # the API takes no more
                        stuck.append(sock)
                        sock.sendall(b'G')      # and never the rest
                    clients = []
                    try:
                        for number in range(100):
                            sock = support.connect(proxy)
                            clients.append(sock)
                            payload = b'ping %d\n' % number
                            self.assertEqual(support.exchange(sock, payload),
                                             payload)
                    finally:
                        for sock in clients:
                            sock.close()
                finally:
                    for sock in stuck:
                        sock.close()


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


class FaultyPlugin(vaurien.Dummy):
    """A behavior whose option check has a bug."""

    name = 'apifaulty'
    options = {'level': ("A level, in no unit", float, 1.0)}

    @staticmethod
    def check_options(values):
        raise RuntimeError('bug in the plugin')


class NanDefault(vaurien.Dummy):
    """A behavior whose default is not a number JSON has."""

    name = 'apinan'
    options = {'level': ("A level, in no unit", float, float('nan'))}


class UnexpectedErrorTest(ApiCase):
    """Findings 5 and 9: a bug behind the API is a 500 JSON error."""

    def setUp(self):
        super(UnexpectedErrorTest, self).setUp()
        for cls in (FaultyPlugin, NanDefault):
            vaurien.Behavior.register(cls)
            self.addCleanup(vaurien.Behavior.unregister, cls.name)

    def test_an_exception_in_a_route_is_a_500(self):
        with self.assertLogs('vaurien', 'ERROR') as logs:
            answer = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                              b'127.0.0.1\r\nContent-Length: 33\r\n\r\n'
                              b'{"name": "apifaulty", "level": 2}')
        error = self.assertJsonError(answer[0], 500)
        self.assertIn('bug in the plugin', error['description'])
        self.assertIn('bug in the plugin', '\n'.join(logs.output))
        status, _, _ = request(self.api, 'GET', '/health')
        self.assertEqual(status, 200)

    def test_an_answer_that_is_not_standard_json_is_a_500(self):
        self.proxy.server.set_mix('apinan')
        with self.assertLogs('vaurien', 'ERROR'):
            status, headers, body = request(self.api, 'GET', '/behavior')
        self.assertEqual(status, 500)
        self.assertEqual(strict_json(body)['status'], 'error')


class JsonEverywhereTest(ApiCase):
    """Finding 6: what http.server would answer in HTML is JSON, and the
    connection closes after a malformed request."""

    def test_head_answers_headers_only(self):
        answers = send_raw(self.api, b'HEAD /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\n'
                           b'Host: 127.0.0.1\r\nConnection: close\r\n\r\n',
                           head=True)
        self.assertEqual([answer[0] for answer in answers], [200, 200])
        self.assertEqual(answers[0][1]['content-type'], 'application/json')
        self.assertGreater(int(answers[0][1]['content-length']), 0)
        self.assertEqual(strict_json(answers[1][2])['status'], 'ok')

    def test_other_methods_get_json_errors(self):
        for line, status in ((b'TRACE /behavior', 405), (b'FOO /health', 405),
                             (b'DELETE /behavior', 405),
                             (b'CONNECT 127.0.0.1:80', 400),
                             (b'OPTIONS *', 400), (b'G@T /health', 400),
                             (b'GET http://127.0.0.1/health', 400)):
            answers = send_raw(self.api, line + b' HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\nConnection: close\r\n\r\n')
            self.assertEqual(len(answers), 1, line)
            self.assertJsonError(answers[0], status)

    def test_malformed_request_lines(self):
        for line, status in ((b'GET /health HTTP/1.x', 400),
                             (b'GET /health FTP/1.1', 400),
                             (b'GET /health', 400),
                             (b'GET  /health HTTP/1.1', 400),
                             (b'GET /health HTTP/1.1 extra', 400),
                             (b'GET /he\x00alth HTTP/1.1', 400),
                             (b'\x00\xff garbage', 400),
                             (b'GET /health HTTP/0.9', 505),
                             (b'GET /health HTTP/2.0', 505),
                             (b'GET /' + b'a' * 70000 + b' HTTP/1.1', 414)):
            answers = send_raw(self.api, line + b'\r\nHost: 127.0.0.1\r\n'
                               b'\r\nGET /health HTTP/1.1\r\n\r\n')
            self.assertEqual(len(answers), 1, line[:40])
            self.assertJsonError(answers[0], status)

    def test_headers_too_many_or_too_large(self):
        many = b''.join(b'X-%d: a\r\n' % number for number in range(101))
        for headers in (many, b'X-Big: ' + b'a' * 70000 + b'\r\n',
                        b'X-Big: a\r\n' * 4000):
            answers = send_raw(self.api, b'GET /health HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\n' + headers + b'\r\n')
            self.assertEqual(len(answers), 1)
            self.assertJsonError(answers[0], 431)

    def test_malformed_header_lines(self):
        for header in (b'Content-Length : 5', b'X-A: a\r\n folded',
                       b'X-A: a\x00b', b'No colon', b': empty name',
                       b'X A: b', b'X-A: a\rb'):
            answers = send_raw(self.api, b'GET /health HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\n' + header + b'\r\n\r\n')
            self.assertEqual(len(answers), 1, header)
            self.assertJsonError(answers[0], 400)

    def test_send_error_answers_json(self):
        """http.server's own way to answer an error (send_error) is
        JSON too."""
        server = self.control

        class Probe(vaurien.ControlHandler):
            def handle(self):
                self.send_error(501, 'Unsupported method', 'TRACE')

        probe = type(server)(('127.0.0.1', 0), self.proxy.server)
        probe.RequestHandlerClass = Probe
        answers = send_raw(serve(self, probe), b'')
        error = self.assertJsonError(answers[0], 501)
        self.assertEqual(error['description'], 'Unsupported method: TRACE')


class TurnsTest(ApiCase):
    """The proxy's connections give way to API requests (see _ApiFirst)
    only while requests are under way: however a request or an API
    connection ends, its turn ends with it, else the proxy's traffic
    would crawl from then on."""

    def assertNoTurnLeft(self):
        deadline = time.time() + support.TIMEOUT
        while self.control.active and time.time() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.control.active, 0)
        self.assertEqual(vaurien.API_FIRST.active, 0)

    def test_every_way_a_request_ends(self):
        # answered, kept alive, then closed
        with support.connect(self.api) as sock:
            for _ in range(3):
                sock.sendall(b'GET /health HTTP/1.1\r\nHost: 127.0.0.1'
                             b'\r\n\r\n')
                self.assertEqual(read_answers(sock, 1)[0][0], 200)
        # closed before its first byte, and in the middle of a request
        support.connect(self.api).close()
        with support.connect(self.api) as sock:
            sock.sendall(b'GET /hea')
        # refused as malformed
        answers = send_raw(self.api, b'BAD\r\n\r\n')
        self.assertJsonError(answers[0], 400)
        self.assertNoTurnLeft()

    def test_a_handler_of_its_own(self):
        class Probe(vaurien.ControlHandler):
            def handle(self):
                self.send_error(501, 'Unsupported method', 'TRACE')

        probe = type(self.control)(('127.0.0.1', 0), self.proxy.server)
        probe.RequestHandlerClass = Probe
        answers = send_raw(serve(self, probe), b'')
        self.assertJsonError(answers[0], 501)
        deadline = time.time() + support.TIMEOUT
        while probe.active and time.time() < deadline:
            time.sleep(0.01)
        self.assertNoTurnLeft()


class TurnedAwayTest(ApiCase):
    """A connection turned away at the cap ends its turn too."""

    server_attributes = {'max_connections': 2}
    assertNoTurnLeft = TurnsTest.assertNoTurnLeft

    def test_turned_away(self):
        held = [support.connect(self.api) for _ in range(2)]
        for sock in held:
            self.addCleanup(sock.close)
        deadline = time.time() + support.TIMEOUT
        while self.control.active < 2 and time.time() < deadline:
            time.sleep(0.01)
        with self.assertLogs('vaurien', 'WARNING'):
            for _ in range(3):
                answers = send_raw(self.api, b'GET /health HTTP/1.1\r\n'
                                   b'Host: 127.0.0.1\r\n\r\n')
                self.assertJsonError(answers[0], 503)
        for sock in held:
            sock.close()
        self.assertNoTurnLeft()


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


class FramingTest(ApiCase):
    """Content-Length games, chunked bodies and Expect: 100-continue."""

    def test_content_length_must_be_one_plain_number(self):
        for lengths in ([b'20', b'20'], [b'20', b'5'], [b'20, 20'], [b'+20'],
                        [b'-1'], [b'0x14'], [b'2_0'], [b'20.0'], [b''],
                        ['\u0662\u0660'.encode('utf-8')]):
            head = b''.join(b'Content-Length: %s\r\n' % length
                            for length in lengths)
            answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\n' + head + b'\r\n' + BLACKOUT)
            self.assertEqual([answer[0] for answer in answers], [400],
                             lengths)
            self.assertJsonError(answers[0], 400)
        self.assertEqual(self.behavior(), 'dummy')
        answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\nContent-Length:  20 \r\n'
                           b'Connection: close\r\n\r\n{"name": "blackout"}')
        self.assertEqual(answers[0][0], 200)

    def test_chunked_bodies_are_read(self):
        body = b'{"name": "delay", "sleep": 0}'
        chunked = b'5;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n' % (
            body[:5], len(body) - 5, body[5:])
        answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n'
                           + chunked + b'GET /behavior HTTP/1.1\r\nHost: '
                           b'127.0.0.1\r\nConnection: close\r\n\r\n')
        self.assertEqual([answer[0] for answer in answers], [200, 200])
        self.assertEqual(strict_json(answers[1][2])['behavior'], 'delay')

    def test_ambiguous_or_unknown_framing_is_refused(self):
        for head, status in ((b'Transfer-Encoding: chunked\r\n'
                              b'Content-Length: 20\r\n', 400),
                             (b'Transfer-Encoding: gzip, chunked\r\n', 501),
                             (b'Transfer-Encoding: chunked\r\n'
                              b'Transfer-Encoding: chunked\r\n', 501),
                             (b'Transfer-Encoding: identity\r\n', 501)):
            answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\n' + head + b'\r\n' + BLACKOUT)
            self.assertEqual([answer[0] for answer in answers], [status],
                             head)
            self.assertJsonError(answers[0], status)
        for chunks in (b'zz\r\n', b'5\r\n{"nam\r\n-1\r\n', b'5\r\n{"name"'
                       b'\r\n', b'100000000\r\n'):
            answers = send_raw(self.api, b'PUT /behavior HTTP/1.1\r\nHost: '
                               b'127.0.0.1\r\nTransfer-Encoding: chunked\r\n'
                               b'\r\n' + chunks + b'\r\n' + BLACKOUT)
            self.assertEqual(len(answers), 1, chunks)
            self.assertIn(answers[0][0], (400, 413))
        self.assertEqual(self.behavior(), 'dummy')

    def test_expect_100_continue(self):
        body = b'{"name": "dummy"}'
        with support.connect(self.api) as sock:
            sock.sendall(b'PUT /behavior HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                         b'Expect: 100-continue\r\nContent-Length: %d\r\n'
                         b'\r\n' % len(body))
            self.assertEqual(read_answers(sock, 1)[0][0], 100)
            sock.sendall(body)
            self.assertEqual(read_answers(sock, 1)[0][0], 200)

    def test_no_100_continue_for_a_request_refused_anyway(self):
        for head, status in ((b'Origin: http://evil.example\r\n'
                              b'Content-Length: 20\r\n', 403),
                             (b'Content-Length: 5000000\r\n', 413),
                             (b'Content-Length: 20\r\n', 417)):
            expect = b'100-continue' if status != 417 else b'coffee'
            with support.connect(self.api) as sock:
                sock.sendall(b'PUT /behavior HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                             b'Expect: ' + expect + b'\r\n' + head + b'\r\n')
                answers = read_answers(sock)
            self.assertEqual([answer[0] for answer in answers], [status])


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
