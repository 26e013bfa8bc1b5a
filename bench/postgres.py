"""pgbench through vaurien: plain tcp, --protocol postgres, and direct, in
the same run (issue 15's target: postgres >= 0.8x plain vaurien's TPS).

    python3 bench/postgres.py                 # 3 rounds of 10 s per case
    python3 bench/postgres.py --quick         # 1 round of 3 s
    python3 bench/postgres.py --rounds 5 --seconds 20 --clients 10

It starts a throw-away PostgreSQL 15 (Debian's postgresql, as the postgres
user when run as root: the integration tests' start_postgres), runs
`pgbench -i -s SCALE` once, then per round, interleaved: direct, vaurien
(tcp), vaurien --protocol postgres, each `pgbench -n -c CLIENTS -j 2 -T
SECONDS`, for the TPC-B-like script and the select-only one (-S: more of
the time is the proxy's).  Prints the median TPS of each and the ratios.
Run by hand on a quiet machine; never in CI.
"""

import argparse
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.integration.test_postgres import pgbench, start_postgres  # noqa

VAURIEN = os.path.join(ROOT, 'vaurien.py')


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def start_vaurien(backend_port, protocol):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, VAURIEN, '--proxy', '127.0.0.1:%d' % port,
         '--backend', '127.0.0.1:%d' % backend_port, '--protocol', protocol,
         '--log-level', 'warning'], stdin=subprocess.DEVNULL)
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit('vaurien --protocol %s did not listen' % protocol)


def tps(report):
    found = re.search(r'tps = ([0-9.]+)', report)
    failed = re.search(r'number of failed transactions: (\d+)', report)
    if failed and int(failed.group(1)):
        raise SystemExit('pgbench reports failed transactions:\n' + report)
    return float(found.group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=int, default=10)
    parser.add_argument('--clients', type=int, default=10)
    parser.add_argument('--scale', type=int, default=10)
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 3
    backend = start_postgres()
    procs = []
    try:
        variants = [('direct', backend.port)]
        for protocol in ('tcp', 'postgres'):
            proc, port = start_vaurien(backend.port, protocol)
            procs.append(proc)
            variants.append(('vaurien ' + protocol, port))
        pgbench(backend.port, ['-i', '-q', '-s', str(args.scale)])
        results = {}
        for script, extra in (('tpcb', []), ('select-only', ['-S'])):
            for _ in range(args.rounds):
                for name, port in variants:
                    report = pgbench(port, ['-n', '-c', str(args.clients),
                                            '-j', '2', '-T',
                                            str(args.seconds)] + extra)
                    results.setdefault((script, name), []).append(
                        tps(report))
        print('PostgreSQL 15 pgbench, %d clients, -T %d, scale %d, '
              '%d round(s); %s, %s, %d CPUs' % (
                  args.clients, args.seconds, args.scale, args.rounds,
                  platform.python_implementation() + ' ' +
                  platform.python_version(), platform.machine(),
                  os.cpu_count()))
        for script in ('tpcb', 'select-only'):
            medians = dict((name, statistics.median(
                results[(script, name)])) for name, _ in variants)
            line = '  %-12s' % script + ''.join(
                '  %s %8.0f tps' % (name, medians[name])
                for name, _ in variants)
            line += '   postgres/tcp %.2fx, tcp/direct %.2fx' % (
                medians['vaurien postgres'] / medians['vaurien tcp'],
                medians['vaurien tcp'] / medians['direct'])
            print(line)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        backend.stop()


if __name__ == '__main__':
    main()
