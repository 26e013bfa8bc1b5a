"""The plugin API: the seed's example, README.txt's examples, discovery
and its errors."""

import os
import re
import shutil
import textwrap
import time
import unittest

from tests import support
from tests.support import vaurien


def readme_files():
    """{file name: code} for every '# file: NAME' block of README.txt."""
    with open(os.path.join(support.ROOT, 'README.txt')) as stream:
        text = stream.read()
    files = {}
    for match in re.finditer(r'^    # file: (\S+)\n((?:    .*\n|\n)+)', text,
                             re.M):
        files[match.group(1)] = textwrap.dedent(match.group(2))
    return files


def readme_ini():
    with open(os.path.join(support.ROOT, 'README.txt')) as stream:
        text = stream.read()
    block = re.search(r'^    \[vaurien\]\n    plugins = mybehaviors\n'
                      r'((?:    .*\n|\n)+)', text, re.M)
    return '[vaurien]\nplugins = mybehaviors\n' + textwrap.dedent(
        block.group(1))


class ExamplesTest(unittest.TestCase):

    def setUp(self):
        self.folder = self._temp()
        self.files = readme_files()
        for name, code in self.files.items():
            support.write(os.path.join(self.folder, name), code)
        self.env = support.env_with_path(self.folder)

    def _temp(self):
        manager = support.temp_dir()
        folder = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        return folder

    def test_readme_has_the_examples(self):
        self.assertTrue({'onetcp.py', 'mybehaviors.py', 'test_myapp.py',
                         'test_with_pytest.py'} <= set(self.files))

    def test_readme_says_each_thing_once(self):
        # A section or an example file twice means an edit went wrong, and
        # the examples tested here might not be the ones a reader sees.
        with open(os.path.join(support.ROOT, 'README.txt')) as stream:
            text = stream.read()
        headings = re.findall(r'^(\S.*)\n-{3,}$', text, re.M)
        names = re.findall(r'^    # file: (\S+)$', text, re.M)
        self.assertIn('Performance', headings)
        self.assertEqual(len(headings), len(set(headings)), headings)
        self.assertEqual(len(names), len(set(names)), names)

    def test_readme_unittest_example(self):
        code, out, err = support.run_command(
            ['-m', 'unittest', 'test_myapp'], cwd=self.folder, env=self.env)
        self.assertEqual(code, 0, err)
        self.assertIn('Ran 2 tests', err)

    def test_seed_protocol_one_request_per_connection(self):
        backend = support.http_backend(self, b'hello world\n' * 1000,
                                       'HTTP/1.0')
        args = ['--plugins', 'onetcp', '--protocol', 'onetcp',
                '--backend', '127.0.0.1:%d' % backend[1]]
        with support.vaurien_process(args, env=self.env,
                                     cwd=self.folder) as (proc, address):
            with support.connect(address) as sock:
                sock.sendall(b'GET /hello.txt HTTP/1.0\r\n\r\n')
                answer = support.recv_all(sock)
        self.assertTrue(answer.startswith(b'HTTP/1.0 200'), answer[:100])
        self.assertTrue(answer.endswith(b'hello world\n' * 1000))

    def test_seed_protocol_keep_alive(self):
        with support.EchoServer() as echo:
            args = ['--plugins', 'onetcp', '--protocol', 'onetcp',
                    '--protocol-onetcp-keep-alive',
                    '--backend', '127.0.0.1:%d' % echo.port]
            with support.vaurien_process(args, env=self.env) as (proc, addr):
                with support.connect(addr) as sock:
                    for word in (b'one', b'two', b'three'):
                        self.assertEqual(support.exchange(sock, word), word)

    def test_slowstart(self):
        with support.EchoServer() as echo:
            args = ['--plugins', 'mybehaviors', '--behavior', 'slowstart',
                    '--behavior-slowstart-exchanges', '2',
                    '--behavior-slowstart-sleep', '1.5',
                    '--backend', '127.0.0.1:%d' % echo.port]
            with support.vaurien_process(args, env=self.env) as (proc, addr):
                with support.connect(addr) as sock:
                    times = []
                    for word in (b'one', b'two', b'three'):
                        start = time.time()
                        self.assertEqual(support.exchange(sock, word), word)
                        times.append(time.time() - start)
        self.assertGreaterEqual(times[0], 1.5)
        self.assertGreaterEqual(times[1], 1.5)
        self.assertLess(times[2], 1.5)    # the third is not delayed at all

    def test_truncate(self):
        def talk(server, conn):
            conn.recv(100)
            conn.sendall(b'0123456789' * 10)
            time.sleep(1)

        with support.ThreadedServer(talk) as backend:
            args = ['--plugins', 'mybehaviors', '--behavior', 'truncate',
                    '--backend', '127.0.0.1:%d' % backend.port]
            with support.vaurien_process(args, env=self.env) as (proc, addr):
                with support.connect(addr) as sock:
                    sock.sendall(b'give me 100 bytes')
                    self.assertEqual(support.recv_all(sock),
                                     b'0123456789' * 5)

    def test_readme_ini_and_list(self):
        ini = support.write(os.path.join(self.folder, 'v.ini'), readme_ini())
        code, out, err = support.run_vaurien(
            ['--config', ini, '--plugins', 'onetcp', '--list'],
            env=self.env, cwd=self.folder)
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r'slowstart +mybehaviors \(')
        self.assertRegex(out, r'coldstart +mybehaviors \(')
        self.assertRegex(out, r'onetcp +onetcp \(')
        self.assertIn('exchanges = 3  [int]', out)


