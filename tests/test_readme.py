"""README.txt itself: its contents list the sections it has, and the
quick start's test suite runs as it reads, under pytest, against a real
redis-server."""

import os
import re
import subprocess
import sys
import unittest

from tests import support
from tests.test_plugins import readme_files


def readme_text():
    with open(os.path.join(support.ROOT, 'README.txt')) as stream:
        return stream.read()


class ContentsTest(unittest.TestCase):

    def test_contents_list_every_section_in_order(self):
        # a section added, renamed or moved must show in the contents too
        text = readme_text()
        headings = re.findall(r'^(\S.*)\n-{3,}$', text, re.M)
        block = re.search(r'^Contents\n-+\n((?:  .*\n)+)', text, re.M)
        listed = [line.strip() for line in block.group(1).splitlines()
                  if line.startswith('    ')]
        self.assertEqual(listed, [heading for heading in headings
                                  if heading != 'Contents'])


class QuickStartTest(unittest.TestCase):
    """The quick start for test suites: test_greeting.py, written out as
    README.txt shows it, run by pytest with REDIS pointing at a
    redis-server of the test's own on a free port."""

    def test_the_quick_start_suite_passes(self):
        # the integration tests' helpers: skip with a line saying what to
        # install, or fail under CI=true
        from tests.integration import support as servers
        servers.need_module('pytest', 'pytest')
        servers.need_module('redis', 'redis')
        redis_server = servers.start_redis()
        self.addCleanup(redis_server.stop)
        code = readme_files()['test_greeting.py']
        with support.temp_dir() as folder:
            support.write(os.path.join(folder, 'test_greeting.py'), code)
            env = support.env_with_path(folder)
            env['REDIS'] = '127.0.0.1:%d' % redis_server.port
            proc = subprocess.run(
                [sys.executable, '-m', 'pytest', '-q', '-p',
                 'no:cacheprovider', 'test_greeting.py'], cwd=folder,
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assertIn('2 passed', proc.stdout)


if __name__ == '__main__':
    unittest.main()
