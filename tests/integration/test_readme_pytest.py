"""README.txt's pytest example, run by pytest itself."""

import importlib.util
import os
import subprocess
import sys
import unittest

from tests import support as stdlib_support
from tests.test_plugins import readme_files

IN_CI = os.environ.get('CI', '').strip().lower() == 'true'


class ReadmePytestExampleTest(unittest.TestCase):

    def test_pytest_example(self):
        if importlib.util.find_spec('pytest') is None:
            if IN_CI:
                raise AssertionError('missing under CI=true: pytest')
            self.skipTest('missing: Python module pytest (pip install pytest)')
        files = readme_files()
        with stdlib_support.temp_dir() as folder:
            for name in ('test_myapp.py', 'test_with_pytest.py'):
                stdlib_support.write(os.path.join(folder, name), files[name])
            proc = subprocess.run(
                [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                 'test_with_pytest.py'], cwd=folder,
                env=stdlib_support.env_with_path(folder),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assertIn('3 passed', proc.stdout)


if __name__ == '__main__':
    unittest.main()
