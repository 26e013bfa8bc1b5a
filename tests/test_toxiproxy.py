"""vaurien as a Toxiproxy server: its HTTP API over real HTTP (statuses,
bodies and error texts of the map), toxics measured from a client's side,
toxicity and the seed, toxics changing under open connections, populate
and reset, the config file, [proxy:NAME] sections, metrics, many proxies,
and the lone file as a server."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests import support
from tests.support import vaurien


class ToxiServer(object):
    """Toxiproxy's API in this process, over a Proxies collection."""

    def __init__(self, seed=None, token=None):
        self.proxies = vaurien.Proxies(seed=seed)
        self.control = vaurien.ControlServer(
            ('127.0.0.1', 0), None, token, proxies=self.proxies,
            toxiproxy_first=True)
        self.address = self.control.address
        self.thread = threading.Thread(target=self.control.serve_forever,
                                       kwargs={'poll_interval': 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.control.shutdown()
        self.control.server_close()
        self.proxies.close_all()

    def call(self, method, path, body=None, headers=None):
        """(status, headers dict, body bytes)."""
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode('utf-8')
        try:
            conn.request(method, path, body, headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def json(self, method, path, body=None):
        status, headers, data = self.call(method, path, body)
        return status, json.loads(data.decode('utf-8')) if data else None

    def proxy(self, name, upstream, listen='127.0.0.1:0', **fields):
        body = dict(name=name, listen=listen, upstream=upstream, **fields)
        status, answer = self.json('POST', '/proxies', body)
        assert status == 201, (status, answer)
        return answer

    def toxic(self, proxy, **body):
        status, answer = self.json('POST', '/proxies/%s/toxics' % proxy,
                                   body)
        assert status == 200, (status, answer)
        return answer


def address_of(listen):
    host, _, port = listen.rpartition(':')
    return host.strip('[]'), int(port)


class ApiTestCase(unittest.TestCase):

    def setUp(self):
        self.api = ToxiServer()
        self.addCleanup(self.api.close)


class ApiTest(ApiTestCase):
    """Every endpoint, status and error text of the map."""

    def assert_error(self, reply, status, message):
        code, headers, body = reply
        self.assertEqual(code, status)
        self.assertEqual(headers['Content-Type'], 'text/plain; charset=utf-8')
        self.assertEqual(body, ('{"error":"%s","status":%d}\n' % (
            message, status)).encode('utf-8'))

    def test_version_and_no_proxies(self):
        status, headers, body = self.api.call('GET', '/version')
        self.assertEqual((status, body), (200, (
            '{"version": "%s"}\n' % vaurien.__version__).encode()))
        self.assertEqual(headers['Content-Type'],
                         'application/json;charset=utf-8')
        self.assertEqual(len(headers['X-Toxiproxy-Request-Id']), 20)
        self.assertEqual(self.api.call('HEAD', '/version')[0], 405)
        status, headers, body = self.api.call('GET', '/proxies')
        self.assertEqual((status, body), (200, b'{}'))
        self.assertEqual(len(headers['X-Toxiproxy-Request-Id']), 20)

    def test_create_show_update_delete(self):
        status, headers, body = self.api.call('POST', '/proxies', {
            'name': 'db', 'listen': 'localhost:0', 'upstream': 'localhost:1'})
        self.assertEqual(status, 201)
        shown = json.loads(body.decode())
        self.assertEqual(list(shown), ['name', 'listen', 'upstream',
                                       'enabled', 'Logger', 'toxics'])
        self.assertTrue(shown['listen'].startswith('127.0.0.1:'))
        self.assertNotEqual(shown['listen'], '127.0.0.1:0')
        self.assertEqual((shown['upstream'], shown['enabled'],
                          shown['Logger'], shown['toxics']),
                         ('localhost:1', True, {}, []))
        self.assertEqual(self.api.json('GET', '/proxies/db'), (200, shown))
        self.assertEqual(self.api.json('GET', '/proxies')[1], {'db': shown})
        # update: missing fields keep their values; disabled keeps listen
        status, updated = self.api.json('PATCH', '/proxies/db',
                                        {'enabled': False})
        self.assertEqual((status, updated['enabled'], updated['listen']),
                         (200, False, shown['listen']))
        with self.assertRaises(OSError):
            support.connect(address_of(shown['listen']), timeout=1).close()
        status, updated = self.api.json('POST', '/proxies/db',
                                        {'enabled': True})
        self.assertEqual((updated['enabled'], updated['listen']),
                         (True, shown['listen']))
        support.connect(address_of(shown['listen'])).close()
        self.assertEqual(self.api.call('DELETE', '/proxies/db')[:1], (204,))
        self.assert_error(self.api.call('DELETE', '/proxies/db'), 404,
                          'proxy not found')
        self.assert_error(self.api.call('GET', '/proxies/db'), 404,
                          'proxy not found')

    def test_create_errors_in_order(self):
        self.assert_error(self.api.call('POST', '/proxies', b''), 400,
                          'bad request body: EOF')
        self.assert_error(self.api.call('POST', '/proxies', b'garbage'), 400,
                          "bad request body: invalid character 'g' looking "
                          "for beginning of value")
        self.assert_error(self.api.call('POST', '/proxies', {}), 400,
                          'missing required field: name')
        self.assert_error(self.api.call('POST', '/proxies', {'name': 'a'}),
                          400, 'missing required field: upstream')
        first = self.api.proxy('a', 'localhost:1', 'localhost:0')
        self.assert_error(self.api.call('POST', '/proxies', {
            'name': 'a', 'upstream': 'localhost:1'}), 409,
            'proxy already exists')
        taken = first['listen'].rpartition(':')[2]
        self.assert_error(self.api.call('POST', '/proxies', {
            'name': 'b', 'upstream': 'localhost:1',
            'listen': 'localhost:%s' % taken}), 500,
            'listen tcp 127.0.0.1:%s: bind: address already in use' % taken)
        self.assert_error(self.api.call('POST', '/proxies', {
            'name': 'c', 'upstream': 'x:1', 'listen': 'bogus'}), 500,
            'listen tcp: address bogus: missing port in address')

    def test_unknown_paths_methods_and_browsers(self):
        status, headers, body = self.api.call('GET', '/nope')
        self.assertEqual((status, body), (404, b'404 page not found\n'))
        self.assertNotIn('X-Toxiproxy-Request-Id', headers)
        self.assertEqual(self.api.call('GET', '/proxies/')[0], 404)
        status, headers, body = self.api.call('PUT', '/proxies')
        self.assertEqual((status, body), (405, b''))
        self.assertNotIn('Content-Type', headers)
        status, headers, body = self.api.call(
            'GET', '/proxies', headers={'User-Agent': 'Mozilla/5.0'})
        self.assertEqual((status, body), (403, b'User agent not allowed\n'))
        self.assertEqual(len(headers['X-Toxiproxy-Request-Id']), 20)
        status, headers, body = self.api.call(
            'GET', '/version', headers={'User-Agent': 'Mozilla/5.0'})
        self.assertEqual((status, body), (403, b'User agent not allowed\n'))

    def test_toxics(self):
        self.api.proxy('p', 'localhost:1')
        base = '/proxies/p/toxics'
        self.assertEqual(self.api.json('GET', base), (200, []))
        status, toxic = self.api.json('POST', base, {'type': 'latency'})
        self.assertEqual((status, toxic), (200, {
            'attributes': {'latency': 0, 'jitter': 0},
            'name': 'latency_downstream', 'type': 'latency',
            'stream': 'downstream', 'toxicity': 1}))
        self.assert_error(self.api.call('POST', base, {'type': 'latency'}),
                          409, 'toxic already exists')
        self.assert_error(self.api.call('POST', base, {
            'type': 'latency', 'stream': 'sideways'}), 400,
            'stream was invalid, can be either upstream or downstream')
        self.assert_error(self.api.call('POST', base, {'type': 'nope'}), 400,
                          'invalid toxic type')
        self.assert_error(self.api.call('POST', base, {}), 400,
                          'invalid toxic type')
        self.assert_error(self.api.call('POST', '/proxies/q/toxics', {
            'type': 'latency'}), 404, 'proxy not found')
        status, up = self.api.json('POST', base, {
            'type': 'latency', 'stream': 'UpStream', 'toxicity': 0.25,
            'attributes': {'latency': 100, 'jitter': 10}})
        self.assertEqual((up['name'], up['stream'], up['toxicity']),
                         ('latency_UpStream', 'UpStream', 0.25))
        self.assertEqual(self.api.json('POST', base, {
            'type': 'noop', 'name': 'nothing'})[1]['attributes'], {})
        names = [t['name'] for t in self.api.json('GET', base)[1]]
        self.assertEqual(names, ['latency_UpStream', 'latency_downstream',
                                 'nothing'])
        # update: attributes merge, a missing toxicity stays
        status, changed = self.api.json(
            'PATCH', base + '/latency_UpStream', {'attributes': {
                'latency': 500}})
        self.assertEqual((changed['attributes'], changed['toxicity']),
                         ({'latency': 500, 'jitter': 10}, 0.25))
        self.assert_error(self.api.call('PATCH', base + '/latency_UpStream',
                                        b''), 400, 'bad request body: EOF')
        self.assertEqual(self.api.json('GET', base + '/latency_UpStream'),
                         (200, changed))
        self.assertEqual(self.api.call('DELETE', base + '/nothing')[0], 204)
        self.assert_error(self.api.call('DELETE', base + '/nothing'), 404,
                          'toxic not found')
        self.assert_error(self.api.call('GET', base + '/nothing'), 404,
                          'toxic not found')

    def test_attributes_are_checked(self):
        self.api.proxy('p', 'localhost:1')
        base = '/proxies/p/toxics'
        for body, word in (
                ({'type': 'bandwidth', 'attributes': {'rate': -100}}, 'rate'),
                ({'type': 'latency', 'attributes': {'latency': -1}},
                 'latency'),
                ({'type': 'slicer', 'attributes': {'average_size': 0}},
                 'average_size'),
                ({'type': 'latency', 'toxicity': 1.5}, 'toxicity'),
                ({'type': 'latency', 'attributes': {'latency': 'x'}},
                 'LatencyToxic.attributes.latency')):
            status, headers, data = self.api.call('POST', base, body)
            self.assertEqual(status, 400, (body, data))
            self.assertIn(word, json.loads(data.decode())['error'])
        self.assertEqual(self.api.json('GET', base), (200, []))

    def test_populate(self):
        status, answer = self.api.json('POST', '/populate', [])
        self.assertEqual((status, answer), (201, {'proxies': None}))
        status, headers, body = self.api.call('POST', '/populate', [
            {'name': 'one', 'upstream': 'localhost:1', 'listen': '127.0.0.1:0'},
            {'upstream': 'localhost:2'}])
        self.assertEqual((status, json.loads(body.decode())), (400, {
            'error': 'missing required field: name at proxy 2',
            'status': 400}))
        self.assertEqual(self.api.json('GET', '/proxies')[1], {})
        status, answer = self.api.json('POST', '/populate', [
            {'name': 'one', 'upstream': 'localhost:1',
             'listen': '127.0.0.1:0'},
            {'name': 'two', 'upstream': 'localhost:2',
             'listen': '127.0.0.1:0', 'enabled': False}])
        self.assertEqual(status, 201)
        one, two = answer['proxies']
        self.assertEqual((one['enabled'], two['enabled']), (True, False))
        self.api.toxic('one', type='latency')
        # unchanged: kept as it is, its toxics too; changed: replaced
        status, answer = self.api.json('POST', '/populate', [
            {'name': 'one', 'upstream': 'localhost:1',
             'listen': one['listen']},
            {'name': 'two', 'upstream': 'localhost:3',
             'listen': '127.0.0.1:0'}])
        self.assertEqual(status, 201)
        kept, replaced = answer['proxies']
        self.assertEqual((kept['listen'], len(kept['toxics'])),
                         (one['listen'], 1))
        self.assertEqual((replaced['upstream'], replaced['enabled']),
                         ('localhost:3', True))

    def test_reset(self):
        self.api.proxy('p', 'localhost:1')
        self.api.toxic('p', type='latency')
        self.api.json('POST', '/proxies/p', {'enabled': False})
        server = self.api.proxies.get('p')
        server.set_mix('delay')
        status, headers, body = self.api.call('POST', '/reset')
        self.assertEqual((status, body), (204, b''))
        shown = self.api.json('GET', '/proxies/p')[1]
        self.assertEqual((shown['enabled'], shown['toxics']), (True, []))
        self.assertEqual(str(server.mix), 'dummy')

    def test_token(self):
        api = ToxiServer(token='s3cret')
        self.addCleanup(api.close)
        status, headers, body = api.call('GET', '/proxies')
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body.decode())['status'], 401)
        self.assertEqual(api.call('GET', '/proxies', headers={
            'Authorization': 'Bearer s3cret'})[0], 200)


class ToxicsTest(ApiTestCase):
    """Each toxic measured from a client's side, through the API."""

    def setUp(self):
        super(ToxicsTest, self).setUp()
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)
        shown = self.api.proxy('echo', '127.0.0.1:%d' % self.echo.port)
        self.address = address_of(shown['listen'])

    def timed_exchange(self, payload=b'ping'):
        with support.connect(self.address) as sock:
            start = time.time()
            got = support.exchange(sock, payload)
            return got, time.time() - start

    def test_latency_both_streams_add_up(self):
        self.api.toxic('echo', type='latency', attributes={'latency': 150})
        self.api.toxic('echo', type='latency', stream='upstream',
                       attributes={'latency': 100})
        got, took = self.timed_exchange()
        self.assertEqual(got, b'ping')
        self.assertGreaterEqual(took, 0.25)

    def test_bandwidth(self):
        self.api.toxic('echo', type='bandwidth', attributes={'rate': 100})
        got, took = self.timed_exchange(b'x' * 50000)
        self.assertEqual(len(got), 50000)
        self.assertGreaterEqual(took, 0.4)     # 50 KB at 100 KB/s

    def test_timeout_and_reset_peer_and_limit_data(self):
        self.api.toxic('echo', type='limit_data', attributes={'bytes': 5})
        with support.connect(self.address) as sock:
            sock.sendall(b'0123456789')
            self.assertEqual(support.recv_all(sock), b'01234')
        self.api.call('DELETE', '/proxies/echo/toxics/limit_data_downstream')
        self.api.toxic('echo', type='reset_peer', attributes={'timeout': 50})
        with support.connect(self.address) as sock:
            sock.sendall(b'x')
            with self.assertRaises(ConnectionResetError):
                while sock.recv(100):
                    pass
        self.api.call('DELETE', '/proxies/echo/toxics/reset_peer_downstream')
        self.api.toxic('echo', type='timeout', attributes={'timeout': 300})
        with support.connect(self.address) as sock:
            start = time.time()
            sock.sendall(b'x')
            self.assertTrue(support.closed_by_peer(sock, 3))
            self.assertGreaterEqual(time.time() - start, 0.3)

    def test_slicer_and_slow_close(self):
        self.api.toxic('echo', type='slicer', attributes={
            'average_size': 10, 'size_variation': 0, 'delay': 20000})
        got, took = self.timed_exchange(b'y' * 100)
        self.assertEqual(got, b'y' * 100)
        self.assertGreaterEqual(took, 9 * 0.02)
        self.api.call('DELETE', '/proxies/echo/toxics/slicer_downstream')
        self.api.toxic('echo', type='slow_close', attributes={'delay': 300})
        with support.connect(self.address) as sock:
            sock.shutdown(socket.SHUT_WR)
            start = time.time()
            self.assertEqual(support.recv_all(sock), b'')
            self.assertGreaterEqual(time.time() - start, 0.3)

    def test_toxics_change_under_an_open_connection(self):
        with support.connect(self.address) as sock:
            self.assertEqual(support.exchange(sock, b'a'), b'a')
            start = time.time()
            self.api.toxic('echo', type='latency',
                           attributes={'latency': 300})
            self.assertLess(time.time() - start, 5)
            start = time.time()
            self.assertEqual(support.exchange(sock, b'b'), b'b')
            self.assertGreaterEqual(time.time() - start, 0.3)
            self.api.call('DELETE', '/proxies/echo/toxics/latency_downstream')
            start = time.time()
            self.assertEqual(support.exchange(sock, b'c'), b'c')
            self.assertLess(time.time() - start, 0.3)

    def test_api_answers_while_connections_stream(self):
        stop = threading.Event()

        def stream():
            with support.connect(self.address) as sock:
                while not stop.is_set():
                    sock.sendall(b'z' * 65536)
                    support.recv_exactly(sock, 65536)
        streams = [threading.Thread(target=stream, daemon=True)
                   for _ in range(10)]
        for thread in streams:
            thread.start()
        self.addCleanup(stop.set)
        time.sleep(0.3)
        for _ in range(5):
            self.api.toxic('echo', type='latency', attributes={'latency': 1})
            self.assertEqual(self.api.call(
                'DELETE', '/proxies/echo/toxics/latency_downstream')[0], 204)
        stop.set()
        for thread in streams:
            thread.join(10)

    def test_decisions_name_the_toxic(self):
        self.api.toxic('echo', type='latency', name='slow',
                       attributes={'latency': 1})
        self.timed_exchange()
        server = self.api.proxies.get('echo')
        record, = [d for d in server.decisions if d.get('toxic')]
        self.assertEqual((record['toxic'], record['stream'],
                          record['proxy'], record['behavior']),
                         ('slow', 'downstream', 'echo', 'latency'))

    def test_metrics_move_while_a_connection_is_open(self):
        listen = self.api.proxies.get('echo').listen
        lines = [line % (listen, self.echo.port) for line in (
            'toxiproxy_proxy_received_bytes_total{direction="upstream",'
            'listener="%s",proxy="echo",upstream="127.0.0.1:%d"} 5',
            'toxiproxy_proxy_sent_bytes_total{direction="downstream",'
            'listener="%s",proxy="echo",upstream="127.0.0.1:%d"} 5')]
        with support.connect(self.address) as sock:
            support.exchange(sock, b'12345')
            # the client may read the echo before the proxy's thread,
            # back from its send, counts it: a moment's grace
            deadline = time.time() + support.TIMEOUT
            while True:
                status, headers, body = self.api.call('GET', '/metrics')
                text = body.decode()
                if all(line in text for line in lines) or \
                        time.time() > deadline:
                    break
                time.sleep(0.01)
        self.assertEqual(status, 200)
        for line in lines:
            self.assertIn(line, text)
        self.assertIn('vaurien_connections_open{proxy="echo"} 1', text)


