"""``vaurien.py server`` driven by Toxiproxy's own clients:
toxiproxy-python (PyPI) in this process, and toxiproxy-node-client (npm)
through node running toxiproxy_node_client.js beside this file.

The Node client is found through VAURIEN_NODE_MODULES, the node_modules
folder it is installed in (.ci/run installs it with ``npm install
--prefix``)."""

import json
import os
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

from tests import support as base
from tests.integration import support

NODE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'toxiproxy_node_client.js')


def start_server():
    """``vaurien.py server``, its API on a free port of 127.0.0.1."""
    port = support.free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-server-')
    return support.Server([sys.executable, base.VAURIEN_PY, 'server',
                           '-host', '127.0.0.1', '-port', str(port),
                           '-seed', '1'], port, folder, 'vaurien.py server')


def api_get(server, path):
    """The JSON answer of the server's API to GET *path*."""
    with urllib.request.urlopen('http://127.0.0.1:%d%s' % (
            server.port, path), timeout=support.TIMEOUT) as answer:
        return json.loads(answer.read().decode('utf-8'))


def accepts(address):
    """Whether something listens on *address* (host, port)."""
    try:
        base.connect(address, timeout=2).close()
        return True
    except OSError:
        return False


def listen_address(text):
    host, _, port = text.rpartition(':')
    return host, int(port)


class ClientTestCase(unittest.TestCase):
    """One ``vaurien.py server`` for the class, every proxy removed after
    each test; toxiproxy-python pointed at it."""

    @classmethod
    def setUpClass(cls):
        support.need_module('toxiproxy', 'toxiproxy-python')
        from toxiproxy import Toxiproxy
        from toxiproxy.api import APIConsumer
        cls.api = APIConsumer
        cls.server = start_server()
        # the client's address is a class attribute: put it back after
        cls.saved = APIConsumer.host, APIConsumer.port
        cls.toxiproxy = Toxiproxy()
        cls.toxiproxy.update_api_consumer('127.0.0.1', cls.server.port)

    @classmethod
    def tearDownClass(cls):
        cls.toxiproxy.update_api_consumer(*cls.saved)
        cls.server.stop()

    def setUp(self):
        self.addCleanup(self.toxiproxy.destroy_all)

    def echo(self):
        echo = base.EchoServer().start()
        self.addCleanup(echo.stop)
        return '127.0.0.1:%d' % echo.port

    def raw_proxy(self, **fields):
        """A proxy made through the client's POST, for fields its create()
        does not send (vaurien's protocol)."""
        from toxiproxy.proxy import Proxy
        return Proxy(**self.api.post('/proxies', json=fields).json())


