"""The option ``match``: behaviors and toxics aimed at chosen requests.

Each framed protocol describes its requests (see vaurien.RequestMatch); a
behavior with a match applies to the requests that match only, and its
gates (after, every, times) count those requests.  The client and the
backend are sockets in the test's hands: a request that the behavior takes
never reaches the backend, one it leaves reaches it as it was sent.
"""

import json
import re
import socket
import unittest

from tests import support
from tests.support import TIMEOUT, vaurien
from tests.test_protocols import Pair, _pkt, mysql_session, read_some
from tests.test_toxiproxy import ToxiServer, address_of

# how long a request the behavior took is given to reach the backend
QUIET = 0.3


class Conversation(object):
    """A proxy of *protocol* with an ``error`` behavior of *options*: each
    request either reaches the backend (which answers *answer*) or gets
    the proxy's error."""

    def __init__(self, test, protocol, options, answer, greeting=None):
        self.pair = Pair(protocol, 'error', {'error': options})
        test.addCleanup(self.pair.close)
        self.test = test
        self.answer = answer
        if greeting is not None:
            self.pair.backend.sendall(greeting)
            test.assertEqual(read_some(self.pair.client, len(greeting),
                                       TIMEOUT), greeting)

    def passes(self, request):
        """*request* reaches the backend untouched, and its answer the
        client."""
        pair = self.pair
        pair.client.sendall(request)
        self.test.assertEqual(read_some(pair.backend, len(request), TIMEOUT),
                              request)
        pair.backend.sendall(self.answer)
        self.test.assertEqual(read_some(pair.client, len(self.answer),
                                        TIMEOUT), self.answer)

    def fails(self, request, error):
        """*request* gets the proxy's *error* (its start), and the backend
        nothing."""
        pair = self.pair
        pair.client.sendall(request)
        got = read_some(pair.client, len(error), TIMEOUT)
        # the rest of the error, whatever it says
        got += read_some(pair.client, 65536, QUIET)
        self.test.assertTrue(got.startswith(error), got)
        self.test.assertEqual(read_some(pair.backend, 1, QUIET), b'')
        return got

    def decisions(self):
        return list(self.pair.server.decisions)


REDIS_ERROR = b'-ERR '


class PatternTest(unittest.TestCase):
    """RequestMatch alone: the syntax README.txt documents."""

    def test_words(self):
        match = vaurien.RequestMatch('INCR | set session:* | POST /pay*')
        for text in ('INCR a', 'incr', 'SET session:1 x', 'set session:',
                     'POST /payments/12 HTTP/1.1'):
            self.assertTrue(match(text), text)
        for text in ('INCRBY a 1', 'SET Session:1', 'SET user:1', 'SETEX',
                     'GET /payments', 'post', '', None):
            self.assertFalse(match(text), text)

    def test_globs(self):
        match = vaurien.RequestMatch('GET user:[0-9]? | DEL *')
        self.assertTrue(match('GET user:12'))
        self.assertFalse(match('GET user:123x'))
        self.assertFalse(match('GET user:x1'))
        self.assertTrue(match('DEL anything'))
        self.assertFalse(match('DEL'))      # * stands for a word

    def test_regular_expressions(self):
        match = vaurien.RequestMatch('COMMIT | re:^(GET|DEL) user:\\d+$')
        self.assertTrue(match('commit'))
        self.assertTrue(match('GET user:12'))
        self.assertFalse(match('GET user:12 x'))
        self.assertFalse(match('SET user:12'))
        headers = vaurien.RequestMatch('re:(?im)^x-chaos: on$')
        self.assertTrue(headers('GET / HTTP/1.1\nHost: a\nX-Chaos: on'))
        self.assertFalse(headers('GET / HTTP/1.1\nX-Chaos: off'))

    def test_malformed(self):
        for text, words in (('re:(', 'is not a regular expression'),
                            ('INCR || SET', 'an empty pattern'),
                            ('| INCR', 'an empty pattern')):
            with self.assertRaises(ValueError) as caught:
                vaurien.RequestMatch(text)
            self.assertIn(words, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith(
                "option 'match'"))
        self.assertIsNone(vaurien.RequestMatch.parse('  '))


