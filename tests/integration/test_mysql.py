"""MariaDB and PyMySQL through the mysql plugin and plain tcp."""

import struct
import time
import unittest

from tests.integration import support


class MySQLTest(support.ProxiedTestCase):

    PROTOCOL = 'mysql'

    @classmethod
    def start_backend(cls):
        cls.pymysql = support.need_module('pymysql', 'PyMySQL')
        return support.start_mariadb()

    def connect(self, proxy, **kwargs):
        kwargs.setdefault('read_timeout', support.TIMEOUT)
        conn = self.pymysql.connect(
            host='127.0.0.1', port=proxy.port, user='vaurien',
            password='vaurien', database='test',
            connect_timeout=support.TIMEOUT, autocommit=True, **kwargs)
        self.addCleanup(conn.close)
        return conn

    def workload(self, proxy, table):
        from pymysql.constants import CLIENT
        conn = self.connect(proxy, client_flag=CLIENT.MULTI_STATEMENTS)
        cur = conn.cursor()
        cur.execute('DROP TABLE IF EXISTS %s' % table)
        cur.execute('CREATE TABLE %s (id INT PRIMARY KEY, name VARCHAR(64),'
                    ' data MEDIUMBLOB)' % table)
        for i in range(1000):
            cur.execute('INSERT INTO %s VALUES (%%s, %%s, %%s)' % table,
                        (i, 'name %d' % i, b'\x00\xfe\xff' * (i % 50)))
        cur.executemany('UPDATE %s SET name = %%s WHERE id = %%s' % table,
                        [('renamed', i) for i in range(0, 1000, 10)])
        cur.execute('SELECT id, name, data FROM %s ORDER BY id' % table)
        rows = cur.fetchall()
        self.assertEqual(len(rows), 1000)
        self.assertEqual(rows[7], (7, 'name 7', b'\x00\xfe\xff' * 7))
        self.assertEqual(rows[10][1], 'renamed')
        big = bytes(bytearray(range(256))) * 8192       # 2 MB
        cur.execute('UPDATE %s SET data = %%s WHERE id = 1' % table, (big,))
        cur.execute('SELECT data FROM %s WHERE id = 1' % table)
        self.assertEqual(cur.fetchone()[0], big)
        cur.execute('SELECT COUNT(*) FROM %s; SELECT 1, 2; '
                    'SELECT name FROM %s WHERE id = 3' % (table, table))
        self.assertEqual(cur.fetchall(), ((1000,),))
        self.assertTrue(cur.nextset())
        self.assertEqual(cur.fetchall(), ((1, 2),))
        self.assertTrue(cur.nextset())
        self.assertEqual(cur.fetchall(), (('name 3',),))
        self.assertFalse(cur.nextset())
        cur.execute("PREPARE s FROM 'SELECT name FROM %s WHERE id = ?'"
                    % table)
        cur.execute('SET @i = 5')
        cur.execute('EXECUTE s USING @i')
        self.assertEqual(cur.fetchall(), (('name 5',),))
        self.binary_prepared(conn)
        conn.ping()
        cur.execute('SELECT 42')
        self.assertEqual(cur.fetchone(), (42,))

    def binary_prepared(self, conn):
        """COM_STMT_PREPARE / EXECUTE / CLOSE with PyMySQL's packet
        reader."""
        conn._execute_command(0x16, 'SELECT ? + ?, ?')
        first = conn._read_packet()
        stmt, columns, params = struct.unpack('<xIHH', first.read(9))
        self.assertEqual((columns, params), (2, 3))
        for _ in range(params + 1 + columns + 1):      # defs and EOFs
            conn._read_packet()
        payload = struct.pack('<IBIBB', stmt, 0, 1, 0, 1)
        payload += struct.pack('<HHH', 8, 8, 253)
        payload += struct.pack('<qq', 40, 2) + b'\x05hello'
        conn._execute_command(0x17, payload)
        count = conn._read_packet()
        self.assertEqual(count.read_length_encoded_integer(), 2)
        for _ in range(2 + 1):
            conn._read_packet()
        row = conn._read_packet()
        self.assertIn(b'hello', row.get_all_data())
        self.assertTrue(conn._read_packet().is_eof_packet())
        conn._execute_command(0x19, struct.pack('<I', stmt))

    def test_workload_plugin(self):
        with support.captured_warnings() as warnings:
            self.workload(self.proxy, 'plugin')
        self.assertEqual(warnings, [])
        self.assertGreater(self.proxy.server.exchange_counts['dummy'], 1100)

    def test_workload_tcp(self):
        self.workload(self.tcp, 'tcp')

    # behaviors, as PyMySQL reports them

    def test_error_code(self):
        conn = self.connect(self.proxy)
        cur = conn.cursor()
        cur.execute('SELECT 1')
        self.proxy.set('error', {'error': {'code': 1213}})
        with self.assertRaises(self.pymysql.err.OperationalError) as caught:
            cur.execute('SELECT 2')
        self.assertEqual(caught.exception.args[0], 1213)
        self.assertIn('Deadlock', caught.exception.args[1])
        self.proxy.set('error', {'error': {'code': 1205}})
        with self.assertRaises(self.pymysql.err.OperationalError) as caught:
            cur.execute('SELECT 2')
        self.assertEqual(caught.exception.args[0], 1205)
        self.proxy.set('dummy')
        cur.execute('SELECT 3')
        self.assertEqual(cur.fetchone(), (3,))

    def test_error_default(self):
        conn = self.connect(self.proxy)
        self.proxy.set('error')
        with self.assertRaises(self.pymysql.err.OperationalError) as caught:
            conn.cursor().execute('SELECT 2')
        self.assertEqual(caught.exception.args[0], 1105)

    def test_hang_third_query(self):
        conn = self.connect(self.proxy, read_timeout=0.5)
        cur = conn.cursor()
        cur.execute('SELECT 1')
        cur.execute('SELECT 2')
        self.proxy.set('hang')
        with self.assertRaises(self.pymysql.err.OperationalError):
            cur.execute('SELECT 3')

    def test_delay(self):
        conn = self.connect(self.proxy)
        self.proxy.set('delay', {'delay': {'sleep': 0.3}})
        start = time.time()
        conn.cursor().execute('SELECT 1')
        self.assertGreaterEqual(time.time() - start, 0.3)

    def test_abort(self):
        conn = self.connect(self.proxy)
        self.proxy.set('abort')
        with self.assertRaises(self.pymysql.err.OperationalError):
            conn.cursor().execute('SELECT 1')

    def test_blackout(self):
        conn = self.connect(self.proxy)
        self.proxy.set('blackout')
        with self.assertRaises(self.pymysql.err.OperationalError):
            conn.cursor().execute('SELECT 1')

    def test_transient(self):
        conn = self.connect(self.proxy)
        cur = conn.cursor()
        self.proxy.set('transient', {'transient': {'agitate': 1,
                                                   'code': 1205}})
        with self.assertRaises(self.pymysql.err.OperationalError):
            cur.execute('SELECT 1')
        cur.execute('SELECT 7')
        self.assertEqual(cur.fetchone(), (7,))


if __name__ == '__main__':
    unittest.main()
