"""Moving over from Vaurien 1.x: its import paths, its errors, its
plugins (classes that need not derive from the base), its Client, and the
test helpers that find the bundled plugins by themselves."""

import json
import os
import shutil
import socket
import sys
import textwrap
import time
import unittest

from tests import support
from tests.support import vaurien

SUPER = '''
from vaurien.behaviors import Behavior

class MySuperBehavior(object):
    """1.x's own docs' example: no base class at all."""

    name = 'super'
    options = {}

    def on_before_handle(self, protocol, source, dest, to_backend):
        if to_backend:
            data = protocol._get_data(source)
            dest.sendall(data.upper())
            return 'handled'
        return True

    def on_after_handle(self, protocol, source, dest, to_backend):
        return True

Behavior.register(MySuperBehavior)
'''

NOT_A_PLUGIN = '''
from vaurien.behaviors import Behavior

class Nothing(object):
    name = 'nothing'

Behavior.register(Nothing)
'''


class HelpersFindPluginsTest(unittest.TestCase):
    """vaurien.proxy() finds the bundled plugins as the command line does,
    with no load_plugins() call: from a checkout and from a vendored copy
    with the plugin folders beside it."""

    SCRIPT = textwrap.dedent('''
        import socket, sys
        import vaurien
        backend = socket.socket()
        backend.bind(('127.0.0.1', 0))
        backend.listen(1)
        with vaurien.proxy(backend=backend.getsockname(),
                           behavior='latency') as p:
            print(p.get_behavior())
        with vaurien.proxy(backend=backend.getsockname(),
                           protocol='redis') as p:
            print(p.server.protocol_name)
        ''')

    def run_script(self, cwd, env):
        code, out, err = support.run_command(['-c', self.SCRIPT], cwd=cwd,
                                             env=env)
        self.assertEqual((code, out.split(), err), (0, ['latency', 'redis'],
                                                    ''))

    def test_from_a_checkout(self):
        with support.temp_dir() as folder:
            self.run_script(folder, support.env_with_path())

    def test_from_a_vendored_copy(self):
        with support.temp_dir() as folder:
            vendored = os.path.join(folder, 'thirdparty')
            os.makedirs(vendored)
            shutil.copy(support.VAURIEN_PY, vendored)
            for name in ('protocols', 'behaviors'):
                shutil.copytree(os.path.join(support.ROOT, name),
                                os.path.join(vendored, name),
                                ignore=shutil.ignore_patterns('__pycache__'))
            env = dict(os.environ, PYTHONPATH=vendored)
            self.run_script(folder, env)