class DiscoveryTest(unittest.TestCase):
    """A lone vaurien.py with plugin packages beside it."""

    def setUp(self):
        manager = support.temp_dir()
        self.folder = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        shutil.copy(support.VAURIEN_PY, self.folder)
        self.script = os.path.join(self.folder, 'vaurien.py')
        support.write(os.path.join(self.folder, 'behaviors', '__init__.py'),
                      '')
        support.write(os.path.join(self.folder, 'protocols', '__init__.py'),
                      '')

    def add(self, path, code):
        support.write(os.path.join(self.folder, path),
                      textwrap.dedent(code))

    def run_list(self, *args):
        return support.run_vaurien(['--list'] + list(args), cwd='/',
                                   script=self.script, isolated=True)

    def test_packages_beside_vaurien_are_scanned(self):
        self.add('behaviors/shout.py', '''\
            import sys
            import vaurien

            # a plugin gets the running module, not a second copy
            assert vaurien is sys.modules['__main__'], 'second copy'

            class Shout(vaurien.Dummy):
                """Upper-cases answers."""
                name = 'shout'

            vaurien.Behavior.register(Shout)
            ''')
        self.add('protocols/line.py', '''\
            from vaurien import TCP, Protocol

            class Line(TCP):
                name = 'line'
                options = dict(TCP.options, eol=("Line end", str, "\\n"))

            Protocol.register(Line)
            ''')
        code, out, err = self.run_list()
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r'shout +behaviors\.shout \(.*shout\.py\)')
        self.assertRegex(out, r'line +protocols\.line \(')
        self.assertIn("eol = '\\n'  [str] Line end", out)
        code, out, err = support.run_vaurien(
            ['--help'], cwd='/', script=self.script, isolated=True)
        self.assertIn('--protocol-line-eol', out)

    def test_module_failing_to_import(self):
        self.add('behaviors/bad.py', 'import no_such_module_here\n')
        code, out, err = self.run_list()
        self.assertEqual(code, 2)
        self.assertEqual(err.strip(), "vaurien: error: plugin module "
                         "'behaviors.bad' failed to import: "
                         "ModuleNotFoundError: No module named "
                         "'no_such_module_here'")

    def test_two_plugins_with_one_name(self):
        for module in ('one', 'two'):
            self.add('behaviors/%s.py' % module, '''\
                import vaurien
                class Same(vaurien.Dummy):
                    name = 'same'
                vaurien.Behavior.register(Same)
                ''')
        code, out, err = self.run_list()
        self.assertEqual(code, 2)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("two behaviors are named 'same'", lines[0])
        self.assertIn('behaviors.one', lines[0])
        self.assertIn('behaviors.two', lines[0])

    def test_a_plugin_named_like_a_builtin(self):
        self.add('behaviors/mydelay.py', '''\
            import vaurien
            class Delay(vaurien.Dummy):
                name = 'delay'
            vaurien.Behavior.register(Delay)
            ''')
        code, out, err = self.run_list()
        self.assertEqual(code, 2)
        self.assertIn("two behaviors are named 'delay': one in built-in, one "
                      "in behaviors.mydelay", err)

    def test_callable_sections(self):
        self.add('extra/myplugins.py', '''\
            import vaurien
            class Quiet(vaurien.Dummy):
                """Not registered by its module."""
                name = 'quiet'
            ''')
        for where in ('myplugins:Quiet', 'myplugins.Quiet'):
            ini = support.write(os.path.join(self.folder, 'v.ini'),
                                '[behavior:hush]\ncallable = %s\n' % where)
            code, out, err = support.run_vaurien(
                ['--config', ini, '--list'], cwd=self.folder,
                script=self.script,
                env=support.env_with_path(os.path.join(self.folder, 'extra')))
            self.assertEqual(code, 0, err)
            self.assertRegex(out, r'hush +myplugins \(')
        ini = support.write(os.path.join(self.folder, 'v.ini'),
                            '[behavior:hush]\ncallable = myplugins:Nope\n')
        code, out, err = support.run_vaurien(
            ['--config', ini, '--list'], cwd=self.folder, script=self.script,
            env=support.env_with_path(os.path.join(self.folder, 'extra')))
        self.assertEqual(code, 2)
        self.assertIn("myplugins has no behavior class 'Nope'", err)


