"""The command line, the ini file, their precedence, and every bad input."""

import os
import socket
import unittest

from tests import support
from tests.support import vaurien


INI = """\
[vaurien]
backend = 127.0.0.1:6379
proxy = 127.0.0.1:8001
behavior = 20:delay,5:blackout
timeout = 5
stay_connected = true

[behavior:delay]
sleep = 2
before = false

[protocol:tcp]
buffer = 4096
"""


class PrecedenceTest(unittest.TestCase):

    def load(self, args, ini=INI):
        with support.temp_dir() as folder:
            path = support.write(os.path.join(folder, 'v.ini'), ini)
            return vaurien.load_settings(['--config', path] + args)

    def test_defaults(self):
        settings, options, _ = vaurien.load_settings([])
        self.assertEqual(settings['proxy'], 'localhost:8000')
        self.assertEqual(settings['timeout'], 30.0)
        self.assertEqual(settings['behavior'], 'dummy')
        self.assertEqual(settings['idle_timeout'], 0)
        self.assertEqual(options, {})

    def test_ini_file_over_defaults(self):
        settings, options, _ = self.load([])
        self.assertEqual(settings['backend'], '127.0.0.1:6379')
        self.assertEqual(settings['behavior'], '20:delay,5:blackout')
        self.assertEqual(settings['timeout'], 5.0)
        self.assertIs(settings['stay_connected'], True)
        self.assertEqual(options[('behavior', 'delay')],
                         {'sleep': '2', 'before': 'false'})

    def test_command_line_over_ini_file(self):
        settings, options, _ = self.load([
            '--timeout', '7', '--behavior', '10:error',
            '--behavior-delay-sleep', '3', '--behavior-delay-before'])
        self.assertEqual(settings['timeout'], 7.0)
        self.assertEqual(settings['behavior'], '10:error')
        self.assertEqual(settings['backend'], '127.0.0.1:6379')
        self.assertEqual(options[('behavior', 'delay')],
                         {'sleep': '3', 'before': 'true'})

    def test_booleans_both_ways(self):
        for flags, expected in [(['--behavior-delay-before'], True),
                                (['--behavior-delay-before', 'false'], False),
                                (['--behavior-delay-before=no'], False),
                                (['--no-behavior-delay-before'], False),
                                ([], True)]:
            settings, options, _ = vaurien.load_settings(
                ['--proxy', '127.0.0.1:0', '--behavior', 'delay'] + flags)
            server = vaurien.build_server(settings, options)
            try:
                delay = server.mix.instances['delay']
                self.assertIs(delay.option('before'), expected, flags)
            finally:
                server.server_close()

    def test_behavior_section_options_are_used(self):
        settings, options, _ = self.load(['--proxy', '127.0.0.1:0'])
        server = vaurien.build_server(settings, options)
        try:
            delay = server.mix.instances['delay']
            self.assertEqual(delay.option('sleep'), 2.0)
            self.assertIs(delay.option('before'), False)
            self.assertEqual(server.make_protocol().option('buffer'), 4096)
        finally:
            server.server_close()

    def test_statsd_section(self):
        settings, _, _ = self.load([], INI + '[statsd]\nenabled = yes\n'
                                   'host = 10.1.2.3\nport = 9125\n')
        self.assertIs(settings['statsd'], True)
        self.assertEqual(settings['statsd_host'], '10.1.2.3')
        self.assertEqual(settings['statsd_port'], 9125)

    def test_example_ini_in_the_repo_loads(self):
        path = os.path.join(support.ROOT, 'vaurien.ini')
        settings, options, _ = vaurien.load_settings(
            ['--config', path, '--proxy', '127.0.0.1:0'])
        vaurien.build_server(settings, options).server_close()