class ToxiproxyPythonTest(ClientTestCase):
    """toxiproxy-python 0.1.1 against vaurien.py server."""

    def test_create_list_get(self):
        proxy = self.toxiproxy.create(upstream='localhost:3306',
                                      name='mysql')
        host, port = listen_address(proxy.listen)
        self.assertEqual(host, '127.0.0.1')
        self.assertNotEqual(port, 0)     # the port it really got
        self.assertTrue(proxy.enabled)
        self.assertEqual(list(self.toxiproxy.proxies()), ['mysql'])
        got = self.toxiproxy.get_proxy('mysql')
        self.assertEqual((got.name, got.upstream, got.listen, got.enabled),
                         ('mysql', 'localhost:3306', proxy.listen, True))
        self.assertIsNone(self.toxiproxy.get_proxy('no_such_proxy'))
        self.assertTrue(accepts((host, port)))

    def test_a_disabled_proxy_shows_its_listen_as_given(self):
        # Toxiproxy keeps a disabled proxy's listen string, and listens
        # there once enabled (its own test_create_proxy)
        port = support.free_port()
        for given, shown in (('127.0.0.1:%d' % port, '127.0.0.1:%d' % port),
                             ('localhost:%d' % port, '127.0.0.1:%d' % port)):
            proxy = self.toxiproxy.create(upstream='localhost:3306',
                                          name='later', enabled=False,
                                          listen=given)
            self.assertFalse(proxy.enabled)
            self.assertEqual(proxy.listen, given)
            self.assertEqual(self.toxiproxy.get_proxy('later').listen, given)
            self.assertFalse(accepts(('127.0.0.1', port)))
            proxy.enable()
            self.assertTrue(accepts(('127.0.0.1', port)))
            self.assertEqual(self.toxiproxy.get_proxy('later').listen, shown)
            proxy.destroy()

    def test_errors_are_the_clients_exceptions(self):
        from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists
        from toxiproxy.proxy import Proxy
        fields = {'name': 'twice', 'upstream': 'localhost:3306',
                  'listen': '127.0.0.1:0'}
        self.api.post('/proxies', json=fields)
        # create() looks first; the server's 409 maps to ProxyExists too
        with self.assertRaises(ProxyExists):
            self.toxiproxy.create(**fields)
        with self.assertRaises(ProxyExists) as caught:
            self.api.post('/proxies', json=fields)
        self.assertIn(b'proxy already exists', caught.exception.args[0])
        with self.assertRaises(NotFound):
            self.api.get('/proxies/no_such_proxy')
        with self.assertRaises(NotFound):
            self.api.get('/no_such_path')
        ghost = Proxy(name='ghost', upstream='x:1', enabled=True,
                      listen='127.0.0.1:1')
        with self.assertRaises(NotFound):
            ghost.disable()
        with self.assertRaises(NotFound):
            ghost.destroy()
        proxy = self.toxiproxy.get_proxy('twice')
        with self.assertRaises(NotFound):
            proxy.destroy_toxic('no_such_toxic')
        for bad in ({'type': 'latency', 'stream': 'sideways'},
                    {'type': 'no_such_type'},
                    {'type': 'latency', 'attributes': {'latency': 'slow'}}):
            with self.assertRaises(InvalidToxic):
                proxy.add_toxic(**bad)
        with self.assertRaises(InvalidToxic) as caught:
            self.api.post('/proxies', json={'name': 'no_upstream'})
        self.assertIn(b'missing required field: upstream',
                      caught.exception.args[0])
        self.assertEqual(proxy.toxics(), {})

    def test_toxics_add_get_remove(self):
        proxy = self.toxiproxy.create(upstream=self.echo(), name='echo')
        proxy.add_toxic(type='latency', attributes={'latency': 50,
                                                    'jitter': 5})
        proxy.add_toxic(type='bandwidth', stream='upstream', toxicity=0.5,
                        attributes={'rate': 1000}, name='slow_up')
        toxics = proxy.toxics()
        self.assertEqual(sorted(toxics), ['latency_downstream', 'slow_up'])
        latency = proxy.get_toxic('latency_downstream')
        self.assertEqual((latency.type, latency.stream, latency.toxicity,
                          latency.attributes),
                         ('latency', 'downstream', 1,
                          {'latency': 50, 'jitter': 5}))
        slow = toxics['slow_up']
        self.assertEqual((slow.type, slow.stream, slow.toxicity,
                          slow.attributes),
                         ('bandwidth', 'upstream', 0.5, {'rate': 1000}))
        # Toxiproxy's order: the upstream stream's toxics first
        self.assertEqual([toxic['name'] for toxic in self.api.get(
            '/proxies/echo/toxics').json()], ['slow_up',
                                              'latency_downstream'])
        self.assertIsNone(proxy.get_toxic('no_such_toxic'))
        self.assertTrue(proxy.destroy_toxic('latency_downstream'))
        self.assertEqual(list(proxy.toxics()), ['slow_up'])
        self.assertTrue(proxy.destroy_toxic('slow_up'))
        self.assertEqual(proxy.toxics(), {})

    def test_slicer_size_variation_as_large_as_average_size(self):
        # Toxiproxy takes it (toxiproxy-node-client's own tests send it);
        # it is listed as given, and the bytes all come through
        proxy = self.toxiproxy.create(upstream=self.echo(), name='sliced')
        attributes = {'average_size': 3, 'size_variation': 3, 'delay': 100}
        proxy.add_toxic(type='slicer', attributes=attributes)
        self.assertEqual(proxy.get_toxic('slicer_downstream').attributes,
                         attributes)
        payload = bytes(bytearray(range(256))) * 4
        with base.connect(listen_address(proxy.listen)) as sock:
            self.assertEqual(base.exchange(sock, payload), payload)

    def test_disable_enable_down(self):
        proxy = self.toxiproxy.create(upstream=self.echo(), name='echo')
        address = listen_address(proxy.listen)
        proxy.add_toxic(type='latency', attributes={'latency': 10})
        proxy.disable()
        self.assertFalse(proxy.enabled)
        self.assertFalse(self.toxiproxy.get_proxy('echo').enabled)
        self.assertFalse(accepts(address))
        proxy.enable()
        self.assertTrue(accepts(address))
        with proxy.down():
            self.assertFalse(accepts(address))
        self.assertTrue(accepts(address))
        again = self.toxiproxy.get_proxy('echo')
        self.assertEqual((again.listen, again.enabled), (proxy.listen, True))
        # the toxics stay through it all
        self.assertEqual(list(proxy.toxics()), ['latency_downstream'])

    def test_populate(self):
        # the client's populate() runs on its side: GET, DELETE and POST
        first, second = support.free_port(), support.free_port()
        wanted = [{'name': 'one', 'upstream': 'localhost:3306',
                   'listen': '127.0.0.1:%d' % first},
                  {'name': 'two', 'upstream': 'localhost:3307',
                   'listen': '127.0.0.1:%d' % second}]
        made = self.toxiproxy.populate(wanted)
        self.assertEqual([proxy.listen for proxy in made],
                         [item['listen'] for item in wanted])
        self.assertTrue(accepts(('127.0.0.1', first)))
        # the same again: kept; another upstream: replaced
        wanted[1]['upstream'] = 'localhost:3308'
        made = self.toxiproxy.populate(wanted)
        self.assertEqual([proxy.name for proxy in made], ['two'])
        self.assertEqual(self.toxiproxy.get_proxy('two').upstream,
                         'localhost:3308')
        self.assertTrue(accepts(('127.0.0.1', second)))
        self.assertEqual(sorted(self.toxiproxy.proxies()), ['one', 'two'])

    def test_reset(self):
        proxy = self.toxiproxy.create(upstream=self.echo(), name='echo')
        address = listen_address(proxy.listen)
        proxy.add_toxic(type='timeout', attributes={'timeout': 0})
        proxy.disable()
        self.assertTrue(self.toxiproxy.reset())
        self.assertTrue(accepts(address))
        self.assertEqual(proxy.toxics(), {})
        got = self.toxiproxy.get_proxy('echo')
        self.assertEqual((got.listen, got.enabled), (proxy.listen, True))
        with base.connect(address) as sock:
            self.assertEqual(base.exchange(sock, b'ping'), b'ping')

    def test_latency_seen_from_the_clients_side(self):
        proxy = self.toxiproxy.create(upstream=self.echo(), name='echo')
        proxy.add_toxic(type='latency', stream='upstream',
                        attributes={'latency': 150})
        proxy.add_toxic(type='latency', attributes={'latency': 150})
        with base.connect(listen_address(proxy.listen)) as sock:
            started = time.monotonic()
            self.assertEqual(base.exchange(sock, b'omg\n'), b'omg\n')
            self.assertGreaterEqual(time.monotonic() - started, 0.3)

    def test_version(self):
        # the version string is vaurien's own: only its shape is Toxiproxy's
        self.assertIn('version', json.loads(self.toxiproxy.version()))
        self.assertTrue(self.toxiproxy.running())


