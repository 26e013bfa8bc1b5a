"""The control API, the Python client, the test helpers and `ctl`."""

import http.client
import json
import socket
import time
import unittest

from tests import support
from tests.support import vaurien


def http_get(address, path='/', timeout=5):
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request('GET', path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


REQUEST = b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'


def ask_hello(sock):
    """One keep-alive request on a raw socket: the whole answer."""
    sock.sendall(REQUEST)
    answer = b''
    while not answer.endswith(b'hello'):
        data = sock.recv(1000)
        if not data:
            break
        answer += data
    return answer


def own(options):
    """A behavior's options in force, less the common ones at default."""
    return dict((k, v) for k, v in options.items()
                if k not in vaurien.COMMON_OPTIONS or
                v != vaurien.COMMON_OPTIONS[k][2])


def raw_request(address, method, path, body=None, headers=None):
    """(status, JSON answer) with exactly the headers given."""
    conn = http.client.HTTPConnection(address[0], address[1], timeout=5)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read().decode())
    finally:
        conn.close()


class ApiTestCase(unittest.TestCase):
    """An in-process proxy with its control API over HTTP."""

    token = None

    def setUp(self):
        self.backend = support.http_backend(self)
        manager = vaurien.proxy(self.backend, http=True,
                                http_token=self.token)
        self.proxy = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        self.api = self.proxy.http_address
        self.client = self.proxy.client()


class VaurienApiTest(ApiTestCase):
    """The original's API tests, ported."""

    def test_list_behaviors(self):
        behaviors = self.client.list_behaviors()
        self.assertEqual(behaviors, sorted(behaviors))
        for name in ('abort', 'blackout', 'delay', 'dummy', 'error', 'hang',
                     'transient'):
            self.assertIn(name, behaviors)

    def test_get_and_set(self):
        self.assertEqual(self.client.get_behavior(), 'dummy')
        self.assertEqual(self.client.set_behavior('blackout'),
                         {'status': 'ok'})
        self.assertEqual(self.client.get_behavior(), 'blackout')
        status, answer = raw_request(self.api, 'GET', '/behavior')
        self.assertEqual((status, answer['behavior']), (200, 'blackout'))

    def test_unknown_behavior(self):
        status, answer = raw_request(self.api, 'PUT', '/behavior',
                                     b'{"name": "nope"}')
        self.assertEqual(status, 400)
        self.assertEqual(answer['status'], 'error')
        error, = answer['errors']
        self.assertEqual((error['location'], error['name']), ('body', 'name'))
        self.assertIn("unknown behavior 'nope'", error['description'])
        with self.assertRaises(vaurien.ControlError) as caught:
            self.client.set_behavior('nope')
        self.assertIn("unknown behavior 'nope'", str(caught.exception))
        self.assertEqual(caught.exception.status, 400)

    def test_options_are_passed(self):
        self.client.set_behavior('delay', sleep=0.3, before=False)
        self.assertEqual(own(self.client.get_behavior_options()['delay']),
                         {'sleep': 0.3, 'before': False})
        start = time.time()
        self.assertEqual(http_get(self.proxy.address), (200, b'hello'))
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_options_not_given_take_configured_values(self):
        self.client.set_behavior('delay', sleep=0.3)
        self.client.set_behavior('delay')
        self.assertEqual(self.client.get_behavior_options()['delay']['sleep'],
                         1.0)

    def test_backend(self):
        self.assertEqual(self.client.get_backend(),
                         '127.0.0.1:%d' % self.backend[1])
        self.client.set_backend('localhost:1234')
        self.assertEqual(self.client.get_backend(), 'localhost:1234')

    def test_blackout_abort_delay_then_normal(self):
        self.assertEqual(http_get(self.proxy.address), (200, b'hello'))
        for name in ('blackout', 'abort'):
            with self.client.with_behavior(name):
                with self.assertRaises((http.client.HTTPException, OSError)):
                    http_get(self.proxy.address)
        with self.client.with_behavior('delay', sleep=0.5):
            start = time.time()
            self.assertEqual(http_get(self.proxy.address), (200, b'hello'))
            self.assertGreaterEqual(time.time() - start, 0.5)
        self.assertEqual(self.client.get_behavior(), 'dummy')
        self.assertEqual(http_get(self.proxy.address), (200, b'hello'))


