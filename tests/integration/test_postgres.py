"""PostgreSQL 15 and its real clients (psycopg 3, asyncpg, psql, pgbench)
through the postgres plugin and plain tcp.

The server is started here, on a free port in a temporary folder, as the
``postgres`` user when the tests run as root (it refuses to run as root).
Trust authentication on 127.0.0.1, plus one md5 and one SCRAM user.
"""

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

from tests.integration import support

BIN = '/usr/lib/postgresql/15/bin'
HBA = """\
host all vaurien_md5 127.0.0.1/32 md5
host all vaurien_scram 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
local all all trust
"""


def _as_server_user(argv):
    """*argv* run as the postgres user when we are root."""
    if os.geteuid() != 0:
        return argv
    runuser = support.need_program('runuser', 'util-linux')
    return [runuser, '-u', 'postgres', '--'] + argv


def _program(name):
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return path
    return support.need_program(name, 'postgresql')


def start_postgres():
    """A throw-away PostgreSQL 15 with database postgres, trust on
    127.0.0.1, users vaurien_md5/md5pass and vaurien_scram/scrampass, and
    TLS (a self-signed certificate) for clients that ask."""
    initdb = _program('initdb')
    server = _program('postgres')
    if os.geteuid() == 0:
        try:
            import pwd
            account = pwd.getpwnam('postgres')
        except KeyError:
            support.missing('the postgres user (apt-get install postgresql)')
    port = support.free_port()
    folder = tempfile.mkdtemp(prefix='vaurien-postgres-')
    data = os.path.join(folder, 'data')
    if os.geteuid() == 0:
        os.chown(folder, account.pw_uid, account.pw_gid)
    os.chmod(folder, 0o700)
    result = subprocess.run(
        _as_server_user([initdb, '-D', data, '-U', 'postgres', '-A', 'trust',
                         '-E', 'UTF8', '--no-sync']),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
        cwd=folder)
    if result.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise AssertionError('initdb failed: %s' % result.stdout[
            -2000:].decode('utf-8', 'replace'))
    with open(os.path.join(data, 'pg_hba.conf'), 'w') as f:
        f.write(HBA)
    options = ['-c', 'listen_addresses=127.0.0.1', '-c', 'fsync=off',
               '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off',
               '-c', 'max_connections=60', '-c', 'unix_socket_directories=' +
               folder, '-c', 'log_min_messages=warning']
    openssl = shutil.which('openssl')
    if openssl:
        subprocess.run([openssl, 'req', '-new', '-x509', '-days', '2',
                        '-nodes', '-subj', '/CN=127.0.0.1', '-keyout',
                        os.path.join(data, 'server.key'), '-out',
                        os.path.join(data, 'server.crt')],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True, timeout=60)
        os.chmod(os.path.join(data, 'server.key'), 0o600)
        if os.geteuid() == 0:
            for name in ('server.key', 'server.crt'):
                os.chown(os.path.join(data, name), account.pw_uid,
                         account.pw_gid)
        options += ['-c', 'ssl=on']
    backend = support.Server(
        _as_server_user([server, '-D', data, '-p', str(port)] + options),
        port, folder, 'postgres', timeout=60.0)
    backend.tls = bool(openssl)
    psql(backend.port, "SET password_encryption = 'md5'; "
         "CREATE ROLE vaurien_md5 LOGIN SUPERUSER PASSWORD 'md5pass'; "
         "SET password_encryption = 'scram-sha-256'; "
         "CREATE ROLE vaurien_scram LOGIN SUPERUSER PASSWORD 'scrampass';")
    return backend