class ToxiproxyRedisTest(ClientTestCase):
    """A proxy with vaurien's ``"protocol": "redis"``, made and poisoned
    through toxiproxy-python, in front of a real redis-server."""

    @classmethod
    def setUpClass(cls):
        cls.redis = support.need_module('redis', 'redis')
        cls.backend = support.start_redis()
        try:
            super(ToxiproxyRedisTest, cls).setUpClass()
        except BaseException:
            cls.backend.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        super(ToxiproxyRedisTest, cls).tearDownClass()
        cls.backend.stop()

    def setUp(self):
        super(ToxiproxyRedisTest, self).setUp()
        self.proxy = self.raw_proxy(
            name='redis', listen='127.0.0.1:0',
            upstream='127.0.0.1:%d' % self.backend.port, protocol='redis')
        host, port = listen_address(self.proxy.listen)
        self.client = self.redis.Redis(host=host, port=port,
                                       socket_timeout=support.TIMEOUT,
                                       single_connection_client=True)
        self.addCleanup(self.client.close)

    def test_the_proxy_shows_its_protocol(self):
        shown = self.api.get('/proxies/redis').json()
        self.assertEqual(shown['protocol'], 'redis')
        self.assertEqual(shown['upstream'],
                         '127.0.0.1:%d' % self.backend.port)

    def test_error_toxic_is_a_redis_error(self):
        self.assertTrue(self.client.set('key', 'value'))
        self.proxy.add_toxic(type='error', attributes={
            'message': 'ERR injected by a toxic'})
        # the open connection meets it at its next command
        with self.assertRaises(self.redis.exceptions.ResponseError) as caught:
            self.client.get('key')
        self.assertIn('injected by a toxic', str(caught.exception))
        self.proxy.destroy_toxic('error_downstream')
        self.assertEqual(self.client.get('key'), b'value')

    def test_latency_toxic_seen_by_redis_py(self):
        self.assertTrue(self.client.ping())
        self.proxy.add_toxic(type='latency', attributes={'latency': 250})
        started = time.monotonic()
        self.assertTrue(self.client.ping())
        self.assertGreaterEqual(time.monotonic() - started, 0.25)