class ErrorFormatTest(ApiTestCase):

    def assertError(self, method, path, body, status, name, words):
        got, answer = raw_request(self.api, method, path, body)
        self.assertEqual(got, status, answer)
        self.assertEqual(answer['status'], 'error')
        error, = answer['errors']
        self.assertEqual(error['name'], name, error)
        self.assertIn(words, error['description'])

    def test_bad_requests(self):
        self.assertError('PUT', '/behavior', b'{oops', 400, '', 'not valid JSON')
        self.assertError('PUT', '/behavior', b'[1]', 400, '', 'JSON object')
        self.assertError('PUT', '/behavior', b'{"sleep": 1}', 400, 'name',
                         'needs a "name"')
        self.assertError('PUT', '/behavior', b'{"name": "delay", "slep": 1}',
                         400, 'slep', "has no option 'slep'")
        self.assertError('PUT', '/behavior',
                         b'{"name": "delay", "sleep": "long"}', 400, 'sleep',
                         'must be a number')
        self.assertError('PUT', '/behavior',
                         b'{"name": "delay", "sleep": -1}', 400, '',
                         'must be 0 or more')
        self.assertError('PUT', '/behavior', b'{"behavior": "70:delay,'
                         b'70:error"}', 400, '', 'adds up to 140%')
        self.assertError('PUT', '/backend', b'{"backend": "nowhere"}', 400,
                         'backend', "malformed backend address 'nowhere'")
        self.assertError('PUT', '/backend', b'{}', 400, 'backend', 'needs')
        self.assertError('GET', '/nope', None, 404, 'path', 'no such endpoint')
        self.assertError('DELETE', '/behavior', None, 405, 'method',
                         'DELETE is not allowed')
        # nothing changed
        self.assertEqual(self.client.get_behavior(), 'dummy')


class LiveTest(ApiTestCase):

    def test_mix_read_and_set(self):
        self.client.set_mix('20:delay,10:error', {'delay': {'sleep': 0.1}})
        self.assertEqual(self.client.get_behavior(), '20:delay,10:error,'
                                                      '70:dummy')
        status, answer = raw_request(self.api, 'GET', '/behavior')
        self.assertEqual(answer['mix'], [
            {'name': 'delay', 'percent': 20.0},
            {'name': 'error', 'percent': 10.0},
            {'name': 'dummy', 'percent': 70.0}])
        self.assertEqual(answer['options']['delay']['sleep'], 0.1)
        status, answer = raw_request(self.api, 'PUT', '/behavior', json.dumps(
            {'behavior': 'hang'}).encode())
        self.assertEqual((status, self.client.get_behavior()), (200, 'hang'))

    def test_change_reaches_an_open_connection(self):
        with support.connect(self.proxy.address) as sock:
            self.assertIn(b'hello', ask_hello(sock))
            self.client.set_behavior('blackout')
            sock.sendall(REQUEST)
            self.assertTrue(support.closed_by_peer(sock))

    def test_new_backend_for_new_connections_only(self):
        with support.EchoServer() as echo:
            with support.connect(self.proxy.address) as old:
                self.assertIn(b'hello', ask_hello(old))
                self.client.set_backend(echo.address)
                with support.connect(self.proxy.address) as new:
                    self.assertEqual(support.exchange(new, b'echo?'),
                                     b'echo?')
                self.assertIn(b'hello', ask_hello(old))

    def test_connections_and_stats(self):
        with support.connect(self.proxy.address) as sock:
            answer = ask_hello(sock)
            time.sleep(0.05)
            conns = self.client.connections()
            self.assertEqual(len(conns), 1)
            conn = conns[0]
            self.assertEqual(conn['client'], '127.0.0.1:%d'
                             % sock.getsockname()[1])
            self.assertEqual(conn['backend'], '127.0.0.1:%d'
                             % self.backend[1])
            self.assertEqual((conn['bytes_up'], conn['bytes_down']),
                             (len(REQUEST), len(answer)))
            self.assertEqual((conn['exchanges'], conn['behavior']),
                             (1, 'dummy'))
            self.assertGreaterEqual(conn['age'], 0)
        deadline = time.time() + 5
        while self.client.connections() and time.time() < deadline:
            time.sleep(0.01)
        stats = self.client.stats()
        self.assertEqual(stats['connections'], 1)
        self.assertEqual(stats['open_connections'], 0)
        self.assertEqual(stats['exchanges'], {'dummy': 1})
        self.assertEqual((stats['bytes_up'], stats['bytes_down']),
                         (len(REQUEST), len(answer)))

    def test_version_and_health(self):
        self.assertEqual(self.client.version(), vaurien.__version__)
        self.assertEqual(self.client.health()['status'], 'ok')

    def test_slow_or_broken_api_requests_do_not_stall_traffic(self):
        with socket.create_connection(self.api, 5) as slow, \
                socket.create_connection(self.api, 5) as broken:
            slow.sendall(b'PUT /behavior HTTP/1.1\r\nContent-Length: 100\r\n'
                         b'\r\n{"name":')      # and never the rest
            broken.sendall(b'\x00\xff garbage \r\n\r\n')
            self.assertEqual(http_get(self.proxy.address), (200, b'hello'))
            self.client.set_behavior('delay', sleep=0)
            self.assertEqual(self.client.get_behavior(), 'delay')
            broken.settimeout(5)
            self.assertIn(b'400', broken.recv(1000))