def psql(port, sql, user='postgres', extra=(), env=None, check=True):
    """psql's output (-At) for *sql* on 127.0.0.1:*port*."""
    program = support.need_program('psql', 'postgresql-client')
    result = subprocess.run(
        [program, '-h', '127.0.0.1', '-p', str(port), '-U', user, '-d',
         'postgres', '-X', '-At', '-v', 'ON_ERROR_STOP=1', '-c', sql] +
        list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=60, env=dict(os.environ, PGCONNECT_TIMEOUT='10',
                             **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError('psql failed: %s' % result.stderr.decode(
            'utf-8', 'replace'))
    return result


def pgbench(port, args, env=None):
    """pgbench's report (its output) against 127.0.0.1:*port*."""
    program = support.need_program('pgbench', 'postgresql')
    result = subprocess.run(
        [program, '-h', '127.0.0.1', '-p', str(port), '-U', 'postgres'] +
        list(args) + ['postgres'], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=300,
        env=dict(os.environ, PGSSLMODE='disable', **(env or {})))
    text = result.stdout.decode('utf-8', 'replace')
    if result.returncode != 0:
        raise AssertionError('pgbench %s failed: %s' % (args, text[-3000:]))
    return text


def processed(report):
    """(transactions processed, transactions asked for or None, failed)
    from pgbench's report."""
    found = re.search(r'number of transactions actually processed: '
                      r'(\d+)(?:/(\d+))?', report)
    failed = re.search(r'number of failed transactions: (\d+)', report)
    return (int(found.group(1)),
            int(found.group(2)) if found.group(2) else None,
            int(failed.group(1)) if failed else 0)


class PostgresTest(support.ProxiedTestCase):

    PROTOCOL = 'postgres'

    @classmethod
    def start_backend(cls):
        cls.psycopg = support.need_module('psycopg', 'psycopg[binary]')
        cls.asyncpg = support.need_module('asyncpg', 'asyncpg')
        return start_postgres()

    def connect(self, proxy, user='postgres', password=None, **kwargs):
        kwargs.setdefault('sslmode', 'disable')
        kwargs.setdefault('autocommit', True)
        conn = self.psycopg.connect(
            host='127.0.0.1', port=proxy.port, user=user, password=password,
            dbname='postgres', connect_timeout=int(support.TIMEOUT),
            **kwargs)
        self.addCleanup(conn.close)
        return conn

    def direct(self):
        return self.connect(self.backend)

    def run_async(self, coroutine):
        return asyncio.run(asyncio.wait_for(coroutine, 60))

    async def asyncpg_connect(self, proxy, user='postgres', password=None):
        return await self.asyncpg.connect(
            host='127.0.0.1', port=proxy.port, user=user, password=password,
            database='postgres', ssl=False, timeout=support.TIMEOUT)

    # pass-through

    def workload(self, proxy, table):
        conn = self.connect(proxy)
        cur = conn.cursor()
        cur.execute('DROP TABLE IF EXISTS %s' % table)
        cur.execute('CREATE TABLE %s (id int PRIMARY KEY, name text, '
                    'data bytea)' % table)
        for i in range(300):
            cur.execute('INSERT INTO %s VALUES (%%s, %%s, %%s)' % table,
                        (i, 'name %d' % i, b'\x00\xfe\xff' * (i % 50)))
        cur.executemany('UPDATE %s SET name = %%s WHERE id = %%s' % table,
                        [('renamed', i) for i in range(0, 300, 10)])
        with conn.pipeline():
            for i in range(300, 400):
                cur.execute('INSERT INTO %s VALUES (%%s, %%s, NULL)'
                            % table, (i, 'piped'))
        cur.execute('SELECT id, name, data FROM %s ORDER BY id' % table,
                    prepare=True)
        rows = cur.fetchall()
        self.assertEqual(len(rows), 400)
        self.assertEqual(rows[7], (7, 'name 7', b'\x00\xfe\xff' * 7))
        self.assertEqual(rows[10][1], 'renamed')
        big = bytes(bytearray(range(256))) * 8192       # 2 MB
        cur.execute('UPDATE %s SET data = %%s WHERE id = 1' % table, (big,))
        cur.execute('SELECT data FROM %s WHERE id = 1' % table)
        self.assertEqual(cur.fetchone()[0], big)
        with cur.copy('COPY %s (id, name) FROM STDIN' % table) as copy:
            for i in range(1000, 6000):
                copy.write_row((i, 'copied %d' % i))
        with cur.copy('COPY %s (id, name) TO STDOUT' % table) as copy:
            self.assertEqual(sum(1 for _ in copy.rows()), 5400)
        # a transaction, a notice, a notification
        conn.autocommit = False
        notices = []
        conn.add_notice_handler(lambda diag: notices.append(
            diag.message_primary))
        cur.execute("DO $$BEGIN RAISE NOTICE 'hello from DO'; END$$")
        conn.commit()
        self.assertEqual(notices, ['hello from DO'])
        conn.autocommit = True
        cur.execute('LISTEN chan')
        other = self.direct()
        other.execute("NOTIFY chan, 'ping'")
        gen = conn.notifies(timeout=support.TIMEOUT, stop_after=1)
        self.assertEqual([n.payload for n in gen], ['ping'])
        cur.execute('SELECT 42')
        self.assertEqual(cur.fetchone(), (42,))

    def test_workload_plugin(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy, 'plugin')
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 300)

    def test_workload_tcp(self):
        self.workload(self.tcp, 'tcp')

    def test_asyncpg_workload(self):
        async def run():
            conn = await self.asyncpg_connect(self.proxy)
            try:
                await conn.execute('CREATE TABLE apg (id int, name text)')
                await conn.executemany('INSERT INTO apg VALUES ($1, $2)',
                                       [(i, 'n%d' % i) for i in range(200)])
                await conn.copy_records_to_table(
                    'apg', records=[(i, 'c') for i in range(200, 1200)])
                statement = await conn.prepare(
                    'SELECT count(*) FROM apg WHERE id >= $1')
                self.assertEqual(await statement.fetchval(0), 1200)
                self.assertEqual(await statement.fetchval(1000), 200)
                async with conn.transaction():
                    await conn.execute("INSERT INTO apg VALUES (-1, 'tx')")
                rows = await conn.fetch('SELECT * FROM apg ORDER BY id')
                self.assertEqual(len(rows), 1201)
            finally:
                await conn.close()
        with support.captured_warnings() as warnings:
            self.run_async(run())
        self.assertEqual(warnings, [])

    def test_psql(self):
        result = psql(self.proxy.port, 'SELECT 6 * 7', env={
            'PGSSLMODE': 'disable'})
        self.assertEqual(result.stdout.strip(), b'42')

    def test_password_authentication_passes(self):
        for user, password in (('vaurien_md5', 'md5pass'),
                               ('vaurien_scram', 'scrampass')):
            conn = self.connect(self.proxy, user, password)
            self.assertEqual(conn.execute('SELECT current_user').fetchone(),
                             (user,))
            with self.assertRaises(self.psycopg.OperationalError):
                self.connect(self.proxy, user, 'wrong')

            async def run():
                conn = await self.asyncpg_connect(self.proxy, user, password)
                try:
                    return await conn.fetchval('SELECT current_user')
                finally:
                    await conn.close()
            self.assertEqual(self.run_async(run()), user)
        # login is never an exchange, whatever the mix
        self.proxy.set('error')
        self.connect(self.proxy, 'vaurien_scram', 'scrampass')

    def test_tls_passes_through(self):
        if not getattr(self.backend, 'tls', False):
            support.missing('openssl (apt-get install openssl)')
        conn = self.connect(self.proxy, sslmode='require')
        self.assertEqual(conn.execute(
            'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()'
        ).fetchone(), (True,))

    def test_pgbench(self):
        """pgbench -i, then the same run through the plugin and direct:
        every transaction passes (-t, so the counts are comparable), and a
        timed run (-T 3 here, not 10, for CI's time) has no failure and as
        many history rows as transactions."""
        with support.captured_warnings() as warnings:
            pgbench(self.proxy.port, ['-i', '-q', '-s', '1'])
            through = processed(pgbench(self.proxy.port,
                                        ['-c', '10', '-t', '100']))
            direct = processed(pgbench(self.backend.port,
                                       ['-c', '10', '-t', '100']))
            self.assertEqual(through, direct)
            self.assertEqual(through, (1000, 1000, 0))
            before = self.direct().execute(
                'SELECT count(*) FROM pgbench_history').fetchone()[0]
            timed = processed(pgbench(self.proxy.port,
                                      ['-n', '-c', '10', '-T', '3']))
            after = self.direct().execute(
                'SELECT count(*) FROM pgbench_history').fetchone()[0]
        self.assertEqual(warnings, [])
        self.assertEqual(timed[2], 0)
        self.assertGreater(timed[0], 0)
        self.assertEqual(after - before, timed[0])

    # the error behavior, as each driver reports it

    ERRORS = [
        ({'code': 40001}, 'SerializationFailure', 'SerializationError'),
        ({'message': 'deadlock_detected'}, 'DeadlockDetected',
         'DeadlockDetectedError'),
        ({'message': '55P03'}, 'LockNotAvailable', 'LockNotAvailableError'),
        ({'code': 57014}, 'QueryCanceled', 'QueryCanceledError'),
        ({'code': 25006}, 'ReadOnlySqlTransaction',
         'ReadOnlySQLTransactionError'),
        ({'code': 53300}, 'TooManyConnections', 'TooManyConnectionsError'),
        ({'message': 'admin_shutdown'}, 'AdminShutdown',
         'AdminShutdownError'),
        ({'code': 8006}, 'ConnectionFailure', 'ConnectionFailureError'),
    ]

    def test_error_classes_psycopg(self):
        errors = self.psycopg.errors
        for options, name, _ in self.ERRORS:
            self.proxy.set('dummy')
            conn = self.connect(self.proxy)
            conn.execute('SELECT 1')
            self.proxy.set('error', {'error': options})
            with self.assertRaises(getattr(errors, name), msg=name):
                conn.execute('SELECT 2')
            self.proxy.set('dummy')
            if name in ('TooManyConnections', 'AdminShutdown',
                        'ConnectionFailure'):
                # FATAL: the connection is gone, as from the server
                with self.assertRaises(self.psycopg.OperationalError):
                    conn.execute('SELECT 3')
            else:
                self.assertEqual(conn.execute('SELECT 3').fetchone(), (3,))

    def test_too_many_connections_at_login(self):
        """An error of 53300 answers the start-up packet, as a full server
        does: the drivers fail to connect, asyncpg with its class."""
        self.proxy.set('error', {'error': {'code': 53300}})
        with self.assertRaises(self.psycopg.OperationalError) as caught:
            self.connect(self.proxy)
        self.assertIn('sorry, too many clients already',
                      str(caught.exception))

        async def run():
            with self.assertRaises(
                    self.asyncpg.exceptions.TooManyConnectionsError):
                await self.asyncpg_connect(self.proxy)
        self.run_async(run())
        self.assertEqual([d['request'] for d in self.proxy.server.decisions],
                         ['start-up', 'start-up'])
        # half of the logins
        self.proxy.set('50:error', {'error': {
            'message': 'too_many_connections'}})
        refused = 0
        for _ in range(20):
            try:
                self.connect(self.proxy).close()
            except self.psycopg.OperationalError:
                refused += 1
        self.assertTrue(0 < refused < 20, refused)

    def test_error_classes_asyncpg(self):
        exceptions = self.asyncpg.exceptions

        async def run(options, name):
            self.proxy.set('dummy')
            conn = await self.asyncpg_connect(self.proxy)
            fatal = name.startswith(('TooMany', 'AdminShutdown',
                                     'ConnectionFailure'))
            try:
                await conn.fetchval('SELECT 1')
                self.proxy.set('error', {'error': options})
                if fatal:
                    # the connection closes after a FATAL: asyncpg says so,
                    # the error as its cause (as when the real server
                    # terminates a backend: pg_terminate_backend)
                    with self.assertRaises(
                            exceptions.ConnectionDoesNotExistError) as caught:
                        await conn.fetchval('SELECT $1::int', 2)
                    self.assertIsInstance(caught.exception.__cause__,
                                          getattr(exceptions, name))
                else:
                    with self.assertRaises(getattr(exceptions, name),
                                           msg=name):
                        await conn.fetchval('SELECT $1::int', 2)
                self.proxy.set('dummy')
                if not fatal:
                    self.assertEqual(await conn.fetchval('SELECT 3'), 3)
            finally:
                conn.terminate()
        for options, _, name in self.ERRORS:
            self.run_async(run(options, name))

    def test_error_in_transaction_leaves_nothing_committed(self):
        """The client is told its statement failed: the backend must not
        commit it later, nor what came before in that transaction."""
        direct = self.direct()
        direct.execute('CREATE TABLE txerr (id int)')
        conn = self.connect(self.proxy)
        conn.execute('BEGIN')
        conn.execute('INSERT INTO txerr VALUES (1)')
        self.proxy.set('error', {'error': {'code': 40001}})
        with self.assertRaises(self.psycopg.errors.SerializationFailure):
            conn.execute('INSERT INTO txerr VALUES (2)')
        self.assertEqual(conn.info.transaction_status,
                         self.psycopg.pq.TransactionStatus.INERROR)
        self.proxy.set('dummy')
        with self.assertRaises(self.psycopg.errors.InFailedSqlTransaction):
            conn.execute('INSERT INTO txerr VALUES (3)')
        conn.execute('COMMIT')          # a failed transaction rolls back
        self.assertEqual(direct.execute('SELECT count(*) FROM txerr')
                         .fetchone(), (0,))
        # an error on COMMIT: rolled back, and the connection is idle
        conn.execute('BEGIN')
        conn.execute('INSERT INTO txerr VALUES (4)')
        self.proxy.set('error', {'error': {'code': 40001}})
        with self.assertRaises(self.psycopg.errors.SerializationFailure):
            conn.execute('COMMIT')
        self.proxy.set('dummy')
        self.assertEqual(conn.info.transaction_status,
                         self.psycopg.pq.TransactionStatus.IDLE)
        conn.execute('INSERT INTO txerr VALUES (5)')
        self.assertEqual(direct.execute('SELECT id FROM txerr').fetchall(),
                         [(5,)])

    # the other faults, per query

    def test_abort_on_commit_commits(self):
        """abort aimed at COMMIT: it reaches the backend and commits; the
        client loses its connection before the answer."""
        direct = self.direct()
        direct.execute('CREATE TABLE aborted (id int)')
        self.proxy.set('abort', {'abort': {'match': 'COMMIT'}})
        conn = self.connect(self.proxy)
        conn.execute('BEGIN')
        conn.execute('INSERT INTO aborted VALUES (1)')
        self.assertEqual(conn.execute('SELECT count(*) FROM aborted')
                         .fetchone(), (1,))
        with self.assertRaises(self.psycopg.OperationalError):
            conn.execute('COMMIT')                          # aborted
        decision = self.proxy.server.decisions[-1]
        self.assertEqual((decision['request'], decision['matched']),
                         ('COMMIT', 'COMMIT'))
        self.assertEqual(len(self.proxy.server.decisions), 1)
        deadline = time.time() + support.TIMEOUT
        while time.time() < deadline:
            count = direct.execute('SELECT count(*) FROM aborted').fetchone()
            if count == (1,):
                break
            time.sleep(0.05)
        self.assertEqual(count, (1,))

    def test_match_one_statement(self):
        """An error aimed at one statement, by psycopg's simple queries and
        its prepared ones, and asyncpg's extended protocol: the others
        pass."""
        self.direct().execute('CREATE TABLE IF NOT EXISTS accounts '
                              '(id int, balance int)')
        self.proxy.set('error', {'error': {
            'match': 'UPDATE accounts*', 'message': '40001'}})
        conn = self.connect(self.proxy)
        conn.execute('INSERT INTO accounts VALUES (1, 10)')
        with self.assertRaises(self.psycopg.errors.SerializationFailure):
            conn.execute('UPDATE accounts SET balance = 0')
        with self.assertRaises(self.psycopg.errors.SerializationFailure):
            conn.execute('update accounts SET balance = %s', (0,),
                         prepare=True)
        self.assertEqual(conn.execute('SELECT balance FROM accounts')
                         .fetchone(), (10,))

        async def run():
            aconn = await self.asyncpg_connect(self.proxy)
            try:
                self.assertEqual(await aconn.fetchval(
                    'SELECT balance FROM accounts WHERE id = $1', 1), 10)
                with self.assertRaises(
                        self.asyncpg.exceptions.SerializationError):
                    await aconn.execute('UPDATE accounts SET balance = $1',
                                        0)
                self.assertEqual(await aconn.fetchval('SELECT 2'), 2)
            finally:
                aconn.terminate()
        self.run_async(run())
        matched = [d['matched'] for d in self.proxy.server.decisions]
        self.assertEqual(len(matched), 3, matched)
        self.assertTrue(all(m.lower().startswith('update accounts')
                            for m in matched), matched)

    def test_delay_per_query(self):
        conn = self.connect(self.proxy)
        self.proxy.set('delay', {'delay': {'sleep': 0.4}})
        started = time.time()
        conn.execute('SELECT 1')
        conn.execute('SELECT 2')
        self.assertGreaterEqual(time.time() - started, 0.75)

    def test_latency_stream_fault(self):
        conn = self.connect(self.proxy)
        self.proxy.set('latency', {'latency': {'latency': 300}})
        started = time.time()
        self.assertEqual(conn.execute('SELECT 1').fetchone(), (1,))
        self.assertGreaterEqual(time.time() - started, 0.25)

    def test_hang(self):
        async def run():
            conn = await self.asyncpg_connect(self.proxy)
            try:
                self.proxy.set('hang')
                with self.assertRaises(asyncio.TimeoutError):
                    await conn.fetchval('SELECT 1', timeout=0.5)
            finally:
                conn.terminate()
        self.run_async(run())

    def test_blackout(self):
        direct = self.direct()
        direct.execute('CREATE TABLE blacked (id int)')
        conn = self.connect(self.proxy)
        self.proxy.set('blackout')
        with self.assertRaises(self.psycopg.OperationalError):
            conn.execute('INSERT INTO blacked VALUES (1)')
        self.assertEqual(direct.execute('SELECT count(*) FROM blacked')
                         .fetchone(), (0,))

    def test_transient(self):
        conn = self.connect(self.proxy)
        self.proxy.set('transient', {'transient': {'agitate': 2,
                                                   'code': 40001}})
        for _ in range(2):
            with self.assertRaises(self.psycopg.errors.SerializationFailure):
                conn.execute('SELECT 1')
        self.assertEqual(conn.execute('SELECT 2').fetchone(), (2,))

    def test_psql_sees_the_error(self):
        self.proxy.set('error', {'error': {'code': 40001}})
        result = psql(self.proxy.port, 'SELECT 1', check=False,
                      env={'PGSSLMODE': 'disable'})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b'ERROR:  could not serialize access due to '
                      b'concurrent update', result.stderr)


if __name__ == '__main__':
    unittest.main()
