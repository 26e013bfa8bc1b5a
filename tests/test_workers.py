"""--workers N: several processes behind each listening port, one proxy to
the user (issue 16).  Each test runs the real vaurien.py in a subprocess,
its log in a file (a pipe left unread would fill up)."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

from tests import support

import vaurien

WORKERS = hasattr(os, 'fork') and hasattr(socket, 'SO_REUSEPORT')
needs_workers = unittest.skipUnless(WORKERS, 'needs os.fork and SO_REUSEPORT')


def _children(pid):
    """The pids of *pid*'s child processes (Linux's /proc)."""
    found = set()
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as stream:
                fields = stream.read().rpartition(')')[2].split()
        except OSError:
            continue            # ended meanwhile
        if int(fields[1]) == pid and fields[0] != 'Z':
            found.add(int(name))
    return found


def _stopped(pid):
    """Whether every thread of *pid* is stopped (Linux's /proc): a
    SIGSTOP takes each thread at its next return from the kernel."""
    try:
        for tid in os.listdir('/proc/%d/task' % pid):
            with open('/proc/%d/task/%s/stat' % (pid, tid)) as stream:
                if stream.read().rpartition(')')[2].split()[0] not in 'Tt':
                    return False
    except OSError:
        return False
    return True


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours is no process any more
    try:
        with open('/proc/%d/stat' % pid) as stream:
            return stream.read().rpartition(')')[2].split()[0] != 'Z'
    except OSError:
        return False


class Run(object):
    """vaurien.py (or ``vaurien.py server``) in a subprocess, its log in a
    file; ``call()`` talks to its control API."""

    def __init__(self, test, args, server=False, env=None):
        manager = support.temp_dir()
        self.folder = manager.__enter__()
        test.addCleanup(manager.__exit__, None, None, None)
        self.log_path = os.path.join(self.folder, 'log.txt')
        ready = os.path.join(self.folder, 'ready.json')
        if server:
            self.http = ('127.0.0.1', support.free_port())
            cmd = [sys.executable, support.VAURIEN_PY, 'server', '-port',
                   str(self.http[1]), '--log-output', self.log_path] + args
        else:
            cmd = [sys.executable, support.VAURIEN_PY, '--proxy',
                   '127.0.0.1:0', '--http', '--http-port', '0',
                   '--ready-file', ready, '--log-output', self.log_path] + args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE,
                                     universal_newlines=True,
                                     env=None if env is None else
                                     dict(os.environ, **env))
        test.addCleanup(self.stop)
        deadline = time.time() + support.TIMEOUT
        while not self._started(server, ready):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError('vaurien did not start: %s%s' % (
                    self.proc.stderr.read(), self.log()))
            time.sleep(0.02)

    def _started(self, server, ready):
        if server:
            try:
                return self.call('GET', '/version')[0] == 200
            except OSError:
                return False
        if not os.path.exists(ready):
            return False
        with open(ready) as stream:
            found = json.load(stream)
        self.address = tuple(found['proxy'])
        self.http = tuple(found['http'])
        return True

    def call(self, method, path, body=None, timeout=support.TIMEOUT):
        """``(status, answer)``: JSON decoded, text when it is none."""
        conn = http.client.HTTPConnection(*self.http, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, data)
            response = conn.getresponse()
            text = response.read().decode('utf-8')
        finally:
            conn.close()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def get(self, path):
        status, answer = self.call('GET', path)
        assert status == 200, (path, status, answer)
        return answer

    def log(self):
        try:
            with open(self.log_path) as stream:
                return stream.read()
        except OSError:
            return ''

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stderr.close()


def _open(address, count):
    """*count* connections, each with an echo done (so that each is
    accepted and counted by a worker)."""
    socks = []
    for number in range(count):
        sock = support.connect(address)
        socks.append(sock)
        payload = b'hello %d' % number
        assert support.exchange(sock, payload) == payload
    return socks


def _close(socks):
    for sock in socks:
        sock.close()


def _wait_for(check, what, timeout=support.TIMEOUT, run=None):
    """check()'s first true answer; *run*'s log in the failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError('timed out waiting for %s%s' % (
        what, ':\n' + run.log() if run is not None else ''))


def _restarted(run, gone):
    """/stats once two workers answer, pid *gone* not among them."""
    return _wait_for(lambda: (lambda s: s if len(s['workers']) == 2
                              and gone not in s['workers']
                              else None)(run.get('/stats')),
                     'the worker to start again', 2 * support.TIMEOUT, run)


def _echoed(socks):
    """For each connection in turn, whether a ping came back as it went;
    then they close."""
    echoed = []
    try:
        for sock in socks:
            sock.sendall(b'ping')
            echoed.append(support.recv_exactly(sock, 4) == b'ping')
    finally:
        _close(socks)
    return echoed


def _echo_all(test, socks, size):
    """Send each connection its own payload (of *size* bytes and more) at
    once, then check each echo, byte for byte; the payloads."""
    payloads = [os.urandom(size + number) for number in range(len(socks))]
    for sock, payload in zip(socks, payloads):
        sock.sendall(payload)
    for sock, payload in zip(socks, payloads):
        test.assertEqual(support.recv_exactly(sock, len(payload)), payload)
    return payloads


def _settled_stats(run):
    """/stats once every connection has closed."""
    return _wait_for(lambda: (lambda s: s if s['open_connections'] == 0
                              else None)(run.get('/stats')),
                     'the connections to close')


@needs_workers
class WorkersTest(unittest.TestCase):
    """Two workers behind one port, Vaurien's API."""

    workers = '2'

    def setUp(self):
        self.echo = support.EchoServer().start()
        self.addCleanup(self.echo.stop)

    def start(self, *args):
        return Run(self, ['--backend', '127.0.0.1:%d' % self.echo.port,
                          '--workers', self.workers] + list(args))

    def workers_of(self, run, socks):
        """The worker pid of each open connection, by connection id."""
        conns = run.get('/connections')['connections']
        self.assertEqual(len(conns), len(socks), conns)
        return dict((conn['id'], conn['worker']) for conn in conns)

    def held(self, run, count):
        """*count* connections, open, once the workers have each (and the
        connections closed before are gone); and the worker of each, by
        connection id."""
        socks = [support.connect(run.address) for _ in range(count)]
        mine = set('%s:%d' % sock.getsockname()[:2] for sock in socks)
        _wait_for(lambda: set(conn['client'] for conn in run.get(
            '/connections')['connections']) == mine,
            'the workers to take the connections')
        workers = self.workers_of(run, socks)
        self.assertEqual(len(set(workers.values())), 2)
        return socks, workers

    def test_every_connection_byte_exact_on_several_workers(self):
        run = self.start()
        stats = run.get('/stats')
        self.assertEqual(len(stats['workers']), 2)
        self.assertEqual(_children(run.proc.pid), set(stats['workers']))
        socks = []
        try:
            for number in range(40):
                socks.append(support.connect(run.address))
            payloads = _echo_all(self, socks, 100000)
            workers = self.workers_of(run, socks)
            # ids unique across the workers, each worker serving some
            self.assertEqual(len(workers), 40)
            self.assertEqual(set(workers.values()), set(stats['workers']))
        finally:
            _close(socks)
        stats = _settled_stats(run)
        self.assertEqual(stats['connections'], 40)
        self.assertEqual(stats['bytes_up'], sum(map(len, payloads)))
        self.assertEqual(stats['bytes_down'], stats['bytes_up'])
        # an exchange each way's end too, as with one process
        self.assertEqual(stats['exchanges'], {'dummy': 80})

    def test_live_change_reaches_open_connections_on_every_worker(self):
        run = self.start()
        socks = _open(run.address, 30)
        try:
            workers = self.workers_of(run, socks)
            self.assertEqual(len(set(workers.values())), 2)
            status, answer = run.call('PUT', '/behavior', {'name': 'error'})
            self.assertEqual((status, answer), (200, {'status': 'ok'}))
            for sock in socks:
                # the error's noise (1000 bytes) instead of the echo
                sock.sendall(b'ping')
                self.assertEqual(len(support.recv_exactly(sock, 1000)), 1000)
            self.assertEqual(run.get('/behavior')['behavior'], 'error')
        finally:
            _close(socks)
        self.assertEqual(len(run.get('/decisions')['decisions']), 30)

    def test_warmup_counts_across_workers(self):
        run = self.start('--behavior', 'error', '--behavior-error-warmup',
                         '12')
        socks, _ = self.held(run, 30)
        # exactly the warmup passed, whichever worker served them
        self.assertEqual(_echoed(socks), [True] * 12 + [False] * 18)
        # a fresh behavior (PUT) counts from 0, across the workers too
        run.call('PUT', '/behavior', {'name': 'transient', 'warmup': 3,
                                      'agitate': 4})
        socks, _ = self.held(run, 12)
        self.assertEqual(_echoed(socks), [True] * 3 + [False] * 4 + [True] * 5)

    def test_stats_decisions_and_metrics_cover_every_worker(self):
        run = self.start('--behavior', '50:error')
        socks, workers = self.held(run, 20)
        try:
            for sock in socks:
                sock.sendall(b'ping')
                sock.recv(1000)
        finally:
            _close(socks)
        stats = _settled_stats(run)
        self.assertEqual(stats['connections'], 20)
        self.assertEqual(sum(stats['exchanges'].values()), 20)
        decisions = run.get('/decisions')['decisions']
        ids = [record['id'] for record in decisions]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(len(decisions), stats['exchanges'].get('error', 0))
        self.assertEqual(set(record['connection'] for record in decisions)
                         - set(workers), set())
        later = run.get('/decisions?since=%d' % ids[len(ids) // 2])
        self.assertEqual([record['id'] for record in later['decisions']],
                         ids[len(ids) // 2 + 1:])
        status, text = run.call('GET', '/metrics')
        self.assertEqual(status, 200)
        self.assertIn('vaurien_connections_total{proxy="vaurien"} 20\n', text)
        self.assertIn('vaurien_decisions_total{proxy="vaurien"} %d\n'
                      % len(decisions), text)
        self.assertEqual(text.count('# TYPE vaurien_connections_total '), 1)

    def test_down_acts_on_every_worker(self):
        run = self.start()
        run.call('PUT', '/behavior', {'name': 'down'})
        for _ in range(20):
            with self.assertRaises(ConnectionRefusedError):
                support.connect(run.address).close()
        run.call('PUT', '/behavior', {'name': 'dummy'})
        _close(_open(run.address, 20))

    def test_killed_worker_restarted_others_connections_live(self):
        run = self.start()
        socks = _open(run.address, 30)
        try:
            workers = self.workers_of(run, socks)
            pids = sorted(set(workers.values()))
            self.assertEqual(len(pids), 2)
            victim = pids[0]
            # a change made before: the new worker starts with it
            other = support.EchoServer().start()
            self.addCleanup(other.stop)
            self.assertEqual(run.call('PUT', '/backend', {
                'backend': '127.0.0.1:%d' % other.port})[0], 200)
            os.kill(victim, signal.SIGKILL)
            by_id = sorted(workers)
            for conn_id, sock in zip(by_id, socks):
                if workers[conn_id] == victim:
                    self.assertTrue(support.closed_by_peer(sock))
                else:
                    self.assertEqual(support.exchange(sock, b'still'),
                                     b'still')
            stats = _restarted(run, victim)
            self.assertEqual(_children(run.proc.pid), set(stats['workers']))
        finally:
            _close(socks)
        self.assertIn('(pid %d) was killed by SIGKILL: starting it again'
                      % victim, run.log())
        # the new worker has the model of its start, and serves too
        socks, _ = self.held(run, 20)
        self.assertEqual(_echoed(socks), [True] * 20)
        self.assertEqual(other.accepted, 20)
        # and it takes the changes made since
        run.call('PUT', '/behavior', {'name': 'error'})
        socks, workers = self.held(run, 20)
        self.assertEqual(set(workers.values()), set(stats['workers']))
        self.assertEqual(_echoed(socks), [False] * 20)

    def test_worker_that_misses_a_change_is_replaced(self):
        run = self.start()
        pids = run.get('/stats')['workers']
        os.kill(pids[0], signal.SIGSTOP)
        try:
            _wait_for(lambda: _stopped(pids[0]), 'worker %d to stop'
                      % pids[0], run=run)
            # answered once the silent worker is given up on (5 s)
            status, _ = run.call('PUT', '/behavior', {'name': 'error'},
                                 timeout=3 * support.TIMEOUT)
        finally:
            with contextlib.suppress(OSError):
                os.kill(pids[0], signal.SIGCONT)
        self.assertEqual(status, 200)
        stats = _restarted(run, pids[0])
        self.assertIn(pids[1], stats['workers'])
        self.assertIn('worker 0 (pid %d) did not answer PUT /behavior '
                      'within 5 seconds: killing it' % pids[0], run.log())
        # the new one has the change
        socks, workers = self.held(run, 20)
        self.assertEqual(_echoed(socks), [False] * 20)

    def test_sigterm_stops_every_process(self):
        run = self.start()
        socks = _open(run.address, 20)
        try:
            pids = run.get('/stats')['workers']
            for sock in socks:
                sock.sendall(b'x' * 10000)
            started = time.monotonic()
            run.proc.send_signal(signal.SIGTERM)
            self.assertEqual(run.proc.wait(support.TIMEOUT), 0)
            took = time.monotonic() - started
            self.assertEqual([pid for pid in pids if _alive(pid)], [])
            log = run.log()
            self.assertIn('[%d] [INFO] SIGTERM: stopping 2 workers'
                          % run.proc.pid, log)
            for pid in pids:
                # stopped by the supervisor, not left to find it gone
                self.assertIn('[%d] [INFO] SIGTERM: stopping' % pid, log)
            for sock in socks:
                self.assertTrue(support.closed_by_peer(sock))
        finally:
            _close(socks)
        # the bound (a second), loosely: a busy CI machine
        self.assertLess(took, 3)
        self.assertNotIn('Traceback', log)

    @unittest.skipUnless(hasattr(os, 'sched_getaffinity') and
                         len(os.sched_getaffinity(0)) >= 2, 'needs 2 CPUs')
    def test_each_worker_on_its_own_cpu(self):
        allowed = os.sched_getaffinity(0)
        run = self.start()
        pids = run.get('/stats')['workers']
        cpus = [os.sched_getaffinity(pid) for pid in pids]
        self.assertEqual([len(found) for found in cpus], [1, 1])
        self.assertEqual(len(cpus[0] | cpus[1]), 2)
        self.assertLessEqual(cpus[0] | cpus[1], allowed)
        self.assertIn('2 workers, pids %d, %d, on CPUs' % tuple(pids),
                      run.log())
        run.stop()
        first = min(allowed)
        run = self.start('--cpu', str(first))
        pids = run.get('/stats')['workers']
        self.assertEqual(os.sched_getaffinity(pids[0]), {first})
        self.assertNotEqual(os.sched_getaffinity(pids[1]), {first})
        run.stop()
        run = self.start('--cpu', 'all')
        for pid in run.get('/stats')['workers']:
            self.assertEqual(os.sched_getaffinity(pid), allowed)

    def test_ini_key(self):
        with support.temp_dir() as folder:
            path = support.write(os.path.join(folder, 'vaurien.ini'),
                                 '[vaurien]\nworkers = 2\n')
            run = Run(self, ['--backend', '127.0.0.1:%d' % self.echo.port,
                             '--config', path])
            self.assertEqual(len(run.get('/stats')['workers']), 2)

    def test_supervisor_killed_workers_stop(self):
        run = self.start()
        pids = run.get('/stats')['workers']
        run.proc.kill()
        run.proc.wait(support.TIMEOUT)
        _wait_for(lambda: not any(_alive(pid) for pid in pids),
                  'the workers to stop')


@needs_workers
class ToxiproxyWorkersTest(unittest.TestCase):
    """``vaurien.py server --workers 2``: Toxiproxy's API."""

    def assertSpread(self, run, address, name='echo'):
        """Connections to proxy *name* at *address*, echoed, land on both
        workers."""
        socks = _open(address, 20)
        try:
            conns = run.get('/connections?proxy=%s' % name)['connections']
            self.assertEqual(len(set(conn['worker'] for conn in conns)), 2)
        finally:
            _close(socks)

    def test_toxic_and_disable_reach_every_worker(self):
        with support.EchoServer() as echo:
            run = Run(self, ['--workers', '2'], server=True)
            status, proxy = run.call('POST', '/proxies', {
                'name': 'echo', 'listen': '127.0.0.1:0',
                'upstream': '127.0.0.1:%d' % echo.port})
            self.assertEqual(status, 201, proxy)
            address = self.address(proxy)
            self.assertSpread(run, address)
            status, _ = run.call('POST', '/proxies/echo/toxics', {
                'type': 'limit_data', 'attributes': {'bytes': 3}})
            self.assertEqual(status, 200)
            socks = [support.connect(address) for _ in range(20)]
            try:
                for sock in socks:
                    sock.sendall(b'hello')
                    self.assertEqual(support.recv_all(sock), b'hel')
            finally:
                _close(socks)
            status, _ = run.call('DELETE', '/proxies/echo/toxics/'
                                 'limit_data_downstream')
            self.assertEqual(status, 204)
            status, _ = run.call('POST', '/proxies/echo',
                                 {'enabled': False})
            self.assertEqual(status, 200)
            for _ in range(20):
                with self.assertRaises(ConnectionRefusedError):
                    support.connect(address).close()
            run.call('POST', '/proxies/echo', {'enabled': True})
            self.assertSpread(run, address)
            status, text = run.call('GET', '/metrics')
            self.assertIn('vaurien_connections_total{proxy="echo"} 60\n',
                          text)
            # moved to a port the supervisor picks: every worker follows
            status, moved = run.call('POST', '/proxies/echo',
                                     {'listen': '127.0.0.1:0'})
            self.assertEqual(status, 200, moved)
            new = self.address(moved)
            self.assertNotEqual(new, address)
            self.assertSpread(run, new)
            for _ in range(10):
                with self.assertRaises(ConnectionRefusedError):
                    support.connect(address).close()
            self.assertEqual(run.call('DELETE', '/proxies/echo')[0], 204)
            for _ in range(10):
                with self.assertRaises(ConnectionRefusedError):
                    support.connect(new).close()

    def test_populate_and_reset_reach_every_worker(self):
        with support.EchoServer() as echo, support.temp_dir() as folder:
            # a -config file's proxy, made before the workers start
            config = support.write(os.path.join(folder, 'config.json'),
                                   json.dumps([{
                                       'name': 'first',
                                       'listen': '127.0.0.1:0',
                                       'upstream': '127.0.0.1:%d'
                                                   % echo.port}]))
            run = Run(self, ['--workers', '2', '-config', config],
                      server=True)
            status, made = run.call('POST', '/populate', [
                {'name': 'second', 'listen': '127.0.0.1:0',
                 'upstream': '127.0.0.1:%d' % echo.port, 'enabled': False}])
            self.assertEqual(status, 201, made)
            listed = run.get('/proxies')
            first = self.address(listed['first'])
            self.assertSpread(run, first, 'first')
            run.call('POST', '/proxies/first/toxics', {
                'type': 'limit_data', 'attributes': {'bytes': 2}})
            # /reset: every proxy enabled, every toxic gone, on each worker
            self.assertEqual(run.call('POST', '/reset')[0], 204)
            second = self.address(run.get('/proxies')['second'])
            self.assertSpread(run, second, 'second')
            self.assertSpread(run, first, 'first')

    @staticmethod
    def address(proxy):
        host, _, port = proxy['listen'].rpartition(':')
        return host, int(port)


@needs_workers
class SharedListenerTest(unittest.TestCase):
    """Workers that share the supervisor's listening sockets (where there
    is no SO_REUSEPORT; VAURIEN_WORKERS_LISTEN=shared asks for it here):
    a proxy made or reopened later gets its socket passed to every
    worker with the change."""

    env = {'VAURIEN_WORKERS_LISTEN': 'shared'}

    def echoed(self, address, count=40):
        socks = _open(address, count)
        self.assertEqual(_echoed(socks), [True] * count)

    def test_every_connection_served(self):
        with support.EchoServer() as echo:
            run = Run(self, ['--backend', '127.0.0.1:%d' % echo.port,
                             '--workers', '2'], env=self.env)
            workers = set(run.get('/stats')['workers'])
            self.assertEqual(len(workers), 2)
            socks = [support.connect(run.address) for _ in range(40)]
            try:
                _echo_all(self, socks, 50000)
                conns = run.get('/connections')['connections']
                self.assertEqual(len(conns), 40)
                self.assertLessEqual(set(c['worker'] for c in conns), workers)
            finally:
                _close(socks)
            run.call('PUT', '/behavior', {'name': 'down'})
            with self.assertRaises(ConnectionRefusedError):
                support.connect(run.address).close()
            run.call('PUT', '/behavior', {'name': 'dummy'})
            self.echoed(run.address)
            # no worker was replaced for want of a socket
            self.assertEqual(set(run.get('/stats')['workers']), workers)
            self.assertNotIn('killing it', run.log())

    def test_proxies_made_later_reach_every_worker(self):
        with support.EchoServer() as echo:
            run = Run(self, ['--workers', '2'], server=True, env=self.env)
            status, proxy = run.call('POST', '/proxies', {
                'name': 'echo', 'listen': '127.0.0.1:0',
                'upstream': '127.0.0.1:%d' % echo.port})
            self.assertEqual(status, 201, proxy)
            address = ToxiproxyWorkersTest.address(proxy)
            self.echoed(address)
            status, _ = run.call('POST', '/proxies/echo',
                                 {'enabled': False})
            self.assertEqual(status, 200)
            with self.assertRaises(ConnectionRefusedError):
                support.connect(address).close()
            run.call('POST', '/proxies/echo', {'enabled': True})
            self.echoed(address)
            status, moved = run.call('POST', '/proxies/echo',
                                     {'listen': '127.0.0.1:0'})
            self.assertEqual(status, 200, moved)
            new = ToxiproxyWorkersTest.address(moved)
            self.echoed(new)
            with self.assertRaises(ConnectionRefusedError):
                support.connect(address).close()
            self.assertNotIn('killing it', run.log())
            self.assertNotIn('failed', run.log())

    def test_killed_worker_forked_with_the_sockets(self):
        with support.EchoServer() as echo:
            run = Run(self, ['--backend', '127.0.0.1:%d' % echo.port,
                             '--workers', '2'], env=self.env)
            pids = run.get('/stats')['workers']
            os.kill(pids[0], signal.SIGKILL)
            _restarted(run, pids[0])
            self.echoed(run.address)


class OneWorkerTest(unittest.TestCase):

    def test_workers_1_spawns_nothing(self):
        with support.EchoServer() as echo:
            run = Run(self, ['--backend', '127.0.0.1:%d' % echo.port,
                             '--workers', '1'])
            _close(_open(run.address, 5))
            self.assertNotIn('workers', run.get('/stats'))
            self.assertEqual(_children(run.proc.pid), set())
            self.assertNotIn('worker', run.log())

    def test_bad_values_refused(self):
        for value, text in (('0', "'0'"), ('many', "'many'"),
                            ('257', "'257'"), ('\u00b2', "'\u00b2'"),
                            ('', "''")):
            code, out, err = support.run_vaurien(['--workers', value])
            self.assertEqual(code, 2)
            self.assertEqual(err, "vaurien: error: option --workers: workers "
                             "must be auto or a whole number from 1 to 256, "
                             "not %s\n" % text)

    def test_bad_listen_mode_refused(self):
        code, out, err = support.run_vaurien(
            ['--workers', '2'], env=dict(os.environ,
                                         VAURIEN_WORKERS_LISTEN='both'))
        self.assertEqual(code, 2)
        self.assertEqual(err, "vaurien: error: VAURIEN_WORKERS_LISTEN must "
                         "be shared or reuseport, not 'both' (or unset it)\n")

    def test_cpu_of_other_digits_refused(self):
        # (found beside --workers: a traceback before)
        code, out, err = support.run_vaurien(['--cpu', '\u00b2'])
        self.assertEqual((code, err), (2, "vaurien: error: option --cpu: cpu "
                                       "must be auto, all or a CPU number, "
                                       "not '\u00b2'\n"))

    def test_auto_is_the_cpus_allowed(self):
        allowed = len(os.sched_getaffinity(0)) if hasattr(
            os, 'sched_getaffinity') else os.cpu_count()
        self.assertEqual(vaurien.worker_count('auto'), allowed)
        self.assertEqual(vaurien.worker_count(' 3 '), 3)


if __name__ == '__main__':
    unittest.main()