class ReadmeExamplesTest(unittest.TestCase):
    """README.txt's examples of "Matching requests" take and leave the
    requests it lists beside them."""

    def test_examples(self):
        from tests.test_readme import readme_text
        text = readme_text()
        section = text[text.index('\nMatching requests\n'):
                       text.index('\nThe decision log\n')]
        examples = re.findall(
            r'^    only .*?match = (.+)\n\s+takes: (.+)\n\s+leaves: (.+)$',
            section, re.M)
        self.assertEqual(len(examples), 4, section)
        for pattern, takes, leaves in examples:
            match = vaurien.RequestMatch(pattern.strip())
            for request in takes.split(' ; '):
                self.assertTrue(match(request.strip()), (pattern, request))
            for request in leaves.split(' ; '):
                self.assertFalse(match(request.strip()), (pattern, request))


class ProtocolsTest(unittest.TestCase):
    """What each framed protocol matches against."""

    def test_redis_commands_and_keys(self):
        talk = Conversation(self, 'redis', {'match': 'INCR | SET session:*'},
                            b'+OK\r\n')
        talk.passes(b'*2\r\n$3\r\nGET\r\n$1\r\na\r\n')
        talk.fails(b'*2\r\n$4\r\nincr\r\n$1\r\na\r\n', REDIS_ERROR)
        talk.fails(b'*3\r\n$3\r\nSET\r\n$9\r\nsession:1\r\n$1\r\nx\r\n',
                   REDIS_ERROR)
        talk.passes(b'*3\r\n$3\r\nSET\r\n$6\r\nuser:1\r\n$1\r\nx\r\n')
        talk.fails(b'INCR counter\r\n', REDIS_ERROR)       # inline
        talk.passes(b'PING\r\n')
        decisions = talk.decisions()
        self.assertEqual([d['matched'] for d in decisions],
                         ['incr a', 'SET session:1 x', 'INCR counter'])
        self.assertEqual([d['exchange'] for d in decisions], [2, 3, 5])

    def test_http_method_path_and_headers(self):
        ok = b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'
        talk = Conversation(
            self, 'http', {'match': 'POST /payments* | re:(?im)^X-Chaos: on'},
            ok)
        talk.passes(b'GET /payments HTTP/1.1\r\nHost: a\r\n\r\n')
        talk.fails(b'POST /payments/12 HTTP/1.1\r\nHost: a\r\n'
                   b'Content-Length: 2\r\n\r\n{}', b'HTTP/1.1 500 ')
        talk.passes(b'POST /users HTTP/1.1\r\nHost: a\r\n'
                    b'Content-Length: 2\r\n\r\n{}')
        talk.fails(b'GET / HTTP/1.1\r\nHost: a\r\nX-Chaos: on\r\n\r\n',
                   b'HTTP/1.1 500 ')

    def test_memcache_command_and_key(self):
        talk = Conversation(self, 'memcache', {'match': 'get session:*'},
                            b'END\r\n')
        talk.passes(b'get user:1\r\n')
        talk.fails(b'get session:1\r\n', b'SERVER_ERROR ')
        talk.fails(b'GET session:2 user:1\r\n', b'SERVER_ERROR ')

    def test_smtp_command(self):
        talk = Conversation(self, 'smtp', {'match': 'RCPT'},
                            b'250 ok\r\n', greeting=b'220 hello\r\n')
        talk.passes(b'EHLO me\r\n')
        talk.passes(b'MAIL FROM:<a@example.com>\r\n')
        talk.fails(b'RCPT TO:<b@example.com>\r\n', b'451 ')
        talk.passes(b'NOOP\r\n')

    def test_mysql_statement(self):
        session = mysql_session(False)
        ok = _pkt(1, b'\x00\x00\x00\x02\x00\x00\x00')
        talk = Conversation(self, 'mysql', {'match': 'COMMIT'}, ok,
                            greeting=session[0][1])
        pair = talk.pair
        pair.client.sendall(session[1][1])
        self.assertEqual(read_some(pair.backend, len(session[1][1]),
                                   TIMEOUT), session[1][1])
        pair.backend.sendall(session[2][1])
        read_some(pair.client, len(session[2][1]), TIMEOUT)
        talk.passes(_pkt(0, b'\x03INSERT INTO t VALUES (1)'))
        got = talk.fails(_pkt(0, b'\x03  /* app */ commit ;'), b'')
        self.assertEqual(got[3:5], b'\x01\xff')     # an ERR packet
        talk.passes(_pkt(0, b'\x03SELECT 1'))
        self.assertEqual(talk.decisions()[0]['matched'], 'commit')


    def test_postgres_statement(self):
        from tests import test_postgres as pg
        talk = Conversation(self, 'postgres', {'match': 'COMMIT | UPDATE *',
                                               'message': '40001'},
                            pg.command_complete(b'X') + pg.ready(b'I'))
        pg.login(talk.pair)
        talk.passes(pg.query(b'BEGIN'))
        talk.passes(pg.query(b'INSERT INTO t VALUES (1)'))
        talk.fails(pg.query(b'-- app\nupdate t SET a = 1;'), b'E')
        # the extended protocol: a group up to Sync, by its Parse's SQL
        talk.passes(pg.parse(b'SELECT 1') + pg.bind() + pg.execute() +
                    pg.SYNC)
        talk.fails(pg.parse(b'COMMIT') + pg.bind() + pg.execute() + pg.SYNC,
                   b'E')
        self.assertEqual([d['matched'] for d in talk.decisions()],
                         ['update t SET a = 1', 'COMMIT'])