class SafetyTest(ApiTestCase):

    def test_browser_requests_are_refused(self):
        body = b'{"name": "blackout"}'
        for headers in ({'Origin': 'http://evil.example'},
                        {'User-Agent': 'Mozilla/5.0 (X11; Linux x86_64)'},
                        {'Sec-Fetch-Mode': 'no-cors'},
                        {'Host': 'evil.example:8080'}):
            status, answer = raw_request(self.api, 'PUT', '/behavior', body,
                                         headers)
            self.assertEqual(status, 403, headers)
            self.assertEqual(answer['status'], 'error')
        self.assertEqual(self.client.get_behavior(), 'dummy')

    def test_listens_on_loopback_by_default(self):
        self.assertEqual(self.api[0], '127.0.0.1')
        settings, _, _ = vaurien.load_settings([])
        self.assertEqual(settings['http_host'], '127.0.0.1')


class TokenTest(ApiTestCase):

    token = 's3cret'

    def test_token_required(self):
        for headers in ({}, {'Authorization': 'Bearer wrong'},
                        {'Authorization': 's3cret'}):
            status, answer = raw_request(self.api, 'GET', '/behavior',
                                         None, headers)
            self.assertEqual(status, 401)
            self.assertEqual(answer['errors'][0]['name'], 'Authorization')
        status, answer = raw_request(self.api, 'GET', '/behavior', None,
                                     {'Authorization': 'Bearer s3cret'})
        self.assertEqual((status, answer['behavior']), (200, 'dummy'))
        self.assertEqual(self.client.get_behavior(), 'dummy')
        status, _ = raw_request(self.api, 'GET', '/health')
        self.assertEqual(status, 200)
        with self.assertRaises(vaurien.ControlError) as caught:
            vaurien.Client(*self.api).get_behavior()
        self.assertEqual(caught.exception.status, 401)


class InProcessTest(unittest.TestCase):

    def test_two_proxies_at_once(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address) as one, \
                vaurien.proxy(echo.address, behavior='delay',
                              behavior_options={'delay': {'sleep': 0.3}}
                              ) as two:
            self.assertNotEqual(one.address, two.address)
            with one.behavior('blackout'):
                self.assertEqual(two.get_behavior(), 'delay')
                with support.connect(two.address) as sock:
                    start = time.time()
                    self.assertEqual(support.exchange(sock, b'2'), b'2')
                    self.assertGreaterEqual(time.time() - start, 0.3)
                with support.connect(one.address) as sock:
                    sock.sendall(b'1')
                    self.assertTrue(support.closed_by_peer(sock))
            with support.connect(one.address) as sock:
                self.assertEqual(support.exchange(sock, b'1'), b'1')

    def test_with_behavior_restores_behavior_and_options_after_an_error(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, behavior='20:delay,10:error',
                              behavior_options={'delay': {'sleep': 0.25}}
                              ) as p:
            p.set_mix('20:delay,10:error', {'delay': {'sleep': 0.5,
                                                      'before': False,
                                                      'every': 2},
                                            'error': {'warmup': 3}})
            before = p.get_behavior_options()
            with self.assertRaises(ZeroDivisionError):
                with p.with_behavior('delay', sleep=2):
                    self.assertEqual(own(p.get_behavior_options()['delay']),
                                     {'sleep': 2.0, 'before': True})
                    1 / 0
            self.assertEqual(p.get_behavior(), '20:delay,10:error,70:dummy')
            self.assertEqual(p.get_behavior_options(), before)
            self.assertEqual(own(before['delay']),
                             {'sleep': 0.5, 'before': False, 'every': 2})

    def test_errors_carry_the_description(self):
        with support.EchoServer() as echo, vaurien.proxy(echo.address) as p:
            with self.assertRaisesRegex(vaurien.ControlError,
                                        "option 'sleep' must be a number"):
                p.set_behavior('delay', sleep='never')