class BadInputTest(unittest.TestCase):
    """Each mistake: one line naming it, a non-zero exit, no traceback."""

    def assertOneLineError(self, args, expected, cwd=None, env=None):
        code, out, err = support.run_vaurien(args, cwd=cwd, env=env)
        self.assertNotEqual(code, 0)
        self.assertNotIn('Traceback', err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith('vaurien: error: '), err)
        self.assertIn(expected, lines[0])
        return lines[0]

    def test_malformed_addresses(self):
        self.assertOneLineError(['--proxy', 'localhost'],
                                "malformed proxy address 'localhost'")
        self.assertOneLineError(['--backend', 'host:http'],
                                "malformed backend address 'host:http'")
        self.assertOneLineError(['--backend', '::1:80'], 'brackets')
        self.assertOneLineError(['--backend', 'h:70000'], '1-65535')

    def test_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(('127.0.0.1', 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            line = self.assertOneLineError(
                ['--proxy', '127.0.0.1:%d' % port], 'cannot listen on')
            self.assertIn('another port', line)

    def test_unknown_protocol_and_behavior(self):
        line = self.assertOneLineError(['--protocol', 'gopher'],
                                       "unknown protocol 'gopher'")
        self.assertIn('tcp', line)
        line = self.assertOneLineError(['--behavior', '20:dealy'],
                                       "unknown behavior 'dealy'")
        for name in ('abort', 'blackout', 'delay', 'dummy', 'error'):
            self.assertIn(name + ',', line)

    def test_bad_mixes(self):
        self.assertOneLineError(['--behavior', '60:delay,50:error'],
                                'adds up to 110%')
        self.assertOneLineError(['--behavior', '20delay'], "unknown behavior")
        self.assertOneLineError(['--behavior', 'x:delay'], 'malformed')

    def test_option_of_the_wrong_type(self):
        self.assertOneLineError(['--behavior-delay-sleep', 'soon'],
                                "option 'sleep' must be a number")
        self.assertOneLineError(['--behavior-delay-before', 'maybe'],
                                "option 'before' must be true or false")
        self.assertOneLineError(['--timeout', 'long'],
                                "'timeout' must be a number")
        self.assertOneLineError(['--unknown-flag'], 'unrecognized arguments')
        self.assertOneLineError(['--backlog', '0'], 'backlog must be 1 or more')
        self.assertOneLineError(['--cpu', 'fast'],
                                "cpu must be auto, all or a CPU number")
        self.assertOneLineError(['--cpu', '4096'], 'cpu 4096 is not '
                                if hasattr(os, 'sched_setaffinity') else
                                'cannot pin')
        self.assertOneLineError(['--behavior', '10:delay+'],
                                "unknown behavior ''")
        self.assertOneLineError(['--behavior', 'slicer',
                                 '--behavior-slicer-average-size', '0'],
                                "'average_size' must be 1 or more")

    def test_ini_file_problems(self):
        self.assertOneLineError(['--config', '/no/such/file.ini'],
                                'cannot read config file')
        with support.temp_dir() as folder:
            bad = support.write(os.path.join(folder, 'bad.ini'),
                                'this is not an ini file\n')
            self.assertOneLineError(['--config', bad], 'malformed config')
            typo = support.write(os.path.join(folder, 'typo.ini'),
                                 '[vaurien]\nbakend = localhost:80\n')
            self.assertOneLineError(['--config', typo],
                                    "unknown setting 'bakend'")
            section = support.write(os.path.join(folder, 'section.ini'),
                                    '[behaviour:delay]\nsleep = 1\n')
            self.assertOneLineError(['--config', section],
                                    'unknown section [behaviour:delay]')
            option = support.write(os.path.join(folder, 'option.ini'),
                                   '[behavior:delay]\nslep = 1\n')
            self.assertOneLineError(['--config', option],
                                    "behavior 'delay' has no option 'slep'")
            kind = support.write(os.path.join(folder, 'kind.ini'),
                                 '[behavior:delay]\nsleep = one\n')
            self.assertOneLineError(['--config', kind],
                                    "option 'sleep' must be a number")

    def test_plugin_that_fails_to_import(self):
        with support.temp_dir() as folder:
            support.write(os.path.join(folder, 'broken.py'),
                          'import vaurien\nraise RuntimeError("oops")\n')
            env = support.env_with_path(folder)
            self.assertOneLineError(
                ['--plugins', 'broken'],
                "plugin module 'broken' failed to import: RuntimeError: oops",
                env=env)
            self.assertOneLineError(['--plugins', 'nothere'],
                                    "plugin module 'nothere' failed to import",
                                    env=env)

    def test_bad_log_level(self):
        self.assertOneLineError(['--log-level', 'loud'], "unknown log level")


class InformationTest(unittest.TestCase):

    def test_version(self):
        code, out, err = support.run_vaurien(['--version'])
        self.assertEqual((code, out.strip()), (0, 'vaurien %s'
                                               % vaurien.__version__))

    def test_list_shows_plugins_origins_and_defaults(self):
        code, out, err = support.run_vaurien(['--list'])
        self.assertEqual(code, 0, err)
        self.assertIn('Protocols:', out)
        self.assertRegex(out, r'tcp +built-in')
        self.assertRegex(out, r'delay +built-in')
        self.assertIn('sleep = 1.0  [float] Delay in seconds', out)
        self.assertIn('buffer = 65536  [int]', out)

    def test_help_lists_plugin_flags(self):
        code, out, err = support.run_vaurien(['--help'])
        self.assertEqual(code, 0, err)
        for flag in ('--behavior-delay-sleep', '--behavior-error-warmup',
                     '--protocol-tcp-buffer', '--stay-connected',
                     '--idle-timeout', '--seed', '--backlog'):
            self.assertIn(flag, out)


if __name__ == '__main__':
    unittest.main()