class RegistryTest(unittest.TestCase):

    def test_original_import_paths(self):
        import vaurien.protocols.base
        from vaurien.behaviors.dummy import Dummy
        from vaurien.protocols import Protocol
        self.assertIs(vaurien.protocols.base.BaseProtocol,
                      vaurien.BaseProtocol)
        self.assertIs(Dummy, vaurien.Dummy)
        self.assertIs(Protocol, vaurien.Protocol)
        self.assertTrue({'abort', 'blackout', 'delay'} <=
                        set(vaurien.get_behaviors()))
        self.assertIn('tcp', vaurien.get_protocols())

    def test_registering_the_same_class_twice_is_fine(self):
        vaurien.Behavior.register(vaurien.Delay)
        self.assertIs(vaurien.Behavior.get('delay'), vaurien.Delay)


class AnswersHookTest(unittest.TestCase):
    """A behavior whose hooks_act_on_answers() says no is not called on
    answers: they pass as under dummy; by default it is."""

    def calls(self, answers):
        from tests.test_protocols import Pair, read_some
        seen = []

        class Counting(vaurien.Dummy):
            name = 'counting-%s' % answers

            def hooks_act_on_answers(self):
                return answers

            def on_before_handle(self, protocol, source, dest, to_backend):
                seen.append(to_backend)
                return True

        vaurien.Behavior.register(Counting)
        pair = Pair('redis', Counting.name)
        self.addCleanup(pair.close)
        for _ in range(3):
            pair.client.sendall(b'GET a\r\n')
            self.assertEqual(read_some(pair.backend, 7, support.TIMEOUT),
                             b'GET a\r\n')
            pair.backend.sendall(b'$-1\r\n')
            self.assertEqual(read_some(pair.client, 5, support.TIMEOUT),
                             b'$-1\r\n')
        return seen

    def test_answers_skipped(self):
        self.assertEqual(self.calls(False), [True, True, True])

    def test_answers_by_default(self):
        self.assertEqual(self.calls(True).count(False), 3)


if __name__ == '__main__':
    unittest.main()