class StartProxyTest(unittest.TestCase):

    def test_start_on_free_ports_control_and_stop(self):
        with support.EchoServer() as echo:
            pid = vaurien.start_proxy(
                proxy_host='127.0.0.1', proxy_port=0, backend_host='127.0.0.1',
                backend_port=echo.port, http_host='127.0.0.1', http_port=0,
                options=['--behavior', 'delay', '--behavior-delay-sleep', '0'])
            try:
                self.assertIsInstance(pid, int)
                self.assertNotEqual(pid.proxy_port, 0)
                with support.connect(('127.0.0.1', pid.proxy_port)) as sock:
                    self.assertEqual(support.exchange(sock, b'hi'), b'hi')
                client = vaurien.Client('127.0.0.1', pid.http_port)
                self.assertEqual(client.get_behavior(), 'delay')
                with client.with_behavior('blackout'):
                    with support.connect(('127.0.0.1', pid.proxy_port)) as s:
                        s.sendall(b'x')
                        self.assertTrue(support.closed_by_peer(s))
                self.assertEqual(client.get_behavior(), 'delay')
            finally:
                self.assertEqual(vaurien.stop_proxy(pid), 0)
        with self.assertRaises(vaurien.VaurienError):
            vaurien.stop_proxy(pid)

    def test_failure_to_start_carries_stderr(self):
        with self.assertRaises(vaurien.VaurienError) as caught:
            vaurien.start_proxy(proxy_port=0, http_port=0,
                                options=['--behavior', 'dealy'])
        self.assertIn("unknown behavior 'dealy'", str(caught.exception))


class CtlTest(unittest.TestCase):

    def ctl(self, port, *args):
        return support.run_vaurien(['ctl', '--port', str(port)] + list(args))

    def test_ctl_commands(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, http=True) as p:
            port = p.http_address[1]
            self.assertEqual(self.ctl(port, 'get-behavior')[1], 'dummy\n')
            code, out, err = self.ctl(port, 'set-behavior', 'delay',
                                      '--sleep', '2', '--before=false')
            self.assertEqual((code, out), (0, 'Behavior changed to "delay"\n'))
            self.assertEqual(own(p.get_behavior_options()['delay']),
                             {'sleep': 2.0, 'before': False})
            code, out, err = self.ctl(port, 'set-behavior',
                                      '20:delay,10:error', '--delay.sleep',
                                      '0.5', '--error.warmup', '2')
            self.assertEqual(code, 0, err)
            self.assertEqual(p.get_behavior_options()['error']['warmup'], 2)
            listed = self.ctl(port, 'list-behaviors')[1].strip().split(', ')
            self.assertEqual(listed, p.list_behaviors())
            self.assertIn('blackout', listed)
            self.assertEqual(self.ctl(port, 'get-backend')[1],
                             '127.0.0.1:%d\n' % echo.port)
            self.assertEqual(self.ctl(port, 'set-backend', 'localhost:99')[0],
                             0)
            self.assertEqual(p.get_backend(), 'localhost:99')
            stats = json.loads(self.ctl(port, 'stats')[1])
            self.assertIn('exchanges', stats)
            code, out, err = self.ctl(port, 'set-behavior', 'dealy')
            self.assertEqual(code, 1)
            self.assertEqual(err.strip().splitlines(), [
                "vaurien ctl: error: unknown behavior 'dealy' (known: %s)"
                % ', '.join(p.list_behaviors())])
            code, out, err = support.run_vaurien(
                ['ctl', '--host', 'http://127.0.0.1:%d' % port,
                 'get-behavior'])
            # the mix, then the options in force of each behavior in it
            self.assertEqual((code, out.splitlines()[0]),
                             (0, '20:delay,10:error,70:dummy'))
            self.assertEqual([line.split(':')[0] for line in
                              out.splitlines()[1:]], ['  delay', '  error'])
            self.assertIn(' sleep=0.5', out)
            self.assertIn(' warmup=2', out)
        code, out, err = self.ctl(support.free_port(), 'get-behavior')
        self.assertEqual(code, 1)
        self.assertIn('cannot reach the control API', err)


class CommandLineTest(unittest.TestCase):

    def test_http_and_behavior_together(self):
        with support.EchoServer() as echo:
            port = support.free_port()
            args = ['--backend', '127.0.0.1:%d' % echo.port, '--http',
                    '--http-port', str(port), '--behavior', '20:delay']
            with support.vaurien_process(args) as (proc, address):
                client = vaurien.Client('127.0.0.1', port)
                deadline = time.time() + 10
                while True:
                    try:
                        self.assertEqual(client.get_behavior(),
                                         '20:delay,80:dummy')
                        break
                    except vaurien.VaurienError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.05)

    def test_control_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(('127.0.0.1', 0))
            busy.listen(1)
            code, out, err = support.run_vaurien(
                ['--proxy', '127.0.0.1:0', '--http', '--http-port',
                 str(busy.getsockname()[1])])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn('cannot serve the control API', err)


if __name__ == '__main__':
    unittest.main()