class ToxicityTest(unittest.TestCase):
    """Toxicity is a chance drawn once per connection and stream, from
    the seed, and not drawn again when another toxic changes."""

    def hits(self, seed, connections=120, churn=False):
        api = ToxiServer(seed=seed)
        try:
            with support.EchoServer() as echo:
                shown = api.proxy('e', '127.0.0.1:%d' % echo.port)
                api.toxic('e', type='latency', name='half', toxicity=0.5,
                          attributes={'latency': 1})
                server = api.proxies.get('e')
                socks = []
                for _ in range(connections):
                    sock = support.connect(address_of(shown['listen']))
                    support.exchange(sock, b'.')
                    socks.append(sock)
                drawn = set(d['connection'] for d in server.decisions)
                if churn:
                    api.toxic('e', type='noop', name='other')
                    for sock in socks:
                        support.exchange(sock, b'.')
                    drawn_again = set(d['connection']
                                      for d in server.decisions)
                    assert drawn_again == drawn, 'drawn again'
                for sock in socks:
                    sock.close()
                return drawn
        finally:
            api.close()

    def test_a_chance_per_connection_from_the_seed(self):
        first = self.hits(7)
        self.assertTrue(30 < len(first) < 90, len(first))
        self.assertEqual(self.hits(7), first)
        self.assertNotEqual(self.hits(8), first)

    def test_not_drawn_again_when_another_toxic_changes(self):
        self.hits(3, connections=40, churn=True)


