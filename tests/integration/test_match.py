"""The option ``match`` with real servers and their client libraries: a
fault aimed at chosen requests while the others pass."""

import unittest

from tests.integration import support


class RedisMatchTest(support.ProxiedTestCase):
    """Only INCR and SET fail (redis-py's incr() sends INCRBY); GET, DEL
    and pipelines of them pass."""

    PROTOCOL = 'redis'

    @classmethod
    def start_backend(cls):
        cls.redis = support.need_module('redis', 'redis')
        return support.start_redis()

    def test_only_incr_and_set(self):
        r = self.redis.Redis(host='127.0.0.1', port=self.proxy.port,
                             socket_timeout=support.TIMEOUT,
                             single_connection_client=True)
        self.addCleanup(r.close)
        r.set('session:1', 'x')
        self.proxy.set('error', {'error': {'match': 'INCR | INCRBY | SET',
                                           'message': 'ERR no writes now'}})
        self.assertEqual(r.get('session:1'), b'x')
        for call in (lambda: r.incr('n'), lambda: r.set('a', 1)):
            with self.assertRaises(self.redis.exceptions.ResponseError) as \
                    caught:
                call()
            self.assertIn('no writes now', str(caught.exception))
        pipe = r.pipeline(transaction=False)
        pipe.get('session:1').incr('n').delete('a').get('n')
        answers = pipe.execute(raise_on_error=False)
        self.assertEqual(answers[0], b'x')
        self.assertIsInstance(answers[1], self.redis.exceptions.ResponseError)
        self.assertEqual(answers[2:], [0, None])   # INCR never reached it
        self.assertEqual(
            [d['matched'] for d in self.proxy.server.decisions],
            ['INCRBY n 1', 'SET a 1', 'INCRBY n 1'])

    def test_only_keys_starting_with_session(self):
        r = self.redis.Redis(host='127.0.0.1', port=self.proxy.port,
                             socket_timeout=support.TIMEOUT,
                             single_connection_client=True)
        self.addCleanup(r.close)
        self.proxy.set('error', {'error': {'match': '* session:*'}})
        r.set('user:1', 'u')
        self.assertEqual(r.get('user:1'), b'u')
        with self.assertRaises(self.redis.exceptions.ResponseError):
            r.get('session:1')
        with self.assertRaises(self.redis.exceptions.ResponseError):
            r.set('session:1', 's')


class HTTPMatchTest(support.ProxiedTestCase):
    """Only POST under /upload fails; GET of the same path passes."""

    PROTOCOL = 'http'

    @classmethod
    def start_backend(cls):
        cls.requests = support.need_module('requests', 'requests')
        return support.start_nginx({'small.txt': b'small file\n'})

    def test_only_post_under_a_path(self):
        base = 'http://127.0.0.1:%d' % self.proxy.port
        self.proxy.set('error', {'error': {'match': 'POST /upload*',
                                           'code': 503}})
        with self.requests.Session() as session:
            self.assertEqual(session.get(base + '/small.txt',
                                         timeout=support.TIMEOUT).text,
                             'small file\n')
            answer = session.post(base + '/upload', data=b'x' * 1000,
                                  timeout=support.TIMEOUT)
            self.assertEqual(answer.status_code, 503)
            answer = session.post(base + '/small.txt', data=b'x',
                                  timeout=support.TIMEOUT)
            self.assertEqual(answer.status_code, 405)      # nginx's own
            self.assertEqual(session.get(base + '/small.txt',
                                         timeout=support.TIMEOUT).text,
                             'small file\n')


class MemcacheMatchTest(support.ProxiedTestCase):

    PROTOCOL = 'memcache'

    @classmethod
    def start_backend(cls):
        cls.pymemcache = support.need_module('pymemcache', 'pymemcache')
        return support.start_memcached()

    def test_only_session_keys(self):
        from pymemcache.client.base import Client
        client = Client(('127.0.0.1', self.proxy.port),
                        timeout=support.TIMEOUT)
        self.addCleanup(client.close)
        client.set('user:1', b'u')
        self.proxy.set('error', {'error': {'match': '* session:*'}})
        self.assertEqual(client.get('user:1'), b'u')
        with self.assertRaises(self.pymemcache.exceptions.
                               MemcacheServerError):
            client.get('session:1')
        self.assertEqual(client.get('user:1'), b'u')


class MySQLMatchTest(support.ProxiedTestCase):
    """The commit happened, its acknowledgment was lost: abort aimed at
    COMMIT alone."""

    PROTOCOL = 'mysql'

    @classmethod
    def start_backend(cls):
        cls.pymysql = support.need_module('pymysql', 'PyMySQL')
        return support.start_mariadb()

    def connect(self, proxy):
        conn = self.pymysql.connect(
            host='127.0.0.1', port=proxy.port, user='vaurien',
            password='vaurien', database='test', autocommit=False,
            connect_timeout=support.TIMEOUT, read_timeout=support.TIMEOUT)
        self.addCleanup(conn.close)
        return conn

    def test_abort_on_commit(self):
        setup = self.connect(self.tcp)
        cur = setup.cursor()
        cur.execute('DROP TABLE IF EXISTS paid')
        cur.execute('CREATE TABLE paid (id INT PRIMARY KEY)')
        setup.commit()
        self.proxy.set('abort', {'abort': {'match': 'COMMIT'}})
        conn = self.connect(self.proxy)
        cur = conn.cursor()
        cur.execute('INSERT INTO paid VALUES (1)')
        cur.execute('SELECT COUNT(*) FROM paid')
        self.assertEqual(cur.fetchone(), (1,))
        with self.assertRaises(self.pymysql.err.OperationalError):
            conn.commit()
        # the backend committed: another connection sees the row
        check = self.connect(self.tcp)
        cur = check.cursor()
        for _ in range(50):
            cur.execute('SELECT COUNT(*) FROM paid')
            if cur.fetchone() == (1,):
                break
            check.commit()      # a new snapshot
        else:
            self.fail('the row was not committed')
        matched = [d['matched'] for d in self.proxy.server.decisions]
        self.assertEqual(matched, ['COMMIT'])

    def test_error_on_one_statement(self):
        conn = self.connect(self.proxy)
        conn.autocommit(True)
        self.proxy.set('error', {'error': {'match': 'UPDATE accounts*',
                                           'code': 1213}})
        cur = conn.cursor()
        cur.execute('SELECT 1')
        with self.assertRaises(self.pymysql.err.OperationalError) as caught:
            cur.execute('UPDATE accounts SET x = 1')
        self.assertEqual(caught.exception.args[0], 1213)
        cur.execute('SELECT 2')
        self.assertEqual(cur.fetchone(), (2,))


if __name__ == '__main__':
    unittest.main()
