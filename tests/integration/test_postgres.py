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