class ManyProxiesTest(ApiTestCase):

    def test_a_hundred_proxies_in_one_process(self):
        with support.EchoServer() as echo:
            listens = []
            for number in range(100):
                listens.append(self.api.proxy(
                    'p%d' % number, '127.0.0.1:%d' % echo.port)['listen'])
            self.assertEqual(len(self.api.json('GET', '/proxies')[1]), 100)
            for number, listen in enumerate(listens):
                with support.connect(address_of(listen)) as sock:
                    payload = ('proxy %d' % number).encode()
                    self.assertEqual(support.exchange(sock, payload), payload)

    def test_a_redis_proxy_answers_errors_in_redis_words(self):
        def redis_like(server, conn):
            while conn.recv(65536):
                conn.sendall(b'+OK\r\n')
        with support.ThreadedServer(redis_like) as backend:
            shown = self.api.proxy('r', '127.0.0.1:%d' % backend.port,
                                   protocol='redis')
            self.assertEqual(shown['protocol'], 'redis')
            self.api.toxic('r', type='error', stream='upstream')
            with support.connect(address_of(shown['listen'])) as sock:
                sock.sendall(b'*1\r\n$4\r\nPING\r\n')
                self.assertTrue(sock.recv(100).startswith(b'-ERR'))


class ProcessTest(unittest.TestCase):
    """``vaurien.py server`` as a process: flags both ways, the config
    file, signals, and a lone copy of the file."""

    def start(self, args, script=support.VAURIEN_PY, env=None, cwd=None):
        port = support.free_port()
        proc = subprocess.Popen(
            [sys.executable, script, 'server', '-port', str(port)] + args,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            cwd=cwd, universal_newlines=True)
        self.addCleanup(self.stop, proc)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                support.connect(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read())
                time.sleep(0.05)
        api = ToxiServer.__new__(ToxiServer)
        api.address = ('127.0.0.1', port)
        return proc, api

    @staticmethod
    def stop(proc):
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        proc.stderr.close()

    def test_config_file_with_toxics_and_sigterm(self):
        with support.EchoServer() as echo, support.temp_dir() as folder:
            config = support.write(os.path.join(folder, 't.json'),
                                   json.dumps([{
                                       'name': 'echo',
                                       'listen': '127.0.0.1:0',
                                       'upstream': '127.0.0.1:%d' % echo.port,
                                       'toxics': [{'type': 'latency',
                                                   'attributes': {
                                                       'latency': 200}}]}]))
            proc, api = self.start(['--config', config, '--seed', '4'])
            shown = api.json('GET', '/proxies/echo')[1]
            self.assertEqual(shown['toxics'][0]['attributes']['latency'], 200)
            with support.connect(address_of(shown['listen'])) as sock:
                start = time.time()
                self.assertEqual(support.exchange(sock, b'hi'), b'hi')
                self.assertGreaterEqual(time.time() - start, 0.2)
                proc.send_signal(signal.SIGTERM)
                start = time.time()
                proc.wait(5)
                self.assertLess(time.time() - start, 1.0)
        self.assertEqual(proc.returncode, 0)

    def test_a_malformed_config_file_is_one_line(self):
        with support.temp_dir() as folder:
            config = support.write(os.path.join(folder, 't.json'),
                                   '{"not": "an array"}')
            code, out, err = support.run_vaurien(['server', '-port', '0',
                                                  '-config', config])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn('cannot unmarshal object', err)

    def test_the_lone_file_is_a_toxiproxy_server(self):
        with support.temp_dir() as folder, support.EchoServer() as echo:
            shutil.copy(support.VAURIEN_PY, folder)
            proc, api = self.start([], script=os.path.join(folder,
                                                           'vaurien.py'),
                                   cwd=folder)
            shown = api.proxy('e', '127.0.0.1:%d' % echo.port)
            for toxic in ('latency', 'bandwidth', 'slow_close', 'timeout',
                          'reset_peer', 'slicer', 'limit_data', 'noop'):
                status, answer = api.json('POST', '/proxies/e/toxics', {
                    'type': toxic, 'toxicity': 0})
                self.assertEqual(status, 200, answer)
            with support.connect(address_of(shown['listen'])) as sock:
                self.assertEqual(support.exchange(sock, b'alone'), b'alone')
            proc.send_signal(signal.SIGINT)
            proc.wait(5)