class ToxiproxyNodeTest(unittest.TestCase):
    """toxiproxy-node-client (npm) against vaurien.py server: the script
    runs once for the class, and each test checks part of what it saw."""

    @classmethod
    def setUpClass(cls):
        node = support.need_program('node', 'nodejs')
        modules = os.environ.get('VAURIEN_NODE_MODULES', '')
        if not os.path.isdir(os.path.join(modules, 'toxiproxy-node-client')):
            support.missing(
                'toxiproxy-node-client (npm install --prefix DIR '
                'toxiproxy-node-client, then VAURIEN_NODE_MODULES='
                'DIR/node_modules)')
        cls.redis = support.need_module('redis', 'redis')
        cls.backend = support.start_redis()
        try:
            cls.server = start_server()
        except BaseException:
            cls.backend.stop()
            raise
        env = dict(os.environ, VAURIEN_NODE_MODULES=modules)
        try:
            result = subprocess.run(
                [node, NODE_SCRIPT, 'http://127.0.0.1:%d' % cls.server.port,
                 '127.0.0.1:%d' % cls.backend.port], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, timeout=60)
        except BaseException:
            cls.tearDownClass()
            raise
        if result.returncode != 0:
            cls.tearDownClass()
            raise AssertionError('the Node client failed (%d): %s\n%s' % (
                result.returncode, result.stderr.decode('utf-8', 'replace'),
                cls.server.log_text()))
        cls.seen = json.loads(result.stdout.decode('utf-8'))

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.backend.stop()

    def refused(self, what, status):
        self.assertEqual(self.seen[what], {
            'name': 'ToxiproxyError',
            'message': 'Request failed with status code %d' % status}, what)

    def test_proxies(self):
        seen = self.seen
        created = seen['created']
        host, port = listen_address(created['listen'])
        self.assertEqual((host, created['enabled'], created['upstream']),
                         ('127.0.0.1', True, 'localhost:6379'))
        self.assertNotEqual(port, 0)
        self.assertEqual(seen['got'], created)
        self.assertEqual(seen['names'], ['node'])
        self.assertEqual(seen['disabled'], dict(created, enabled=False))
        self.assertEqual(seen['enabled'], created)
        self.assertEqual(seen['afterReset'], created)
        self.refused('duplicate', 409)
        self.refused('missing', 404)
        self.refused('removed', 404)
        self.assertIn('version', json.loads(seen['version']))

    def test_toxics(self):
        seen = self.seen
        self.assertEqual(seen['latency'], {
            'attributes': {'latency': 100, 'jitter': 10},
            'name': 'latency_downstream', 'stream': 'downstream',
            'toxicity': 1, 'type': 'latency'})
        self.assertEqual(seen['gotToxic'], seen['latency'])
        # an update merges the attributes into the toxic's
        self.assertEqual(seen['updated']['attributes'],
                         {'latency': 200, 'jitter': 10})
        self.assertEqual(seen['slicer']['attributes'], {
            'average_size': 1000, 'size_variation': 1000, 'delay': 1000})
        self.refused('duplicateToxic', 409)
        self.refused('badType', 400)
        self.refused('badStream', 400)
        self.refused('removedToxic', 404)

    def test_populate(self):
        one, two = self.seen['populated']
        self.assertEqual((one['name'], one['enabled']), ('node_a', True))
        self.assertNotEqual(listen_address(one['listen'])[1], 0)
        # disabled: its listen as given
        self.assertEqual(two, {'name': 'node_b', 'listen': '127.0.0.1:0',
                               'upstream': 'localhost:6380',
                               'enabled': False})
        # {"proxies": null}, as Toxiproxy answers: the client cannot
        # iterate it, against either server
        self.assertEqual(self.seen['populateEmpty']['name'], 'TypeError')
        self.assertTrue(accepts(listen_address(one['listen'])))

    def test_error_toxic_added_by_the_node_client(self):
        self.assertEqual(self.seen['redisToxic']['attributes']['message'],
                         'OOM command not allowed (a toxic)')
        shown = api_get(self.server, '/proxies/node_redis')
        self.assertEqual(shown['protocol'], 'redis')
        host, port = listen_address(shown['listen'])
        client = self.redis.Redis(host=host, port=port,
                                  socket_timeout=support.TIMEOUT)
        self.addCleanup(client.close)
        with self.assertRaises(self.redis.exceptions.ResponseError) as caught:
            client.get('key')
        # redis-py takes the error's first word for its class
        self.assertIn('command not allowed (a toxic)', str(caught.exception))


if __name__ == '__main__':
    unittest.main()