class GatesTest(unittest.TestCase):
    """after, every and times count the requests that match."""

    def test_every_and_after_count_matching_requests(self):
        talk = Conversation(self, 'redis', {'match': 'INCR', 'every': 2,
                                            'after': 1}, b':1\r\n')
        incr = b'INCR a\r\n'
        get = b'GET a\r\n'
        talk.passes(incr)       # the 1st INCR: after 1
        talk.passes(get)
        talk.passes(get)
        talk.fails(incr, REDIS_ERROR)       # the 2nd INCR: every 2
        talk.passes(incr)
        talk.passes(get)
        talk.fails(incr, REDIS_ERROR)       # the 4th

    def test_times(self):
        talk = Conversation(self, 'redis', {'match': 'SET', 'times': 1},
                            b'+OK\r\n')
        talk.passes(b'GET a\r\n')
        talk.fails(b'SET a 1\r\n', REDIS_ERROR)
        talk.passes(b'SET a 2\r\n')

    def test_composite_parts_match_alone(self):
        pair = Pair('redis', 'error+delay',
                    {'error': {'match': 'INCR'}, 'delay': {'sleep': 0}})
        self.addCleanup(pair.close)
        pair.client.sendall(b'GET a\r\n')
        self.assertEqual(read_some(pair.backend, 7, TIMEOUT), b'GET a\r\n')
        pair.backend.sendall(b'$-1\r\n')
        self.assertEqual(read_some(pair.client, 5, TIMEOUT), b'$-1\r\n')
        pair.client.sendall(b'INCR a\r\n')
        self.assertTrue(read_some(pair.client, 5, TIMEOUT).startswith(
            REDIS_ERROR))