class ErrorsAreValueErrorsTest(unittest.TestCase):
    """1.x raised ValueError; code written for it says except ValueError."""

    def test_stop_proxy_of_an_unknown_pid(self):
        with self.assertRaises(ValueError):
            vaurien.stop_proxy(999999)

    def test_start_proxy_that_cannot_start(self):
        with self.assertRaises(ValueError):
            vaurien.start_proxy(backend_port=0, proxy_port=0, http=False,
                                warmup=10)

    def test_set_behavior_refused_by_the_api(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(backend=echo.address, http=True) as proxy:
            client = proxy.client()
            with self.assertRaises(ValueError):
                client.set_behavior('no-such-behavior')
            with self.assertRaises(vaurien.ControlError):
                client.set_behavior('no-such-behavior')


class ImportPathsTest(unittest.TestCase):

    def test_util_paths_of_the_2_0_docs(self):
        from vaurien.util import start_proxy, stop_proxy
        self.assertIs(start_proxy, vaurien.start_proxy)
        self.assertIs(stop_proxy, vaurien.stop_proxy)

    def test_1x_module_paths(self):
        from vaurien.protocols.base import BaseProtocol
        from vaurien.behaviors.dummy import Dummy
        from vaurien.behaviors import Behavior
        self.assertIs(BaseProtocol, vaurien.BaseProtocol)
        self.assertIs(Dummy, vaurien.Dummy)
        self.assertIs(Behavior, vaurien.Behavior)


class ClientTest(unittest.TestCase):

    def test_1x_attributes_and_a_port_as_a_string(self):
        client = vaurien.Client(host='localhost', port='8081')
        self.assertEqual(client.port, 8081)
        self.assertEqual(client.scheme, 'http')
        self.assertEqual(client.root_url, 'http://localhost:8081')
        self.assertEqual(client.behavior_url, 'http://localhost:8081/behavior')
        self.assertEqual(client.list_behaviors_url,
                         'http://localhost:8081/behaviors')


class OneXPluginsTest(unittest.TestCase):
    """Any class with a name and the hooks is a behavior, as with 1.x's
    registry: through Behavior.register, --plugins and callable =."""

    def tearDown(self):
        vaurien.Behavior.unregister('super')

    def test_register_a_class_of_no_base(self):
        namespace = {}
        exec(SUPER, namespace)
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, behavior='super') as proxy:
            with proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, b'shout'), b'SHOUT')

    def check_process(self, args, folder):
        with support.EchoServer() as echo, support.vaurien_process(
                args + ['--backend', '127.0.0.1:%d' % echo.port],
                cwd=folder, env=support.env_with_path(folder)) as (proc,
                                                                  address):
            with support.connect(address) as sock:
                self.assertEqual(support.exchange(sock, b'shout'), b'SHOUT')

    def test_plugins_flag(self):
        with support.temp_dir() as folder:
            support.write(os.path.join(folder, 'oldplugin.py'), SUPER)
            self.check_process(['--plugins', 'oldplugin', '--behavior',
                                'super'], folder)

    def test_callable_in_the_ini_file(self):
        with support.temp_dir() as folder:
            support.write(os.path.join(folder, 'oldplugin.py'),
                          SUPER.replace('Behavior.register(MySuperBehavior)',
                                        ''))
            ini = support.write(os.path.join(folder, 'v.ini'), textwrap.dedent(
                '''
                [vaurien]
                behavior = loud

                [behavior:loud]
                callable = oldplugin:MySuperBehavior
                '''))
            self.check_process(['--config', ini], folder)

    def test_a_class_that_is_no_plugin_is_one_line(self):
        with support.temp_dir() as folder:
            support.write(os.path.join(folder, 'notplugin.py'), NOT_A_PLUGIN)
            code, out, err = support.run_vaurien(
                ['--plugins', 'notplugin', '--list'], cwd=folder,
                env=support.env_with_path(folder))
        self.assertEqual(code, 2)
        self.assertNotIn('Traceback', err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn('none of the methods', err)


class RoundTripTest(unittest.TestCase):
    """What GET /behavior answers, PUT back as it is, gives the same proxy;
    with_behavior restores whatever was in force."""

    MIXES = [
        ('dummy', {}),
        ('delay', {'delay': {'sleep': 0.25, 'before': False}}),
        ('20:delay,5:blackout', {}),
        ('10:latency+corrupt', {'latency': {'latency': 5},
                                'corrupt': {'probability': 0.5}}),
        ('30:error,10:latency+corrupt', {
            'error': {'warmup': 3, 'after': 2, 'every': 2, 'times': 4,
                      'clients': '127.0.0.0/8', 'direction': 'upstream'},
            'latency': {'direction': 'downstream', 'scope': 'connection'}}),
        ('50:slow_close,50:abort', {'slow_close': {'delay': 10}}),
    ]

    def setUp(self):
        vaurien.load_plugins()

    def test_get_then_put_gives_the_same_proxy(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(backend=echo.address) as proxy:
            for mix, options in self.MIXES:
                proxy.set_mix(mix, options)
                got = proxy._call('GET', '/behavior')
                proxy.set_mix('dummy')
                proxy._call('PUT', '/behavior', {'behavior': got['behavior'],
                                                 'options': got['options']})
                self.assertEqual(proxy._call('GET', '/behavior'), got, mix)

    def test_with_behavior_restores_every_kind_of_mix(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(backend=echo.address, http=True) as proxy:
            client = proxy.client()
            for mix, options in self.MIXES:
                client.set_mix(mix, options)
                before = client._call('GET', '/behavior')
                with client.with_behavior('blackout'):
                    self.assertEqual(client.get_behavior(), 'blackout')
                self.assertEqual(client._call('GET', '/behavior'), before)


class RequestsTest(unittest.TestCase):
    """Decisions on framed protocols name the request they hit, and a
    client library's set-up commands are no exchanges."""

    def play(self, protocol, steps):
        from tests.test_protocols import Pair, read_some
        pair = Pair(protocol, 'delay', {'delay': {'sleep': 0}})
        try:
            for who, data in steps:
                if who == 'c':
                    pair.client.sendall(data)
                    read_some(pair.backend, len(data), 2)
                else:
                    pair.backend.sendall(data)
                    read_some(pair.client, len(data), 2)
            return pair.server
        finally:
            pair.close()

    def requests(self, protocol, steps):
        server = self.play(protocol, steps)
        return [d['request'] for d in server.decisions]

    def test_each_protocol_names_its_requests(self):
        from tests import test_protocols as recorded
        self.assertEqual(self.requests('http', recorded.HTTP[:4]),
                         ['GET /', 'POST /up'])
        self.assertEqual(self.requests('redis', recorded.REDIS[:4]),
                         ['PING', 'SET'])
        self.assertEqual(self.requests('memcache', recorded.MEMCACHE[:4]),
                         ['set', 'get'])
        self.assertEqual(self.requests('smtp', recorded.SMTP[:5]),
                         ['EHLO', 'MAIL', 'RCPT', 'DATA'])
        mysql = recorded.mysql_session(deprecate_eof=False)
        self.assertEqual(self.requests('mysql', mysql), [
            'SELECT', 'SELECT', 'COM_STMT_PREPARE', 'COM_STMT_EXECUTE',
            'COM_STMT_CLOSE', 'COM_PING', 'X' * 32, 'COM_QUIT'])

    def test_the_log_line_is_short_and_names_the_request(self):
        from tests import test_protocols as recorded
        with self.assertLogs('vaurien', 'INFO') as logs:
            self.play('http', recorded.HTTP[:2])
        line, = [line for line in logs.output if 'decision' in line]
        self.assertTrue(line.endswith('exchange 1: delay on GET /'), line)

    def test_redis_set_up_is_no_exchange(self):
        from tests.test_protocols import _resp
        steps = [('c', _resp(b'HELLO', b'3') +
                  _resp(b'CLIENT', b'SETINFO', b'LIB-NAME', b'redis-py') +
                  _resp(b'SELECT', b'0')),
                 ('s', b'%1\r\n$5\r\nproto\r\n:3\r\n+OK\r\n+OK\r\n'),
                 ('c', _resp(b'GET', b'k')),
                 ('s', b'$-1\r\n'),
                 ('c', _resp(b'SELECT', b'1')),
                 ('s', b'+OK\r\n')]
        server = self.play('redis', steps)
        self.assertEqual([d['request'] for d in server.decisions],
                         ['GET', 'SELECT'])


class AfterTheFallBackTest(unittest.TestCase):
    """A framed protocol that meets TLS passes it on, and from then on the
    connection is as under tcp: behaviors still act on it."""

    HELLO = b'\x16\x03\x01\x00\x40\x01' + b'\x00' * 64

    def proxy(self, echo, behavior, **options):
        vaurien.load_plugins()
        return support.Proxy(echo.address, protocol='http', behavior=behavior,
                             behavior_options={behavior: options})

    def test_delay_still_delays(self):
        with support.EchoServer() as echo, self.proxy(echo, 'delay',
                                                      sleep=0.3) as proxy:
            with self.assertLogs('vaurien', 'WARNING') as logs, \
                    proxy.connect() as sock:
                self.assertEqual(support.exchange(sock, self.HELLO),
                                 self.HELLO)
                start = time.time()
                self.assertEqual(support.exchange(sock, b'encrypted'),
                                 b'encrypted')
                self.assertGreaterEqual(time.time() - start, 0.3)
        self.assertIn('TLS', logs.output[0])

    def test_error_answers_random_bytes(self):
        with support.EchoServer() as echo, self.proxy(echo, 'error') as proxy:
            with self.assertLogs('vaurien', 'WARNING'), proxy.connect() as sock:
                sock.sendall(self.HELLO)
                support.recv_exactly(sock, len(self.HELLO))
                sock.sendall(b'encrypted')
                answer = support.recv_exactly(sock, 1000)
        self.assertEqual(len(answer), 1000)
        self.assertNotIn(b'HTTP/1.1', answer)

    def test_blackout_cuts(self):
        with support.EchoServer() as echo, self.proxy(echo, 'blackout') as \
                proxy:
            with self.assertLogs('vaurien', 'WARNING'), proxy.connect() as sock:
                sock.sendall(self.HELLO)
                support.recv_exactly(sock, len(self.HELLO))
                sock.sendall(b'encrypted')
                self.assertTrue(support.closed_by_peer(sock))


ONE_X_INI = """
[vaurien]
proxy = 127.0.0.1:0
backend = 127.0.0.1:%(port)d
behavior = 100:dummy
bufsize = 8192
timeout = 30
stay_connected = false
pool_max_size = 100
pool_timeout = 30
sync = false
backlog = 8192

[statsd]
enabled = false
host = localhost
port = 8125
prefix = vaurien
sample_rate = 1.0
"""


class OneXConfigurationTest(unittest.TestCase):
    """Vaurien 1.x's ini files and command lines start, its settings with
    no meaning any more each ignored with one warning."""

    def start(self, args, folder=None):
        return support.vaurien_process(args, cwd=folder)

    def test_a_1x_ini_file_with_its_defaults(self):
        with support.EchoServer() as echo, support.temp_dir() as folder:
            ini = support.write(os.path.join(folder, 'vaurien.ini'),
                                ONE_X_INI % {'port': echo.port})
            with self.start(['--config', ini]) as (proc, address):
                with support.connect(address) as sock:
                    self.assertEqual(support.exchange(sock, b'1.x'), b'1.x')
                proc.terminate()
                err = proc.stderr.read()
        for key in ('bufsize', 'pool_max_size', 'pool_timeout', 'sync'):
            self.assertEqual(err.count('ignoring Vaurien 1.x setting %s:'
                                       % key), 1, err)
        self.assertNotIn('Traceback', err)

    def test_1x_flags_and_statsd_spellings(self):
        stats = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stats.bind(('127.0.0.1', 0))
        stats.settimeout(5)
        self.addCleanup(stats.close)
        with support.EchoServer() as echo, self.start([
                '--backend', '127.0.0.1:%d' % echo.port,
                '--bufsize', '8192', '--pool-max-size', '100',
                '--pool-timeout', '30', '--sync', '--stay-connected',
                '--statsd.enabled', '--statsd.host', '127.0.0.1',
                '--statsd.port', str(stats.getsockname()[1]),
                '--statsd.prefix', 'old', '--statsd.sample-rate', '1']) as (
                    proc, address):
            with support.connect(address) as sock:
                support.exchange(sock, b'x')
            line = stats.recv(1000)
        self.assertTrue(line.startswith(b'old.'), line)

    def test_the_sample_rate_is_followed(self):
        stats = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stats.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        stats.bind(('127.0.0.1', 0))
        self.addCleanup(stats.close)
        client = vaurien._Statsd('127.0.0.1', stats.getsockname()[1],
                                 'v', sample_rate=0.25)
        self.addCleanup(client.close)
        for _ in range(800):
            client.incr('x')
        stats.settimeout(0.5)
        got = []
        try:
            while True:
                got.append(stats.recv(100))
        except socket.timeout:
            pass
        self.assertEqual(set(got), {b'v.x:1|c|@0.25'})
        self.assertTrue(120 < len(got) < 280, len(got))

    def test_keep_alive_and_reuse_socket_on_every_protocol(self):
        vaurien.load_plugins()
        for name in ('tcp', 'http', 'redis', 'memcache', 'mysql', 'smtp'):
            values = vaurien.validate_options(
                'protocol', vaurien.Protocol.get(name),
                {'keep_alive': 'true', 'reuse_socket': 'true'})
            self.assertEqual(values, {'keep_alive': True,
                                      'reuse_socket': True})
        with support.EchoServer() as echo, support.Proxy(
                echo.address, protocol='http',
                protocol_options={'keep_alive': True}) as proxy:
            with proxy.connect() as sock:
                sock.sendall(b'GET / HTTP/1.1\r\n')
                deadline = time.time() + 5
                while not proxy.server.connections and time.time() < deadline:
                    time.sleep(0.01)
                conn, = proxy.server.connections.values()
                while conn.backend is None and time.time() < deadline:
                    time.sleep(0.01)
                for side in (conn.client, conn.backend):
                    self.assertTrue(side.sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def test_ini_reader_conventions(self):
        with support.EchoServer() as echo, support.temp_dir() as folder:
            support.write(os.path.join(folder, 'base.ini'), textwrap.dedent(
                """
                [vaurien]
                proxy = 127.0.0.1:0
                backend = 127.0.0.1:1
                behavior = "delay"

                [behavior:delay]
                sleep = 2
                """))
            ini = support.write(os.path.join(folder, 'main.ini'),
                                textwrap.dedent(
                                    """
                                    [DEFAULT]
                                    extends = base.ini

                                    [vaurien]
                                    backend = 127.0.0.1:${ECHO_PORT}

                                    [behavior:delay]
                                    sleep = "0"
                                    """))
            env = dict(os.environ, ECHO_PORT=str(echo.port))
            code, out, err = support.run_command([
                '-c', 'import sys, json; sys.path.insert(0, %r); '
                'import vaurien; s, o, _ = vaurien.load_settings(sys.argv[1:]);'
                'print(json.dumps([s["backend"], s["behavior"], '
                'o[("behavior", "delay")]]))' % support.ROOT,
                '--config', ini], env=env)
        self.assertEqual((code, err), (0, ''))
        import json
        self.assertEqual(json.loads(out), ['127.0.0.1:%d' % echo.port,
                                           'delay', {'sleep': '0'}])

    def test_an_unset_variable_is_one_line(self):
        with support.temp_dir() as folder:
            ini = support.write(os.path.join(folder, 'v.ini'),
                                '[vaurien]\nbackend = ${NO_SUCH_VAURIEN_VAR}\n')
            code, out, err = support.run_vaurien(['--config', ini, '--list'])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn('NO_SUCH_VAURIEN_VAR', err)

    def test_option_flags_take_dashes(self):
        vaurien.load_plugins()
        for flag in ('--behavior-limit-data-bytes',
                     '--behavior-limit_data-bytes'):
            _, options, _ = vaurien.load_settings([flag, '7'])
            self.assertEqual(options[('behavior', 'limit_data')],
                             {'bytes': '7'})

    def test_where_the_api_listens_is_said_at_any_log_level(self):
        with support.EchoServer() as echo:
            cmd = [sys.executable, support.VAURIEN_PY, '--log-level',
                   'warning', '--http', '--http-port', '0', '--proxy',
                   '127.0.0.1:0', '--backend', '127.0.0.1:%d' % echo.port]
            proc = support.subprocess.Popen(
                cmd, stderr=support.subprocess.PIPE,
                stdout=support.subprocess.DEVNULL, universal_newlines=True)
            try:
                lines = read_lines(proc.stderr, 2, deadline=10)
            finally:
                proc.kill()
                proc.wait(5)
                proc.stderr.close()
        self.assertIn('proxying 127.0.0.1:', lines[0])
        self.assertIn('control API on http://127.0.0.1:', lines[1])


class CtlTest(unittest.TestCase):
    """vaurien ctl as Vaurien 1.x's vaurienctl was used, and its new
    actions."""

    def ctl(self, *args):
        return support.run_vaurien(['ctl'] + list(args))

    def test_options_after_the_action_and_1x_messages(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, http=True) as p:
            url = 'http://127.0.0.1:%d' % p.http_address[1]
            code, out, err = self.ctl('set-behavior', 'blackout', '--host',
                                      url)
            self.assertEqual((code, out, err),
                             (0, 'Behavior changed to "blackout"\n', ''))
            self.assertEqual(self.ctl('get-behavior', '--host', url)[1],
                             'blackout\n')
            code, out, err = self.ctl('--host', url, 'set-behavior', 'delay',
                                      '--sleep', '0.5')
            self.assertEqual(code, 0, err)
            out = self.ctl('get-behavior', '--host', url)[1]
            self.assertEqual(out.splitlines()[0], 'delay')
            self.assertIn('sleep=0.5', out.splitlines()[1])
            self.assertEqual(self.ctl('list-behaviors', '--host', url)[1],
                             ', '.join(p.list_behaviors()) + '\n')

    def test_new_actions(self):
        with support.EchoServer() as echo, \
                vaurien.proxy(echo.address, http=True,
                              behavior='delay',
                              behavior_options={'delay': {'sleep': 0}}) as p:
            port = str(p.http_address[1])
            with support.connect(p.address) as sock:
                support.exchange(sock, b'a')
                support.exchange(sock, b'b')
                code, out, err = self.ctl('connections', '--port', port)
                self.assertEqual(code, 0, err)
                self.assertEqual(len(json.loads(out)), 1)
            self.assertEqual(self.ctl('version', '--port', port)[1],
                             vaurien.__version__ + '\n')
            stats = json.loads(self.ctl('stats', '--port', port)[1])
            self.assertEqual(stats['exchanges'], {'delay': 2})
            decisions = json.loads(self.ctl('decisions', '--port', port)[1])
            self.assertEqual([d['exchange'] for d in decisions], [1, 2])
            later = json.loads(self.ctl('decisions', '--port', port,
                                        '--since', str(decisions[0]['id']))[1])
            self.assertEqual(later, decisions[1:])

    def test_help_says_ctl(self):
        code, out, err = support.run_vaurien(['--help'])
        self.assertIn('vaurien ctl', ' '.join(out.split()))

    def test_vaurienctl_is_a_console_script(self):
        with open(os.path.join(support.ROOT, 'setup.cfg')) as stream:
            self.assertIn('vaurienctl = vaurien:ctl_main', stream.read())


def read_lines(stream, count, deadline):
    """Up to *count* lines of a pipe, waiting at most *deadline* seconds
    for them: a test never hangs on a line that does not come."""
    import select
    lines = []
    stop = time.time() + deadline
    text = ''
    fd = stream.fileno()
    while len(lines) < count and time.time() < stop:
        if not select.select([fd], [], [], max(0, stop - time.time()))[0]:
            break
        chunk = os.read(fd, 4096).decode()
        if not chunk:
            break
        text += chunk
        lines = text.splitlines(True)
    return (lines + [''] * count)[:count]


class BlackoutTest(unittest.TestCase):

    def test_blackout_is_a_clean_end_not_a_reset(self):
        with support.EchoServer() as echo, \
                support.Proxy(echo.address, behavior='blackout') as proxy:
            for _ in range(5):
                with proxy.connect() as sock:
                    sock.sendall(b'x' * 100000)
                    time.sleep(0.05)
                    try:
                        got = sock.recv(100)
                    except ConnectionResetError:
                        got = 'reset'
                    self.assertEqual(got, b'')


if __name__ == '__main__':
    unittest.main()