class IniProxiesTest(unittest.TestCase):

    def test_the_readme_example(self):
        from tests.test_plugins import readme_files
        text = readme_files()['two-proxies.ini']
        with support.temp_dir() as folder:
            ini = support.write(os.path.join(folder, 'v.ini'), text)
            settings, options, args = vaurien.load_settings(['--config',
                                                             ini])
        self.assertEqual(settings['backend'], 'localhost:6379')
        (name, values), = args.proxy_sections
        self.assertEqual((name, values['backend'], values['delay.sleep']),
                         ('slow-db', 'localhost:5432', '0.3'))

    def test_proxy_sections_and_their_names(self):
        with support.EchoServer() as echo, support.temp_dir() as folder:
            http_port = support.free_port()
            ini = support.write(os.path.join(folder, 'v.ini'), '''
[vaurien]
proxy = 127.0.0.1:0
backend = 127.0.0.1:%(port)d
http = true
http_port = %(http)d

[proxy:second]
proxy = 127.0.0.1:0
backend = 127.0.0.1:%(port)d
behavior = delay
delay.sleep = 0.3
''' % {'port': echo.port, 'http': http_port})
            with support.vaurien_process(['--config', ini]) as (proc,
                                                                 address):
                api = ToxiServer.__new__(ToxiServer)
                api.address = ('127.0.0.1', http_port)
                proxies = api.json('GET', '/proxies')[1]
                self.assertEqual(sorted(proxies), ['second', 'vaurien'])
                status, mix = api.json('GET', '/behavior?proxy=second')
                self.assertEqual((status, mix['behavior']), (200, 'delay'))
                self.assertEqual(mix['options']['delay']['sleep'], 0.3)
                self.assertEqual(api.json('GET', '/behavior')[1]['behavior'],
                                 'dummy')
                second = address_of(proxies['second']['listen'])
                with support.connect(second) as sock:
                    start = time.time()
                    self.assertEqual(support.exchange(sock, b'2'), b'2')
                    self.assertGreaterEqual(time.time() - start, 0.3)
                client = vaurien.Client('127.0.0.1', http_port,
                                        proxy='second')
                self.assertEqual(client.get_behavior(), 'delay')
                self.assertEqual(api.json('GET', '/behavior?proxy=nope')[0],
                                 404)


if __name__ == '__main__':
    unittest.main()