class RefusedTest(unittest.TestCase):
    """match on plain tcp, on a behavior that acts before any request, or
    malformed: one clear error, at start-up and from the API."""

    def test_in_process(self):
        for protocol, options, words in (
                ('tcp', {'match': 'INCR'}, "needs a protocol that frames "
                 "requests"),
                ('redis', {'match': 're:('}, 'is not a regular expression'),
                ('redis', {'match': 'a || b'}, 'an empty pattern')):
            with self.assertRaises(vaurien.VaurienError) as caught:
                vaurien.ProxyServer(('127.0.0.1', 0), ('127.0.0.1', 1),
                                    protocol=protocol, behavior='error',
                                    behavior_options={'error': options})
            self.assertIn(words, str(caught.exception))

    def test_command_line(self):
        for args, words in (
                (['--behavior', 'error', '--behavior-error-match', 'INCR'],
                 "option 'match' needs a protocol that frames requests"),
                (['--protocol', 'redis', '--behavior', 'error',
                  '--behavior-error-match', 're:['],
                 "is not a regular expression"),
                (['--protocol', 'redis', '--behavior', 'down',
                  '--behavior-down-match', 'INCR'],
                 'acts before any request')):
            code, out, err = support.run_vaurien(
                ['--backend', '127.0.0.1:1', '--proxy', '127.0.0.1:0'] + args)
            self.assertEqual(code, 2, err)
            lines = err.strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn(words, lines[0])
            self.assertNotIn('Traceback', err)

    def test_control_api(self):
        proxy = support.Proxy(('127.0.0.1', 1))
        with proxy:
            control = vaurien.ControlServer(('127.0.0.1', 0), proxy.server)
            thread = support.threading.Thread(
                target=control.serve_forever, kwargs={'poll_interval': 0.05},
                daemon=True)
            thread.start()
            self.addCleanup(control.server_close)
            self.addCleanup(control.shutdown)
            client = vaurien.Client(*control.address)
            with self.assertRaises(ValueError) as caught:
                client.set_behavior('error', match='INCR')
            self.assertIn("needs a protocol that frames requests",
                          str(caught.exception))
            self.assertEqual(client.get_behavior(), 'dummy')

    def test_toxic_on_a_tcp_proxy(self):
        api = ToxiServer()
        self.addCleanup(api.close)
        api.proxy('plain', '127.0.0.1:1')
        status, answer = api.json('POST', '/proxies/plain/toxics', {
            'type': 'error', 'attributes': {'match': 'INCR'}})
        self.assertEqual(status, 400, answer)
        self.assertIn("match", answer['error'])


class ToxicsTest(unittest.TestCase):
    """A toxic with a match, on a proxy that frames requests, acts on the
    requests that match only."""

    def test_error_toxic_on_chosen_commands(self):
        backend = socket.socket()
        backend.bind(('127.0.0.1', 0))
        backend.listen(1)
        backend.settimeout(TIMEOUT)
        self.addCleanup(backend.close)
        api = ToxiServer()
        self.addCleanup(api.close)
        proxy = api.proxy('redis', '127.0.0.1:%d' % backend.getsockname()[1],
                          protocol='redis')
        toxic = api.toxic('redis', type='error',
                          attributes={'match': 'INCR | DEL'})
        self.assertEqual(toxic['attributes']['match'], 'INCR | DEL')
        client = support.connect(address_of(proxy['listen']))
        self.addCleanup(client.close)
        client.sendall(b'GET a\r\n')
        server_side = backend.accept()[0]
        server_side.settimeout(TIMEOUT)
        self.addCleanup(server_side.close)
        self.assertEqual(read_some(server_side, 7, TIMEOUT), b'GET a\r\n')
        server_side.sendall(b'$-1\r\n')
        self.assertEqual(read_some(client, 5, TIMEOUT), b'$-1\r\n')
        client.sendall(b'DEL a\r\n')
        self.assertTrue(read_some(client, 5, TIMEOUT).startswith(
            REDIS_ERROR))
        self.assertEqual(read_some(server_side, 1, QUIET), b'')
        read_some(client, 65536, QUIET)
        client.sendall(b'SET a 1\r\n')
        self.assertEqual(read_some(server_side, 9, TIMEOUT), b'SET a 1\r\n')
        status, data = api.json('GET', '/decisions?proxy=redis')
        self.assertEqual(status, 200, data)
        self.assertIn('DEL a', json.dumps(data))


if __name__ == '__main__':
    unittest.main()
