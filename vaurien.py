#!/usr/bin/env python3
"""vaurien: a chaos TCP proxy in one file.

Vaurien sits between an application and its backend and misbehaves on
purpose, so that you can see what the application does when the backend is
slow, fails, hangs or vanishes.  Everything here is standard library only:
copy this file anywhere and run it.

The life of one client connection, top down as this file reads::

    client --connect--> ProxyServer (socketserver.ThreadingTCPServer)
                             |  accept; a thread per connection: a spare
                             |  one left by an ended connection, or new
                             v
                        Connection.run()
                             |  behaviors' on_open; connect the backend
                             |  (--timeout); a Duplex of two Sides
                             v
              +-------> Connection._loop(): poll() over both Sides
              |              |  one is readable, or drained (what waited
              |              |  for it goes out), or a timer is due
              |              v
              |         Connection._step(source, dest, to_backend)
              |              |  data from the client starts an Exchange:
              |              |  the behavior mix is drawn (Picker)
              |              v
              |         Exchange.run(): the behaviors acting this way
              |             on_before_handle()      -- False: close
              |             protocol._handle()      -- False: close
              |               (on_between_handle() once the request
              |                went to the backend)
              |             on_after_handle()       -- False: close
              |             stream behaviors (Outlet): on_chunk, on_end
              |             say when each piece goes out
              +--------------+
                             |  both directions ended, or a hook said stop
                             v
                        close both sockets, log one line

A protocol that knows where requests start (``frames = True``, the
plugins of protocols/) is called for every read instead, and runs an
Exchange per request itself, so pipelined requests each meet their own
behavior.

Writes never block the loop: what a socket cannot take at once waits in
its Side, in order, while the other direction goes on; past a few MiB
waiting, the source that feeds it is not read until it drains.  When one
side fails or resets, what it sent first still reaches the other side,
then the reset does, as TCP itself would.

A *protocol* moves bytes and knows where a request ends; a *behavior* is
the misbehavior drawn for each exchange.  Both are plugins: classes with a
``name`` and an ``options`` table, registered with ``Protocol.register`` and
``Behavior.register``.  The plugins packages ``protocols`` and ``behaviors``
beside this file, the modules named with ``--plugins`` and the ini file's
``[behavior:NAME] callable = module:Class`` sections are loaded at start-up.
"""

__version__ = '2.0.0.dev0'
import argparse
import collections
import configparser
import contextlib
import errno
import fnmatch
import hmac
import http.client
import http.server
import importlib
import importlib.util
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import operator
import os
import pkgutil
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
# Run as a script, this module is ``__main__``.  Plugins ``import vaurien``:
# make that name (and the original package's module paths) point here, so
# that they see this registry and not a second copy of it.
_this = sys.modules[__name__]
sys.modules.setdefault('vaurien', _this)
HERE = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger('vaurien')


# Compatibility and platform ##############################################

# poll() has no limit on descriptor numbers, unlike select(), which fails
# on descriptors >= 1024; Windows has no poll() at all.
_HAS_POLL = hasattr(select, 'poll')
# Linux tells when a peer shut down its writing side: then a peek tells a
# last request from the bare end of the stream.
_POLLRDHUP = getattr(select, 'POLLRDHUP',
                     0x2000 if sys.platform.startswith('linux') else 0)
# poll()'s events, with the values select.poll uses (where it exists)
_POLLIN = getattr(select, 'POLLIN', 1)
_POLLPRI = getattr(select, 'POLLPRI', 2)
_POLLOUT = getattr(select, 'POLLOUT', 4)
_POLLERR = getattr(select, 'POLLERR', 8)
_POLLHUP = getattr(select, 'POLLHUP', 16)
_IN_EVENTS = _POLLIN | _POLLPRI
_READ_EVENTS = _IN_EVENTS | _POLLRDHUP
_NOT_POLLOUT = ~_POLLOUT
# Writes never block a connection's thread: a send that would wait
# returns at once (MSG_DONTWAIT; without it, sockets are made non-blocking).
_DONTWAIT = getattr(socket, 'MSG_DONTWAIT', 0)
#: reads the tcp fast path makes on one readable event, while each comes
#: full (the other direction waits for the next poll meanwhile)
_READS_PER_STEP = 8
# Linux tells how much a socket still holds for its peer, unacknowledged:
# a reset waits for it to be delivered, as the reset would throw it away.
try:
    import fcntl
    import termios
    _TIOCOUTQ = termios.TIOCOUTQ
except (ImportError, AttributeError):
    _TIOCOUTQ = None


# Errors ##################################################################

class VaurienError(ValueError):
    """A mistake in what the user asked for: one line, no traceback.

    A ValueError, as Vaurien 1.x's errors were: code written for it says
    ``except ValueError``.

    *field* names what was wrong (an option, 'name', 'backend') for the
    control API's error answers.
    """

    def __init__(self, message, field=None):
        Exception.__init__(self, message)
        self.field = field


class PluginError(VaurienError):
    """A plugin module that cannot be loaded or clashes with another."""


# Options #################################################################

_TRUE = ('1', 'true', 'yes', 'on', 'y')
_FALSE = ('0', 'false', 'no', 'off', 'n')
_TYPE_WORDS = {int: 'a whole number', float: 'a number', bool: 'true or false',
               str: 'a string'}


def parse_bool(value):
    """``True``/``False`` from a bool or from words like yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(value)


def convert_value(value, type_):
    """Convert *value* (often a string from the command line or an ini
    file, or a JSON value) to *type_*; ValueError when it does not fit."""
    if type_ is bool:
        return parse_bool(value)
    if isinstance(value, bool) and type_ in (int, float):
        raise ValueError(value)
    if type_ is int and isinstance(value, float):
        # int() of an infinity raises OverflowError: a ValueError here
        if not math.isfinite(value) or value != int(value):
            raise ValueError(value)
        return int(value)
    if type_ in (int, float) and isinstance(value, str):
        value = value.strip()
    return type_(value)


class Range(object):
    """The numbers an option accepts, from *low* to *high*, both
    included; *unit* names them in messages, ``--help`` and ``--list``.

    Put it where an option's choices go: ``'sleep': ("Delay in seconds",
    float, 1.0, Range(0, 3600, 'seconds'))``.
    """

    def __init__(self, low, high, unit=''):
        self.low = low
        self.high = high
        self.unit = unit

    def __contains__(self, value):
        # False for NaN, which compares false with everything
        return self.low <= value <= self.high

    def problem(self, value):
        """What is wrong with *value* ('must be 0 or more ...'), or
        None when it is in range."""
        if value in self:
            return None
        if value != value:
            need = 'a finite number'
        elif value < self.low:
            need = '%s or more' % _show(self.low)
        else:
            need = '%s or less' % _show(self.high)
        return 'must be %s (%s), not %s' % (need, self, _show(value))

    def __str__(self):
        return ('from %s to %s %s' % (_show(self.low), _show(self.high),
                                      self.unit)).rstrip()

    def __repr__(self):
        return 'Range(%r, %r, %r)' % (self.low, self.high, self.unit)


def _show(value):
    """A value as people write it: 3600, 0.001, 1e+308, localhost:80."""
    if isinstance(value, float) and value.is_integer() and \
            abs(value) < 1e16:
        return '%d' % value
    if isinstance(value, str):
        return value or "''"
    return repr(value)


def _clip(text, size=60):
    """*text* cut short for a message: a value may be a whole file."""
    text = str(text)
    return text if len(text) <= size else text[:size] + '...'


def _option_spec(option):
    """``(description, type, default, choices)`` of an options-table entry;
    choices is None, a tuple of the values allowed, or a Range."""
    description, type_, default = option[:3]
    choices = option[3] if len(option) > 3 else None
    return description, type_, default, choices


def _describe_choices(choices):
    if isinstance(choices, Range):
        return str(choices)
    return 'one of %s' % ', '.join(map(str, choices))


#: The longest delay an option may ask for, in seconds: an hour.  Longer
#: is a connection that never comes back, which ``hang`` says plainly.
MAX_DELAY = 3600
#: The range of an option that is a delay in milliseconds.
DELAY_MS = Range(0, MAX_DELAY * 1000, 'milliseconds')
#: Options every behavior takes, beside its own: where and when it applies.
COMMON_OPTIONS = {
    'direction': ("Data the behavior acts on: both ways, upstream (client "
                  "to backend) or downstream", str, 'both',
                  ('both', 'upstream', 'downstream')),
    'scope': ("Draw the behavior for each exchange, or once per connection "
              "for the connection's whole life", str, 'exchange',
              ('exchange', 'connection')),
    'after': ("Pass the first N exchanges of each connection untouched",
              int, 0, Range(0, 10 ** 9, 'exchanges')),
    'every': ("Apply only to every Nth exchange of a connection (1: each)",
              int, 1, Range(1, 10 ** 9, 'exchanges')),
    'times': ("Apply at most N times per connection (0: no limit)", int, 0,
              Range(0, 10 ** 9)),
    'clients': ("Apply only to clients from these addresses or networks, "
                "comma-separated, e.g. 10.0.0.0/8,::1 (empty: every client)",
                str, ''),
    'match': ("Apply only to requests that match: patterns separated by |, "
              "each words with * and ? (INCR | SET | POST /payments*), or "
              "re: and a regular expression (empty: every request; needs a "
              "protocol that frames requests)", str, ''),
}
_option_tables = {}


def option_table(cls):
    """Every option of plugin *cls*: its own and, for behaviors, the
    common ones.  Shared: read it, never change it."""
    known = _option_tables.get(cls)
    if known is not None and known[0] is cls.options:
        return known[1]
    table = cls.options
    if issubclass(cls, Dummy):
        table = dict(COMMON_OPTIONS)
        table.update(cls.options)
    # behaviors read their options on every exchange: build this once
    _option_tables[cls] = (cls.options, table)
    return table


def _check_common(cls, values):
    if values['direction'] not in cls.directions:
        raise ValueError("option 'direction' must be %s: this behavior acts "
                         "on requests" % ' or '.join(cls.directions))
    _parse_networks(values['clients'])
    if values['match'] and any(
            getattr(cls, hook, None) is not getattr(Dummy, hook)
            for hook in ('on_open', 'activate')):
        raise ValueError("option 'match': this behavior acts before any "
                         "request (when a connection opens, or on the whole "
                         "proxy)")
    RequestMatch.parse(values['match'])


class RequestMatch(object):
    """The option ``match``: which requests a behavior applies to.

    A framed protocol describes each request in a line of text (see
    ``BaseProtocol.matches_requests``): the Redis command and its
    arguments, the HTTP request line (its header lines follow, one per
    line), the SQL statement, the memcache or SMTP command line.  A match
    is patterns separated by ``|``, any of which may match:

    * words, compared with the request's first words, one for one, with
      fnmatch's ``*``, ``?`` and ``[...]``: ``COMMIT``, ``SET session:*``,
      ``POST /payments*``.  The first word (the command) is compared
      without regard to case, the others as they are.  A request may
      have more words than the pattern.
    * ``re:`` and a regular expression, searched in the whole description
      (it runs to the end of the text, ``|`` included): ``re:^(GET|SET)
      user:[0-9]+``, ``re:(?im)^X-Chaos: on``.
    """

    __slots__ = ('text', '_tests')

    def __init__(self, text):
        self.text = text
        self._tests = []
        rest = text
        while rest.strip():
            part, bar, tail = rest.partition('|')
            part = part.strip()
            if part.startswith('re:'):
                expression = rest.strip()[3:]
                try:
                    self._tests.append(re.compile(expression).search)
                except re.error as exc:
                    raise ValueError("option 'match': re:%s is not a regular "
                                     "expression (%s)" % (expression, exc))
                break
            if not part:
                raise ValueError("option 'match': an empty pattern in %r "
                                 "(patterns are separated by |)" % text)
            words = [re.compile(fnmatch.translate(word),
                                re.IGNORECASE if not index else 0).match
                     for index, word in enumerate(part.split())]
            self._tests.append(self._words_test(words))
            rest = tail
            if not bar:
                break

    @staticmethod
    def _words_test(patterns):
        count = len(patterns)

        def test(description):
            words = description.split(None, count)
            if len(words) < count:
                return False
            for pattern, word in zip(patterns, words):
                if pattern(word) is None:
                    return False
            return True
        return test

    @classmethod
    def parse(cls, text):
        """A RequestMatch for *text*, None when it is empty; ValueError
        when it is malformed."""
        return cls(text) if text.strip() else None

    def __call__(self, description):
        """Whether the request *description* (None: not a request the
        protocol framed) matches."""
        if description is None:
            return False
        for test in self._tests:
            if test(description):
                return True
        return False

    def __repr__(self):
        return 'RequestMatch(%r)' % self.text


def _parse_networks(text):
    networks = []
    for part in text.split(','):
        part = part.strip()
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError("option 'clients': %r is not an address or "
                                 "network (e.g. 10.0.0.0/8, 127.0.0.1, ::1)"
                                 % part)
    return networks


def validate_options(kind, cls, values):
    """Check and convert a mapping of option values for plugin *cls*.

    Returns a new dict; raises VaurienError naming the plugin, the option
    and what is wrong.
    """
    result = {}
    label = "%s '%s'" % (kind, cls.name)
    table = option_table(cls)
    for key, raw in values.items():
        name = key.replace('-', '_')
        if name not in table:
            known = ', '.join(sorted(table)) or 'none'
            raise VaurienError("%s has no option '%s' (its options: %s)"
                               % (label, key, known), key)
        _, type_, _, choices = _option_spec(table[name])
        try:
            value = convert_value(raw, type_)
        except (TypeError, ValueError, OverflowError):
            raise VaurienError("%s: option '%s' must be %s, not %r"
                               % (label, name, _TYPE_WORDS.get(
                                   type_, type_.__name__), _clip(raw)), name)
        # out of range: no field, like check_options' errors (the API's
        # answers have always named none for those)
        if type_ is float and not math.isfinite(value):
            # nothing waits NaN or infinite seconds: refused for every float
            raise VaurienError("%s: option '%s' must be a finite number%s, "
                               "not %r" % (label, name, ' (%s)' % choices
                                           if isinstance(choices, Range)
                                           else '', _clip(raw)))
        if isinstance(choices, Range):
            problem = choices.problem(value)
            if problem is not None:
                raise VaurienError("%s: option '%s' %s" % (label, name,
                                                           problem))
        elif choices is not None and value not in choices:
            raise VaurienError("%s: option '%s' must be one of %s, not %r"
                               % (label, name, ', '.join(map(str, choices)),
                                  _clip(raw)), name)
        result[name] = value
    checkers = [getattr(cls, 'check_options', None)]
    if table is not cls.options:
        checkers.append(lambda values: _check_common(cls, values))
    merged = dict((k, _option_spec(v)[2]) for k, v in table.items())
    merged.update(result)
    for checker in checkers:
        try:
            if checker is not None:
                checker(merged)
        except ValueError as exc:
            raise VaurienError('%s: %s' % (label, exc))
    return result


# Addresses ###############################################################

def parse_address(text, what='address', allow_zero=False):
    """``'host:port'`` or ``'[v6]:port'`` -> ``(host, port)``."""
    text = str(text).strip()
    example = ' (expected HOST:PORT, e.g. localhost:8000 or [::1]:8000)'
    host, sep, port = text.rpartition(':')
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    elif ':' in host:
        raise VaurienError('malformed %s %r: put an IPv6 address in '
                           'brackets, e.g. [::1]:8000' % (what, text))
    if not sep or not host or not port.isdigit():
        raise VaurienError('malformed %s %r%s' % (what, _clip(text), example))
    number = int(port)
    if not (0 if allow_zero else 1) <= number <= 65535:
        raise VaurienError('malformed %s %r: port must be 1-65535%s'
                           % (what, _clip(text), ' (0 picks a free port)'
                              if allow_zero else ''))
    return check_host(host, what), number


# a DNS label: letters, digits, hyphens inside; underscores too, which
# real names have (docker compose services, SRV-style names)
_LABEL = re.compile(r'(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z')


def check_host(host, what='host'):
    """*host* when it is an IP address or a valid DNS name (labels of 1 to
    63 letters, digits, '-' or '_', 253 characters at most; non-ASCII
    names as IDNA); VaurienError otherwise."""
    try:
        ipaddress.ip_address(host.partition('%')[0])   # fe80::1%eth0
        return host
    except ValueError:
        pass
    try:
        name = host.encode('idna').decode('ascii')
    except UnicodeError:
        name = None
    if name is not None and name.endswith('.'):
        name = name[:-1]                # a fully qualified name
    if not name or len(name) > 253 or not all(
            _LABEL.match(label) for label in name.split('.')):
        raise VaurienError('%s: %r is neither an IP address nor a host name '
                           '(letters, digits, - and _ in dot-separated parts '
                           'of 63 at most)' % (what, _clip(host)))
    return host


def _local_ip(address):
    """Whether *address* (an ipaddress object) is one of this host's."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


def _ip(text):
    address = ipaddress.ip_address(text.partition('%')[0])
    return getattr(address, 'ipv4_mapped', None) or address


def loops_back(listen, backend):
    """Whether connecting to *backend* ``(host, port)`` reaches the
    listener bound at *listen* (its real address, as ``getsockname``
    says): a proxy would then connect to itself, again and again, until
    it runs out of descriptors."""
    if listen[1] != backend[1]:
        return False
    try:
        found = socket.getaddrinfo(backend[0], backend[1], 0,
                                   socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False        # not resolvable now: not ourselves, so far
    bound = _ip(listen[0])
    for info in found:
        address = _ip(info[4][0])
        if address.is_unspecified:      # connecting to 0.0.0.0 is local
            address = ipaddress.ip_address('::1' if address.version == 6
                                           else '127.0.0.1')
        if address == bound:
            return True
        # 0.0.0.0 takes every local IPv4 address; :: every local one
        if bound.is_unspecified and (bound.version == 6 or
                                     address.version == 4):
            if _local_ip(address):
                return True
    return False


def check_not_self(server, backend, what='backend'):
    """VaurienError when *backend* is *server*'s own listening address."""
    if backend is not None and loops_back(server.server_address, backend):
        raise VaurienError('%s %s is this proxy itself (it listens on %s): '
                           'it would connect to itself without end; give '
                           "the real service's address" % (
                               what, format_address(backend),
                               format_address(server.server_address)),
                           'backend')


def format_address(address):
    host, port = address[:2]
    if ':' in host:
        return '[%s]:%d' % (host, port)
    return '%s:%d' % (host, port)


# Settings ################################################################

_LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')


class Setting(object):
    """One core setting, declared once: its flag (``--idle-timeout``),
    its ini key (``idle_timeout`` in [vaurien]; *statsd*: its key in
    [statsd] too), its type, default and help, and the values it accepts:
    *limits* (a Range), and *check*, called with the converted value,
    which returns the value to keep or raises VaurienError."""

    def __init__(self, name, default, help, metavar=None, type=str,
                 limits=None, check=None, statsd=None, ignored=None):
        self.name = name
        self.flag = '--' + name.replace('_', '-')
        #: the flag's other spellings: Vaurien 1.x's --statsd.host...
        self.aliases = ['--statsd.' + statsd.replace('_', '-')] if statsd \
            else []
        self.default = default
        self.help = help
        self.metavar = metavar
        self.type = type
        self.limits = limits
        self.check = check
        self.statsd = statsd
        #: why a Vaurien 1.x setting that means nothing any more is
        #: accepted, and ignored with a warning at start-up
        self.ignored = ignored

    def help_text(self):
        """The --help line: the help, the default and the range."""
        notes = []
        if self.default is not None and self.default is not False and \
                self.default != '':
            notes.append('default %s' % _show(self.default))
        if self.limits is not None:
            notes.append(str(self.limits))
        return '%s (%s)' % (self.help, '; '.join(notes)) if notes \
            else self.help

    def convert(self, value, where):
        """*value* (text from the command line or the ini file, or a Python
        value) converted and checked; VaurienError naming *where* and the
        setting otherwise."""
        if value is None:
            return None
        try:
            value = convert_value(value, self.type)
        except (TypeError, ValueError, OverflowError):
            raise VaurienError('%s: setting %r must be %s, not %r' % (
                where, self.name, _TYPE_WORDS[self.type], _clip(value)))
        if self.type is float and not math.isfinite(value):
            raise VaurienError('%s: %s must be a finite number (%s), not %r'
                               % (where, self.name, self.limits, value))
        if self.limits is not None:
            problem = self.limits.problem(value)
            if problem is not None:
                raise VaurienError('%s: %s %s' % (where, self.name, problem))
        if self.check is not None:
            try:
                value = self.check(value)
            except VaurienError as exc:
                raise VaurienError('%s: %s' % (where, exc))
        return value


def _check_log_level(level):
    level = level.strip().lower()
    if level not in _LOG_LEVELS:
        raise VaurienError('unknown log level %r (use one of %s)'
                           % (_clip(level), ', '.join(_LOG_LEVELS)))
    return level


def _check_prefix(prefix):
    # the statsd line is PREFIX.NAME:COUNT|c, in ASCII
    if not prefix or not all(c.isalnum() and ord(c) < 128 or c in '._-'
                             for c in prefix):
        raise VaurienError('statsd prefix %r: use letters, digits and '
                           '._- only, e.g. vaurien' % _clip(prefix))
    return prefix


def _check_token(token):
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise VaurienError('the control API token must be one or more '
                           'printable characters without spaces (leave '
                           '--http-token out for no token)')
    return token


def _check_proxy(text):
    parse_address(text, 'proxy address', allow_zero=True)
    return text


def _check_backend(text):
    parse_address(text, 'backend address')
    return text


def _check_cpu(text):
    _cpu_choice(text)
    return text


def _check_workers(text):
    worker_count(text)
    return text


#: Every core setting; build_parser, load_settings and build_server read
#: this, and nothing else says a default, a type or a help text.
SETTINGS = [
    Setting('proxy', 'localhost:8000', 'address to listen on; port 0 picks '
            'a free one', 'HOST:PORT', check=_check_proxy),
    Setting('backend', 'localhost:80', 'address of the backend',
            'HOST:PORT', check=_check_backend),
    Setting('protocol', 'tcp', 'protocol plugin', 'NAME'),
    Setting('behavior', 'dummy', 'behavior mix, PERCENT:NAME[,...], e.g. '
            '20:delay,5:error; the rest is dummy', 'MIX'),
    Setting('timeout', 30.0, 'seconds allowed to connect to the backend; '
            '0: no limit', 'SECONDS', float, Range(0, MAX_DELAY, 'seconds')),
    Setting('idle_timeout', 0.0, 'close connections quiet both ways for '
            'this many seconds; 0: never', 'SECONDS', float,
            Range(0, 86400, 'seconds')),
    Setting('stay_connected', False, 'accepted for Vaurien 1.x: '
            'connections are never cut for being quiet unless '
            '--idle-timeout says so', type=bool),
    Setting('backlog', 2048, 'listen queue length', 'N', int,
            Range(1, 65535)),
    Setting('cpu', 'auto', 'auto: run every thread on one CPU, the one '
            'vaurien starts on; a CPU number: run on that one; all: let the '
            'system spread the threads', 'CPU', check=_check_cpu),
    Setting('seed', None, 'seed for every random choice: the same seed and '
            'traffic make the same choices', 'SEED'),
    Setting('workers', '1', 'processes that serve the connections, behind '
            'each listening port; auto: one per CPU vaurien may use',
            'N', check=_check_workers),
    Setting('plugins', '', 'extra plugin modules to import '
            '(comma-separated)', 'MODULE[,MODULE]'),
    Setting('log_level', 'info', 'debug, info, warning, error or critical',
            'LEVEL', check=_check_log_level),
    Setting('log_output', '-', "'-' or stderr, stdout, or a file path",
            'FILE'),
    Setting('statsd', False, 'send counters to statsd', type=bool,
            statsd='enabled'),
    Setting('statsd_host', 'localhost', 'statsd host', 'HOST',
            check=lambda host: check_host(host, 'statsd host'),
            statsd='host'),
    Setting('statsd_port', 8125, 'statsd UDP port', 'PORT', int,
            Range(1, 65535), statsd='port'),
    Setting('statsd_prefix', 'vaurien', 'prefix of the statsd counters',
            'PREFIX', check=_check_prefix, statsd='prefix'),
    Setting('statsd_sample_rate', 1.0, 'share of the counts sent to '
            'statsd (each with @RATE, as statsd clients do)', 'RATE', float,
            Range(0.001, 1), statsd='sample_rate'),
    Setting('http', False, 'serve the control API (REST, JSON) to read and '
            'change the behavior live', type=bool),
    Setting('http_host', '127.0.0.1', 'address of the control API', 'HOST',
            check=lambda host: check_host(host, 'control API host')),
    Setting('http_port', 8080, 'port of the control API; 0 picks a free '
            'one', 'PORT', int, Range(0, 65535)),
    Setting('http_token', None, 'require this bearer token on the control '
            'API', 'TOKEN', check=_check_token),
    Setting('ready_file', None, 'once listening, write the real addresses '
            'there as JSON (for scripts that start vaurien on port 0)',
            'FILE'),
    # Vaurien 1.x's, with no meaning any more: accepted, and ignored
    Setting('bufsize', None, '', 'BYTES', int, Range(1, 1 << 24, 'bytes'),
            ignored='each protocol reads with its own buffer option, e.g. '
            '--protocol-tcp-buffer'),
    Setting('pool_max_size', None, '', 'N', int, Range(0, 10 ** 6),
            ignored='vaurien keeps no pool of backend connections: each '
            'client has its own'),
    Setting('pool_timeout', None, '', 'SECONDS', float,
            Range(0, MAX_DELAY, 'seconds'), ignored='vaurien keeps no pool '
            'of backend connections'),
    Setting('sync', None, '', type=bool, ignored='every connection runs '
            'in a thread of its own, with no event loop to make '
            'synchronous'),
]
_SETTINGS = collections.OrderedDict((s.name, s) for s in SETTINGS)
#: The default of each core setting.
DEFAULTS = collections.OrderedDict((s.name, s.default) for s in SETTINGS)
#: The name of the proxy that the command line and [vaurien] set up.
DEFAULT_PROXY = 'vaurien'


def check_settings(settings, where='settings'):
    """Every core setting of *settings* (a mapping; those missing take
    their default) converted and checked, as a new OrderedDict."""
    return collections.OrderedDict(
        (name, setting.convert(settings.get(name, setting.default), where))
        for name, setting in _SETTINGS.items())


# Plugin registry #########################################################

class Registry(object):
    """The plugins of one kind, by name.

    ``register(cls)`` is what a plugin module calls at import time; two
    different classes under one name are an error naming both modules.  As
    in Vaurien 1.x, whose registries took any class with a name and the
    hooks, a class need not derive from the kind's base class (``base``,
    set once it is defined): it gets the base's defaults for what it
    lacks.
    """

    #: the base class of the kind's plugins, and the hooks that make a
    #: class a plugin of the kind (any one of them)
    base, hooks = None, ()

    def __init__(self, kind):
        self.kind = kind
        self._plugins = {}
        self._lock = threading.Lock()

    def register(self, cls, name=None):
        if not isinstance(cls, type):
            raise PluginError('%r is not a %s class' % (cls, self.kind))
        name = name or getattr(cls, 'name', None)
        if not name:
            raise PluginError('%s class %s.%s has no name' % (
                self.kind, cls.__module__, cls.__name__))
        if self.base is not None and not issubclass(cls, self.base):
            cls = self._adopt(cls)
        if name != getattr(cls, 'name', None):
            cls = type(cls.__name__, (cls,), {'name': name,
                                              '__module__': cls.__module__})
        with self._lock:
            old = self._plugins.get(name)
            if old is not None and not _same_class(old, cls):
                raise PluginError(
                    "two %ss are named '%s': one in %s, one in %s "
                    "(rename one of them)" % (self.kind, name,
                                              plugin_origin(old),
                                              plugin_origin(cls)))
            self._plugins[name] = cls
        return cls

    def _adopt(self, cls):
        """A subclass of *cls* and the base: the base's defaults for what
        *cls* lacks, and both __init__ methods."""
        if not any(callable(getattr(cls, hook, None)) for hook in self.hooks):
            raise PluginError('%s.%s is not a %s: it has none of the methods '
                              '%s' % (cls.__module__, cls.__name__, self.kind,
                                      ', '.join(self.hooks)))
        base = self.base
        own_init = cls.__init__ if cls.__init__ is not object.__init__ \
            else None

        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            if own_init is not None:
                own_init(self, *args, **kwargs)
        namespace = {'__init__': __init__, '__module__': cls.__module__,
                     '__doc__': cls.__doc__}
        if base is BaseProtocol and not callable(getattr(cls, '_handle',
                                                         None)):
            # a 1.x protocol that does everything in __call__
            namespace['_handle'] = lambda self, source, dest, to_backend: \
                cls.__call__(self, source, dest, to_backend)
        return type(cls.__name__, (cls, base), namespace)

    def unregister(self, name):
        self._plugins.pop(name, None)

    def get(self, name):
        try:
            return self._plugins[name]
        except KeyError:
            raise VaurienError("unknown %s '%s' (known: %s)" % (
                self.kind, name, ', '.join(self.names())), 'name')

    def names(self):
        return sorted(self._plugins)

    def items(self):
        return sorted(self._plugins.items())

    def __contains__(self, name):
        return name in self._plugins

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self._plugins)


def _same_class(a, b):
    if a is b:
        return True
    # the same module imported twice (say as __main__ and as vaurien)
    return (a.__qualname__ == b.__qualname__ and
            plugin_origin(a) == plugin_origin(b))


def plugin_origin(cls):
    """Where a plugin comes from: 'built-in' or its module and file."""
    module = sys.modules.get(cls.__module__)
    if module is _this:
        return 'built-in'
    path = getattr(module, '__file__', None)
    if path:
        return '%s (%s)' % (cls.__module__, os.path.relpath(path)
                            if not os.path.isabs(path) else path)
    return cls.__module__


Protocol = Registry('protocol')
Behavior = Registry('behavior')


def get_protocols():
    """Name -> protocol class, for every registered protocol."""
    return dict(Protocol.items())


def get_behaviors():
    """Name -> behavior class, for every registered behavior."""
    return dict(Behavior.items())


class _Configurable(object):
    """What protocols and behaviors share: the options table and its
    values."""

    #: The name the plugin is known under (``--protocol NAME``,
    #: ``--behavior 10:NAME``).
    name = None
    #: ``{option: (description, type, default[, choices])}``: one sentence
    #: with the unit, the type (int, float, bool, str) and the default.
    options = {}

    def update_settings(self, settings):
        """Set option values (already checked by ``validate_options``)."""
        self.settings.update(settings)

    def option(self, name):
        """The value of option *name*, or its default."""
        table = option_table(type(self))
        # called on every exchange: a default, not a caught KeyError
        value = self.settings.get(name, table)
        if value is table:
            return table[name][2]
        type_ = table[name][1]
        if isinstance(value, type_) or value is None:
            return value
        return convert_value(value, type_)


def check_for_protocol(protocol_class, behavior):
    """VaurienError when *protocol_class* cannot serve *behavior* (each
    part of a composite) as its options say (see
    ``BaseProtocol.check_behavior``)."""
    for part in getattr(behavior, 'parts', [behavior]):
        try:
            protocol_class.check_behavior(part)
        except ValueError as exc:
            raise VaurienError("behavior '%s': %s" % (part.name, exc))


# Plugin discovery ########################################################

# (installed name, name beside vaurien.py in the source folder)
PLUGIN_PACKAGES = (('vaurien_protocols', 'protocols'),
                   ('vaurien_behaviors', 'behaviors'))


def _import_module(name, what):
    try:
        return importlib.import_module(name)
    except PluginError:
        raise
    except BaseException as exc:
        # KeyboardInterrupt and SystemExit too: a plugin's mistake, said
        # in one line like any other
        raise PluginError("%s '%s' failed to import: %s" % (
            what, name, _exception_text(exc)))


def _exception_text(exc):
    """'RuntimeError: oops', or 'KeyboardInterrupt' when it says nothing."""
    text = str(exc)
    return '%s: %s' % (type(exc).__name__, text) if text else \
        type(exc).__name__


def _plugin_package(installed, local):
    """The package holding bundled plugins: installed under its
    ``vaurien_`` name, or the folder beside this file."""
    for name in (installed, local):
        folder = os.path.join(HERE, name)
        if not os.path.isfile(os.path.join(folder, '__init__.py')):
            continue
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(
                name, os.path.join(folder, '__init__.py'),
                submodule_search_locations=[folder])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException as exc:
                del sys.modules[name]
                raise PluginError("plugin package '%s' failed to import: %s"
                                  % (folder, _exception_text(exc)))
        return module
    return None


_bundled_loaded = []


def _load_bundled_plugins():
    """The bundled plugins, once per process (see load_plugins)."""
    if not _bundled_loaded:
        load_plugins()


def load_plugins(modules=(), callables=()):
    """Import every bundled plugin module, the *modules* a user names, and
    the *callables* ``(kind, name, 'module:Class')`` of ini sections."""
    _bundled_loaded.append(True)
    for installed, local in PLUGIN_PACKAGES:
        package = _plugin_package(installed, local)
        if package is None:
            continue
        for info in sorted(pkgutil.iter_modules(package.__path__),
                           key=lambda info: info[1]):
            if not info[1].startswith('_'):
                _import_module('%s.%s' % (package.__name__, info[1]),
                               'plugin module')
    for name in modules:
        name = name.strip()
        if name:
            _import_module(name, 'plugin module')
    for kind, name, where in callables:
        registry = Protocol if kind == 'protocol' else Behavior
        module_name, sep, attr = where.strip().partition(':')
        if not sep:
            module_name, _, attr = where.strip().rpartition('.')
        if not module_name or not attr:
            raise PluginError("[%s:%s] callable = %r: expected module:Class"
                              % (kind, name, where))
        module = _import_module(module_name, 'plugin module')
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise PluginError("[%s:%s] callable = %r: %s has no %s class %r"
                              % (kind, name, where, module_name, kind, attr))
        try:
            registry.register(cls, name)
        except PluginError as exc:
            raise PluginError('[%s:%s] callable = %r: %s'
                              % (kind, name, where, exc))


# Protocols ###############################################################

class BaseProtocol(_Configurable):
    """Moves bytes between the client and the backend.

    One instance serves one client connection (``self.connection``), so a
    protocol may keep parser state in ``self``.  Subclasses implement
    ``_handle``, which the engine calls each time the client or the
    backend socket is readable, between the hooks of the exchange's
    behaviors: data from the client starts a new exchange (the behavior
    mix is drawn), data from the backend belongs to the current one.  A
    protocol that knows where requests start (``frames = True``) is called
    for every read instead, and starts an exchange per request itself: see
    ``Connection.start_exchange`` and ``protocols/_framing.py``.

    The sockets it is given are the connection's Sides: their ``sendall``
    never blocks (what the kernel cannot take waits, in order), every
    other public attribute is the socket's.
    """

    options = {
        'buffer': ("Bytes read from a socket at a time", int, 65536,
                   Range(1, 1 << 24, 'bytes')),
        'keep_alive': ("Turn on TCP keep-alive probes on both sockets, for "
                       "long quiet connections", bool, False),
        'reuse_socket': ("Accepted for Vaurien 1.x configurations; no "
                         "effect (each client gets its own backend "
                         "connection)", bool, False),
    }
    #: True for a protocol that starts an exchange per request itself
    frames = False
    #: The codes this protocol can answer for the error behavior's option
    #: ``code`` (a Range, or any container that says what it holds when
    #: printed); None: it has no codes, and ignores the option.
    error_codes = None
    #: whether the protocol describes each request it frames (what the
    #: option ``match`` compares with: see RequestMatch)
    matches_requests = False

    @classmethod
    def check_behavior(cls, behavior):
        """Called with each behavior of a mix (its options set) before
        the mix is put in force, at start-up and on each change: raise
        ValueError when this protocol cannot do what the options ask.
        The default refuses an error code outside ``error_codes``."""
        if behavior.match is not None and not cls.matches_requests:
            raise ValueError("option 'match' needs a protocol that frames "
                             "requests (http, redis, memcache, mysql, smtp, "
                             "postgres), not '%s'" % cls.name)
        codes = cls.error_codes
        if codes is None or not isinstance(behavior, Error):
            return
        code = behavior.option('code')
        if code and code not in codes:
            raise ValueError("option 'code' must be %s for protocol '%s' "
                             "(0 picks its usual one), not %d"
                             % (codes, cls.name, code))

    def __init__(self, settings=None, proxy=None):
        self.settings = dict(settings or {})
        self.proxy = proxy
        self.logger = logger
        self.connection = None
        self._bufsize = (self.option('buffer') if 'buffer' in self.options
                         else 65536)

    def setup(self, client, backend):
        """Called once the backend is connected, before any data moves
        (subclasses that replace it call it)."""
        if self.option('keep_alive'):
            for sock in (client, backend):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def _handle(self, source, dest, to_backend):
        """Read what *source* has and pass it on to *dest*.

        Return a true value to keep the connection, False to close it.
        """
        raise NotImplementedError

    def _between(self, source, dest, to_backend):
        """Call once the request went to the backend, before its answer is
        read: runs the behaviors' ``on_between_handle``."""
        return self.connection.exchange.between(self, source, dest,
                                                to_backend)

    def _get_data(self, sock, buffer=None):
        """Read up to *buffer* bytes from *sock*; ``b''`` at end of stream.

        Waits while the socket has nothing yet, sending meanwhile what
        waits to go either way; and, read after read, while the side that
        the data goes to is full (backpressure for a protocol or hook that
        reads in a loop).
        """
        side = getattr(sock, 'side', None)
        conn = self.connection
        if side is None or conn is None or conn.backend is None:
            return _read_plain(sock, buffer or self._bufsize)
        duplex = conn.duplex
        if duplex.granted is side:
            duplex.granted = None   # the read the poller found ready
        else:
            if side.peer.full:
                duplex.make_room(side.peer)
            if conn.client.blocked or conn.backend.blocked:
                duplex.wait_readable(side)
        size = buffer or self._bufsize
        if side.peer.density:
            size = side.peer.room(size)
        while True:
            try:
                data = side.recv(size)
                break
            except (BlockingIOError, InterruptedError):
                duplex.wait_readable(side)
        if side is conn.client:
            conn.bytes_up += len(data)
        else:
            conn.bytes_down += len(data)
        return data

    def _end_of_stream(self, source, dest):
        """*source* ended its stream: pass that on as a half-close of
        *dest* and stop reading *source*.  Returns False once both
        directions have ended (the connection is done)."""
        try:
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        duplex = self.connection.duplex
        duplex.stop_reading(source.side)
        return duplex.busy()

    def _error_answer(self, behavior):
        """What the ``error`` behavior answers, in this protocol's words.

        ``None`` means the protocol has no words for an error, and random
        bytes are sent instead.
        """
        return None


def _read_plain(sock, size):
    """A plain socket's recv, waiting while a non-blocking one has
    nothing."""
    while True:
        try:
            return sock.recv(size)
        except (BlockingIOError, InterruptedError):
            wait_readable(sock)


def wait_readable(sock, timeout=None):
    """Wait until *sock* has data (or its end, or an error), at most
    *timeout* seconds (None: no limit); True if it has."""
    if _HAS_POLL:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(None if timeout is None else
                                int(math.ceil(timeout * 1000))))
    return bool(select.select([sock], [], [], timeout)[0])


class TCP(BaseProtocol):
    """Plain TCP: every byte passes as it comes, both ways at once, for the
    connection's whole life; one side's end of stream is passed on as a
    half-close."""

    name = 'tcp'

    def _handle(self, source, dest, to_backend):
        data = self._get_data(source)
        if not data:
            return self._end_of_stream(source, dest)
        dest.sendall(data)
        if to_backend:
            return self._between(source, dest, to_backend)
        return True

    def _pass_plain(self, source, dest, to_backend):
        """The fast path, which the engine takes while no behavior nor
        toxic acts (and this class's own _handle is the protocol's):
        straight through.  While reads come full and *dest* takes them
        whole, it reads on (up to _READS_PER_STEP): the poll would only
        say again that *source* is readable."""
        conn, size = self.connection, self._bufsize
        data = source.recv(size)
        reads = 1
        while data:
            dest.sendall(data)
            got = len(data)
            if to_backend:
                conn.bytes_up += got
            else:
                conn.bytes_down += got
            if dest.queue:
                # the rest waits for the kernel: read no more until it took
                # it, as a blocking send would (TCP's own backpressure)
                if not dest.full:
                    conn.duplex.hold(dest)
                return True
            if got < size or reads == _READS_PER_STEP or \
                    not source.reading or \
                    conn.server.toxics.generation != conn.toxic_draws.seen:
                return True
            if to_backend and (conn.client_ended or
                               not conn.picker.plain_next()):
                return True     # the next exchange may not be plain
            try:
                data = source.recv(size, _DONTWAIT)
            except BlockingIOError:
                return True
            reads += 1
            if data and to_backend:
                conn.start_exchange()   # each read of the client is one
        return self._end_of_stream(source, dest)


Protocol.base, Protocol.hooks = BaseProtocol, ('_handle', '__call__')
Protocol.register(TCP)


# Behaviors ###############################################################

#: A hook's answer meaning "I dealt with this data myself": the protocol's
#: ``_handle`` is skipped and the connection goes on.
HANDLED = 'handled'


class Dummy(_Configurable):
    """Passes everything through untouched.  The base of every behavior.

    One instance serves the whole proxy (every connection), from the
    moment the behavior is set until it is set again.  State of its own
    per connection it asks for with ``new_state()`` (and finds with
    ``connection.state_of(self)``); per exchange it keeps it in
    ``protocol.connection.exchange.state``, per direction of a connection
    in ``flow.state`` (stream hooks).

    Socket hooks run in the connection's thread, once per readable event,
    with the protocol instance and the two sockets (``source`` is the
    readable one; ``to_backend`` is True when it is the client).  A hook
    may read from ``source`` (with ``protocol._get_data``), write to either
    socket, sleep, or close the sockets.  What its return value means:

    - ``False``: close the connection (both sockets) now;
    - ``HANDLED`` (from ``on_before_handle``): the hook consumed the data
      itself; skip the protocol's ``_handle`` and keep the connection.  On
      a request, the rest of that request is dropped; on an answer, the
      bytes the hook read are dealt with and the rest still flows;
    - anything else (``True``, ``None``): carry on.

    Stream hooks (``on_chunk``, ``on_end``) see the bytes the protocol
    sends, one chunk at a time, and say when each piece goes out: see
    ``Flow``.  ``on_open`` runs before the backend is connected;
    ``activate``/``deactivate`` when the behavior is put in force and
    replaced.
    """

    name = 'dummy'
    options = {}
    #: The directions this behavior can be limited to (option direction).
    directions = ('both', 'upstream', 'downstream')
    # what __init__ works out (for subclasses whose __init__ skips ours)
    passive, hooks, streams, opens, whole_proxy = False, True, False, False, \
        False
    upstream = downstream = True
    scope, gated, plan, match, answers = 'exchange', False, None, None, True

    def __init__(self):
        self.settings = {}
        self.proxy = None
        cls = type(self)
        overrides = set(hook for hook in _HOOKS + _STREAM_HOOKS + _OTHER_HOOKS
                        if getattr(cls, hook) is not getattr(Dummy, hook))
        #: True when no hook is overridden: the engine skips the hooks
        self.passive = not overrides
        self.hooks = bool(overrides.intersection(_HOOKS))
        self.streams = bool(overrides.intersection(_STREAM_HOOKS))
        self.opens = 'on_open' in overrides
        self.whole_proxy = bool(overrides.intersection(
            ('activate', 'deactivate')))
        self.ready()

    def update_settings(self, settings):
        self.settings.update(settings)
        self._in_force = self._decision = None
        self.ready()

    def ready(self):
        """Read the common options once, for the engine's hot path."""
        get = self.settings.get
        direction = get('direction', 'both')
        self.upstream = direction != 'downstream'
        self.downstream = direction != 'upstream'
        self.scope = get('scope', 'exchange')
        #: the option ``match``, compiled (None: every request)
        self.match = RequestMatch.parse(get('match', ''))
        self.gated = bool(get('after') or get('every', 1) != 1 or
                          get('times') or get('clients') or self.match)
        self._networks = _parse_networks(get('clients', ''))
        self.answers = self.hooks_act_on_answers()
        self.plan = _plan([self])

    def hooks_act_on_answers(self):
        """Whether this behavior's socket hooks do anything to answers
        (data towards the client) with the options in force: when they do
        not, the engine does not call them there, and answers pass as
        under dummy.  The default: they may."""
        return True

    def acts(self, to_backend):
        """Whether this behavior acts on data going this way."""
        return self.upstream if to_backend else self.downstream

    def new_state(self):
        """This behavior's state for a new connection (None: it keeps
        none).  The engine keeps what this returns, one per connection,
        made when the behavior first asks for it with
        ``connection.state_of(self)``."""
        return None

    def on_before_handle(self, protocol, source, dest, to_backend):
        """Before the protocol reads *source*."""
        return True

    def on_between_handle(self, protocol, source, dest, to_backend):
        """After the protocol sent the client's request to the backend,
        before it relays the answer (protocols call it: see
        ``BaseProtocol._between``)."""
        return True

    def on_after_handle(self, protocol, source, dest, to_backend):
        """After the protocol passed the data on."""
        return True

    def on_chunk(self, flow, data, at):
        """One chunk of *data* on its way, available since *at* (on the
        ``time.monotonic()`` clock).  Returns the pieces to send, in order,
        as ``[(when, bytes)]``; ``[]`` swallows the chunk."""
        return [(at, data)]

    def on_end(self, flow, at):
        """The source ended its stream at *at*: returns when to pass the
        end on, or None never to."""
        return at

    def on_open(self, connection):
        """Before the backend connection is made (may sleep)."""

    def activate(self, server):
        """The behavior was put in force on *server*."""

    def deactivate(self, server):
        """The behavior was replaced on *server*."""

    def __repr__(self):
        return '<behavior %s %r>' % (self.name, self.settings)


_HOOKS = ('on_before_handle', 'on_between_handle', 'on_after_handle')
_STREAM_HOOKS = ('on_chunk', 'on_end')
_OTHER_HOOKS = ('on_open', 'activate', 'deactivate')


def _plan(parts):
    """Which of *parts* act each way: ``{to_backend: (socket hook parts,
    stream hook parts)}``, in order; what an Exchange runs.  Also
    ``{(to_backend, hook): hook methods}``: each socket hook's methods,
    without the parts that leave it as Dummy's (it does nothing)."""
    plan = {}
    for to_backend in (True, False):
        hooked = tuple(part for part in parts if part.hooks and
                       part.acts(to_backend) and
                       (to_backend or part.answers))
        plan[to_backend] = (hooked, tuple(
            part for part in parts if part.streams and part.acts(to_backend)))
        for hook in _HOOKS:
            methods = [getattr(part, hook) for part in hooked]
            plan[to_backend, hook] = tuple(
                method for method in methods
                if getattr(method, '__func__', None) is not getattr(Dummy,
                                                                    hook))
    return plan


def _matched_text(behavior, text):
    """*text*, cut to 200 characters, when *behavior* (or one of its
    parts) took its request by a match: what the decision log records."""
    if text is None:
        return None
    for part in getattr(behavior, 'parts', [behavior]):
        if part.match is not None:
            return text[:200]
    return None


def _client_in(connection, networks):
    try:
        address = ipaddress.ip_address(connection.client_address[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


class Composite(Dummy):
    """Several behaviors at once (``latency+bandwidth``): an Exchange runs
    their socket hooks in order, and their stream hooks as a pipeline, the
    first one's pieces feeding the second."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.name = '+'.join(part.name for part in self.parts)
        self.settings = {}
        self.proxy = None
        self.passive = all(part.passive for part in self.parts)
        self.hooks = any(part.hooks for part in self.parts)
        self.streams = any(part.streams for part in self.parts)
        self.opens = any(part.opens for part in self.parts)
        self.whole_proxy = any(part.whole_proxy for part in self.parts)
        self.upstream = any(part.upstream for part in self.parts)
        self.downstream = any(part.downstream for part in self.parts)
        first = self.parts[0]
        self.scope = first.scope
        self.gated = any(part.gated for part in self.parts)
        self.plan = _plan(self.parts)

    def ready(self):
        pass

    def __repr__(self):
        return '<behaviors %s>' % self.name


class Delay(Dummy):
    """Delays the answer of each exchange it is drawn for."""

    name = 'delay'
    directions = ('both', 'upstream')
    options = {
        'sleep': ("Delay in seconds (decimals allowed)", float, 1.0,
                  Range(0, MAX_DELAY, 'seconds')),
        'before': ("Wait before the request goes to the backend (true) or "
                   "after it went, before the answer is relayed (false)",
                   bool, True),
    }

    def hooks_act_on_answers(self):
        return False

    def ready(self):
        super(Delay, self).ready()
        # read once: the hooks run on every exchange
        self._before, self._sleep = self.option('before'), self.option('sleep')

    def on_before_handle(self, protocol, source, dest, to_backend):
        if to_backend and self._before:
            _sleep(self._sleep)
        return True

    def on_after_handle(self, protocol, source, dest, to_backend):
        if to_backend and not self._before:
            _sleep(self._sleep)
        return True


def _sleep(seconds):
    # sleep(0) would still hand the GIL round every thread waiting for it
    if seconds > 0:
        time.sleep(seconds)


class _Counted(Dummy):
    """Counts the exchanges it is drawn for: across the whole proxy (the
    count survives a client reconnecting), or per connection."""

    directions = ('both', 'upstream')

    def __init__(self):
        super(_Counted, self).__init__()
        self._count = 0
        self._lock = threading.Lock()
        if _COUNTERS is not None:
            # with workers, the count across the proxy is in the table
            # every process shares (see _SharedCounters)
            self._slot = _COUNTERS.take()
            if self._slot is not None:
                self._next_count = self._next_shared_count

    def new_state(self):
        return {'count': 0}     # with per_connection

    def _next_count(self, protocol):
        """0 for the first exchange this behavior is drawn for, 1 for the
        next, and so on."""
        if self.option('per_connection'):
            state = protocol.connection.state_of(self)
            number = state['count']
            state['count'] = number + 1
            return number
        with self._lock:
            number = self._count
            self._count += 1
        return number

    def _next_shared_count(self, protocol):
        """_next_count with workers: the count across the whole proxy is
        the shared table's."""
        if self.option('per_connection'):
            return _Counted._next_count(self, protocol)
        return _COUNTERS.next(self._slot)


class Error(_Counted):
    """Answers an error instead of the backend: the protocol's own error
    when it has one, random bytes otherwise (plain tcp)."""

    name = 'error'
    options = {
        'inject': ("Pass the request on, then splice random bytes into the "
                   "backend's real answer", bool, False),
        'warmup': ("Exchanges passed through untouched before the errors "
                   "start", int, 0, Range(0, 10 ** 9, 'exchanges')),
        'per_connection': ("Count warmup per connection instead of across "
                           "the whole proxy", bool, False),
        'code': ("Error code for protocols that have them (HTTP status, "
                 "MySQL error number, SMTP reply code, a PostgreSQL "
                 "SQLSTATE of digits: 40001); 0 picks the protocol's usual "
                 "one", int, 0, Range(0, 65535)),
        'message': ("Error text for protocols that have one (e.g. a Redis "
                    "'OOM command not allowed'; for PostgreSQL a SQLSTATE "
                    "or condition name first: 40P01, deadlock_detected); "
                    "empty picks the protocol's usual one", str, ''),
    }

    def ready(self):
        super(Error, self).ready()
        self._warmup = self.option('warmup')    # read once: every exchange

    def _erring(self, protocol):
        return self._next_count(protocol) >= self._warmup

    def hooks_act_on_answers(self):
        return self.option('inject')

    def on_before_handle(self, protocol, source, dest, to_backend):
        exchange = protocol.connection.exchange
        if not to_backend:
            if exchange.state.pop('inject', False):
                data = protocol._get_data(source)
                if not data:
                    return True
                dest.sendall(_splice_noise(data, protocol.connection.rng))
                return HANDLED
            return True
        if not self._erring(protocol):
            return True
        if self.option('inject'):
            exchange.state['inject'] = True
            return True
        data = protocol._get_data(source)
        if not data:
            return True       # the client's end of stream: let it through
        answer = protocol._error_answer(self)
        if answer is None:
            answer = _noise(protocol.connection.rng, 1000)
        # after whatever still waits to go to the client
        source.sendall(answer)
        return HANDLED


def _noise(rng, size):
    return bytes(bytearray(rng.getrandbits(8) for _ in range(size)))


def _splice_noise(data, rng, size=100):
    middle = len(data) // 2
    return data[:middle] + _noise(rng, size) + data[middle:]


class Transient(Error):
    """Errors for ``agitate`` exchanges (after ``warmup`` good ones), then
    passes everything: a backend that recovers."""

    name = 'transient'
    options = dict(Error.options)
    options['agitate'] = ("Exchanges that fail before the backend recovers",
                          int, 1, Range(0, 10 ** 9, 'exchanges'))

    def _erring(self, protocol):
        number = self._next_count(protocol) - self.option('warmup')
        return 0 <= number < self.option('agitate')


class Hang(Dummy):
    """Reads the request and never answers, for as long as the client
    waits (``--timeout`` does not cut it short)."""

    name = 'hang'
    directions = ('both', 'upstream')

    def on_before_handle(self, protocol, source, dest, to_backend):
        if not to_backend:
            return True
        while protocol._get_data(source):
            pass
        return False


class Blackout(Dummy):
    """Closes the client's connection at once, without a word: a clean end
    of stream (a FIN), never a reset (``reset_peer`` resets)."""

    name = 'blackout'

    def on_before_handle(self, protocol, source, dest, to_backend):
        protocol.connection.duplex.hang_up()
        return False


class Abort(Dummy):
    """Passes the request to the backend, then cuts the connection before
    the answer comes back."""

    name = 'abort'
    directions = ('both', 'upstream')

    def on_between_handle(self, protocol, source, dest, to_backend):
        return False

    def on_after_handle(self, protocol, source, dest, to_backend):
        # for protocols that never call on_between_handle
        return not to_backend


# Toxiproxy's toxics: the faults of its proxies, on the byte stream ########

_LONGEST_MS = MAX_DELAY * 1000.0


class Latency(Dummy):
    """Delays each chunk by ``latency`` milliseconds, give or take
    ``jitter``; chunks keep their order, and a delay does not cap the
    throughput (delays are pipelined, chunk by chunk).

    The delay ``d`` of each chunk, in milliseconds, with L = latency,
    J = jitter, a = shape and u drawn uniformly in [0, 1):

    - uniform: ``d = L + J * (2u - 1)``, uniform in [L - J, L + J]
      (clamped at 0);
    - normal: ``d = max(0, N(L, J))``, mean L and standard deviation J;
    - pareto: ``d = L + J * ((1 - u) ** (-1 / a) - 1)`` (Lomax: a Pareto
      tail shifted to start at L), never below L; its median is
      ``L + J * (2 ** (1 / a) - 1)`` and, for a > 1, its mean
      ``L + J / (a - 1)``.

    A chunk is due at its arrival plus its own delay; a chunk drawn a
    shorter delay than the one before it waits for it (order is kept).
    """

    name = 'latency'
    options = {
        'latency': ("Delay added to each chunk, in milliseconds", float,
                    100.0, DELAY_MS),
        'jitter': ("Spread of the delay, in milliseconds: the half-width "
                   "(uniform), the standard deviation (normal) or the "
                   "scale of the tail (pareto); 0 for none", float, 0.0,
                   DELAY_MS),
        'distribution': ("How the delay is drawn around latency", str,
                         'uniform', ('uniform', 'normal', 'pareto')),
        'shape': ("Tail index of the pareto distribution (no unit): "
                  "smaller is a heavier tail; the mean is finite above 1",
                  float, 2.0, Range(0.1, 1000)),
    }

    def delay(self, rng):
        """One chunk's delay, in seconds."""
        latency = self.option('latency')
        jitter = self.option('jitter')
        if not jitter:
            return latency / 1000.0
        distribution = self.option('distribution')
        if distribution == 'normal':
            value = rng.gauss(latency, jitter)
        elif distribution == 'pareto':
            shape = self.option('shape')
            # 1 - u is in (0, 1]: never a division by zero
            value = latency + jitter * (
                math.pow(1.0 - rng.random(), -1.0 / shape) - 1.0)
        else:
            value = latency + jitter * (2.0 * rng.random() - 1.0)
        # a tail draw may be years: no delay is longer than an hour
        return min(max(0.0, value), _LONGEST_MS) / 1000.0

    def on_chunk(self, flow, data, at):
        return [(at + self.delay(flow.rng), data)]


#: what a bandwidth piece carries at most: about this much time's worth
#: of data...
_SLOT = 0.01
#: ...between these sizes, in bytes
_MIN_PIECE = 1
_MAX_PIECE = 65536
#: seconds of credit a link keeps while it waits (a token bucket this deep):
#: it makes up for a read the proxy made late (a busy machine, a garbage
#: collection), never a lasting burst
_CREDIT = 0.05


class Bandwidth(Dummy):
    """Passes the data at ``rate`` KB/s at most (1 KB = 1000 bytes, as
    Toxiproxy), in each direction: per connection, or with ``shared``, one
    budget per direction for all the connections of the proxy.

    Data goes out in pieces of about 10 ms worth (1 byte to 64 KiB), each
    when the link has carried it; a waiting link keeps up to 50 ms of
    credit (a token bucket), which makes up for a read the proxy made
    late.  A shared link serves chunks first come, first served.
    """

    name = 'bandwidth'
    options = {
        'rate': ("Rate in KB/s (1 KB = 1000 bytes; decimals allowed), in "
                 "each direction", float, 100.0,
                 Range(0.001, 10 ** 7, 'KB/s')),
        'shared': ("One budget (per direction) for all the connections of "
                   "the proxy, instead of one per connection", bool, False),
    }

    def __init__(self):
        super(Bandwidth, self).__init__()
        self._lock = threading.Lock()
        # direction (to_backend) -> time the shared link is free again
        self._free = {True: None, False: None}

    def on_chunk(self, flow, data, at):
        rate = self.option('rate') * 1000.0        # bytes per second
        step = int(rate * _SLOT)
        step = _MIN_PIECE if step < _MIN_PIECE else min(step, _MAX_PIECE)
        size = len(data)
        if self.option('shared'):
            with self._lock:
                free = self._free[flow.to_backend]
                pieces, free = self._schedule(data, size, step, rate, at,
                                              free)
                self._free[flow.to_backend] = free
        else:
            pieces, free = self._schedule(data, size, step, rate, at,
                                          flow.state.get('free'))
            flow.state['free'] = free
        return pieces

    @staticmethod
    def _schedule(data, size, step, rate, at, free):
        """Pieces of at most *step* bytes, each due once the link has
        carried it: absolute times, so that no rounding builds up.  *free*
        is when the link is free again (None: a new link, no credit)."""
        if free is None:
            free = at
        elif free < at - _CREDIT:
            free = at - _CREDIT
        pieces = []
        for start in range(0, size, step):
            piece = data[start:start + step] if size > step else data
            free += len(piece) / rate
            pieces.append((free, piece))
        return pieces, free


class SlowClose(Dummy):
    """Delays passing on the end of a stream (a close or half-close) by
    ``delay`` milliseconds; the data before it is not delayed."""

    name = 'slow_close'
    options = {
        'delay': ("Time the end of the stream is held back, in "
                  "milliseconds", float, 1000.0, DELAY_MS),
    }

    def on_end(self, flow, at):
        return at + self.option('delay') / 1000.0


class Timeout(Dummy):
    """Swallows every byte (and the end of the stream) and closes the
    connection ``timeout`` milliseconds after the first chunk it swallowed;
    with 0, a black hole that holds the connection open forever."""

    name = 'timeout'
    options = {
        'timeout': ("Time from the first swallowed chunk to the close, in "
                    "milliseconds; 0 never closes (a black hole)", float,
                    0.0, DELAY_MS),
    }

    def new_state(self):
        return {'started': False}

    def _start(self, flow, at):
        timeout = self.option('timeout')
        if timeout > 0:
            # once per connection, whichever direction comes first
            state = flow.connection.state_of(self)
            if not state['started']:
                state['started'] = True
                flow.close(at + timeout / 1000.0)

    def on_chunk(self, flow, data, at):
        self._start(flow, at)
        return []

    def on_end(self, flow, at):
        # nothing gets through, not even the end of the stream
        self._start(flow, at)
        return None


class ResetPeer(Dummy):
    """Resets the connection (a TCP RST: the client sees "connection reset
    by peer") ``timeout`` milliseconds after its first chunk either way,
    connections already open included; data before the reset passes."""

    name = 'reset_peer'
    options = {
        'timeout': ("Time from the first chunk to the reset, in "
                    "milliseconds; 0 resets at once", float, 0.0,
                    DELAY_MS),
    }

    def new_state(self):
        return {'started': False}

    def _start(self, flow, at):
        # once per connection, whichever direction comes first
        state = flow.connection.state_of(self)
        if not state['started']:
            state['started'] = True
            flow.close(at + self.option('timeout') / 1000.0, reset=True)

    def on_chunk(self, flow, data, at):
        self._start(flow, at)
        return [(at, data)]

    def on_end(self, flow, at):
        # an end of stream counts as a first chunk, as in Toxiproxy
        self._start(flow, at)
        return at


class Slicer(Dummy):
    """Cuts the data into slices of ``average_size`` bytes, give or take
    ``size_variation`` (uniformly), each written ``delay`` microseconds
    after the one before.

    Where a slice ends does not depend on how the proxy happened to cut
    the stream in chunks: a slice that a chunk ends in goes on in the next
    chunk (its second part goes out as soon as it comes, with no delay).
    Sizes are drawn from the connection's generator (--seed).
    """

    name = 'slicer'
    options = {
        'average_size': ("Average size of a slice, in bytes", int, 64,
                         Range(1, 1 << 24, 'bytes')),
        'size_variation': ("Slice sizes vary by up to this many bytes either "
                           "way (less than average_size)", int, 32,
                           Range(0, (1 << 24) - 1, 'bytes')),
        'delay': ("Time between two slices, in microseconds", float, 1000.0,
                  Range(0, MAX_DELAY * 10 ** 6,
                                'microseconds')),
    }

    @staticmethod
    def check_options(values):
        average = values['average_size']
        if values['size_variation'] >= average:
            raise ValueError("option 'size_variation' must be less than "
                             "average_size (%d), not %r"
                             % (average, values['size_variation']))

    def on_chunk(self, flow, data, at):
        average = self.option('average_size')
        variation = self.option('size_variation')
        delay = self.option('delay') / 1e6
        rng = flow.rng
        state = flow.state
        left = state.get('left', 0)     # bytes left of the current slice
        last = state.get('when')        # when its last piece went
        pieces = []
        size = len(data)
        start = 0
        while start < size:
            if left:
                # the rest of a slice the previous chunk ended in
                when = at if last is None else max(at, last)
            else:
                left = rng.randint(average - variation, average + variation)
                when = at if last is None else max(at, last + delay)
            end = min(size, start + left)
            pieces.append((when, data[start:end]))
            left -= end - start
            start = end
            last = when
        state['left'] = left
        state['when'] = last
        return pieces


class LimitData(Dummy):
    """Passes the first ``bytes`` bytes of a stream (each direction counts
    its own), then closes the connection."""

    name = 'limit_data'
    options = {
        'bytes': ("Bytes passed in each direction before the connection "
                  "is closed", int, 1024, Range(1, 10 ** 12, 'bytes')),
    }

    def on_chunk(self, flow, data, at):
        state = flow.state
        passed = state.get('passed', 0)
        room = self.option('bytes') - passed
        if room <= 0:
            return []
        if len(data) > room:
            data = data[:room]
        state['passed'] = passed + len(data)
        if len(data) == room:
            flow.close(at)
        return [(at, data)]


Behavior.base = Dummy
Behavior.hooks = _HOOKS + _STREAM_HOOKS + _OTHER_HOOKS
for _cls in (Dummy, Delay, Error, Transient, Hang, Blackout, Abort, Latency,
             Bandwidth, SlowClose, Timeout, ResetPeer, Slicer, LimitData):
    Behavior.register(_cls)
del _cls


# The mix #################################################################

class Mix(object):
    """The behaviors in force and their shares, e.g. ``20:delay,5:error``.

    Each name has one behavior instance, built from its class and the
    option values in force; ``latency+corrupt`` is a Composite of two.  The
    remainder of 100 goes to ``dummy``.
    """

    def __init__(self, shares, instances):
        self.shares = shares            # [(name, percent)], as given
        self.instances = instances      # {name: behavior}
        bound = 0.0
        self._table = []
        for name, percent in shares:
            bound += percent
            self._table.append((bound, name, instances[name]))
        active = [(n, p) for n, p in shares if p > 0]
        self.single = None
        if len(active) == 1 and active[0][1] >= 100:
            name = active[0][0]
            behavior = instances[name]
            if behavior.scope == 'exchange' and not behavior.gated:
                self.single = (name, behavior)
        #: dummy alone: every exchange is the plain one, with no draw
        self.plain = self.single is not None and self.single[0] == 'dummy'
        self.per_connection = any(b.scope == 'connection' for _, _, b in
                                  self._table)
        #: whether a behavior of the mix has a match (requests must then
        #: be described whole: see RequestMatch)
        self.matching = any(part.match is not None
                            for part in self.behaviors())
        # behaviors that act before the backend connection is made
        self.openers = [(p, n, instances[n]) for n, p in active
                        if instances[n].opens]
        for name, percent in active:
            if instances[name].whole_proxy and (percent < 100 or
                                                '+' in name):
                raise VaurienError("behavior '%s' acts on the whole proxy: "
                                   "set it alone, at 100%%" % name, 'name')

    def draw(self, rng):
        if self.single is not None:
            return self.single
        point = rng.random() * 100
        for bound, name, behavior in self._table:
            if point < bound:
                return name, behavior
        return self._table[-1][1:]

    def behaviors(self):
        """Every behavior instance of the mix with a share above 0,
        composites' parts included."""
        for name, percent in self.shares:
            if percent > 0:
                behavior = self.instances[name]
                for part in getattr(behavior, 'parts', [behavior]):
                    yield part

    def __str__(self):
        if self.single is not None:
            return self.single[0]
        return ','.join('%s:%s' % (_number(p), n) for n, p in self.shares
                        if p > 0)


def _number(value):
    return ('%d' % value) if value == int(value) else ('%g' % value)


def parse_mix(text):
    """``'20:delay,5:blackout'`` -> ``[('delay', 20.0), ('blackout', 5.0),
    ('dummy', 75.0)]``; a bare name means 100."""
    shares = collections.OrderedDict()
    text = str(text).strip()
    if not text:
        raise VaurienError('empty behavior mix (expected PERCENT:NAME[,...],'
                           ' e.g. 20:delay,5:blackout)')
    for part in text.split(','):
        part = part.strip()
        percent, sep, name = part.rpartition(':')
        name = name.strip()
        if not sep:
            percent = '100'
        try:
            value = float(percent)
        except ValueError:
            value = -1
        if not name or not 0 <= value <= 100 or value != value:
            raise VaurienError(
                'malformed behavior mix %r at %r (expected PERCENT:NAME'
                '[,...] with percents from 0 to 100, e.g. 20:delay,5:blackout)'
                % (text, part))
        for part in name.split('+'):
            Behavior.get(part.strip())
        name = '+'.join(part.strip() for part in name.split('+'))
        if name in shares:
            raise VaurienError("behavior '%s' appears twice in the mix %r"
                               % (name, text))
        shares[name] = value
    total = sum(shares.values())
    if total > 100 + 1e-9:
        raise VaurienError('the behavior mix %r adds up to %s%%: the total '
                           'must be 100 or less' % (text, _number(total)))
    rest = 100 - total
    if rest > 1e-9:
        shares['dummy'] = shares.get('dummy', 0) + rest
    return list(shares.items())


# Toxics: behaviors on one stream of a named proxy #######################

#: Toxiproxy's toxic types: the Go struct its server decodes each into (its
#: error messages name it), and its attributes in order, listed zero-filled
#: as Toxiproxy lists them.  Every other behavior is a toxic type too, its
#: options its attributes.
TOXIPROXY_TYPES = {
    'latency': ('LatencyToxic', ('latency', 'jitter')),
    'bandwidth': ('BandwidthToxic', ('rate',)),
    'slow_close': ('SlowCloseToxic', ('delay',)),
    'timeout': ('TimeoutToxic', ('timeout',)),
    'reset_peer': ('ResetToxic', ('timeout',)),
    'slicer': ('SlicerToxic', ('average_size', 'size_variation', 'delay')),
    'limit_data': ('LimitDataToxic', ('bytes',)),
    'noop': ('NoopToxic', ()),
}


class ToxicError(VaurienError):
    """A toxic refused, in Toxiproxy's words: *status* is its HTTP
    status."""

    def __init__(self, message, status=400, field=None):
        VaurienError.__init__(self, message, field)
        self.status = status


class Toxic(object):
    """A behavior on one stream of a named proxy, as Toxiproxy has them:
    its name, its type (the behavior's name, or noop), its stream (as
    given: "UpStream" stays), its toxicity (the chance it acts on a
    connection's stream, drawn once per connection and stream) and its
    attributes (the behavior's options).

    Toxics of socket hooks (error, delay, abort...) act on requests, as
    behaviors do, whatever their stream says."""

    def __init__(self, name, type_, stream, toxicity, behavior, attributes):
        self.name = name
        self.type = type_
        self.stream = stream
        self.upstream = stream.lower() == 'upstream'
        self.toxicity = toxicity
        self.behavior = behavior
        #: the attributes given, by name (the others take their defaults)
        self.attributes = attributes
        #: bumped on each update: connections draw the toxicity again
        self.version = 0

    def listed_attributes(self):
        """The attributes, as GET lists them: Toxiproxy's types their
        fields, zero-filled, in order (and any other option set); every
        other type its own options in force."""
        values = _options_in_force(self.behavior)
        fields = TOXIPROXY_TYPES.get(self.type)
        if fields is not None:
            # Toxiproxy echoes its fields as it read them (see
            # _toxiproxy_options: the behavior may act on a value close by)
            values = dict(values)
            values.update((name, value) for name, value in
                          self.attributes.items() if name in fields[1])
            names = list(fields[1]) + sorted(
                name for name in self.attributes if name not in fields[1])
        else:
            # its own options, and the common ones given (match...)
            names = sorted(set(type(self.behavior).options).union(
                self.attributes))
        return dict((name, _json_number(values.get(name, 0)))
                    for name in names)

    def to_json(self):
        return {'attributes': self.listed_attributes(), 'name': self.name,
                'type': self.type, 'stream': self.stream,
                'toxicity': _float32(self.toxicity)}


def _json_number(value):
    """A whole float as an int (Toxiproxy's attributes are integers)."""
    if isinstance(value, float) and value == int(value) and \
            abs(value) < 1 << 53:
        return int(value)
    return value


def _float32(value):
    """*value* as Go prints a float32: its shortest form (0.1, not
    0.10000000149), a whole one without a point."""
    single = struct.unpack('f', struct.pack('f', value))[0]
    for digits in range(1, 10):
        text = '%.*g' % (digits, single)
        if struct.unpack('f', struct.pack('f', float(text)))[0] == single:
            break
    number = float(text)
    return int(number) if number == int(number) else number


class Toxics(object):
    """The toxics of one proxy, in Toxiproxy's order: those of the upstream
    stream first, then the downstream ones, each in the order added.  A
    change bumps ``generation``: an open connection sees it at its next
    chunk (see ToxicDraws), without waiting for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._toxics = []
        self.generation = 0
        self._chains = {True: (), False: ()}

    def __len__(self):
        return len(self._toxics)

    def listed(self):
        """Every toxic, upstream ones first."""
        return list(self._chains[True] + self._chains[False])

    def chain(self, upstream):
        """The toxics of one stream, in order (a tuple: safe to read from
        a connection's thread while the API changes them)."""
        return self._chains[upstream]

    def get(self, name):
        for toxic in self._toxics:
            if toxic.name == name:
                return toxic
        return None

    def add(self, toxic):
        with self._lock:
            if self.get(toxic.name) is not None:
                raise ToxicError('toxic already exists', 409)
            self._toxics.append(toxic)
            self._changed()

    def changed(self, toxic):
        """*toxic* was updated: connections draw its toxicity again."""
        with self._lock:
            toxic.version += 1
            self._changed()

    def remove(self, name):
        with self._lock:
            toxic = self.get(name)
            if toxic is None:
                raise ToxicError('toxic not found', 404)
            self._toxics.remove(toxic)
            self._changed()
        return toxic

    def clear(self):
        with self._lock:
            self._toxics = []
            self._changed()

    def _changed(self):
        self._chains = dict(
            (upstream, tuple(toxic for toxic in self._toxics
                             if toxic.upstream == upstream))
            for upstream in (True, False))
        self.generation += 1


def make_toxic(server, data, toxics=None, old=None):
    """A Toxic for *server* (a ProxyServer) from Toxiproxy's JSON object
    *data*, checked in Toxiproxy's order: the fields' JSON types, the
    stream, the type, the name's uniqueness in *toxics*, the attributes.
    With *old*, an update: the attributes merge into *old*'s, a missing
    toxicity keeps its, and name, type and stream stay."""
    for key, go_type in (('name', 'string'), ('type', 'string'),
                         ('stream', 'string'), ('toxicity', 'float32')):
        _go_field(data.get(key), (int, float) if go_type == 'float32'
                  else str, 'ToxicWrapper.' + key, go_type)
    if old is None:
        stream = data.get('stream') or 'downstream'
        if stream.lower() not in ('upstream', 'downstream'):
            raise ToxicError('stream was invalid, can be either upstream or '
                             'downstream', field='stream')
        type_ = data.get('type')
        if type_ != 'noop' and type_ not in Behavior:
            raise ToxicError('invalid toxic type', field='type')
        name = data.get('name') or '%s_%s' % (type_, stream)
        if toxics is not None and toxics.get(name) is not None:
            raise ToxicError('toxic already exists', 409)
        attributes = {}
        toxicity = 1.0
    else:
        stream, type_, name = old.stream, old.type, old.name
        attributes = dict(old.attributes)
        toxicity = old.toxicity
    if data.get('toxicity') is not None:
        toxicity = data['toxicity']
        if not 0 <= toxicity <= 1:
            raise ToxicError('toxicity must be from 0 to 1 (the chance a '
                             'connection meets the toxic), not %r'
                             % (toxicity,), field='toxicity')
    given = data.get('attributes') or {}
    fields = TOXIPROXY_TYPES.get(type_)
    struct_name = fields[0] if fields else _go_struct(type_)
    if not isinstance(given, dict):
        raise ToxicError('bad request body: json: cannot unmarshal %s into '
                         'Go struct field .attributes of type toxics.%s'
                         % (_go_kind(given), struct_name), field='attributes')
    for key, value in given.items():
        if fields is not None and key in fields[1]:
            _go_field(value, (int, float), '%s.attributes.%s'
                      % (struct_name, key), 'int64')
    attributes.update(given)
    if fields is not None:
        # Toxiproxy's defaults: every field it lists is 0 unless given;
        # where 0 means nothing (a rate, a slice's size), the behavior's
        # own default
        table = option_table(Behavior.get(type_)) if type_ != 'noop' else {}
        options = dict((key, 0) for key in fields[1]
                       if _zero_is_valid(_option_spec(table[key])[3]))
        options.update(attributes)
        _toxiproxy_options(type_, options)
    else:
        options = dict(attributes)
    if type_ == 'noop':
        behavior = server.dummy
    else:
        cls = Behavior.get(type_)
        wanted = stream.lower()
        # request behaviors act on the request, whatever the stream says
        options['direction'] = wanted if wanted in cls.directions \
            else 'both'
        try:
            behavior, _ = server.make_behavior(type_, options)
            check_for_protocol(server.protocol_class, behavior)
        except VaurienError as exc:
            raise ToxicError(str(exc), field=exc.field or 'attributes')
        if old is not None:
            # the same instance: what its connections keep (a flow's
            # state, a bandwidth's schedule) goes on
            old.behavior.update_settings(behavior.settings)
            behavior = old.behavior
    return Toxic(name, type_, stream, float(toxicity), behavior, attributes)


def _zero_is_valid(choices):
    """Whether an option whose values are *choices* (a Range, a tuple, or
    None) may be 0."""
    problem = getattr(choices, 'problem', None)
    return problem(0) is None if problem else choices is None or 0 in choices


def _toxiproxy_options(type_, options):
    """Where Toxiproxy's toxic takes a value its vaurien behavior does not,
    the nearest one the behavior takes, in *options*.

    Toxiproxy's slicer takes a size_variation as large as average_size
    (it never cuts an empty slice: toxiproxy-node-client's own tests add
    1000 and 1000); vaurien's draws sizes from average_size -
    size_variation up, and wants it below, so it gets one byte less."""
    if type_ == 'slicer':
        average = options.get('average_size')
        if isinstance(average, (int, float)) and average >= 1 and \
                options.get('size_variation') == average:
            options['size_variation'] = average - 1


def _go_struct(type_):
    return ''.join(word.capitalize() for word in type_.split('_')) + 'Toxic'


def _go_kind(value):
    """What Go's encoding/json calls a JSON value in its errors."""
    if isinstance(value, bool):
        return 'bool'
    if isinstance(value, (int, float)):
        return 'number'
    if isinstance(value, str):
        return 'string'
    if isinstance(value, list):
        return 'array'
    if isinstance(value, dict):
        return 'object'
    return 'null'


def _go_field(value, types, where, go_type):
    """Refuse a JSON value of the wrong type, in Go's words (a missing one,
    None, is no error)."""
    if value is None:
        return
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, types) and (bool in types or
                                     not isinstance(value, bool)):
        return
    raise ToxicError('bad request body: json: cannot unmarshal %s into Go '
                     'struct field %s of type %s'
                     % (_go_kind(value), where, go_type))


# The engine: the server ##################################################

class _Statsd(object):
    """Counters sent as plain statsd UDP lines; names have a bounded set
    of values (no per-connection ids)."""

    def __init__(self, host=None, port=DEFAULTS['statsd_port'],
                 prefix=DEFAULTS['statsd_prefix'],
                 sample_rate=DEFAULTS['statsd_sample_rate']):
        self.enabled = bool(host)
        self.prefix = prefix
        #: the share of counts sent, each one standing for 1/rate (statsd
        #: multiplies it back)
        self.sample_rate = sample_rate
        self._tail = '|c' if sample_rate >= 1 else '|c|@%g' % sample_rate
        if self.enabled:
            self.address = (host, port)
            self.sock = socket.socket(
                socket.AF_INET6 if ':' in host else socket.AF_INET,
                socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    def incr(self, name, count=1):
        if not self.enabled:
            return
        if self.sample_rate < 1 and random.random() >= self.sample_rate:
            return
        line = ('%s.%s:%d%s' % (self.prefix, name, count,
                                self._tail)).encode('ascii')
        try:
            self.sock.sendto(line, self.address)
        except OSError:     # closed too: a connection ending after stop
            pass

    def close(self):
        if self.enabled:
            self.sock.close()


class ProxyServer(socketserver.ThreadingTCPServer):
    """The chaos proxy: listens on *proxy*, connects each client to
    *backend*, and runs the behavior *mix* on every exchange.

    Methods for the caller: serve_forever(), shutdown(), close_all();
    set_mix() and make_behavior(); go_down() and go_up() (the ``down``
    behavior); the properties address and exchange_counts.

    Methods of socketserver this class replaces, and why:

    - serve_forever() and shutdown(): the listening socket may close and
      open again (go_down, go_up), which socketserver's loop cannot follow;
    - get_request(): out of descriptors, it waits instead of spinning;
    - process_request(): a connection's thread, once its connection has
      ended, takes the next one (ThreadingMixIn starts a thread each time);
    - server_close(): under a lock, any number of times, and the listener
      is shut down first (a close alone leaves it listening while the
      accepting thread's poll holds it);
    - fileno(): -1 while down; handle_error(): one log line.

    Class variables that may be overridden: request_queue_size (unless
    *backlog* is given), decision_log_size, grace, spare_threads and
    spare_thread_idle.
    """

    # a thread per connection, which must not keep the process alive
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default of 5 drops part of a burst of connections
    request_queue_size = DEFAULTS['backlog']
    # decisions kept in memory for GET /decisions
    decision_log_size = 10000
    # seconds a connection that is ending waits to deliver what it still
    # holds: before a reset (which throws away what the kernel holds), and
    # for a backend that takes nothing once the client's stream has ended
    grace = 2.0
    # threads kept waiting for the next connection once theirs has ended,
    # and how long one waits before it ends too (seconds)
    spare_threads = 64
    spare_thread_idle = 60.0

    def __init__(self, proxy=DEFAULTS['proxy'], backend=DEFAULTS['backend'],
                 protocol=DEFAULTS['protocol'], behavior=DEFAULTS['behavior'],
                 timeout=DEFAULTS['timeout'], idle_timeout=None, backlog=None,
                 seed=None, protocol_options=None, behavior_options=None,
                 statsd=None, name=None, listen=True, upstream=None):
        # in-process proxies find the bundled plugins as the command line
        # does, without a load_plugins() call first
        _load_bundled_plugins()
        if isinstance(proxy, str):
            proxy = parse_address(proxy, 'proxy address', allow_zero=True)
        if isinstance(backend, str):
            backend = parse_address(backend, 'backend address')
        #: where connections go: (host, port), or None when the upstream
        #: given is no address (Toxiproxy takes any: its clients then get
        #: closed)
        self.backend = tuple(backend) if backend is not None else None
        #: the upstream as given (Toxiproxy's, stored verbatim)
        self.upstream_given = upstream
        #: its name among the process's proxies (see Proxies)
        self.name = name or DEFAULT_PROXY
        #: False once disabled (Toxiproxy's enabled): no listener then
        self.enabled = bool(listen)
        self.thread = None
        self.decision_count = 0
        self.toxic_counts = collections.Counter()
        #: its toxics, Toxiproxy's way (see Toxics)
        self.toxics = Toxics()
        # checked as the command line's are (timeout and idle_timeout 0 or
        # None: no limit)
        self.timeout = _SETTINGS['timeout'].convert(timeout, 'ProxyServer') \
            or None
        self.idle_timeout = _SETTINGS['idle_timeout'].convert(
            idle_timeout, 'ProxyServer') or None
        backlog = _SETTINGS['backlog'].convert(backlog, 'ProxyServer')
        self.seed = seed
        self.statsd = statsd or _Statsd()
        self.protocol_class = Protocol.get(protocol)
        self.protocol_name = protocol
        self.protocol_settings = validate_options(
            'protocol', self.protocol_class, protocol_options or {})
        # option values per behavior name from the command line and ini
        # file: the base of every behavior set, live changes included
        self.behavior_settings = {}
        for name, values in (behavior_options or {}).items():
            self.behavior_settings[name] = validate_options(
                'behavior', Behavior.get(name), values)
        self.dummy = Dummy()
        self.connections = {}
        self.closing = False
        self._starved = False   # warned of running out of descriptors
        # with workers, connection and decision ids are counted across
        # them: unique, in the order they came
        self._ids = itertools.count(1) if _COUNTERS is None else \
            _COUNTERS.count()
        self._stats_lock = threading.Lock()
        self.started = time.time()
        self._closed_exchanges = collections.Counter()
        # totals of the connections that ended (open ones are added live)
        self.totals = collections.Counter()
        self.mix = None
        self.mix_generation = 0
        self._live = False      # whole-proxy behaviors wait for the socket
        self.decisions = collections.deque(maxlen=self.decision_log_size)
        self._decision_ids = itertools.count(1) if _COUNTERS is None \
            else _COUNTERS.count()
        self.set_mix(behavior)
        if backlog:
            self.request_queue_size = backlog
        if ':' in proxy[0]:
            self.address_family = socket.AF_INET6
        self._stop_request = threading.Event()
        self._stopped = threading.Event()
        self._listen_lock = threading.Lock()
        self._spares = []       # [_Spare] waiting for a connection
        self._spares_lock = threading.Lock()
        socketserver.ThreadingTCPServer.__init__(
            self, tuple(proxy)[:2], ProxyHandler, bind_and_activate=False)
        self._listen_shown = format_address(proxy)
        if listen:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.socket.close()
                raise
        else:
            self.socket.close()
            self.socket = None
        self._live = True
        self._activate()

    # what connections need

    def get_request(self):
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                             errno.ENOMEM):
                # the connection waits in the backlog; do not spin on it
                if not self._starved:
                    logger.warning('out of file descriptors (%s): new '
                                   'connections wait; raise the limit '
                                   '(ulimit -n)', _os_error_text(exc))
                self._starved = True
                time.sleep(0.05)
            raise

    def process_request(self, request, client_address):
        """Run the connection in a thread of its own: a spare one left by
        an earlier connection, or a new one.  Starting a thread costs a
        dozen system calls and a hand-off with the accepting thread; a
        spare one is woken with a single lock release."""
        with self._spares_lock:
            spare = self._spares.pop() if self._spares else None
        if spare is not None:
            spare.job = (request, client_address)
            spare.wake.release()
            return
        thread = threading.Thread(target=self._serve_connections,
                                  args=(request, client_address),
                                  name='vaurien %s' % format_address(
                                      self.address))
        thread.daemon = self.daemon_threads
        thread.start()

    def _serve_connections(self, request, client_address):
        spare = None
        while True:
            self.process_request_thread(request, client_address)
            if spare is None:
                spare = _Spare()
            with self._spares_lock:
                if self.closing or len(self._spares) >= self.spare_threads:
                    return
                self._spares.append(spare)
            if not spare.wake.acquire(timeout=self.spare_thread_idle):
                with self._spares_lock:
                    if spare in self._spares:
                        self._spares.remove(spare)
                        return
                spare.wake.acquire()    # taken just now: the job is coming
            if spare.job is None:
                return
            (request, client_address), spare.job = spare.job, None

    def _end_spares(self):
        with self._spares_lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.wake.release()

    def connect_backend(self, address=None):
        sock = socket.create_connection(address or self.backend,
                                        timeout=self.timeout)
        sock.settimeout(None)
        return sock

    def proxy_settings(self):
        """What other proxies of this process take from this one (the
        keywords of ProxyServer): seed, statsd, timeouts."""
        return {'seed': self.seed, 'statsd': self.statsd,
                'timeout': self.timeout, 'idle_timeout': self.idle_timeout}

    def make_protocol(self):
        return self.protocol_class(self.protocol_settings, self)

    def count_closed(self, conn):
        """Move *conn* from the open connections to the totals, at once:
        readers holding the lock see it in one place or the other."""
        with self._stats_lock:
            self.connections.pop(conn.id, None)
            self.totals['connections'] += 1
            self.totals['bytes_up'] += conn.bytes_up
            self.totals['bytes_down'] += conn.bytes_down
            self.totals['sent_down'] += conn.client.sent
            if conn.backend is not None:
                self.totals['sent_up'] += conn.backend.sent
            if conn.backend is None:
                self.totals['backend_errors'] += 1
            closed = self._closed_exchanges
            for name, count in conn.behaviors_met.items():
                closed[name] += count

    def decide(self, conn, number, behavior, request=None, toxic=None,
               matched=None):
        """Log a non-dummy decision in one short line, and keep it, with
        every option in force, for GET /decisions.  A *toxic* is decided
        once per connection: from exchange *number* on, it acts.
        *matched* is the request that the behavior's match took."""
        direction, options = _decision_fields(behavior)
        record = {
            'id': next(self._decision_ids),
            'time': time.time(),      # rounded when read: round() is slow
            'proxy': self.name,
            'connection': conn.id,
            'client': conn.client_text,
            'exchange': number,
            'request': request,
            'direction': direction,
            'behavior': behavior.name,
            'options': options}
        if matched is not None:
            record['matched'] = matched
        if toxic is not None:
            record['toxic'] = toxic.name
            record['stream'] = toxic.stream
            self.toxic_counts[toxic.name] += 1
        self.decision_count += 1
        self.decisions.append(record)
        if logger.isEnabledFor(logging.INFO):
            logger.info('decision %d: connection %d exchange %d: %s%s',
                        record['id'], conn.id, number, behavior.name,
                        ' (toxic %s)' % toxic.name if toxic is not None
                        else ' on %s' % request if request else '')

    @property
    def exchange_counts(self):
        """Exchanges since start, by the behavior they met."""
        with self._stats_lock:
            counts = collections.Counter(self._closed_exchanges)
            open_now = list(self.connections.values())
        for conn in open_now:
            counts.update(conn.met())
        return counts

    # changing the mix

    def make_behavior(self, name, options=None):
        """A fresh instance of behavior *name* with the options in force
        (plus *options*); fresh, so its counters start again.  Several
        names joined by '+' make a Composite; *options* then maps each
        part's name to its options."""
        if '+' in name:
            options = options or {}
            parts, values = [], {}
            for part in name.split('+'):
                instance, values[part] = self.make_behavior(
                    part, options.get(part))
                parts.append(instance)
            return Composite(parts), values
        cls = Behavior.get(name)
        values = dict(self.behavior_settings.get(name, {}))
        if options:
            values.update(validate_options('behavior', cls, options))
        instance = cls()
        instance.proxy = self
        instance.update_settings(values)
        return instance, values

    def set_mix(self, text, options=None):
        """Put the mix *text* in force, for new exchanges of every
        connection, open ones included.  *options* maps a behavior name to
        option values to set with it."""
        shares = parse_mix(text)
        options = options or {}
        instances = {}
        parts = set()
        for name, _ in shares:
            if '+' in name:
                instances[name], _ = self.make_behavior(name, options)
            else:
                instances[name], _ = self.make_behavior(
                    name, options.get(name))
            parts.update(name.split('+'))
        for name in options:
            if name not in parts:
                raise VaurienError("options given for behavior '%s', which "
                                   "is not in the mix" % name, 'options')
        mix = Mix(shares, instances)
        for behavior in instances.values():
            check_for_protocol(self.protocol_class, behavior)
        old, self.mix = self.mix, mix
        self.mix_generation += 1
        if self._live:
            if old is not None:
                for behavior in old.behaviors():
                    if behavior.whole_proxy:
                        behavior.deactivate(self)
            self._activate()
        return mix

    def _activate(self):
        for behavior in self.mix.behaviors():
            if behavior.whole_proxy:
                behavior.activate(self)

    # accepting, and the `down` behavior

    def serve_forever(self, poll_interval=0.5):
        """Accept connections until ``shutdown()``; like socketserver's,
        but the listening socket may close and open again (``go_down``,
        ``go_up``)."""
        self._stop_request.clear()
        self._stopped.clear()
        try:
            if _ROLE is not None and _ROLE.supervising:
                # its workers accept (see _Supervisor)
                self._stop_request.wait()
            while not self._stop_request.is_set():
                listener = self.socket
                if listener is None:
                    self._stop_request.wait(poll_interval)
                    continue
                try:
                    ready = wait_readable(listener, poll_interval)
                except (OSError, ValueError):
                    ready = False       # closed under us by go_down
                if ready and listener is self.socket:
                    self._handle_request_noblock()
                self.service_actions()
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stop serve_forever and wait until it has."""
        self._stop_request.set()
        self._stopped.wait()

    def go_down(self):
        """Refuse new connections (the listener closes) and close the open
        ones, until ``go_up``."""
        self.server_close()
        for conn in list(self.connections.values()):
            conn.abort()
        logger.info('down: refusing connections on %s',
                    format_address(self.address))

    def go_up(self):
        """Listen again, on the same address, after ``go_down`` (unless
        the proxy is disabled)."""
        if self._listen_again():
            logger.info('up: accepting connections on %s',
                        format_address(self.address))

    def _listen_again(self):
        """go_up without a word: True if it listens now."""
        with self._listen_lock:
            if self.socket is not None or self.closing or not self.enabled:
                return False
            family = socket.AF_INET6 if ':' in self.server_address[0] \
                else socket.AF_INET
            listener = None if _ROLE is None else _ROLE.adopt(self)
            if listener is None:
                listener = self._new_listener(family)
            self.server_address = listener.getsockname()
            self._listen_shown = format_address(self.address)
            self.socket = listener
        return True

    def _new_listener(self, family):
        listener = socket.socket(family, self.socket_type)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if _ROLE is not None:
                _ROLE.share_port(self, listener)
            _dual_stack(listener, self.server_address)
            listener.bind(self.server_address)
            if _ROLE is None or _ROLE.listens:
                listener.listen(self.request_queue_size)
        except BaseException:
            listener.close()
            raise
        return listener

    def server_bind(self):
        """Replaces the base method: ``::`` takes IPv4 clients too (as Go
        listens), and the address it got is what Toxiproxy shows.  A
        worker sharing the supervisor's listening sockets takes the one
        passed to it instead (see _Worker.adopt)."""
        adopted = None if _ROLE is None else _ROLE.adopt(self)
        if adopted is not None:
            self.socket.close()
            self.socket = adopted
            self.server_address = adopted.getsockname()
        else:
            _dual_stack(self.socket, self.server_address)
            if _ROLE is not None:
                _ROLE.share_port(self, self.socket)
            socketserver.ThreadingTCPServer.server_bind(self)
        self._listen_shown = format_address(self.address)

    def server_activate(self):
        """Replaces the base method: the supervisor of workers holds the
        port, bound but not listening, unless the workers share its
        listening sockets (see _Supervisor)."""
        if _ROLE is None or _ROLE.listens:
            socketserver.ThreadingTCPServer.server_activate(self)

    # a named proxy's life (see Proxies)

    @property
    def listen(self):
        """Where it listens; disabled, where it last listened (as given,
        if it never did)."""
        if self.socket is not None:
            return format_address(self.address)
        return self._listen_shown

    @property
    def upstream(self):
        if self.upstream_given is not None:
            return self.upstream_given
        return format_address(self.backend)

    def set_upstream(self, text):
        """New connections go to *text* (Toxiproxy's upstream: anything;
        one that is no address closes its clients)."""
        self.upstream_given = text
        try:
            self.backend = parse_address(text, 'upstream')
        except VaurienError:
            self.backend = None

    def enable(self):
        self.enabled = True
        self.go_up()

    def disable(self):
        self.enabled = False
        self.go_down()

    def disable_connections(self):
        for conn in list(self.connections.values()):
            conn.abort()

    def stop(self):
        """For good: stop accepting, close every connection."""
        self._stop_request.set()
        # the listener's shutdown wakes serve_forever's wait at once,
        # rather than at its next poll
        self.close_all()
        self._stopped.wait()

    def byte_counts(self):
        """``{('received' or 'sent', 'upstream' or 'downstream'): bytes}``
        since the start, open connections' included (Toxiproxy's
        directions: upstream is from the clients to the upstream)."""
        with self._stats_lock:
            totals = dict(self.totals)
            open_now = list(self.connections.values())
        counts = {
            ('received', 'upstream'): totals.get('bytes_up', 0),
            ('received', 'downstream'): totals.get('bytes_down', 0),
            ('sent', 'upstream'): totals.get('sent_up', 0),
            ('sent', 'downstream'): totals.get('sent_down', 0)}
        for conn in open_now:
            counts['received', 'upstream'] += conn.bytes_up
            counts['received', 'downstream'] += conn.bytes_down
            if conn.backend is not None:
                counts['sent', 'upstream'] += conn.backend.sent
            counts['sent', 'downstream'] += conn.client.sent
        return counts

    def fileno(self):
        listener = self.socket
        return listener.fileno() if listener is not None else -1

    def server_close(self):
        with self._listen_lock:
            listener, self.socket = self.socket, None
            if listener is not None:
                _stop_listening(listener)

    # stopping

    def close_all(self):
        """Stop accepting and close every open connection."""
        self.closing = True
        self.server_close()
        self._end_spares()
        for conn in list(self.connections.values()):
            conn.abort()

    def handle_error(self, request, client_address):
        logger.error('connection from %s: %s', format_address(client_address),
                     sys.exc_info()[1])

    @property
    def address(self):
        """The address really listened on (``port 0`` resolved)."""
        return self.server_address[:2]


def _dual_stack(sock, address):
    """A socket to listen on ``::`` takes IPv4 clients too."""
    if address[0] == '::' and hasattr(socket, 'IPV6_V6ONLY'):
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass


def _stop_listening(listener):
    # shut down first: a close alone leaves the socket listening until the
    # accepting thread's poll lets go of it
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    _close(listener)


class _Spare(object):
    """A connection's thread waiting for the next connection."""
    __slots__ = ('wake', 'job')

    def __init__(self):
        self.wake = threading.Lock()
        self.wake.acquire()     # released to hand over a connection
        self.job = None


class ProxyHandler(socketserver.BaseRequestHandler):
    """Runs one client connection in its own thread."""

    def handle(self):
        server = self.server
        conn = Connection(server, self.request, self.client_address)
        server.connections[conn.id] = conn
        server.statsd.incr('connections')
        try:
            conn.run()
        except Exception as exc:    # never let one connection kill others
            logger.error('connection %s: %s: %s', conn.describe(),
                         type(exc).__name__, exc)
            logger.debug('%s', traceback.format_exc())
        finally:
            server.count_closed(conn)
            conn.duplex.close()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug('%s', conn.summary())
            conn.release()


# The engine: a connection ################################################

class _ApiFirst(object):
    """Lets the control API go first.  From a request's first byte (a new
    API connection's accept) to its answer, and *linger* seconds after
    (the next request of a busy client), connection threads wait at their
    next step, blocked on an event: a blocked thread does not queue for
    the GIL, so the API's thread does not queue behind every busy
    connection at each of its system calls.  One waiting thread, the
    keeper, looks every *linger* seconds whether the API is done and
    opens for all.  The traffic waits *hold* seconds at most at a time,
    then runs for *rest* seconds whatever the API does: a client calling
    the API without pause slows the traffic down, it cannot stop it.
    Measured under 200 busy streams: p99 of an API call about 1 s without
    (bench/stress.py, api-latency); the figures with it are in
    bench/README.txt."""

    hold = 0.2
    rest = 0.02
    linger = 0.02

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._linger_end = 0.0
        self._open = threading.Event()
        self._open.set()
        self._closed_at = None      # when the traffic began to wait
        self._rest_end = 0.0        # the traffic's turn lasts until then
        self._keeper = False
        #: true while connections must call give_way at their next step
        self.busy = False

    def enter(self):
        with self._lock:
            self._active += 1
            self.busy = True
            if self._closed_at is None and _now() >= self._rest_end:
                self._close(_now())

    @property
    def active(self):
        """How many API requests are under way."""
        return self._active

    def leave(self):
        with self._lock:
            self._active = max(0, self._active - 1)
            if not self._active:
                self._linger_end = _now() + self.linger

    def give_way(self):
        """Called by connection threads while ``busy`` is true: returns
        once they may go on."""
        keeper = False
        while True:
            with self._lock:
                if keeper:
                    self._keeper = keeper = False
                wait = self._wait()
                if wait is None:
                    return
                if not self._keeper:
                    self._keeper = keeper = True
                    wait = min(wait, self.linger)
            self._open.wait(wait)

    def _wait(self):
        # (the lock held) how long the traffic must still wait, or None
        now = _now()
        if not self._active and now >= self._linger_end:
            self.busy = False           # the API is done
            self._reopen()
            return None
        if self._closed_at is None:
            if now < self._rest_end:
                return None             # the traffic's turn
            self._close(now)
        left = self._closed_at + self.hold - now
        if left <= 0:
            self._reopen()
            self._rest_end = now + self.rest
            return None
        return left

    def _close(self, now):
        self._closed_at = now
        self._open.clear()

    def _reopen(self):
        self._closed_at = None
        self._open.set()


API_FIRST = _ApiFirst()


class _Turn(object):
    """One API request's turn to go first (see _ApiFirst): it ends once,
    however the request ends."""

    __slots__ = ('live',)

    def __init__(self):
        self.live = True
        API_FIRST.enter()

    def end(self):
        if self.live:
            self.live = False
            API_FIRST.leave()


def _seeded(seed, *key):
    """A random generator for what *key* names: seeded from ``--seed`` and
    *key* (a run can be replayed), or from the system when *seed* is
    None."""
    if seed is None:
        return random.Random()
    return random.Random(':'.join(str(part) for part in (seed,) + key))


class Connection(object):
    """One client, its backend connection, and the loop between them: the
    life of the connection, from the backend's connect to the close."""

    def __init__(self, server, client, address):
        self.server = server
        self.id = next(server._ids)
        self.duplex = Duplex(self, client)
        #: the two Sides (``backend`` once connected)
        self.client, self.backend = self.duplex.client, None
        self.client_address = address
        self.client_text = format_address(address)
        self.backend_address = server.backend
        self.started = time.time()
        self.bytes_up = 0       # read from the client
        self.bytes_down = 0     # read from the backend
        self.exchanges = 0
        self.behaviors_met = {}     # behavior name -> exchanges (see met)
        #: a dict for plugins (per behavior, prefer new_state/state_of)
        self.state = {}
        self._states = {}
        self._flows = {}
        # a dummy exchange keeps nothing: one serves them all
        self.plain = self.exchange = Exchange(self, 0, 'dummy', server.dummy)
        self.picker = Picker(self)
        self.toxic_plan = self.toxics_matching = None   # see ToxicDraws
        self.toxic_draws = ToxicDraws(self)
        self.protocol = None
        self._plain_tcp = False
        self._rng = None
        #: True once all that is left from the client is its end of stream
        self.client_ended = False
        #: set from another thread to end the connection now (see abort)
        self.aborted = False

    @property
    def rng(self):
        """This connection's random generator: seeded from ``--seed`` and
        the connection's number, so a run can be replayed."""
        if self._rng is None:
            self._rng = _seeded(self.server.seed, self.id)
        return self._rng

    # exchanges, and what behaviors keep per connection

    def start_exchange(self, request=None, text=None):
        """Start a new exchange (its behavior drawn and decided by the
        Picker) and make it current: the one place where exchanges are
        counted.  *request* says what the client asked, in a few words (a
        framed protocol knows: ``GET /users``, ``SET``), for the decision
        log; *text* describes it whole, for the option ``match``."""
        self.exchanges += 1
        name, exchange = self.picker.exchange(self.exchanges, request, text)
        self.exchange = exchange
        met = self.behaviors_met
        met[name] = met.get(name, 0) + 1
        if self.server.statsd.enabled:
            self.server.statsd.incr('behavior.' + name)
        return exchange

    def pass_exchanges(self, count, single):
        """Count *count* exchanges that meet *single*, the ``(name,
        behavior)`` of a mix that is one passive behavior (``mix.single``):
        what start_exchange does for each, without a draw (there is none
        to make) nor an object each.  Returns the exchange they share (it
        keeps nothing: no hook of a passive behavior runs)."""
        name, behavior = single
        self.exchanges += count
        met = self.behaviors_met
        met[name] = met.get(name, 0) + count
        server = self.server
        if server.statsd.enabled:
            for _ in range(count):
                server.statsd.incr('behavior.' + name)
        if behavior is server.dummy or name == 'dummy':
            exchange = self.plain
        else:
            exchange = Exchange(self, self.exchanges, name, behavior)
        self.exchange = exchange
        return exchange

    def state_of(self, behavior):
        """*behavior*'s state on this connection: what its ``new_state()``
        returned, made at the first call."""
        try:
            return self._states[behavior]
        except KeyError:
            state = self._states[behavior] = behavior.new_state()
            return state

    def flow(self, behavior, to_backend):
        """*behavior*'s Flow for one direction of this connection."""
        key = (id(behavior), to_backend)
        flow = self._flows.get(key)
        if flow is None or flow.behavior is not behavior:
            flow = self._flows[key] = Flow(self, to_backend, behavior)
        return flow

    # the life of the connection

    def describe(self):
        return '%d %s -> %s' % (
            self.id, format_address(self.client_address),
            format_address(self.backend_address) if self.backend_address
            else self.server.upstream)

    def run(self):
        server = self.server
        if server.mix.openers:
            self.picker.open()
        if self.backend_address is None:
            logger.warning('connection %s: the upstream %r is no HOST:PORT: '
                           'closing the client', self.describe(),
                           server.upstream)
            server.statsd.incr('backend_errors')
            return
        try:
            backend = server.connect_backend(self.backend_address)
        except OSError as exc:
            logger.warning('connection %s: cannot reach the backend (%s); '
                           'closing the client', self.describe(),
                           _os_error_text(exc))
            server.statsd.incr('backend_errors')
            return
        self.backend = self.duplex.attach(backend)
        if server.mix.per_connection:
            self.exchange = self.picker.first_exchange()
        if server.toxics.generation:
            self.toxic_draws.refresh(server.toxics)     # the links start
        self.protocol = protocol = server.make_protocol()
        protocol.connection = self
        self._plain_tcp = type(protocol)._handle is TCP._handle
        protocol.setup(self.client, self.backend)
        self._loop(protocol)

    def _loop(self, protocol):
        duplex = self.duplex
        poller, client, backend = duplex.poller, self.client, self.backend
        sides = {client.fd: client, backend.fd: backend}
        idle = self.server.idle_timeout
        api_first = API_FIRST
        while duplex.busy() and not self.aborted:
            if api_first.busy:
                api_first.give_way()
            timeout, timer = idle, False
            due = duplex.due()
            if due is not None:
                wait = max(0.0, due - _now())
                if timeout is None or wait < timeout:
                    timeout, timer = wait, True
            if timer and timeout < 0.002:
                # poll counts in milliseconds: sleep for finer waits
                time.sleep(timeout)
                events = poller.poll(0)
            else:
                events = poller.poll(timeout)
            if due is not None and not _guarded(self, duplex.run_due):
                return
            if not events:
                if not timer:
                    logger.info('connection %s: quiet for %gs, closing it',
                                self.describe(), idle)
                    return
                continue
            # a step may read the other socket too (a hook, a framed
            # protocol relaying earlier answers): then what the poll said
            # of that one is stale, and reading it again could block
            client_reads, backend_reads = client.reads, backend.reads
            for fd, flags in events:
                side = sides.get(fd)
                if side is None:
                    continue
                if flags & _POLLOUT or (side.blocked and not side.reading):
                    # (a socket watched for POLLOUT alone reports its
                    # errors as POLLERR/POLLHUP: flushing finds them)
                    _guarded(self, side.flush)
                if not flags & _NOT_POLLOUT or not side.reading or (
                        side.reads != (client_reads if side is client
                                       else backend_reads)):
                    continue
                if side.held and not flags & (_POLLHUP | _POLLERR):
                    # not read while what it feeds is full: only its end
                    # is news (its data comes first, once read again)
                    if flags & _POLLRDHUP:
                        side.ended = True
                        duplex.watch(side)
                    continue
                to_backend = side is client
                if to_backend and flags & _POLLRDHUP:
                    self.client_ended = _only_end_of_stream(side)
                try:
                    going = self._step(protocol, side, side.peer, to_backend)
                except Exception as exc:
                    going = _failed(self, exc)
                if not going:
                    return

    def _step(self, protocol, source, dest, to_backend):
        """*source* is readable: run it through the exchange it belongs to
        and the protocol.  False: close the connection."""
        toxics = self.server.toxics
        if toxics.generation != self.toxic_draws.seen:
            self.toxic_draws.refresh(toxics)    # from this chunk on
        frames = protocol.frames
        if not frames:
            # nothing left but the end of the client's stream: no new
            # exchange, and only the stream behaviors of the current one
            ending = to_backend and self.client_ended
            exchange = self.start_exchange() if to_backend and not ending \
                else self.exchange      # (an answer: the current one's)
            if exchange is self.plain and self._plain_tcp and \
                    self.toxic_plan is None:
                return protocol._pass_plain(source, dest, to_backend)
        duplex = self.duplex
        duplex.source = duplex.granted = source
        try:
            if frames:      # it starts an exchange per request
                return protocol._handle(source, dest, to_backend)
            return exchange.run(protocol, source, dest, to_backend,
                                hooks=not ending)
        finally:
            duplex.source = duplex.granted = None

    def abort(self):
        """End the connection now, from another thread: its thread sees
        the end of both streams and finishes without waiting."""
        self.aborted = True
        self.duplex.shutdown()

    def release(self):
        """The connection is over: break its reference cycles (with
        Duplex.close), so that it goes at once, by reference counting,
        not at the collector's next pass.  What the API reads stays."""
        self.picker.connection = self.toxic_draws.connection = None
        self.plain.connection = self.exchange.connection = None
        self.protocol = None
        self._flows.clear()

    def met(self):
        """Exchanges by the behavior they met."""
        return collections.Counter(self.behaviors_met)

    def summary(self):
        met = ' '.join('%s=%d' % item for item in
                       sorted(self.met().items())) or 'none'
        return ('connection %s closed after %.3fs: %d bytes up, %d bytes '
                'down, %d exchanges (%s)' % (
                    self.describe(), time.time() - self.started,
                    self.bytes_up, self.bytes_down, self.exchanges, met))


def _guarded(conn, call, *args):
    """Run *call* for connection *conn*; a peer gone or a plugin raising
    closes this connection only (False, see _failed)."""
    try:
        return call(*args)
    except Exception as exc:
        return _failed(conn, exc)


def _failed(conn, exc):
    """*exc* was raised for connection *conn* (called where it is caught):
    one log line, and False, which closes this connection only."""
    if isinstance(exc, (ConnectionResetError, BrokenPipeError,
                        ConnectionAbortedError, socket.timeout)):
        logger.debug('connection %s: %s', conn.describe(),
                     _os_error_text(exc))
        if isinstance(exc, ConnectionResetError):
            # a plugin's own socket call met a reset: pass it on
            for side in (conn.client, conn.backend):
                if side is not None:
                    _reset(side.sock)
    elif isinstance(exc, OSError):
        if not (conn.server.closing or conn.aborted):
            logger.info('connection %s: %s', conn.describe(),
                        _os_error_text(exc))
    else:
        logger.error('connection %s: %s raised %s: %s; closing this '
                     'connection', conn.describe(), _culprit(exc),
                     type(exc).__name__, exc)
        logger.debug('%s', traceback.format_exc())
    return False


# The engine: an exchange #################################################

class Exchange(object):
    """One request from the client and what answers it, with the behavior
    drawn for it: the one place where behaviors meet the data.

    The engine's step and the framed protocols call it: ``before``,
    ``between`` and ``after`` run, in order, the socket hooks of every
    behavior acting on data going that way (the parts of ``a+b`` one after
    the other; the first ``False`` or ``HANDLED`` stops the others), and
    ``outlet`` puts the stream behaviors acting that way in front of the
    destination.  Which behaviors act each way is worked out once per
    behavior (its ``plan``), never per chunk.  While its hooks run, the
    exchange is the connection's current one (``connection.exchange``).
    """

    __slots__ = ('connection', 'number', 'name', 'behavior', 'state', 'plan',
                 'toxics')

    def __init__(self, connection, number, name, behavior, toxics=None):
        self.connection = connection
        self.number = number
        self.name = name
        self.behavior = behavior
        #: the toxics' plan for this exchange, when their matches leave
        #: some out (None: the connection's toxic_plan)
        self.toxics = toxics
        #: a dict private to this exchange
        self.state = {}
        self.plan = behavior.plan or _plan(getattr(behavior, 'parts',
                                                   [behavior]))

    def parts(self, to_backend):
        """``(socket hook behaviors, stream behaviors)`` acting on data
        going this way: the exchange's own, then the proxy's toxics that
        act on this connection (see ToxicDraws)."""
        own = self.plan[to_backend]
        toxics = self.toxics
        if toxics is None:
            toxics = self.connection.toxic_plan
            if toxics is None:
                return own
        more = toxics[to_backend]
        return own[0] + more[0], own[1] + more[1]

    def hooks_act(self, to_backend):
        """Whether socket hooks act on data going this way."""
        return bool(self.parts(to_backend)[0])

    def outlet(self, dest, to_backend):
        """*dest*, or an Outlet in front of it when stream behaviors act on
        what goes this way."""
        streams = self.parts(to_backend)[1]
        if not streams:
            return dest
        flow = self.connection.flow
        return Outlet(dest.side, to_backend,
                      [(part, flow(part, to_backend)) for part in streams])

    def run(self, protocol, source, dest, to_backend, hooks=True):
        """One readable event of a protocol that does not frame requests:
        the hooks before, its ``_handle``, the hooks after.  False: close
        the connection."""
        dest = self.outlet(dest, to_backend)
        if not hooks or not self.parts(to_backend)[0]:
            return protocol._handle(source, dest, to_backend)
        verdict = self.before(protocol, source, dest, to_backend)
        if verdict is False:
            return False
        if verdict is HANDLED:
            return True
        return bool(protocol._handle(source, dest, to_backend)) and \
            self.after(protocol, source, dest, to_backend)

    def before(self, protocol, source, dest, to_backend):
        """``on_before_handle`` of each behavior acting this way: True,
        False (close) or HANDLED (the hook dealt with the data)."""
        return self._each('on_before_handle', protocol, source, dest,
                          to_backend)

    def between(self, protocol, source, dest, to_backend):
        """``on_between_handle`` of each: False when one closes."""
        return self._each('on_between_handle', protocol, source, dest,
                          to_backend) is not False

    def after(self, protocol, source, dest, to_backend):
        """``on_after_handle`` of each: False when one closes."""
        return self._each('on_after_handle', protocol, source, dest,
                          to_backend) is not False

    def _each(self, hook, protocol, source, dest, to_backend):
        methods = self.plan[to_backend, hook]
        toxics = self.toxics
        if toxics is None:
            toxics = self.connection.toxic_plan
        if toxics is not None:
            methods = methods + toxics[to_backend, hook]
        if not methods:
            return True
        conn = self.connection
        current, conn.exchange = conn.exchange, self
        try:
            for method in methods:
                verdict = method(protocol, source, dest, to_backend)
                if verdict is False or verdict is HANDLED:
                    return verdict
            return True
        finally:
            conn.exchange = current


class Picker(object):
    """Draws the behavior of each exchange of one connection from the mix
    in force, and applies the gates of the common options (after, every,
    times, clients): an exchange they keep out meets dummy."""

    def __init__(self, connection):
        self.connection = connection
        self.server = connection.server
        self._sticky = None             # (mix generation, (name, behavior))
        # made at first use (most connections never need them):
        self._used = None       # {behavior: times it applied}
        self._matched = None    # {behavior: requests its match took}

    def exchange(self, number, request=None, text=None):
        """``(name, Exchange)`` for exchange *number*, whose request the
        protocol describes in a few words as *request* and whole as *text*
        (see RequestMatch): its behavior drawn and gated, its toxics (a
        toxic's match decided on *text*), the decision logged."""
        conn, server = self.connection, self.server
        mix = server.mix
        name, behavior = mix.single or self.draw(mix)
        if behavior.gated:
            name, behavior = self._gate(name, behavior, number, text)
        toxics = None
        if conn.toxics_matching:
            toxics = conn.toxic_draws.for_exchange(number, request, text)
        if toxics is None and (behavior is server.dummy or name == 'dummy'):
            return name, conn.plain     # (the mix's dummy is another one)
        if not behavior.passive:
            server.decide(conn, number, behavior, request,
                          matched=_matched_text(behavior, text))
        return name, Exchange(conn, number, name, behavior, toxics)

    def plain_next(self):
        """Whether exchange() would give the plain exchange with no draw:
        the mix is dummy alone, and no toxic matches requests."""
        return self.server.mix.plain and not self.connection.toxics_matching

    def open(self):
        """Run the ``on_open`` of the behaviors drawn to act before the
        backend connection is made."""
        for behavior in self.openers():
            self.server.decide(self.connection, 0, behavior)
            behavior.on_open(self.connection)

    def first_exchange(self):
        """The exchange before the client's first request (what the
        backend says first): one of a behavior drawn for the whole
        connection, else the plain one."""
        conn = self.connection
        name, behavior = self.draw(self.server.mix)
        if behavior.passive or behavior.scope != 'connection':
            return conn.plain
        self.server.decide(conn, 0, behavior)
        return Exchange(conn, 0, name, behavior)

    def draw(self, mix):
        if not mix.per_connection:
            return mix.draw(self.connection.rng)
        # behaviors of connection scope are drawn once per connection (and
        # again when the mix changes); the others for each exchange
        generation = self.server.mix_generation
        if self._sticky is None or self._sticky[0] != generation:
            name, behavior = mix.draw(self.connection.rng)
            if behavior.scope != 'connection':
                name, behavior = None, None
            self._sticky = (generation, (name, behavior))
        if self._sticky[1][0] is not None:
            return self._sticky[1]
        name, behavior = mix.draw(self.connection.rng)
        if behavior.scope == 'connection':
            return 'dummy', self.server.dummy
        return name, behavior

    def _gate(self, name, behavior, number, text):
        parts = getattr(behavior, 'parts', None)
        if parts is None:
            if self.admits(behavior, number, text):
                return name, behavior
            return 'dummy', self.server.dummy
        admitted = [part for part in parts
                    if self.admits(part, number, text)]
        if not admitted:
            return 'dummy', self.server.dummy
        if len(admitted) == 1:
            return admitted[0].name, admitted[0]
        if len(admitted) < len(parts):
            behavior = Composite(admitted)
        return behavior.name, behavior

    def admits(self, behavior, number, text=None):
        """Whether exchange *number*, whose request is described as *text*,
        may meet *behavior* (its options match, after, every, times,
        clients).  With a match, after and every count the requests that
        match, not the exchanges."""
        get = behavior.settings.get
        if behavior.match is not None:
            if not behavior.match(text):
                return False
            if self._matched is None:
                self._matched = {}
            number = self._matched[behavior] = \
                self._matched.get(behavior, 0) + 1
        if number <= get('after', 0) or number % get('every', 1):
            return False
        if not self.serves_client(behavior):
            return False
        limit = get('times', 0)
        if limit:
            if self._used is None:
                self._used = {}
            used = self._used.get(behavior, 0)
            if used >= limit:
                return False
            self._used[behavior] = used + 1
        return True

    def serves_client(self, behavior):
        """Whether *behavior*'s option ``clients`` admits this client."""
        networks = getattr(behavior, '_networks', None)
        return not networks or _client_in(self.connection, networks)

    def openers(self):
        """The behaviors to run before the backend connection is made, each
        drawn from its share of the mix."""
        rng = self.connection.rng
        for percent, name, behavior in self.server.mix.openers:
            if percent < 100 and rng.random() * 100 >= percent:
                continue
            for part in getattr(behavior, 'parts', [behavior]):
                if part.opens and self.serves_client(part):
                    yield part


class ToxicDraws(object):
    """Which of the proxy's toxics act on one connection: each drawn once
    per connection (its toxicity), and again only when it is updated.  It
    keeps two attributes of the connection up to date: ``toxic_plan``,
    the ``{to_backend: (hooks, streams)}`` of the toxics acting on it
    (None: none does), and ``toxics_matching``, those toxics when one has
    a match (None: none has)."""

    def __init__(self, connection):
        self.connection = connection
        self.seen = 0               # the toxics' generation last seen
        self._draws = {}            # toxic -> (its version, it acts)

    def refresh(self, toxics):
        """Draw what is new in *toxics*: when the link starts, when a
        toxic appears or is updated."""
        conn = self.connection
        self.seen = toxics.generation
        draws, self._draws = self._draws, {}
        chosen = []
        for toxic in toxics.listed():
            known = draws.get(toxic)
            if known is not None and known[0] == toxic.version:
                acts = known[1]
            else:
                acts = self._draw(toxic)
            self._draws[toxic] = (toxic.version, acts)
            if acts and not toxic.behavior.passive:
                chosen.append(toxic)
        conn.toxics_matching = None
        if not chosen:
            conn.toxic_plan = None
            return
        conn.toxic_plan = _plan([toxic.behavior for toxic in chosen])
        if any(toxic.behavior.match is not None for toxic in chosen):
            conn.toxics_matching = chosen

    def for_exchange(self, number, request, text):
        # the toxics that act on exchange *number*, whose request is
        # *text*, when some have a match (None: all of toxic_plan); a
        # toxic's match is decided on each request it takes
        conn = self.connection
        chosen = conn.toxics_matching
        acting = []
        for toxic in chosen:
            match = toxic.behavior.match
            if match is None:
                acting.append(toxic.behavior)
            elif match(text):
                acting.append(toxic.behavior)
                conn.server.decide(conn, number, toxic.behavior, request,
                                   toxic=toxic, matched=text[:200])
        if len(acting) == len(chosen):
            return None
        return _plan(acting)

    def _draw(self, toxic):
        conn = self.connection
        toxicity = toxic.toxicity
        if toxicity >= 1:
            acts = True
        elif toxicity <= 0:
            acts = False
        else:
            seed = conn.server.seed
            rng = conn.rng if seed is None else _seeded(
                seed, conn.id, toxic.name, toxic.stream.lower(),
                toxic.version)
            acts = rng.random() < toxicity
        if acts and not toxic.behavior.passive and \
                toxic.behavior.match is None:
            # (a toxic with a match is decided on each request it takes)
            conn.server.decide(conn, conn.exchanges, toxic.behavior,
                               toxic=toxic)
        return acts


# The engine: streams and their sides #####################################

def _now():
    return time.monotonic()


class Flow(object):
    """What a stream hook (``on_chunk``, ``on_end``) sees: one behavior's
    view of one direction of one connection."""

    __slots__ = ('connection', 'to_backend', 'behavior', 'state', '_rng')

    def __init__(self, connection, to_backend, behavior):
        self.connection = connection
        #: True for data going from the client to the backend (upstream)
        self.to_backend = to_backend
        self.behavior = behavior
        #: a dict private to this flow
        self.state = {}
        self._rng = None

    @property
    def rng(self):
        """This flow's random generator.  With ``--seed``, seeded from the
        seed, the connection's number, the direction and the behavior, so
        a replay does not depend on which direction happened to go
        first."""
        if self._rng is None:
            seed = self.connection.server.seed
            if seed is None:
                self._rng = self.connection.rng
            else:
                self._rng = _seeded(seed, self.connection.id, 'up' if
                                    self.to_backend else 'down',
                                    self.behavior.name)
        return self._rng

    @staticmethod
    def now():
        """The clock of ``at`` and ``when``: ``time.monotonic()``."""
        return _now()

    def close(self, when, reset=False):
        """Close the whole connection at *when*; *reset*: with a TCP RST
        to the client."""
        self.connection.duplex.close_at(when, reset)


class Outlet(object):
    """Stands in for a Side while stream behaviors act on what goes to it:
    what the protocol sends goes through their ``on_chunk`` (a pipeline,
    the first one's pieces feeding the next) into the side's queue, each
    piece out when due.  Anything else is the side's."""

    __slots__ = ('side', 'to_backend', 'flows')

    def __init__(self, side, to_backend, flows):
        self.side = side
        self.to_backend = to_backend
        self.flows = flows          # [(behavior, its Flow)], in order

    def sendall(self, data):
        pieces = [(_now(), bytes(data))]
        for behavior, flow in self.flows:
            passed = []
            for when, piece in pieces:
                passed.extend(behavior.on_chunk(flow, piece, when))
            pieces = passed
        side = self.side
        side.density = len(pieces) / len(data) if data else 0.0
        for when, piece in pieces:
            side.put(when, piece)

    def send(self, data):
        self.sendall(data)
        return len(data)

    def shutdown(self, how):
        side = self.side
        if how != socket.SHUT_WR:
            side.shutdown(socket.SHUT_RD)
        if how == socket.SHUT_RD:
            return
        when = _now()
        for behavior, flow in self.flows:
            when = behavior.on_end(flow, when)
            if when is None:
                return      # never passed on
        side.put(when, side.end_mark())

    def __getattr__(self, name):
        return getattr(self.side, name)


class _Mark(object):
    """The end of a stream in a Side's queue: passed on (a FIN, or with
    *reset* a RST) after the bytes queued before it."""

    __slots__ = ('reset',)

    def __init__(self, reset):
        self.reset = reset


_END, _RESET = _Mark(False), _Mark(True)


class Side(object):
    """One socket of a connection, as protocols and behaviors see it: its
    reads are the socket's, its writes never block.

    What the kernel cannot take at once waits in ``queue``, in order and
    with the pieces that stream behaviors hold for later, and goes out as
    the socket drains: meanwhile the loop watches the socket for POLLOUT
    and goes on serving the other direction.  What feeds this side is not
    read past ``Duplex.high_water`` bytes waiting here (pieces that stream
    behaviors hold for later), or past ``low_water`` while the kernel
    takes nothing more (its buffer is the buffer then: queuing more here
    only spreads the bytes over fresh memory), until it drains under
    ``low_water`` (see Duplex).  Every public attribute but ``sendall``,
    ``send``, ``shutdown`` and ``recv`` is the socket's (see _lend).
    """

    #: what one waiting piece costs beside its bytes (its tuple, the bytes
    #: object, the deque's slot), counted against the water marks: a
    #: million 1-byte slices weigh what they really do
    piece_cost = 128

    def __init__(self, duplex, sock, name):
        self.duplex = duplex
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name                # 'client' or 'backend'
        self.peer = None                # the other side
        self.queue = collections.deque()    # (when, bytes or _Mark)
        self.size = 0                   # bytes waiting, with their cost
        self.last = 0.0                 # when the last piece is due
        self.full = False               # over high water, until low water
        self.blocked = False            # the kernel took less than was due
        self.stuck_since = None         # last progress while blocked
        self.reading = True             # the connection still reads it
        self.held = set()               # full sides it feeds: not read now
        self.ended = False              # its stream ended (or its FIN came)
        self.lost = False               # a write failed, or it was reset
        self.density = 0.0              # pieces per byte stream behaviors cut
        self.reads = 0                  # reads made: a poll's news goes stale
        self.sent = 0                   # bytes the kernel took

    @property
    def side(self):
        return self

    # what protocols and behaviors call

    def sendall(self, data):
        """Send *data*: now as far as the kernel takes it, the rest as the
        socket drains.  Never blocks."""
        if self.queue or self.lost:
            self.put(_now(), data)
            return
        sent = self._send(data)
        if sent is not None and sent < len(data):
            if type(data) is not bytes:
                data = bytes(data)
            self.put(_now(), memoryview(data)[sent:])

    def send(self, data):
        self.sendall(data)
        return len(data)

    def shutdown(self, how):
        """SHUT_WR passes the end of the stream on once what waits is
        sent (a reset when the other side was lost: see lose())."""
        if how != socket.SHUT_WR:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if how != socket.SHUT_RD:
            if self.queue or self.lost:
                self.put(_now(), self.end_mark())
            else:
                self.duplex.pass_end(self, self.end_mark())   # (nothing waits)

    def recv(self, size, flags=0):
        """The socket's recv, where a reset reads as the end of the stream
        (``b''``): the connection passes the reset on (see lose())."""
        try:
            data = self.sock.recv(size, flags)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            self.duplex.lose(self, exc)
            data = b''
        self.reads += 1
        if not data:
            self.ended = True
        return data

    # the engine's side

    def _send(self, data):
        """What the kernel takes of *data* now: a count, or None when the
        socket is gone (see Connection.lose)."""
        try:
            sent = self.sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.duplex.lose(self, exc)
            return None
        self.sent += sent
        return sent

    def end_mark(self):
        return _RESET if self.peer.lost else _END

    def put(self, when, piece):
        """Queue *piece* (bytes, or an end mark) to go out at *when* (on
        the ``_now()`` clock), never before what was queued earlier."""
        if self.lost:
            return
        if type(piece) is not _Mark:
            if not piece:
                return
            if type(piece) is not bytes and type(piece) is not memoryview:
                piece = bytes(piece)
            self.size += len(piece) + self.piece_cost
        if when < self.last:
            when = self.last
        self.last = when
        queue = self.queue
        queue.append((when, piece))
        if len(queue) == 1 and not self.blocked and when <= _now():
            self.flush(when)
        elif not self.full and self.size > (
                self.duplex.low_water if self.blocked
                else self.duplex.high_water):
            self.duplex.hold(self)

    def flush(self, now=None):
        """Send the pieces due by *now*, as far as the kernel takes them."""
        queue = self.queue
        if now is None:
            now = _now()
        duplex = self.duplex
        stuck = False
        while queue:
            when, piece = queue[0]
            if when > now:
                break
            if type(piece) is _Mark:
                queue.popleft()
                duplex.pass_end(self, piece)
                continue
            sent = self._send(piece)
            if sent is None:
                return
            size = len(piece)
            if sent < size:
                queue[0] = (when, memoryview(piece)[sent:])
                self.size -= sent
                stuck = True
                break
            queue.popleft()
            self.size -= size + self.piece_cost
        if stuck:
            if sent or self.stuck_since is None:
                self.stuck_since = _now()
            if not self.blocked:
                self.blocked = True
                duplex.watch(self)
            if not self.full and self.size > duplex.low_water:
                duplex.hold(self)
            return
        if self.blocked:
            self.blocked = False
            self.stuck_since = None
            duplex.watch(self)
        if self.full:
            if self.size < duplex.low_water:
                duplex.release(self)
        elif self.size > duplex.high_water:
            duplex.hold(self)

    def room(self, size):
        """How much of a read of *size* bytes on its way here fits under
        the high water mark, counting the pieces that stream behaviors cut
        it into (1-byte slices cost 129 times their bytes)."""
        left = self.duplex.high_water - self.size
        fit = int(left / (1 + self.piece_cost * self.density))
        return max(1, min(size, fit))

    def due(self):
        """When the first waiting piece is due; None when nothing waits or
        the socket must drain first (the loop watches it for POLLOUT)."""
        if self.queue and not self.blocked:
            return self.queue[0][0]
        return None

    def drop(self):
        """Forget what waits (the socket is gone)."""
        self.queue.clear()
        self.size = 0
        self.blocked = False
        self.stuck_since = None


def _lend(cls, attribute, names):
    """Give *cls* each of *names* it lacks as a read-only property: that
    attribute of ``self.<attribute>``.  (A ``__getattr__`` would do it
    too, but it makes every other attribute of the class slower to read:
    CPython's attribute caches skip such classes.)"""
    for name in names:
        if not name.startswith('_') and not hasattr(cls, name):
            setattr(cls, name, property(
                operator.attrgetter(attribute + '.' + name)))


_lend(Side, 'sock', dir(socket.socket))


class Duplex(object):
    """The two Sides of one connection and what moves between them.

    It keeps the poller's view of both sockets, the water marks (a full
    side holds what feeds it), a side that is lost (the other side gets
    what the lost one sent, then a reset), the ends passed on, and the
    waits inside a step (a hook, a protocol reading in a loop) that keep
    both directions moving meanwhile.
    """

    # what waits for one side, in bytes (pieces counted with their cost),
    # past which what feeds that side is not read, and under which it is
    # read again (low_water is the mark too while the side's kernel takes
    # nothing more: see Side)
    high_water = 4 << 20
    low_water = 1 << 20

    def __init__(self, connection, client):
        self.connection = connection
        self.client = Side(self, client, 'client')
        self.backend = None
        self.poller = None
        # the side being handled, and whether its first read is still the
        # one the poller found ready (see BaseProtocol._get_data)
        self.source = None
        self.granted = None
        self._unsent = None             # (bytes the kernel holds, since)
        self._closing = None            # (when, reset) of Flow.close

    def attach(self, backend):
        """The backend is connected: from now on both sides move."""
        client = self.client
        self.backend = backend = Side(self, backend, 'backend')
        client.peer, backend.peer = backend, client
        for side in (client, backend):
            try:
                side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                     1)
            except OSError:
                pass
            if not _DONTWAIT:
                side.sock.setblocking(False)
        self.poller = _Poller()
        self.watch(client)
        self.watch(backend)
        return backend

    def watch(self, side):
        """Tell the poller what to wait for on *side*."""
        if self.poller is None:
            return
        mask = 0
        if side.reading:
            if not side.held:
                mask = _READ_EVENTS
            elif not side.ended:
                mask = _POLLRDHUP     # its end is news even while held
        if side.blocked:
            mask |= _POLLOUT
        self.poller.set(side.fd, mask)

    def hold(self, side):
        """*side* is full: stop reading what feeds it (its peer, and the
        side being handled, when a hook answers it itself)."""
        side.full = True
        for reader in (side.peer, self.source):
            if reader is not None and side not in reader.held:
                reader.held.add(side)
                self.watch(reader)

    def release(self, side):
        """*side* drained: read again what it held."""
        side.full = False
        for reader in (self.client, self.backend):
            if reader is not None and side in reader.held:
                reader.held.discard(side)
                self.watch(reader)

    def lose(self, side, exc):
        """*side* is gone: a write to it failed, or it was reset.  Nothing
        more goes to it, and nothing more is read from the other side
        (there is nowhere to send it); what *side* had sent is still read
        to its end and delivered, then the other side gets a reset, as
        TCP would give it (see Side.end_mark)."""
        if side.lost:
            return
        logger.debug('connection %s: the %s is gone (%s)',
                     self.connection.describe(), side.name,
                     _os_error_text(exc))
        side.lost = True
        side.drop()
        if side.full:
            self.release(side)
        self.watch(side)
        peer = side.peer
        if peer is None:
            return
        if peer.reading:
            self.stop_reading(peer)
        if not side.reading:
            # its end came already: nothing will pass the reset on
            peer.put(_now(), _RESET)

    def pass_end(self, side, mark):
        """An end mark reached the head of *side*'s queue: pass it on."""
        if not mark.reset:
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        # a reset throws away what the kernel still holds: let it deliver
        # that first (for at most the grace period)
        _wait_delivered(side.sock, _now() + self.connection.server.grace)
        if self.poller is not None:
            self.poller.set(side.fd, 0)
        side.lost = side.ended = True
        side.reading = False
        side.drop()
        _reset(side.sock)

    def stop_reading(self, side):
        side.reading = False
        side.held.clear()
        self.watch(side)

    def busy(self):
        """Whether anything is left to read, to send, or to close."""
        client, backend = self.client, self.backend
        return bool(client.reading or backend.reading or client.queue or
                    backend.queue or self._closing is not None)

    # timers: pieces due later, a close, a backend that takes nothing

    def close_at(self, when, reset=False):
        """Close the connection at *when* (with a RST to the client)."""
        if self._closing is None or when < self._closing[0]:
            self._closing = (when, reset)

    def due(self):
        """When the next piece is due, or a close, or a stuck backend is
        given up; None when nothing is waiting for a time."""
        client, backend = self.client, self.backend
        if not (client.queue or backend.queue or client.ended or
                client.lost or self._closing is not None):
            return None         # (the usual case, told at once)
        times = [when for when in (self.client.due(), self.backend.due())
                 if when is not None]
        if self._closing is not None:
            times.append(self._closing[0])
        stuck = self.backend_stuck()
        if stuck is not None:
            # (and look again at what the kernel holds now and then)
            times.append(min(stuck + self.connection.server.grace,
                             _now() + 0.25))
        return min(times) if times else None

    def run_due(self):
        """Send what is due; False when the connection must close now."""
        now = _now()
        closing = self._closing
        connection = self.connection
        grace = connection.server.grace
        if closing is not None and closing[0] <= now:
            # what was due before the close still goes out first
            self.deliver(closing[0])
            if closing[1]:
                _wait_delivered(self.client.sock, _now() + grace)
                _reset(self.client.sock)
            return False
        for side in (self.client, self.backend):
            when = side.due()
            if when is not None and when <= now:
                side.flush(now)
        stuck = self.backend_stuck()
        if stuck is not None and now - stuck >= grace:
            logger.info('connection %s: the client has ended and the backend '
                        'took nothing for %gs: closing',
                        connection.describe(), grace)
            return False
        return True

    def backend_stuck(self):
        """Once the client's stream has ended: since when the backend has
        taken nothing of what is on its way to it, here or in the kernel
        (None: nothing waits, or it moves)."""
        client, backend = self.client, self.backend
        if not (client.ended or client.lost) or backend.lost:
            return None
        if backend.blocked:
            return backend.stuck_since
        unsent = _unsent(backend.sock)
        if not unsent:
            self._unsent = None
            return None
        if self._unsent is None or self._unsent[0] != unsent:
            self._unsent = (unsent, _now())
        return self._unsent[1]

    # waiting inside a step

    def serve(self, done=None, readable=None, deadline=None, quiet=None):
        """Send what waits for either side until ``done()`` is true or
        *readable* (a Side) has data; False when the *deadline* passes, or
        *quiet* seconds go by with no event, or the connection aborts."""
        sides = (self.client, self.backend)
        connection = self.connection
        while not connection.aborted:
            if done is not None and done():
                return True
            now = _now()
            timeout = quiet
            if deadline is not None:
                if now >= deadline:
                    return False
                timeout = deadline - now if timeout is None else min(
                    timeout, deadline - now)
            watched = {}
            timer = False
            for side in sides:
                if side.blocked:
                    watched[side.fd] = _POLLOUT
                when = side.due()
                if when is not None:
                    wait = max(0.0, when - now)
                    if timeout is None or wait <= timeout:
                        timeout, timer = wait, True
            if readable is not None:
                watched[readable.fd] = watched.get(readable.fd, 0) | _IN_EVENTS
            if not watched and timeout is None:
                return False        # nothing can happen any more
            events = _poll_once(watched, timeout)
            if not events and not timer and quiet is not None and (
                    deadline is None or _now() < deadline):
                return False
            ready = False
            for fd, flags in events:
                for side in sides:
                    if side.fd == fd and side.blocked:
                        side.flush()
                if readable is not None and fd == readable.fd and (
                        flags & _NOT_POLLOUT):
                    ready = True
            now = _now()
            for side in sides:
                when = side.due()
                if when is not None and when <= now:
                    side.flush(now)
            if ready:
                return True
        return False

    def wait_readable(self, side, timeout=None):
        """Wait until *side* has data or its end, at most *timeout* seconds
        (None: no limit), sending what waits either way; True if it has."""
        return self.serve(
            None, readable=side,
            deadline=None if timeout is None else _now() + timeout)

    def make_room(self, side):
        """Wait, sending what waits, until *side* has room again (a
        protocol or hook reading in a loop faster than *side* drains).
        Raises socket.timeout when nothing moves for the idle timeout."""
        if not self.serve(lambda: not side.full,
                          quiet=self.connection.server.idle_timeout):
            raise socket.timeout('the %s takes nothing' % side.name)

    def deliver(self, until):
        """Send what is due by *until*, waiting for the sockets to take it
        for at most the grace period."""
        def delivered():
            for side in (self.client, self.backend):
                side.flush(until)
                if side.queue and side.queue[0][0] <= until:
                    return False
            return True
        return self.serve(delivered,
                          deadline=_now() + self.connection.server.grace)

    # the end

    def hang_up(self, linger=0.2):
        """End both streams now with a FIN, and read out what the peers
        still send for at most *linger* seconds: a socket closed with
        unread data would reset its peer instead."""
        sides = [side for side in (self.client, self.backend)
                 if side is not None and not side.lost]
        for side in sides:
            side.drop()
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = _now() + linger
        while sides and _now() < deadline:
            ready = _poll_once(dict((side.fd, _IN_EVENTS) for side in sides),
                               deadline - _now())
            for fd, _ in ready:
                side = self.client if fd == self.client.fd else self.backend
                try:
                    if side.sock.recv(65536, _DONTWAIT):
                        continue
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
                sides.remove(side)      # its end came: nothing unread

    def shutdown(self):
        """Wake the connection's thread, from another: both streams end."""
        for side in (self.client, self.backend):
            if side is not None:
                try:
                    side.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        """Close both sockets, and forget the links between the sides and
        the connection (see Connection.release)."""
        self.connection = None
        for side in (self.client, self.backend):
            if side is not None:
                side.drop()     # what waits goes now, not at the next GC
                _close(side.sock)
                side.peer = side.duplex = None
                side.held.clear()


# The engine: polling and sockets #########################################

class _Poller(object):
    """``select.poll`` where there is one, ``selectors`` elsewhere; both
    have no limit on descriptor numbers.  ``set(fd, events)`` watches a
    descriptor for poll()'s events (0: not at all)."""

    def __init__(self):
        self._events = {}
        if _HAS_POLL:
            self._poll = select.poll()
        else:
            import selectors
            self._sel = selectors.DefaultSelector()

    def set(self, fd, events):
        old = self._events.get(fd)
        if events == old or (not events and old is None):
            return
        if _HAS_POLL:
            if not events:
                self._poll.unregister(fd)
            elif old is None:
                self._poll.register(fd, events)
            else:
                self._poll.modify(fd, events)
        else:
            import selectors
            if old is not None:
                self._sel.unregister(fd)
            wanted = ((selectors.EVENT_READ if events & _NOT_POLLOUT else 0) |
                      (selectors.EVENT_WRITE if events & _POLLOUT else 0))
            if wanted:
                self._sel.register(fd, wanted)
        if events:
            self._events[fd] = events
        else:
            del self._events[fd]

    def poll(self, timeout=None):
        if _HAS_POLL:
            # (a signal does not interrupt it: Python retries, PEP 475)
            return self._poll.poll(None if timeout is None else
                                   int(math.ceil(timeout * 1000)))
        import selectors
        return [(key.fd, (_POLLIN if mask & selectors.EVENT_READ else 0) |
                 (_POLLOUT if mask & selectors.EVENT_WRITE else 0))
                for key, mask in self._sel.select(timeout)]


def _poll_once(watched, timeout):
    """Wait once for ``{fd: events}``; the events that came."""
    poller = _Poller()
    for fd, events in watched.items():
        poller.set(fd, events)
    if not watched:
        if timeout:
            time.sleep(timeout)
        return []
    return poller.poll(timeout)


def _wait_delivered(sock, deadline):
    """Wait until the kernel has delivered what it holds for *sock*'s peer
    (sent and acknowledged), at most until *deadline*: a reset throws away
    what is still unsent.  Only where the system tells (Linux's
    TIOCOUTQ)."""
    while _unsent(sock) and _now() < deadline:
        time.sleep(0.002)


def _unsent(sock):
    if _TIOCOUTQ is None:
        return 0
    try:
        return struct.unpack('i', fcntl.ioctl(sock.fileno(), _TIOCOUTQ,
                                              b'\0\0\0\0'))[0]
    except (OSError, ValueError):
        return 0


def _only_end_of_stream(side):
    """Whether all that is left to read from *side* is its end (a reset
    found here is the side's: the peek must not swallow it)."""
    try:
        return side.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b''
    except OSError:
        return False


def _os_error_text(exc):
    if isinstance(exc, socket.timeout):
        return 'timed out'
    if getattr(exc, 'strerror', None):
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _culprit(exc):
    """Name the plugin in whose code *exc* was raised."""
    found = 'a plugin'
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get('self')
        if isinstance(owner, BaseProtocol):
            found = "protocol '%s'" % owner.name
        elif isinstance(owner, Dummy):
            found = "behavior '%s'" % owner.name
        tb = tb.tb_next
    return found


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


def _reset(sock):
    """Close *sock* with a TCP RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack('ii', 1, 0))
    except OSError:
        pass
    _close(sock)


# The control API #########################################################

def _options_in_force(behavior):
    """Every option value of *behavior*, defaults included.  Cached and
    shared (the decision log keeps it in every record): read, never
    change it."""
    cached = getattr(behavior, '_in_force', None)
    if cached is None:
        cached = dict((name, _option_spec(spec)[2])
                      for name, spec in option_table(type(behavior)).items())
        cached.update(behavior.settings)
        behavior._in_force = cached
    return cached


def _decision_fields(behavior):
    """The direction and option values of *behavior* (each part of a
    composite), as the decision log shows them; cached like
    ``_options_in_force``."""
    cached = getattr(behavior, '_decision', None)
    if cached is None:
        parts = getattr(behavior, 'parts', [behavior])
        directions = set(part.settings.get('direction', 'both')
                         for part in parts)
        cached = (directions.pop() if len(directions) == 1 else 'mixed',
                  dict((part.name, _options_in_force(part))
                       for part in parts))
        behavior._decision = cached
    return cached


class Call(object):
    """One call of the control API, declared once (see CALLS): the HTTP
    method and path the server routes to its Controller's *handler*, the
    method *name* that the Python client (Client, proxy()) gets, and the
    action of ``vaurien ctl`` (*ctl*).

    *request* makes the call's body (PUT) or query (GET) from the client
    method's arguments, and its signature is that method's: required
    parameters become ctl's positional arguments, the others its flags, a
    ``**options`` the free ``--NAME VALUE`` pairs.  *answer* is the key of
    the answer that the method returns (None: all of it).
    """

    def __init__(self, name, method, path, handler, help, answer=None,
                 request=None, ctl=None):
        self.name = name
        self.method = method
        self.path = path
        self.handler = handler
        self.help = help
        self.answer = answer
        self.request = request
        self.ctl = ctl

    def client_method(self):
        call = self

        def method(self, *args, **kwargs):
            path, body = call.path, None
            if call.request is not None:
                body = call.request(*args, **kwargs)
            if call.method == 'GET':
                if body:
                    path += '?' + urllib.parse.urlencode(body)
                body = None
            answer = self._call(call.method, path, body)
            return answer if call.answer is None else answer[call.answer]
        method.__name__ = self.name
        method.__doc__ = self.help
        if self.request is not None:
            method.__wrapped__ = self.request     # its signature
        return method


def _backend_text(backend):
    return backend if isinstance(backend, str) else format_address(backend)


#: The control API, call by call: the one list the server's routes, the
#: Python client's methods and ``vaurien ctl``'s actions come from.
CALLS = [
    Call('get_behavior', 'GET', '/behavior', 'get_behavior',
         'The behavior in force: a name, or a mix like 20:delay,10:error.',
         answer='behavior', ctl='get-behavior'),
    Call('get_behavior_options', 'GET', '/behavior', 'get_behavior',
         'The option values in force, by behavior name.', answer='options'),
    Call('set_behavior', 'PUT', '/behavior', 'set_behavior',
         'Put behavior NAME (or a mix) in force, with these options; options '
         'left out take the proxy\'s configured values.',
         request=lambda name, **options: dict(options, name=name),
         ctl='set-behavior'),
    Call('set_mix', 'PUT', '/behavior', 'set_behavior',
         "Put a mix in force, e.g. set_mix('20:delay,10:error', {'delay': "
         "{'sleep': 0.5}}).",
         request=lambda mix, options=None: {'behavior': mix,
                                            'options': options or {}}),
    Call('list_behaviors', 'GET', '/behaviors', 'list_behaviors',
         'The behaviors the proxy knows.', answer='behaviors',
         ctl='list-behaviors'),
    Call('get_backend', 'GET', '/backend', 'get_backend',
         'Where new connections go, HOST:PORT.', answer='backend',
         ctl='get-backend'),
    Call('set_backend', 'PUT', '/backend', 'set_backend',
         "Send new connections to BACKEND ('host:port' or a tuple).",
         request=lambda backend: {'backend': _backend_text(backend)},
         ctl='set-backend'),
    Call('connections', 'GET', '/connections', 'connections',
         'The open connections.', answer='connections', ctl='connections'),
    Call('stats', 'GET', '/stats', 'stats', 'Counts since the start.',
         ctl='stats'),
    Call('health', 'GET', '/health', 'health', 'Whether the proxy serves.',
         ctl='health'),
    Call('version', 'GET', '/version', 'version', "The proxy's version.",
         answer='version', ctl='version'),
    Call('decisions', 'GET', '/decisions', 'decisions',
         'The decisions kept (exchanges that met a behavior other than '
         'dummy), oldest first; those after decision SINCE only.',
         answer='decisions', request=lambda since=0: {'since': since},
         ctl='decisions'),
]


class _NoSuchProxy(VaurienError):
    """A ?proxy= that names none: a 404."""


class Controller(object):
    """What the control API can do to a proxy, as a table of routes:
    ``call(method, path, body)`` -> ``(status, answer)``.  The HTTP front
    end and the in-process helper share it, so both check the same way.

    It serves *server*, or, with *proxies* (a Proxies collection), the
    proxy that ``?proxy=NAME`` names, the default one without it.
    """

    def __init__(self, server=None, proxies=None):
        self._server = server
        self.proxies = proxies
        # every API thread calls this one Controller at once: the query
        # and the proxy of the request a thread answers are its own
        self._request = threading.local()
        self.routes = {}
        for call in CALLS:
            route = self.routes.setdefault(call.path, {})
            handler = getattr(self, call.handler)
            # Vaurien 1.x's clients POST where ours PUT
            for method in ((call.method, 'POST') if call.method == 'PUT'
                           else (call.method,)):
                route[method] = handler

    @property
    def query(self):
        """The query of the request being answered (in this thread), as
        a dict: the last value of each key."""
        return getattr(self._request, 'query', {})

    @property
    def server(self):
        """The proxy the request being answered (in this thread) is for:
        VaurienError (404) when it names none."""
        name = self.query.get('proxy')
        if self.proxies is None and not name:
            return self._server
        return self._proxy(name)

    def _proxy(self, name):
        if self.proxies is None:
            if name and name != self._server.name:
                raise _NoSuchProxy('no proxy named %r here (this one is %r)'
                                   % (name[:100], self._server.name), 'proxy')
            return self._server
        name = name or self.proxies.default
        if name is None:
            raise _NoSuchProxy('which proxy? give ?proxy=NAME (proxies: %s)'
                               % ', '.join(self.proxies.names()), 'proxy')
        try:
            return self.proxies.get(name)
        except ToxicError:
            raise _NoSuchProxy('no proxy named %r (proxies: %s)' % (
                name[:100], ', '.join(self.proxies.names())), 'proxy')

    def call(self, method, path, body=b''):
        path, _, query = path.partition('?')
        path = path.rstrip('/') or '/'
        route = self.routes.get(path)
        if route is None:
            return 404, _error('url', 'path', 'no such endpoint %r (try: %s)'
                               % (path[:100], ', '.join(sorted(self.routes))))
        handler = route.get(method)
        if handler is None:
            return 405, _error('method', 'method', '%.40s is not allowed on '
                               '%s (allowed: %s)' % (method, path,
                                                     ', '.join(sorted(route))))
        self._request.query = dict((k, v[-1]) for k, v in
                                   urllib.parse.parse_qs(query).items())
        if method in ('PUT', 'POST'):
            try:
                data = _load_json(body)
            except ValueError as exc:
                return 400, _error('body', '', 'the body is not valid JSON: '
                                   '%s' % exc)
            if not isinstance(data, dict):
                return 400, _error('body', '', 'the body must be a JSON '
                                   'object')
            args = (data,)
        else:
            args = ()
        try:
            return 200, handler(*args)
        except _NoSuchProxy as exc:
            return 404, _error('url', 'proxy', str(exc))
        except VaurienError as exc:
            return 400, _error('body', exc.field or '', str(exc))

    # the routes

    def get_behavior(self):
        """The mix in force, and the options of each behavior in it by
        name (the parts of ``a+b`` each under its own): a body that PUT
        back as it is gives the same proxy."""
        mix = self.server.mix
        options = {}
        for behavior in mix.instances.values():
            for part in getattr(behavior, 'parts', [behavior]):
                options[part.name] = _options_in_force(part)
        return {'behavior': str(mix),
                'mix': [{'name': name, 'percent': percent}
                        for name, percent in mix.shares],
                'options': options}

    def set_behavior(self, data):
        data = dict(data)
        if 'behavior' in data:
            mix = data.pop('behavior')
            options = data.pop('options', {})
            if data:
                raise VaurienError('unexpected keys beside "behavior": %s'
                                   % ', '.join(sorted(data)), sorted(data)[0])
            if not isinstance(mix, str):
                raise VaurienError('"behavior" must be a mix string, e.g. '
                                   '"20:delay,10:error", not %s'
                                   % _json_kind(mix), 'behavior')
            if not isinstance(options, dict):
                raise VaurienError('"options" must be an object of objects, '
                                   'e.g. {"delay": {"sleep": 0.5}}, not %s'
                                   % _json_kind(options), 'options')
        elif 'name' in data:
            mix = data.pop('name')
            if not isinstance(mix, str):
                raise VaurienError('"name" must be a string, not %s'
                                   % _json_kind(mix), 'name')
            options = {mix: data} if data else {}
        else:
            raise VaurienError('the body needs a "name" key (or a '
                               '"behavior" mix)', 'name')
        for name, values in options.items():
            if not isinstance(values, dict):
                raise VaurienError('"options" must map behavior names to '
                                   'objects: "%s" is %s' % (
                                       name, _json_kind(values)), 'options')
            for option, value in values.items():
                # str() would take a list or an object for a string option
                if value is None or isinstance(value, (dict, list)):
                    raise VaurienError("option '%s' must be a string, a "
                                       "number or true/false, not %s" % (
                                           option, _json_kind(value)), option)
        self.server.set_mix(mix, options)
        logger.info('behavior changed to %s', self.server.mix)
        return {'status': 'ok'}

    def list_behaviors(self):
        return {'behaviors': Behavior.names()}

    def get_backend(self):
        return {'backend': self.server.upstream}

    def set_backend(self, data):
        backend = data.get('backend')
        if not isinstance(backend, str):
            raise VaurienError('the body needs a "backend" key: "host:port"',
                               'backend')
        try:
            address = parse_address(backend, 'backend address')
        except VaurienError as exc:
            raise VaurienError(str(exc), 'backend')
        check_not_self(self.server, address)
        self.server.backend = address
        self.server.upstream_given = backend
        logger.info('backend changed to %s (for new connections)',
                    self.server.upstream)
        return {'status': 'ok'}

    def connections(self):
        now = time.time()
        found = []
        for conn in sorted(list(self.server.connections.values()),
                           key=lambda conn: conn.id):
            found.append({
                'id': conn.id,
                'client': format_address(conn.client_address),
                'backend': format_address(conn.backend_address),
                'age': round(now - conn.started, 3),
                'bytes_up': conn.bytes_up, 'bytes_down': conn.bytes_down,
                'exchanges': conn.exchanges,
                'behavior': conn.exchange.name})
        return {'connections': found}

    def stats(self):
        server = self.server
        exchanges = dict(server.exchange_counts)
        with server._stats_lock:
            totals = dict(server.totals)
            open_now = list(server.connections.values())
        return {
            'uptime': round(time.time() - server.started, 3),
            'connections': totals.get('connections', 0) + len(open_now),
            'open_connections': len(open_now),
            'backend_errors': totals.get('backend_errors', 0),
            'bytes_up': totals.get('bytes_up', 0) +
            sum(c.bytes_up for c in open_now),
            'bytes_down': totals.get('bytes_down', 0) +
            sum(c.bytes_down for c in open_now),
            'exchanges': exchanges,
            'behavior': str(server.mix)}

    def version(self):
        return {'version': __version__}

    def decisions(self):
        """Decisions kept in memory, oldest first; ``?since=ID`` for those
        after decision ID only."""
        since = self.query.get('since', '0')
        # ASCII digits only: str.isdigit() takes '²', which int() refuses,
        # and int() takes other scripts' digits
        if not since or since.strip('0123456789') or len(since) > 18:
            raise VaurienError('since must be a decision id (a whole '
                               'number: digits 0-9, at most 18)', 'since')
        since = int(since)
        return {'decisions': [dict(record, time=round(record['time'], 6))
                              for record in list(self.server.decisions)
                              if record['id'] > since]}

    def health(self):
        return {'status': 'ok', 'proxy': format_address(self.server.address),
                'backend': self.server.upstream}


def _error(location, name, description):
    """An error answer in Vaurien 1.x's format."""
    return {'status': 'error', 'errors': [
        {'location': location, 'name': name, 'description': description}]}


def _json_kind(value):
    """What a JSON value is, in words, for error messages."""
    for types_, word in (((bool,), 'true/false'), ((dict,), 'an object'),
                         ((list,), 'a list'), ((str,), 'a string'),
                         ((int, float), 'a number')):
        if isinstance(value, types_):
            return word
    return 'null' if value is None else type(value).__name__


def _finite_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError('%.40s is too large a number' % text)
    return value


def _short_int(text):
    # int() of a long run of digits costs time quadratic in its length,
    # holding the proxy's threads back meanwhile (Python < 3.11)
    if len(text) > 40:
        raise ValueError('a number of %d digits is too long' % len(text))
    return int(text)


def _no_constant(name):
    raise ValueError('%s is not a number JSON allows (numbers must be '
                     'finite)' % name)


def _unique_keys(pairs):
    found = {}
    for key, value in pairs:
        if key in found:
            raise ValueError('key %r appears twice' % key[:40])
        found[key] = value
    return found


_JSON = json.JSONDecoder(parse_float=_finite_float, parse_int=_short_int,
                         parse_constant=_no_constant,
                         object_pairs_hook=_unique_keys)


def _load_json(body):
    """A request body as JSON, strictly: finite numbers of sane length,
    no key twice in an object (which of them would count?)."""
    try:
        return _JSON.decode(body.decode('utf-8') if body else '')
    except RecursionError:
        raise ValueError('it is nested too deeply')


def _is_local_host(host, own):
    """Whether a Host header names this machine's loopback, so that no
    web page can reach the API through a DNS name it controls (DNS
    rebinding): an address of 127.0.0.0/8 or ::1 (IPv6 in brackets), with
    or without a port, ``localhost``, or one of *own*, the names and
    address the API was told to listen on (lower case)."""
    host = host.strip().lower()
    if host.startswith('['):
        name, bracket, port = host[1:].partition(']')
        if not bracket or (port and not port.startswith(':')):
            return False
        port = port[1:]
    else:
        name, _, port = host.partition(':')
    if port.strip('0123456789') or len(port) > 5:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:          # a name
        return not host.startswith('[') and (name == 'localhost' or
                                             name in own)
    if (address.version == 6) != host.startswith('['):
        return False
    mapped = getattr(address, 'ipv4_mapped', None)
    return (address.is_loopback or name in own or
            (mapped is not None and mapped.is_loopback))


class _Refused(Exception):
    """A request answered with an error before its end was read: the
    connection closes after the answer, so that what follows (a body, or
    bytes posing as the next request) is never taken for a request."""

    def __init__(self, status, location, name, description):
        Exception.__init__(self, description)
        self.status = status
        self.answer = _error(location, name, description)


class _RequestReader(io.RawIOBase):
    """A socket read against a deadline (``time.monotonic()``) that bounds
    every read of a request together, not each read alone."""

    # setting a socket's timeout costs a system call (and a turn at the
    # GIL): it is set only when the one in force could overshoot the
    # deadline by more than this many seconds
    slack = 0.25

    def __init__(self, sock, turn=None):
        io.RawIOBase.__init__(self)
        self.sock = sock
        self.deadline = None
        self.received = 0       # bytes since the deadline was set
        #: the turn of the request being read (see _ApiFirst): from its
        #: first byte to its answer
        self.turn = turn

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('timed out')
        timeout = self.sock.gettimeout()
        if timeout is None or timeout > left + self.slack:
            self.sock.settimeout(left)
        count = self.sock.recv_into(buffer)
        if count and self.turn is None:
            self.turn = _Turn()     # a request came: it goes first
        self.received += count
        return count

    def end_turn(self):
        if self.turn is not None:
            self.turn.end()
            self.turn = None


# the characters of a token (a method, a header name), and the control
# characters no request line or header value may hold (RFC 9110 5.5, 5.6.2)
_TOKEN = (b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
          b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CONTROLS = bytes(range(0, 9)) + bytes(range(10, 32)) + b'\x7f'
_HEX = b'0123456789abcdefABCDEF'


class ControlHandler(http.server.BaseHTTPRequestHandler):
    """The control API over HTTP: JSON in, JSON out, errors included.

    Replaces the base class's reading of a request (``handle_one_request``,
    ``parse_request``) with a stricter one: a whole request (its line,
    headers and body, and on a kept-alive connection the wait for it) must
    arrive within ``timeout`` seconds; anything malformed or ambiguous is
    refused with a JSON error, and the connection closes after any answer
    sent before the request was read to its end.  ``send_error`` answers
    JSON too.
    """

    server_version = 'vaurien/' + __version__
    protocol_version = 'HTTP/1.1'
    # an error answered before the request's version is known still has
    # a status line (the base class's default, HTTP/0.9, has none)
    default_request_version = 'HTTP/1.0'
    # seconds a client has to send a whole request, and to take an answer
    timeout = 10
    max_body = 1 << 20
    max_line = 1 << 16          # the request line, in bytes
    max_header_bytes = 1 << 16  # all the headers together
    max_headers = 100

    def setup(self):
        http.server.BaseHTTPRequestHandler.setup(self)
        # the base class's reader has a timeout per read: this one has a
        # deadline per request
        self.rfile.close()
        # the server gave way at the accept already: its first request
        # takes that turn
        self.reader = _RequestReader(
            self.connection, self.server.turns.pop(self.connection, None))
        self.rfile = io.BufferedReader(self.reader)
        self._forget_request()

    def _forget_request(self):
        # what an answer reads, before a request has told it
        self.command = self.requestline = self.path = ''
        self.request_version = self.default_request_version

    def handle_one_request(self):
        """Read one request by its deadline and answer it; the proxy's
        connections give way meanwhile (see _ApiFirst)."""
        try:
            self._handle_one_request()
        finally:
            self.reader.end_turn()

    def finish(self):
        # (a subclass's own handle may not have called handle_one_request)
        self.reader.end_turn()
        http.server.BaseHTTPRequestHandler.finish(self)

    def _handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.timeout
        self.reader.received = 0
        self.close_connection = True
        self._forget_request()
        try:
            reply = self._read_and_call()
        except _Refused as refusal:
            self.close_connection = True
            reply = refusal.status, refusal.answer
        except socket.timeout:
            self.close_connection = True
            if not self.reader.received:
                return          # kept alive, and quiet: close, nothing to say
            reply = 408, _error('request', '', 'the request did not arrive '
                                'whole within %g seconds' % self.timeout)
        except OSError:         # the client went away
            self.close_connection = True
            return
        except Exception as exc:
            self.close_connection = True
            logger.error('control API: %s %.100s from %s failed: %s: %s',
                         self.command, self.path, self.address_string(),
                         type(exc).__name__, exc)
            logger.debug('control API failure', exc_info=True)
            reply = 500, _error('server', '', 'internal error (%s: %s); the '
                                "proxy's log has the details" % (
                                    type(exc).__name__, exc))
        if reply is not None:
            try:
                self._send(*reply)
            except OSError:
                self.close_connection = True

    def _read_and_call(self):
        """``(status, answer)`` for the next request, or None when the
        connection ended before one."""
        if not self._read_head():
            return None
        server = self.server
        toxiproxy = server.toxiproxy
        if toxiproxy is not None and server.serves_toxiproxy(self.path):
            return self._toxiproxy_call(toxiproxy)
        refusal = self._refusal()
        if refusal is not None:
            self.close_connection = True
            return refusal
        body = self._read_body()
        method = 'GET' if self.command == 'HEAD' else self.command
        return server.answer(False, method, self.path, body)

    def _toxiproxy_call(self, api):
        """A request of Toxiproxy's API: refused in its words, or
        answered by it (a _Reply)."""
        found = api.route(self.command, self.path)
        if isinstance(found, _Reply):       # no such route: no refusal
            self.close_connection = True
            return found.status, found
        refusal = self._refusal(toxiproxy=True)
        if refusal is not None:
            self.close_connection = True
            status, answer = refusal
            if status == 403 and answer['errors'][0]['name'] == 'Origin':
                reply = _Reply(403, b'User agent not allowed\n', [
                    ('Content-Type', 'text/plain; charset=utf-8'),
                    ('X-Content-Type-Options', 'nosniff')])
            else:
                reply = api.error(status,
                                  answer['errors'][0]['description'])
        else:
            reply = self.server.answer(True, self.command, self.path,
                                       self._read_body())
        # a matched route's answer carries a request id, refusals too
        reply.headers.append(('X-Toxiproxy-Request-Id', _request_id()))
        return reply.status, reply

    def _read_head(self):
        """Read and check the request line and headers; False when the
        connection ended before a request."""
        line = self.rfile.readline(self.max_line + 1)
        for _ in range(4):      # blank lines before a request are allowed
            if line not in (b'\r\n', b'\n'):
                break
            line = self.rfile.readline(self.max_line + 1)
        if not line:
            return False
        self.raw_requestline = line
        if len(line) > self.max_line:
            self.requestline = line[:100].decode('latin-1') + '...'
            raise _Refused(414, 'url', 'path', 'the request line is longer '
                           'than %d bytes' % self.max_line)
        self.requestline = line.rstrip(b'\r\n').decode('latin-1')
        parts = _line_content(line).split(b' ')
        if len(parts) != 3 or not parts[0] or parts[0].translate(
                None, _TOKEN) or parts[1].translate(None, _CONTROLS) != \
                parts[1]:
            raise _Refused(400, 'request', '', 'malformed request line %r '
                           '(expected METHOD /path HTTP/1.1)'
                           % self.requestline[:100])
        method, target, version = parts
        if version not in (b'HTTP/1.1', b'HTTP/1.0'):
            if (len(version) == 8 and version[:5] == b'HTTP/' and
                    version[5:6].isdigit() and version[6:7] == b'.' and
                    version[7:8].isdigit()):
                raise _Refused(505, 'request', 'version', 'HTTP version %s '
                               'is not supported: this API speaks HTTP/1.1 '
                               'and 1.0' % version.decode('ascii'))
            raise _Refused(400, 'request', 'version', 'malformed HTTP '
                           'version %r (expected HTTP/1.1)'
                           % version.decode('latin-1')[:20])
        self.command = method.decode('ascii')
        self.path = target.decode('latin-1')
        self.request_version = version.decode('ascii')
        if not target.startswith(b'/'):
            raise _Refused(400, 'url', 'path', 'the request target must be '
                           'a path such as /behavior, not %r'
                           % self.path[:100])
        self.headers = http.client.HTTPMessage()
        for name, value in self._read_fields():
            self.headers[name] = value
        connection = ','.join(self.headers.get_all('Connection') or ())
        tokens = set(token.strip() for token in
                     connection.lower().split(','))
        if self.request_version == 'HTTP/1.1':
            self.close_connection = 'close' in tokens
        else:
            self.close_connection = 'keep-alive' not in tokens
        return True

    def _read_fields(self, budget=None):
        """Header (or trailer) fields up to the blank line, as (name,
        value) strings; within *budget* bytes in all."""
        budget = self.max_header_bytes if budget is None else budget
        fields = []
        while True:
            line = self.rfile.readline(budget + 1)
            budget -= len(line)
            if budget < 0:
                raise _Refused(431, 'header', '', 'the headers are larger '
                               'than %d bytes' % self.max_header_bytes)
            if not line.endswith(b'\n'):
                raise _Refused(400, 'header', '', 'the request ended '
                               'within its headers')
            if line in (b'\r\n', b'\n'):
                return fields
            if len(fields) >= self.max_headers:
                raise _Refused(431, 'header', '', 'more than %d headers'
                               % self.max_headers)
            name, colon, value = _line_content(line).partition(b':')
            # a space before the colon, or a line folded onto the one
            # before, reads differently from one parser to the next
            if (not colon or not name or name.translate(None, _TOKEN) or
                    value.translate(None, _CONTROLS) != value):
                raise _Refused(400, 'header', '', 'malformed header line '
                               '%r' % line[:100].decode('latin-1'))
            fields.append((name.decode('ascii'),
                           value.strip(b' \t').decode('latin-1')))

    def _read_body(self):
        """The body, framed by Content-Length or chunked; checked before
        any of it is read, and before 100 Continue is sent."""
        headers = self.headers
        lengths = headers.get_all('Content-Length') or []
        codings = headers.get_all('Transfer-Encoding') or []
        if codings:
            if lengths:
                raise _Refused(400, 'header', 'Transfer-Encoding', 'both '
                               'Content-Length and Transfer-Encoding: send '
                               'one of them')
            coding = ','.join(codings).strip().lower()
            if coding != 'chunked' or self.request_version != 'HTTP/1.1':
                raise _Refused(501, 'header', 'Transfer-Encoding',
                               'Transfer-Encoding %r is not supported (only '
                               'chunked, in HTTP/1.1)' % coding[:40])
            length = None
        else:
            text = lengths[0].strip() if len(lengths) == 1 else '0'
            if len(lengths) > 1 or not text or text.strip('0123456789'):
                raise _Refused(400, 'header', 'Content-Length', 'one '
                               'Content-Length header is expected, a whole '
                               'number of bytes (not %s)' % ', '.join(
                                   map(repr, lengths))[:100])
            length = int(text) if len(text) < 16 else self.max_body + 1
            if length > self.max_body:
                raise _Refused(413, 'header', 'Content-Length', 'a body of '
                               '0 to %d bytes is expected' % self.max_body)
        expect = ','.join(headers.get_all('Expect') or ()).strip().lower()
        if expect and expect != '100-continue':
            raise _Refused(417, 'header', 'Expect', 'only Expect: '
                           '100-continue is understood, not %r' % expect[:40])
        if expect and length != 0 and self.request_version == 'HTTP/1.1':
            self.wfile.write(b'HTTP/1.1 100 Continue\r\n\r\n')
        if length is None:
            return self._read_chunks()
        body = self.rfile.read(length) if length else b''
        if len(body) < length:
            raise _Refused(400, 'body', '', 'the body ended after %d of its '
                           '%d bytes' % (len(body), length))
        return body

    def _read_chunks(self):
        chunks, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            digits = line.split(b';', 1)[0].strip(b' \t\r\n')
            if (not line.endswith(b'\n') or not digits or len(digits) > 8 or
                    digits.translate(None, _HEX)):
                raise _Refused(400, 'body', '', 'malformed chunk size line '
                               '%r' % line[:40].decode('latin-1'))
            count = int(digits, 16)
            if not count:
                break
            size += count
            if size > self.max_body:
                raise _Refused(413, 'body', '', 'a body of 0 to %d bytes is '
                               'expected' % self.max_body)
            chunk = self.rfile.read(count)
            if len(chunk) < count or self.rfile.readline(3) not in (
                    b'\r\n', b'\n'):
                raise _Refused(400, 'body', '', 'malformed or incomplete '
                               'chunk')
            chunks.append(chunk)
        self._read_fields()     # trailer fields: read, not used
        return b''.join(chunks)

    def _refusal(self, toxiproxy=False):
        """Requests a web page could make (forged against localhost from a
        browser) are refused; so are requests without the token.

        A request of Toxiproxy's clients (*toxiproxy*) is a browser's by
        its Origin or User-Agent only: Node's fetch sends Sec-Fetch-Mode
        on every request, toxiproxy-node-client's included, and a
        browser's User-Agent starts with Mozilla/ anyway."""
        headers = self.headers
        agent = headers.get('User-Agent', '')
        if (headers.get('Origin') is not None or agent.startswith('Mozilla/')
                or not toxiproxy and any(name.lower().startswith('sec-fetch-')
                                         for name in headers.keys())):
            return 403, _error('header', 'Origin', 'requests from web '
                               'browsers are refused: use curl, a script or '
                               'vaurien.Client')
        hosts = headers.get_all('Host') or []
        if len(hosts) > 1 or (not hosts and
                              self.request_version == 'HTTP/1.1'):
            raise _Refused(400, 'header', 'Host', 'one Host header is '
                           'expected, not %d' % len(hosts))
        server = self.server
        if (hosts and server.loopback_only and
                not _is_local_host(hosts[0], server.own_names)):
            return 403, _error('header', 'Host', 'this API answers to '
                               'localhost only, not %r' % hosts[0][:100])
        token = server.token
        if token and self.path.split('?')[0].rstrip('/') != '/health':
            given = headers.get_all('Authorization') or []
            scheme, _, credentials = (given[0] if len(given) == 1
                                      else '').strip().partition(' ')
            # compared in constant time; the scheme's case does not matter
            matches = hmac.compare_digest(
                credentials.strip().encode('latin-1'), token.encode('utf-8'))
            if scheme.lower() != 'bearer' or not matches:
                return 401, _error('header', 'Authorization', 'a bearer '
                                   'token is required (--http-token)')
        return None

    def send_error(self, code, message=None, explain=None):
        """Replaces the base method: the error as JSON, in ``_error()``'s
        shape, and the connection closes after it."""
        self.close_connection = True
        description = message or self.responses.get(code, ('error',))[0]
        if explain:
            description += ': ' + explain
        self._send(code, _error('request', '', description))

    def _send(self, status, answer):
        """Send *answer* as JSON, all in one write (HEAD: its headers only);
        a _Reply as it is."""
        if isinstance(answer, _Reply):
            return self._send_reply(answer)
        try:
            text = json.dumps(answer, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            logger.error('control API: the answer to %s %.100s cannot be '
                         'JSON (%s): please report this bug', self.command,
                         self.path, exc)
            status, text = 500, json.dumps(_error(
                'server', '', 'the answer cannot be encoded as JSON: %s'
                % exc), sort_keys=True)
        data = (text + '\n').encode('utf-8')
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        if status == 401:
            self.send_header('WWW-Authenticate', 'Bearer')
        if self.close_connection:
            self.send_header('Connection', 'close')
        self._headers_buffer.append(b'\r\n')
        if self.command != 'HEAD':
            self._headers_buffer.append(data)
        data, self._headers_buffer = b''.join(self._headers_buffer), []
        # the reader may have shortened the timeout to its deadline
        if self.connection.gettimeout() != self.timeout:
            self.connection.settimeout(self.timeout)
        self.wfile.write(data)  # sendall: the timeout bounds it whole

    def _send_reply(self, reply):
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.status not in (204, 304):
            self.send_header('Content-Length', str(len(reply.body)))
        if self.close_connection:
            self.send_header('Connection', 'close')
        self._headers_buffer.append(b'\r\n')
        if self.command != 'HEAD':
            self._headers_buffer.append(reply.body)
        data, self._headers_buffer = b''.join(self._headers_buffer), []
        if self.connection.gettimeout() != self.timeout:
            self.connection.settimeout(self.timeout)
        self.wfile.write(data)

    def log_message(self, format, *args):
        logger.debug('control API: %s %s', self.address_string(),
                     format % args)


def _request_id():
    """Twenty characters, as Toxiproxy's X-Toxiproxy-Request-Id has."""
    return ''.join(random.choice('0123456789abcdefghijklmnopqrstuv')
                   for _ in range(20))


def _line_content(line):
    """A request or header line without its CRLF (or bare LF)."""
    return line[:-2] if line.endswith(b'\r\n') else line.rstrip(b'\n')


class ControlServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The control API's HTTP server, for one ProxyServer.

    At most ``max_connections`` API connections are served at once, each
    in its own thread with one descriptor: beyond them a connection is
    answered 503 and closed at once, so that slow or stuck API clients
    can never take the threads and descriptors the proxy's own traffic
    needs.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default of 5 drops connections (they wait for SYN
    # retries, one to fifteen seconds) while the accepting thread waits
    # its turn behind busy proxy threads
    request_queue_size = 1024
    max_connections = 64
    # seconds, after an answer that closes the connection, to read what
    # the client still sends (a body not read): closing on unread bytes
    # would reset the connection, and the client could lose the answer
    linger = 1.0
    handler_class = ControlHandler
    #: the _Supervisor whose workers each change reaches too (and whose
    #: reads of live state gather theirs), or None
    workers = None

    def __init__(self, address, proxy=None, token=None, proxies=None,
                 toxiproxy_first=False):
        self.proxy = proxy
        self.controller = Controller(proxy, proxies)
        #: Toxiproxy's API, over every proxy of the process (with
        #: *proxies*); *toxiproxy_first*: it answers unknown paths too
        #: (``vaurien.py server``), else Vaurien's API does
        self.toxiproxy = ToxiproxyAPI(proxies) if proxies is not None \
            else None
        self.toxiproxy_first = toxiproxy_first
        self.token = token or None
        self.active = 0
        self._active_lock = threading.Lock()
        #: the accept's turn (see _ApiFirst) of each connection whose
        #: handler has yet to take it
        self.turns = {}
        self._turned_away = False
        if ':' in address[0]:
            self.address_family = socket.AF_INET6
        http.server.HTTPServer.__init__(self, tuple(address)[:2],
                                        self.handler_class)
        try:
            self.loopback_only = ipaddress.ip_address(
                self.address[0].split('%')[0]).is_loopback
        except ValueError:
            self.loopback_only = False
        # what a Host header may name besides loopback addresses: the
        # host the API was told to listen on, and the address it got
        self.own_names = frozenset((address[0].lower(),
                                    self.address[0].lower()))

    @property
    def address(self):
        return self.server_address[:2]

    def answer(self, toxiproxy, method, path, body):
        """A request's answer: Toxiproxy's API's (a _Reply) or Vaurien's
        (``(status, answer)``); with workers, theirs too (see
        _Supervisor.answer)."""
        if self.workers is not None:
            return self.workers.answer(self, toxiproxy, method, path, body)
        if toxiproxy:
            return self.toxiproxy.call(method, path, body)
        return self.controller.call(method, path, body)

    def serves_toxiproxy(self, path):
        """Whether Toxiproxy's API answers *path* (the two families of
        endpoints do not collide)."""
        if self.toxiproxy.owns(path):
            return True
        # vaurien.py server answers /version as Toxiproxy does (its
        # clients read it), with vaurien's version
        path = path.split('?', 1)[0]
        return self.toxiproxy_first and (
            path == '/version' or path.rstrip('/') not in
            self.controller.routes)

    def get_request(self):
        """Replaces the base method: a new connection's first request goes
        first already (see _ApiFirst: its handler's thread is yet to
        start)."""
        request = http.server.HTTPServer.get_request(self)
        self.turns[request[0]] = _Turn()
        return request

    def close_request(self, request):
        """Replaces the base method: the accept's turn ends with the
        connection if no handler took it (refused, turned away, no thread,
        a handler that failed to start)."""
        turn = self.turns.pop(request, None)
        if turn is not None:
            turn.end()
        http.server.HTTPServer.close_request(self, request)

    def process_request(self, request, client_address):
        """Serve the connection in a thread, unless ``max_connections``
        are open: then answer 503 and close it at once."""
        with self._active_lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
                self._turned_away = False
        if full:
            self._turn_away(request, client_address)
            return
        try:
            socketserver.ThreadingMixIn.process_request(self, request,
                                                        client_address)
        except Exception:       # no thread to be had: the caller closes it
            self._ended()
            raise

    def process_request_thread(self, request, client_address):
        try:
            socketserver.ThreadingMixIn.process_request_thread(
                self, request, client_address)
        finally:
            self._ended()

    def _ended(self):
        with self._active_lock:
            self.active -= 1

    def _turn_away(self, request, client_address):
        if not self._turned_away:
            self._turned_away = True
            logger.warning('control API: %d connections open already: '
                           'closing new ones (from %s first) until one ends',
                           self.max_connections,
                           format_address(client_address))
        data = (json.dumps(_error(
            'server', '', 'the control API serves %d connections at once: '
            'try again' % self.max_connections)) + '\n').encode('utf-8')
        try:
            request.send(b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: '
                         b'application/json\r\nContent-Length: %d\r\n'
                         b'Connection: close\r\n\r\n%s' % (len(data), data),
                         getattr(socket, 'MSG_DONTWAIT', 0))
        except OSError:
            pass
        self.close_request(request)

    def shutdown_request(self, request):
        """Replaces the base method: a lingering close (see ``linger``)."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger
            left = 1 << 16
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                request.settimeout(wait)
                data = request.recv(min(left, 16384))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        logger.debug('control API: %s: %s', format_address(client_address),
                     sys.exc_info()[1])


# Many proxies in one process ##############################################

class Proxies(object):
    """Every proxy of the process, by name; each is a ProxyServer with its
    own listener and accepting thread, and a thread per connection.

    They come from the command line and [vaurien] (named ``vaurien``), the
    ini file's [proxy:NAME] sections, and Toxiproxy's API (POST /proxies,
    /populate, the server's -config file).  A disabled proxy keeps its mix
    and its toxics, its listener closed; enabled again, it listens on the
    same address.  ``settings`` are the keywords every new ProxyServer
    gets (seed, statsd, timeouts)."""

    def __init__(self, **settings):
        self.settings = settings
        self._lock = threading.RLock()
        self._proxies = {}
        #: the proxy Vaurien's endpoints serve when no ?proxy= names one
        self.default = None
        #: set to make serve() return (see stop())
        self.stopped = threading.Event()
        self.waker = None

    def servers(self):
        return [self._proxies[name] for name in self.names()
                if name in self._proxies]

    def stop(self):
        """Make serve() return."""
        self.stopped.set()
        if self.waker is not None:
            with contextlib.suppress(OSError):
                self.waker.send(b'\0')

    def __contains__(self, name):
        return name in self._proxies

    def names(self):
        return sorted(self._proxies)

    def get(self, name):
        """The ProxyServer named *name*; ToxicError 404 when none is."""
        server = self._proxies.get(name)
        if server is None:
            raise ToxicError('proxy not found', 404, 'proxy')
        return server

    def add(self, server, enabled=True):
        """Take *server* in, and serve it (listening if *enabled*)."""
        with self._lock:
            if server.name in self._proxies:
                raise ToxicError('proxy already exists', 409, 'name')
            self._proxies[server.name] = server
        if self.default is None and server.name == DEFAULT_PROXY:
            self.default = server.name
        self.start_accepting(server)
        if not enabled:
            server.disable()
        return server

    @staticmethod
    def start_accepting(server):
        """Run *server*'s serve_forever in a thread of its own."""
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={'poll_interval': 0.2},
                                  name='vaurien %s' % server.name)
        thread.daemon = True
        thread.start()
        server.thread = thread

    def create(self, name, listen, upstream, enabled=True, protocol='tcp',
               protocol_options=None, behavior='dummy',
               behavior_options=None):
        """A new proxy, listening at once if *enabled* (Toxiproxy's
        create: ToxicError 409 for a name taken, 500 when it cannot
        listen)."""
        with self._lock:
            if name in self._proxies:
                raise ToxicError('proxy already exists', 409, 'name')
            if enabled:
                address = _go_listen(listen)
            else:
                # Toxiproxy reads the listen address when it first
                # listens (see _enable): till then it shows it as given
                try:
                    address = _go_listen(listen)
                except ToxicError:
                    address = ('127.0.0.1', 0)
            try:
                server = ProxyServer(
                    address, upstream, protocol=protocol, behavior=behavior,
                    protocol_options=protocol_options,
                    behavior_options=behavior_options, name=name,
                    listen=enabled, **self.settings)
            except OSError as exc:
                raise ToxicError(_go_bind_error(address, exc), 500)
            if not enabled:
                server._listen_shown = listen
            return self.add(server, enabled)

    def remove(self, name):
        with self._lock:
            server = self.get(name)
            del self._proxies[name]
            if self.default == name:
                self.default = None
        server.stop()

    def update(self, name, listen=None, upstream=None, enabled=None):
        """Toxiproxy's update: a listen address that resolves elsewhere,
        or another upstream, restarts the proxy (its connections close);
        then it starts or stops as *enabled* says."""
        server = self.get(name)
        with self._lock:
            if listen is not None and listen != server.listen:
                address = _go_listen(listen)
                if _resolved(address) != _resolved(server.address):
                    was = server.enabled
                    server.disable()
                    server.server_address = address
                    # shown as given until it listens (Toxiproxy's Listen)
                    server._listen_shown = listen
                    if was:
                        self._enable(server)
            if upstream is not None and upstream != server.upstream:
                server.disable_connections()
                server.set_upstream(upstream)
            if enabled is not None and enabled != server.enabled:
                if enabled:
                    self._enable(server)
                else:
                    server.disable()
        return server

    def _enable(self, server):
        """Listen where the proxy shows (Toxiproxy's start reads its
        Listen then: as given, or where it last listened)."""
        server.server_address = _go_listen(server.listen)
        try:
            server.enable()
        except OSError as exc:
            raise ToxicError(_go_bind_error(server.server_address, exc), 500)

    def reset(self):
        """Toxiproxy's /reset: every proxy enabled again, every toxic
        removed; and vaurien's mix back to dummy on each."""
        for name in self.names():
            server = self._proxies.get(name)
            if server is None:
                continue
            if not server.enabled:
                self._enable(server)
            server.toxics.clear()
            server.set_mix('dummy')

    def populate(self, items):
        """Toxiproxy's /populate with *items* checked already: a proxy of
        the same name whose listen and upstream are the same is kept as it
        is (its toxics too); any other is replaced.  Returns the proxies,
        in order; on the first failure, ToxicError with ``done``, the ones
        done so far."""
        done = []
        for item in items:
            name = item['name']
            try:
                old = self._proxies.get(name)
                if old is not None and _resolved(_go_listen(
                        item.get('listen') or '')) == _resolved(
                            old.address) and item['upstream'] == old.upstream:
                    done.append(old)
                    continue
                if old is not None:
                    self.remove(name)
                server = self.create(
                    name, item.get('listen') or '', item['upstream'],
                    item.get('enabled', True),
                    protocol=item.get('protocol') or 'tcp',
                    protocol_options=item.get('protocol_options'))
                for toxic in item.get('toxics') or ():
                    server.toxics.add(make_toxic(server, toxic,
                                                 server.toxics))
                done.append(server)
            except (ToxicError, VaurienError) as exc:
                error = exc if isinstance(exc, ToxicError) else ToxicError(
                    str(exc), 400, exc.field)
                error.done = done
                raise error
        return done

    def close_all(self):
        for server in list(self._proxies.values()):
            server.stop()


def _go_listen(text):
    """A listen address Toxiproxy's way: ``host:port``, ``:port`` or ``""``
    (every interface, a free port); ToxicError 500 in Go's words when it
    is none of them."""
    text = text.strip()
    if not text:
        return ('::' if socket.has_ipv6 else '0.0.0.0', 0)
    host, sep, port = text.rpartition(':')
    if not sep:
        raise ToxicError('listen tcp: address %s: missing port in address'
                         % text, 500, 'listen')
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    elif ':' in host:
        raise ToxicError('listen tcp: address %s: too many colons in address'
                         % text, 500, 'listen')
    if not port.isdigit() or int(port) > 65535:
        raise ToxicError('listen tcp: address %s: invalid port' % text, 500,
                         'listen')
    return (host or ('::' if socket.has_ipv6 else '0.0.0.0'), int(port))


def _resolved(address):
    """*address* with its host resolved, to tell two spellings of one
    address apart from two addresses (localhost:80 is 127.0.0.1:80)."""
    host, port = address[:2]
    try:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return info[0][4][:2]
    except (OSError, UnicodeError):
        return (host, port)


def _go_bind_error(address, exc):
    """What Go says when it cannot listen on *address*."""
    if isinstance(exc, socket.gaierror):
        return 'listen tcp: lookup %s: no such host' % address[0]
    return 'listen tcp %s: bind: %s' % (format_address(_resolved(address)),
                                        _os_error_text(exc))


# Toxiproxy's API ##########################################################

class _Reply(object):
    """An answer the control API sends as it is: its status, its body
    (bytes) and its headers (Toxiproxy's answers are exact to the byte)."""

    __slots__ = ('status', 'body', 'headers')

    def __init__(self, status, body=b'', headers=()):
        self.status = status
        self.body = body
        self.headers = list(headers)


def _go_json(value):
    """*value* as Go's encoding/json writes it: compact, keys in the order
    given, UTF-8, and <, > and & escaped."""
    text = json.dumps(value, separators=(',', ':'), ensure_ascii=False,
                      allow_nan=False)
    return (text.replace('<', '\\u003c').replace('>', '\\u003e')
            .replace('&', '\\u0026').replace('\u2028', '\\u2028')
            .replace('\u2029', '\\u2029')).encode('utf-8')


def _go_json_error(text, exc):
    """What Go's json decoder says of *text*, where Python's said *exc*."""
    message = getattr(exc, 'msg', str(exc))
    pos = getattr(exc, 'pos', len(text))
    if not text.strip():
        return 'EOF'
    if pos >= len(text) or message.startswith('Unterminated'):
        return 'unexpected EOF'
    char = text[pos]
    shown = "'%s'" % char if char.isprintable() and char not in "'\\" else \
        repr(char) if char != "'" else "'\\''"
    if message.startswith('Expecting value'):
        return 'invalid character %s looking for beginning of value' % shown
    if message.startswith('Expecting property name'):
        return ('invalid character %s looking for beginning of object key '
                'string' % shown)
    if message.startswith("Expecting ':'"):
        return 'invalid character %s after object key' % shown
    if message.startswith("Expecting ','"):
        inside = 'object key:value pair' if text[:pos].rstrip()[-1:] != ']' \
            and _innermost(text[:pos]) == '{' else 'array element'
        return 'invalid character %s after %s' % (shown, inside)
    if message.startswith('Invalid control character'):
        return 'invalid character %s in string literal' % shown
    return 'invalid character %s: %s' % (shown, message)


def _innermost(text):
    """The opening bracket of the innermost object or array still open at
    the end of *text* (a JSON prefix), or ''."""
    stack = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == '\\':
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in '[{':
            stack.append(char)
        elif char in ']}' and stack:
            stack.pop()
    return stack[-1] if stack else ''


class ToxiproxyAPI(object):
    """Toxiproxy's HTTP API over a Proxies collection, as its 2.12 server
    answers (every path, status, header and error text of the map in
    README.txt's "Coming from Toxiproxy"): ``call(method, path, body)``
    -> a _Reply.  The control server sends its requests here when
    ``owns(path)``."""

    #: Toxiproxy's routes: a path's parts, and the methods of each
    ROUTES = (
        (('reset',), {'POST': 'reset'}),
        (('proxies',), {'GET': 'list_proxies', 'POST': 'create'}),
        (('populate',), {'POST': 'populate'}),
        (('proxies', None), {'GET': 'proxy', 'POST': 'update',
                             'PATCH': 'update', 'DELETE': 'delete'}),
        (('proxies', None, 'toxics'), {'GET': 'toxics', 'POST': 'add_toxic'}),
        (('proxies', None, 'toxics', None), {
            'GET': 'toxic', 'POST': 'update_toxic', 'PATCH': 'update_toxic',
            'DELETE': 'remove_toxic'}),
        (('metrics',), None),       # any method
        (('version',), {'GET': 'version'}),     # vaurien.py server's
    )

    def __init__(self, proxies):
        self.proxies = proxies

    @staticmethod
    def owns(path):
        path = path.split('?', 1)[0]
        return path in ('/reset', '/populate', '/metrics', '/proxies') or \
            path.startswith('/proxies/')

    def route(self, method, path):
        """``(handler name, path arguments)``; a _Reply for an unknown path
        (404) or method (405)."""
        parts = [urllib.parse.unquote(part) for part in
                 path.split('?', 1)[0].split('/')[1:]]
        for pattern, methods in self.ROUTES:
            if len(pattern) != len(parts) or any(
                    want is not None and want != got or not got
                    for want, got in zip(pattern, parts)):
                continue
            if methods is None:
                return 'metrics', []
            name = methods.get(method)
            if name is None:
                return _Reply(405)
            return name, [got for want, got in zip(pattern, parts)
                          if want is None]
        return _Reply(404, b'404 page not found\n', [
            ('Content-Type', 'text/plain; charset=utf-8'),
            ('X-Content-Type-Options', 'nosniff')])

    def call(self, method, path, body=b''):
        found = self.route(method, path)
        if isinstance(found, _Reply):
            return found
        name, args = found
        try:
            return getattr(self, name)(body, *args)
        except ToxicError as exc:
            return self.error(exc.status, str(exc))

    @staticmethod
    def version(body):
        return _Reply(200, b'{"version": "%s"}\n' % __version__.encode(),
                      [('Content-Type', 'application/json;charset=utf-8')])

    @staticmethod
    def error(status, message):
        """Toxiproxy's error: JSON, sent as text/plain (http.Error)."""
        return _Reply(status, _go_json({'error': message, 'status': status})
                      + b'\n', [('Content-Type', 'text/plain; charset=utf-8'),
                                ('X-Content-Type-Options', 'nosniff')])

    @staticmethod
    def ok(value, status=200):
        return _Reply(status, _go_json(value),
                      [('Content-Type', 'application/json')])

    @staticmethod
    def decode(body, go_type='toxiproxy.Proxy', want=dict):
        """The JSON value a request carries, as Go's Decoder reads it: the
        first value (what follows is not read), checked to be *want*."""
        text = body.decode('utf-8', 'replace')
        try:
            value, _ = json.JSONDecoder().raw_decode(text, len(text) - len(
                text.lstrip()))
        except ValueError as exc:
            raise ToxicError('bad request body: %s' % _go_json_error(text,
                                                                     exc))
        if not isinstance(value, want) or value is None:
            if value is None:
                return want()
            raise ToxicError('bad request body: json: cannot unmarshal %s '
                             'into Go value of type %s'
                             % (_go_kind(value), go_type))
        return value

    def proxy_json(self, server):
        """A proxy as Toxiproxy shows it (``Logger`` is Go's, emitted as it
        is), with vaurien's protocol when it has one."""
        shown = {'name': server.name, 'listen': server.listen,
                 'upstream': server.upstream, 'enabled': server.enabled,
                 'Logger': {}, 'toxics': [toxic.to_json() for toxic in
                                          server.toxics.listed()]}
        if server.protocol_name != 'tcp':
            shown['protocol'] = server.protocol_name
            if server.protocol_settings:
                shown['protocol_options'] = dict(server.protocol_settings)
        return shown

    # the routes

    def list_proxies(self, body):
        return self.ok(dict((name, self.proxy_json(self.proxies.get(name)))
                            for name in self.proxies.names()))

    def create(self, body):
        data = self.decode(body)
        item = self._proxy_fields(data)
        server = self.proxies.create(
            item['name'], item.get('listen') or '', item['upstream'],
            item.get('enabled', True), protocol=item.get('protocol') or 'tcp',
            protocol_options=item.get('protocol_options'))
        return self.ok(self.proxy_json(server), 201)

    def _proxy_fields(self, data, where=''):
        """A proxy's fields, checked as Toxiproxy checks them (types, then
        the name, then the upstream), and vaurien's protocol."""
        for key, go_type in (('name', str), ('listen', str),
                             ('upstream', str), ('enabled', bool)):
            _go_field(data.get(key), go_type, 'Proxy.' + key,
                      go_type.__name__ if go_type is str else 'bool')
        if not data.get('name'):
            raise ToxicError('missing required field: name' + where)
        if not data.get('upstream'):
            raise ToxicError('missing required field: upstream' + where)
        protocol = data.get('protocol')
        if protocol is not None:
            try:
                cls = Protocol.get(protocol)
                validate_options('protocol', cls,
                                 data.get('protocol_options') or {})
            except (VaurienError, TypeError, AttributeError) as exc:
                raise ToxicError('bad protocol%s: %s' % (where, exc))
        return data

    def populate(self, body):
        items = self.decode(body, '[]struct { toxiproxy.Proxy; Enabled '
                                  '*bool "json:\\"enabled\\"" }', list)
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise ToxicError('bad request body: json: cannot unmarshal %s '
                                 'into Go value of type toxiproxy.Proxy'
                                 % _go_kind(item))
            self._proxy_fields(item, ' at proxy %d' % (index + 1))
        try:
            done = self.proxies.populate(items)
        except ToxicError as exc:
            proxies = [self.proxy_json(server) for server in exc.done]
            return _Reply(exc.status, _go_json(
                {'error': str(exc), 'status': exc.status,
                 'proxies': proxies or None}), [('Content-Type',
                                                 'application/json')])
        return self.ok({'proxies': [self.proxy_json(server)
                                    for server in done] or None}, 201)

    def proxy(self, body, name):
        return self.ok(self.proxy_json(self.proxies.get(name)))

    def update(self, body, name):
        server = self.proxies.get(name)
        data = self.decode(body)
        for key, go_type in (('listen', str), ('upstream', str),
                             ('enabled', bool)):
            _go_field(data.get(key), go_type, 'Proxy.' + key,
                      'string' if go_type is str else 'bool')
        self.proxies.update(name, data.get('listen'), data.get('upstream'),
                            data.get('enabled'))
        return self.ok(self.proxy_json(server))

    def delete(self, body, name):
        self.proxies.remove(name)
        return _Reply(204)

    def reset(self, body):
        self.proxies.reset()
        return _Reply(204)

    def toxics(self, body, name):
        server = self.proxies.get(name)
        return self.ok([toxic.to_json() for toxic in server.toxics.listed()])

    def add_toxic(self, body, name):
        server = self.proxies.get(name)
        data = self.decode(body, 'toxics.ToxicWrapper')
        toxic = make_toxic(server, data, server.toxics)
        server.toxics.add(toxic)
        logger.info('proxy %s: toxic %s added (%s, %s)', server.name,
                    toxic.name, toxic.type, toxic.stream)
        return self.ok(toxic.to_json())

    def toxic(self, body, name, toxic_name):
        toxic = self._toxic(name, toxic_name)
        return self.ok(toxic.to_json())

    def update_toxic(self, body, name, toxic_name):
        server = self.proxies.get(name)
        old = self._toxic(name, toxic_name)
        data = self.decode(body, 'struct { Attributes interface {} '
                                 '"json:\\"attributes\\""; Toxicity float32 '
                                 '"json:\\"toxicity\\"" }')
        new = make_toxic(server, data, old=old)
        old.attributes, old.toxicity = new.attributes, new.toxicity
        server.toxics.changed(old)
        return self.ok(old.to_json())

    def remove_toxic(self, body, name, toxic_name):
        server = self.proxies.get(name)
        server.toxics.remove(toxic_name)
        return _Reply(204)

    def _toxic(self, name, toxic_name):
        toxic = self.proxies.get(name).toxics.get(toxic_name)
        if toxic is None:
            raise ToxicError('toxic not found', 404)
        return toxic

    def metrics(self, body):
        return _Reply(200, prometheus_text(self.proxies).encode('utf-8'), [
            ('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')])


def prometheus_text(proxies):
    """Every proxy's counters in Prometheus's text format: Toxiproxy's
    series (its names and labels), counted live, and vaurien's own."""
    series = collections.OrderedDict((name, []) for name in (
        'toxiproxy_proxy_received_bytes_total',
        'toxiproxy_proxy_sent_bytes_total', 'vaurien_connections_open',
        'vaurien_connections_total', 'vaurien_exchanges_total',
        'vaurien_decisions_total', 'vaurien_toxics_applied_total'))
    for name in proxies.names():
        try:
            server = proxies.get(name)
        except ToxicError:
            continue            # removed meanwhile
        counts = server.byte_counts()
        for direction in ('downstream', 'upstream'):
            labels = {'direction': direction, 'listener': server.listen,
                      'proxy': name, 'upstream': server.upstream}
            series['toxiproxy_proxy_received_bytes_total'].append(
                (labels, counts['received', direction]))
            series['toxiproxy_proxy_sent_bytes_total'].append(
                (labels, counts['sent', direction]))
        labels = {'proxy': name}
        with server._stats_lock:
            total = server.totals.get('connections', 0)
            open_now = len(server.connections)
        series['vaurien_connections_open'].append((labels, open_now))
        series['vaurien_connections_total'].append((labels,
                                                    total + open_now))
        for behavior, count in sorted(server.exchange_counts.items()):
            series['vaurien_exchanges_total'].append(
                ({'behavior': behavior, 'proxy': name}, count))
        series['vaurien_decisions_total'].append((labels,
                                                  server.decision_count))
        for toxic, count in sorted(server.toxic_counts.items()):
            series['vaurien_toxics_applied_total'].append(
                ({'proxy': name, 'toxic': toxic}, count))
    helps = {
        'toxiproxy_proxy_received_bytes_total': 'Bytes a proxy read, by '
        'direction (upstream: from the clients)',
        'toxiproxy_proxy_sent_bytes_total': 'Bytes a proxy wrote, by '
        'direction (upstream: to the upstream)',
        'vaurien_connections_open': 'Client connections open now',
        'vaurien_connections_total': 'Client connections since the start',
        'vaurien_exchanges_total': 'Exchanges, by the behavior they met',
        'vaurien_decisions_total': 'Decisions logged (behaviors and toxics '
        'other than dummy met)',
        'vaurien_toxics_applied_total': 'Connections each toxic acted on',
    }
    lines = []
    for name, samples in series.items():
        kind = 'gauge' if name == 'vaurien_connections_open' else 'counter'
        lines.append('# HELP %s %s' % (name, helps[name]))
        lines.append('# TYPE %s %s' % (name, kind))
        for labels, value in samples:
            lines.append('%s{%s} %d' % (name, ','.join(
                '%s="%s"' % (key, _prometheus_label(labels[key]))
                for key in sorted(labels)), value))
    return '\n'.join(lines) + '\n'


def _prometheus_label(value):
    return str(value).replace('\\', '\\\\').replace('"', '\\"') \
        .replace('\n', '\\n')


# Client helpers ##########################################################

class ControlError(VaurienError):
    """The control API said no: carries the HTTP status and the server's
    description."""

    def __init__(self, status, answer):
        errors = answer.get('errors') or [{}] if isinstance(answer, dict) \
            else [{}]
        description = errors[0].get('description') or str(answer)
        VaurienError.__init__(self, description, errors[0].get('name'))
        self.status = status
        self.answer = answer


class _ControlMethods(object):
    """The control calls (one method per Call of CALLS), on top of
    ``self._call(method, path, body)``."""

    @contextlib.contextmanager
    def with_behavior(self, name, **options):
        """Put *name* in force for the ``with`` block, then restore the
        previous behavior (or mix) and its options, exceptions included.
        Should the restoring fail, dummy is put in force (and the error
        raised): a test helper never leaves a fault switched on."""
        before = self._call('GET', '/behavior')
        self.set_behavior(name, **options)
        try:
            yield self
        finally:
            try:
                self._call('PUT', '/behavior',
                           {'behavior': before['behavior'],
                            'options': before['options']})
            except VaurienError:
                self.set_behavior('dummy')
                raise

    behavior = with_behavior


for _call in CALLS:
    setattr(_ControlMethods, _call.name, _call.client_method())
del _call


class Client(_ControlMethods):
    """Talks to a proxy's control API (``--http``, or ``vaurien.py
    server``) over HTTP; *proxy* names the proxy (of the process's many)
    its calls are for, the default one without it."""

    def __init__(self, host='localhost', port=DEFAULTS['http_port'],
                 scheme='http', token=None, timeout=10.0, proxy=None):
        if scheme != 'http':
            raise VaurienError('the control API speaks plain http only')
        self.host = host
        self.port = int(port)
        self.token = token
        self.timeout = timeout
        self.proxy = proxy
        # Vaurien 1.x's attributes
        self.scheme = scheme
        self.root_url = '%s://%s' % (scheme,
                                     format_address((host, self.port)))
        self.behavior_url = self.root_url + '/behavior'
        self.list_behaviors_url = self.root_url + '/behaviors'

    def _call(self, method, path, body=None):
        # http.client, not urllib: no http_proxy variable may reroute us
        conn = http.client.HTTPConnection(self.host, self.port,
                                          timeout=self.timeout)
        headers = {'User-Agent': 'vaurien-client/' + __version__,
                   'Accept': 'application/json'}
        data = None
        if body is not None:
            data = json.dumps(body).encode('utf-8')
            headers['Content-Type'] = 'application/json'
        if self.token:
            headers['Authorization'] = 'Bearer ' + self.token
        if self.proxy is not None:
            path += ('&' if '?' in path else '?') + urllib.parse.urlencode(
                {'proxy': self.proxy})
        try:
            conn.request(method, path, data, headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VaurienError('cannot reach the control API at %s: %s'
                               % (format_address((self.host, self.port)),
                                  _os_error_text(exc)))
        finally:
            conn.close()
        try:
            answer = json.loads(raw.decode('utf-8'))
        except ValueError:
            answer = {'errors': [{'description': raw[:200].decode(
                'latin-1')}]}
        if response.status >= 400:
            raise ControlError(response.status, answer)
        return answer


class LocalProxy(_ControlMethods):
    """A proxy running in this process (see ``proxy()``): its address, its
    server, and the control calls, made without HTTP."""

    def __init__(self, server, control=None):
        self.server = server
        self.control = control
        self.address = server.address
        self.host, self.port = self.address
        self.http_address = control.address if control else None
        self._controller = Controller(server)

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode('utf-8') if body is not None else b''
        status, answer = self._controller.call(method, path, data)
        if status >= 400:
            raise ControlError(status, answer)
        return answer

    def client(self):
        """A ``Client`` for the control API (``proxy(..., http=True)``)."""
        host, port = self.http_address
        return Client(host, port, token=self.control.token,
                      proxy=self.server.name)


@contextlib.contextmanager
def proxy(backend, address=('127.0.0.1', 0), behavior='dummy',
          protocol='tcp', http=False, http_address=('127.0.0.1', 0),
          http_token=None, **options):
    """Run a proxy in a background thread of this process::

        with vaurien.proxy(backend=('localhost', 6379)) as p:
            redis.Redis(*p.address) ...
            with p.behavior('blackout'):
                ...

    Other keywords go to ProxyServer (timeout, idle_timeout, seed,
    protocol_options, behavior_options, name).  Several can run at once.
    """
    server = ProxyServer(address, backend, protocol=protocol,
                         behavior=behavior, **options)
    threads = [threading.Thread(target=server.serve_forever,
                                kwargs={'poll_interval': 0.05},
                                name='vaurien-proxy', daemon=True)]
    control = None
    try:
        if http:
            control = ControlServer(http_address, server, http_token)
            threads.append(threading.Thread(
                target=control.serve_forever, kwargs={'poll_interval': 0.05},
                name='vaurien-control', daemon=True))
    except OSError:
        server.server_close()
        raise
    for thread in threads:
        thread.start()
    try:
        yield LocalProxy(server, control)
    finally:
        if control is not None:
            control.shutdown()
            control.server_close()
        server.shutdown()
        server.close_all()


class ProxyProcess(int):
    """What ``start_proxy`` returns: the process id (an int, as in Vaurien
    1.x), with the real addresses as attributes."""

    def __new__(cls, process, ready):
        self = int.__new__(cls, process.pid)
        self.process = process
        self.proxy_host, self.proxy_port = ready['proxy']
        self.http_host, self.http_port = ready.get('http') or (None, None)
        return self

    @property
    def pid(self):
        return int(self)


_PROCESSES = {}


def start_proxy(proxy_host='localhost',
                proxy_port=parse_address(DEFAULTS['proxy'])[1],
                backend_host='localhost', backend_port=8888,
                protocol=DEFAULTS['protocol'], http=True, warmup=10,
                http_host='localhost', http_port=DEFAULTS['http_port'],
                options=None, log_level=DEFAULTS['log_level'],
                log_output=DEFAULTS['log_output']):
    """Start vaurien.py in a new process and wait until it listens.

    Port 0 picks a free port; the result is the process id, with the real
    ports as ``.proxy_port`` and ``.http_port``.  *warmup* is how many
    seconds it may take to start; a proxy that fails to start raises
    VaurienError carrying its error output.  Stop it with ``stop_proxy``.
    """
    folder = tempfile.mkdtemp(prefix='vaurien-')
    ready_file = os.path.join(folder, 'ready.json')
    errors_path = os.path.join(folder, 'stderr.txt')
    cmd = [sys.executable, os.path.abspath(__file__),
           '--proxy', format_address((proxy_host, proxy_port)),
           '--backend', format_address((backend_host, backend_port)),
           '--protocol', protocol, '--log-level', log_level,
           '--log-output', log_output, '--ready-file', ready_file]
    if http:
        cmd += ['--http', '--http-host', http_host,
                '--http-port', str(http_port)]
    cmd += list(options or ())
    with open(errors_path, 'w') as errors:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.time() + (warmup or 10)
    try:
        while not os.path.exists(ready_file):
            if process.poll() is not None or time.time() > deadline:
                if process.poll() is None:
                    process.kill()
                process.wait()
                with open(errors_path) as stream:
                    output = stream.read().strip()
                raise VaurienError('the proxy did not start (%s): %s' % (
                    'exit status %s' % process.returncode
                    if process.returncode >= 0 else 'too slow',
                    output or 'no output'))
            time.sleep(0.01)
        with open(ready_file) as stream:
            ready = json.load(stream)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    handle = ProxyProcess(process, ready)
    _PROCESSES[handle.pid] = process
    return handle


def stop_proxy(pid):
    """Stop a proxy started with ``start_proxy``."""
    process = _PROCESSES.pop(int(pid), None)
    if process is None:
        raise VaurienError('no proxy started here has process id %s' % pid)
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode


# Vaurien 1.x's module paths ##############################################

def _original_module_paths():
    """Vaurien 1.x was a package: keep its module paths importable
    (``from vaurien.protocols.base import BaseProtocol``)."""
    def module(name, **names):
        made = types.ModuleType(name)
        made.__dict__.update(names)
        return sys.modules.setdefault(name, made)
    base = module('vaurien.protocols.base', BaseProtocol=BaseProtocol)
    tcp = module('vaurien.protocols.tcp', TCP=TCP)
    _this.protocols = module('vaurien.protocols', Protocol=Protocol,
                             BaseProtocol=BaseProtocol,
                             get_protocols=get_protocols, base=base, tcp=tcp)
    dummy = module('vaurien.behaviors.dummy', Dummy=Dummy)
    _this.behaviors = module('vaurien.behaviors', Behavior=Behavior,
                             Dummy=Dummy, get_behaviors=get_behaviors,
                             dummy=dummy)
    # the 2.0 docs' test helpers
    _this.util = module('vaurien.util', start_proxy=start_proxy,
                        stop_proxy=stop_proxy)


_original_module_paths()


# Command line and configuration ##########################################

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and no usage block."""

    def error(self, message):
        raise VaurienError('%s (see %s --help)' % (message, self.prog))


def _base_parser(add_help=True):
    parser = _Parser(
        prog='vaurien', add_help=add_help, allow_abbrev=False,
        description='A chaos TCP proxy: sits between an application and its '
                    'backend, and delays, errors, hangs or drops on purpose. '
                    '"vaurien ctl ACTION" drives a running one (see vaurien '
                    'ctl --help).',
        epilog='Every behavior also takes --behavior-NAME-%s and -clients '
               'NETWORKS: see README.txt. Every option can also be set in '
               'the ini file given with --config ([vaurien] section; '
               '[behavior:NAME] and [protocol:NAME] sections for plugin '
               'options). The command line wins over the file.' % ', -'.join(
                   '%s (%s)' % (name, _describe_choices(spec[3]))
                   for name, spec in COMMON_OPTIONS.items() if len(spec) > 3))
    parser.add_argument('--config', metavar='FILE',
                        help='ini file to read settings from')
    plugins = _SETTINGS['plugins']
    parser.add_argument(plugins.flag, metavar=plugins.metavar,
                        help=plugins.help_text())
    return parser


def _add_flag(parser, flag, dest, help, bool_flag=False, metavar=None,
              aliases=()):
    flags = [flag] + [alias for alias in aliases if alias != flag]
    if bool_flag:
        parser.add_argument(*flags, dest=dest, nargs='?', const='true',
                            default=None, metavar='BOOL', help=help)
        parser.add_argument('--no-' + flag[2:], dest=dest,
                            action='store_const', const='false',
                            help=argparse.SUPPRESS)
    else:
        parser.add_argument(*flags, dest=dest, default=None, metavar=metavar,
                            help=help)


def build_parser():
    """The full command line, with a flag per plugin option."""
    parser = _base_parser()
    add = parser.add_argument
    add('--version', action='store_true', help='print the version and exit')
    add('--list', action='store_true',
        help='list every protocol and behavior found, with their options, '
             'and exit')
    for setting in SETTINGS:
        if setting.name != 'plugins':       # in _base_parser
            _add_flag(parser, setting.flag, setting.name,
                      argparse.SUPPRESS if setting.ignored
                      else setting.help_text(),
                      bool_flag=setting.type is bool,
                      metavar=setting.metavar, aliases=setting.aliases)
    for kind, registry in (('protocol', Protocol), ('behavior', Behavior)):
        group = parser.add_argument_group('%s options' % kind)
        for name, cls in registry.items():
            for option, spec in sorted(option_table(cls).items()):
                description, type_, default, choices = _option_spec(spec)
                # dashes for underscores, in the plugin's name too; the
                # spelling with its underscores still works
                flag = '--%s-%s-%s' % (kind, name.replace('_', '-'),
                                       option.replace('_', '-'))
                aliases = ['--%s-%s-%s' % (kind, name,
                                           option.replace('_', '-'))]
                dest = 'plugin:%s:%s:%s' % (kind, name, option)
                text = '%s (default %s)' % (description, _show(default))
                if choices:
                    text += ': %s' % _describe_choices(choices)
                if option in COMMON_OPTIONS and option not in cls.options:
                    text = argparse.SUPPRESS    # said once, in the epilog
                _add_flag(group, flag, dest, text, bool_flag=type_ is bool,
                          metavar=_TYPE_WORDS.get(type_, 'VALUE')
                          .split()[-1].upper(), aliases=aliases)
    return parser


def read_config(path, _reading=()):
    """The ini file as ``{section: {key: value}}``, with Vaurien 1.x's
    conventions: ``[DEFAULT] extends = FILE`` (or several, one a line)
    reads those files first, this one's values winning; ``${VAR}`` is the
    environment variable VAR; a value in double quotes loses them."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding='utf-8') as stream:
            parser.read_file(stream)
    except OSError as exc:
        raise VaurienError('cannot read config file %r: %s (give --config an '
                           'existing ini file)' % (path, _os_error_text(exc)))
    except (configparser.Error, UnicodeDecodeError) as exc:
        text = str(exc).replace('\n', ' ').strip()
        raise VaurienError('malformed config file %r: %s (see vaurien.ini '
                           'for the format)' % (path, text))
    config = {}
    extends = parser.defaults().pop('extends', '')
    for other in extends.split('\n'):
        other = _ini_value(other, path)
        if not other:
            continue
        other = os.path.join(os.path.dirname(os.path.abspath(path)),
                             os.path.expanduser(other))
        if os.path.abspath(other) in _reading:
            raise VaurienError('config file %r extends %r, which extends it '
                               'again' % (path, other))
        for section, values in read_config(
                other, _reading + (os.path.abspath(path),)).items():
            config.setdefault(section, {}).update(values)
    for section in parser.sections():
        config.setdefault(section, {}).update(
            (key, _ini_value(value, path))
            for key, value in parser.items(section))
    return config


_ENV_VAR = re.compile(r'\$\{(\w+)\}')


def _ini_value(value, path):
    value = value.strip()
    if len(value) > 1 and value[0] == value[-1] == '"':
        return value[1:-1]

    def variable(found):
        name = found.group(1)
        if name not in os.environ:
            raise VaurienError('config file %r: ${%s} is not set in the '
                               'environment (set it, or write the value)'
                               % (path, name))
        return os.environ[name]
    return _ENV_VAR.sub(variable, value)


def _split_section(section):
    kind, sep, name = section.partition(':')
    if sep and kind.strip() in ('behavior', 'protocol', 'proxy') and \
            name.strip():
        return kind.strip(), name.strip()
    return None, None


#: what a [proxy:NAME] section may set, beside NAME.OPTION keys (options of
#: a behavior or protocol, for this proxy only)
PROXY_KEYS = ('proxy', 'backend', 'protocol', 'behavior', 'timeout',
              'idle_timeout')


def load_settings(argv=None):
    """Defaults < ini file < command line.  Returns ``(settings,
    plugin_options, args)`` where plugin_options maps ``(kind, name)`` to
    raw option values, and ``args.proxy_sections`` lists the ini file's
    ``(NAME, {key: value})`` of [proxy:NAME] sections."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early, _ = _base_parser(add_help=False).parse_known_args(argv)
    config = read_config(early.config) if early.config else {}

    callables = []
    for section, values in config.items():
        kind, name = _split_section(section)
        if kind is None and section not in ('vaurien', 'statsd'):
            raise VaurienError(
                "config file %r: unknown section [%s] (sections: [vaurien], "
                "[statsd], [behavior:NAME], [protocol:NAME], [proxy:NAME])"
                % (early.config, section))
        if kind in ('behavior', 'protocol') and 'callable' in values:
            callables.append((kind, name, values['callable']))
    modules = []
    for text in (config.get('vaurien', {}).get('plugins', ''), early.plugins):
        modules.extend(m.strip() for m in (text or '').split(',') if
                       m.strip())
    load_plugins(modules, callables)

    args = build_parser().parse_args(argv)
    settings = collections.OrderedDict(DEFAULTS)
    plugin_options = collections.defaultdict(dict)

    def take(key, value, where):
        key = key.strip().replace('-', '_')
        if key not in _SETTINGS:
            raise VaurienError('%s: unknown setting %r (known: %s)'
                               % (where, key, ', '.join(_SETTINGS)))
        settings[key] = _SETTINGS[key].convert(value, where)

    where = 'config file %r' % early.config
    for key, value in config.get('vaurien', {}).items():
        take(key, value, where + ' [vaurien]')
    in_statsd = dict((s.statsd, s.name) for s in SETTINGS if s.statsd)
    for key, value in config.get('statsd', {}).items():
        key = key.strip().replace('-', '_')
        if key not in in_statsd:
            raise VaurienError('%s [statsd]: unknown key %r (known: %s)'
                               % (where, key, ', '.join(sorted(in_statsd))))
        take(in_statsd[key], value, where + ' [statsd]')
    args.proxy_sections = []
    for section, values in config.items():
        kind, name = _split_section(section)
        if kind == 'proxy':
            args.proxy_sections.append((name, values))
        elif kind:
            registry = Protocol if kind == 'protocol' else Behavior
            registry.get(name)
            for key, value in values.items():
                if key != 'callable':
                    plugin_options[(kind, name)][key.replace('-', '_')] = value

    for dest, value in vars(args).items():
        if value is None or dest in ('config', 'version', 'list',
                                     'proxy_sections'):
            continue
        if dest.startswith('plugin:'):
            _, kind, name, option = dest.split(':', 3)
            plugin_options[(kind, name)][option] = value
        else:
            take(dest, value, 'option --%s' % dest.replace('_', '-'))
    return settings, dict(plugin_options), args


class _LogOutput(object):
    """What vaurien's log handlers add: a record that cannot be written (a
    full disk) is lost, and the first one says so on stderr, in one line
    instead of logging's traceback per record; the proxy serves on."""

    #: the first error writing the log, once there was one
    failure = None
    #: False while starting: main() says the failure, as an error
    warn = True
    _where = '-'

    def handleError(self, record):
        if self.failure is not None:
            return
        self.failure = sys.exc_info()[1]
        if not self.warn:
            return
        try:
            sys.stderr.write('vaurien: warning: cannot write the log to %s: '
                             '%s (records are lost while it cannot be '
                             'written; the proxy goes on)\n'
                             % (self._where, _os_error_text(self.failure)))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass                # stderr is the log output, or is gone


class _StreamLog(_LogOutput, logging.StreamHandler):
    pass


class _FileLog(_LogOutput, logging.FileHandler):
    pass


def configure_logging(level='info', output='-'):
    """Send vaurien's log to stderr, stdout or a file; returns the
    handler (its ``failure`` tells whether a record could not be
    written)."""
    level = _check_log_level(str(level))
    if output in ('-', 'stderr', None, ''):
        handler = _StreamLog(sys.stderr)
    elif output == 'stdout':
        handler = _StreamLog(sys.stdout)
    else:
        try:
            handler = _FileLog(output)
        except OSError as exc:
            raise VaurienError('cannot write the log to %r: %s (give '
                               '--log-output a writable path)'
                               % (output, _os_error_text(exc)))
    handler._where = output if output not in (None, '', '-') else 'stderr'
    handler.setFormatter(logging.Formatter(
        '%(asctime)s [%(process)d] [%(levelname)s] %(message)s',
        '%Y-%m-%d %H:%M:%S'))
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    return handler


def build_server(settings, plugin_options):
    """A ProxyServer from the settings of ``load_settings`` (checked
    again: a caller may make its own) and the plugins' options."""
    settings = check_settings(settings)
    protocol = settings['protocol']
    Protocol.get(protocol)
    behavior_options = {}
    for (kind, name), values in plugin_options.items():
        if kind == 'behavior':
            behavior_options[name] = values
        elif name != protocol:
            validate_options('protocol', Protocol.get(name), values)
    statsd = None
    if settings['statsd']:
        statsd = _Statsd(settings['statsd_host'], settings['statsd_port'],
                         settings['statsd_prefix'],
                         settings['statsd_sample_rate'])
    proxy = parse_address(settings['proxy'], 'proxy address', allow_zero=True)
    backend = parse_address(settings['backend'], 'backend address')
    try:
        server = ProxyServer(
            proxy, backend, protocol=protocol, behavior=settings['behavior'],
            timeout=settings['timeout'] or None,
            idle_timeout=settings['idle_timeout'],
            backlog=settings['backlog'], seed=settings['seed'],
            protocol_options=plugin_options.get(('protocol', protocol)),
            behavior_options=behavior_options, statsd=statsd)
    except OSError as exc:
        hint = ('stop what uses it or pick another port'
                if exc.errno == errno.EADDRINUSE else 'check --proxy')
        raise VaurienError('cannot listen on %s: %s (%s)' % (
            format_address(proxy), _os_error_text(exc), hint))
    try:
        check_not_self(server, server.backend)
        # options given for a behavior set later (through the API) too
        for name in behavior_options:
            check_for_protocol(server.protocol_class,
                               server.make_behavior(name)[0])
    except VaurienError:
        server.server_close()
        raise
    return server


def build_named_proxy(name, values, settings, plugin_options, proxies):
    """A ProxyServer for an ini file's [proxy:NAME] section: its keys are
    [vaurien]'s (PROXY_KEYS), defaults [vaurien]'s own values; a
    NAME.OPTION key sets an option of behavior or protocol NAME for this
    proxy only."""
    where = 'config file [proxy:%s]' % name
    if name in proxies:
        raise VaurienError('%s: a proxy named %r exists already (the '
                           'command line\'s is %r)' % (where, name,
                                                      DEFAULT_PROXY))
    own = dict((key, settings[key]) for key in PROXY_KEYS)
    options = dict(plugin_options)
    for key, value in values.items():
        key = key.strip().replace('-', '_')
        plugin, dot, option = key.partition('.')
        if dot:
            kind = 'protocol' if plugin in Protocol and plugin not in \
                Behavior else 'behavior'
            options[(kind, plugin)] = dict(options.get((kind, plugin), {}),
                                           **{option: value})
        elif key in PROXY_KEYS:
            own[key] = _SETTINGS[key].convert(value, where)
        else:
            raise VaurienError('%s: unknown key %r (known: %s, and '
                               'NAME.OPTION for a behavior or protocol NAME)'
                               % (where, key, ', '.join(PROXY_KEYS)))
    server = build_server(dict(settings, **own), options)
    server.name = name
    return server


def list_plugins(out=None):
    """Print every protocol and behavior with its origin and options."""
    out = out or sys.stdout
    for title, registry in (('Protocols', Protocol), ('Behaviors', Behavior)):
        out.write('%s:\n' % title)
        for name, cls in registry.items():
            doc = (cls.__doc__ or '').strip().split('\n\n')[0]
            doc = ' '.join(doc.split())
            out.write('  %-12s %s\n' % (name, plugin_origin(cls)))
            if doc:
                out.write('      %s\n' % doc)
            _list_options(out, cls.options)
        out.write('\n')
    out.write('Every behavior also takes:\n')
    _list_options(out, COMMON_OPTIONS)


def _list_options(out, table):
    for option, spec in sorted(table.items()):
        description, type_, default, choices = _option_spec(spec)
        extra = ' (%s)' % _describe_choices(choices) if choices else ''
        out.write('      %s = %r  [%s] %s%s\n' % (
            option, default, type_.__name__, description, extra))


def start_control(settings, server, proxies=None, address=None,
                  toxiproxy_first=False):
    """The control API's server, when --http asks for it (or *address*
    is given): both families of endpoints, Vaurien's and Toxiproxy's, for
    *proxies*.  Its token: --http-token, or TOXIPROXY_AUTH_TOKEN."""
    if address is None:
        if not settings['http']:
            return None
        address = (settings['http_host'], settings['http_port'])
    token = settings['http_token'] or os.environ.get('TOXIPROXY_AUTH_TOKEN')
    try:
        return ControlServer(address, server, token, proxies=proxies,
                             toxiproxy_first=toxiproxy_first)
    except OSError as exc:
        if proxies is not None:
            proxies.close_all()
        elif server is not None:
            server.server_close()
        raise VaurienError('cannot serve the control API on %s: %s (pick '
                           'another port)' % (format_address(address),
                                              _os_error_text(exc)))


def write_ready_file(path, server, control):
    ready = {'proxy': list(server.address), 'pid': os.getpid(),
             'http': list(control.address) if control else None}
    partial = path + '.partial'
    try:
        with open(partial, 'w') as stream:
            json.dump(ready, stream)
        os.rename(partial, path)
    except OSError as exc:
        raise VaurienError('cannot write --ready-file %r: %s' % (
            path, _os_error_text(exc)))


# Process tuning ##########################################################

#: seconds; see main()
SWITCH_INTERVAL = 0.05


def raise_descriptor_limit(wanted=1 << 16):
    """Each connection takes two file descriptors: ask for as many as the
    system allows (the hard limit; more when privileged)."""
    try:
        import resource
    except ImportError:         # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(hard, wanted), max(hard, wanted)), (hard, hard)):
        if limits[0] == resource.RLIM_INFINITY or limits[0] <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return
        except (ValueError, OSError):
            continue


def _current_cpu():
    """The CPU this thread last ran on (Linux), or None."""
    try:
        with open('/proc/thread-self/stat') as stream:
            fields = stream.read().rpartition(')')[2].split()
        return int(fields[36])      # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None


def _cpu_choice(choice):
    """--cpu's value: None for auto, 'all', or a CPU number."""
    choice = str(choice).strip().lower()
    if choice in ('auto', 'all'):
        return None if choice == 'auto' else choice
    # ASCII digits only: str.isdigit() takes '²', which int() refuses
    cpu = int(choice) if choice and not choice.strip('0123456789') and \
        len(choice) < 6 else -1
    if not 0 <= cpu < 1 << 16:
        raise VaurienError('cpu must be auto, all or a CPU number, not %r'
                           % _clip(choice))
    return cpu


def pin_to_cpu(choice='auto'):
    """Keep the calling thread, and the threads it starts from now on, on
    one CPU; returns that CPU's number, or None when left to the system.

    Only one thread runs Python at a time (the GIL), so a proxy gains
    nothing from a second CPU, and loses much: every hand-off of the GIL
    to a thread waiting on another CPU is a cross-CPU wake-up (an
    interrupt, a virtual machine exit) and cold caches.  Measured: on one
    CPU, 2.5 times the requests with 50 busy connections, at a third of
    the CPU per request (README.txt, Performance)."""
    cpu = _cpu_choice(choice)
    auto = cpu is None
    if cpu == 'all':
        return None
    if not hasattr(os, 'sched_setaffinity'):
        if cpu is not None:
            raise VaurienError('cpu %d: this Python cannot pin threads to a '
                               'CPU (no os.sched_setaffinity; use --cpu auto '
                               'or all)' % cpu)
        return None
    gil = getattr(sys, '_is_gil_enabled', None)
    if cpu is None and gil is not None and not gil():
        return None                 # free-threaded: threads run in parallel
    allowed = os.sched_getaffinity(0)
    if cpu is None:
        if len(allowed) < 2:
            return None
        cpu = _current_cpu()
        if cpu not in allowed:
            cpu = min(allowed)
    elif cpu not in allowed:
        raise VaurienError('cpu %d is not available here (this process may '
                           'use %s; or use --cpu auto or all)' % (
                               cpu, ', '.join(map(str, sorted(allowed)))))
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:          # a cpuset changed under us...
        if not auto:
            raise VaurienError('cannot run on cpu %d: %s (use --cpu auto or '
                               'all)' % (cpu, _os_error_text(exc)))
        logger.warning('cannot keep threads on CPU %d (%s): using every CPU',
                       cpu, _os_error_text(exc))
        return None
    return cpu


# Workers ##################################################################
#
# --workers N: N processes, each the proxy of one process (a thread per
# connection), behind each listening port.  The process the user started,
# the supervisor, builds everything as with one process and answers the
# control API, but accepts no connection: each of its proxies' sockets is
# bound with SO_REUSEPORT and never listens, so that the port (port 0
# resolved once) stays the proxy's, and every worker binds it too, each
# with its own listening socket (the kernel spreads the connections).
# Where there is no SO_REUSEPORT (or VAURIEN_WORKERS_LISTEN=shared), the
# supervisor's sockets listen and the workers share them (inherited at the
# fork; a socket made later is passed with the change, SCM_RIGHTS).
#
#     supervisor: control API, the model (proxies, mixes, toxics)
#        |  fork (its model at that moment), a private socket pair each
#        +-- worker 0 (CPU a): listens, accepts, serves its connections
#        +-- worker 1 (CPU b): ...
#
# A change through the API is applied by the supervisor, then sent to
# every worker over its socket pair and applied there, the same request
# in the same order, before the call answers.  Reads of live state
# (/connections, /stats, /decisions, /metrics) gather the workers' and
# merge them.  A worker that dies is forked again, from the model of that
# moment.

#: The counters every process shares (a _SharedCounters) while there are
#: workers; None with one process.
_COUNTERS = None
#: This process's part among workers: None with one process, else its
#: _Supervisor or _Worker.
_ROLE = None
#: Vaurien's reads that show live state, gathered from the workers
_LIVE_READS = ('/connections', '/stats', '/decisions')
_COUNT = struct.Struct('=Q')
_LENGTH = struct.Struct('>I')


def worker_count(text):
    """--workers' value as a number: a whole number from 1 to 256, or
    auto (the CPUs this process may use)."""
    text = str(text).strip().lower()
    if text == 'auto':
        if hasattr(os, 'sched_getaffinity'):
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1
    # ASCII digits only: str.isdigit() takes '²', which int() refuses
    digits = text and not text.strip('0123456789') and len(text) < 6
    count = int(text) if digits else 0
    if not 1 <= count <= 256:
        raise VaurienError('workers must be auto or a whole number from 1 '
                           'to 256, not %r' % _clip(text))
    return count


class _SharedCounters(object):
    """Counters that every process of a proxy with workers shares: the
    count of the behaviors that count across the whole proxy (``error``'s
    warmup), connection and decision ids.  8 bytes each, in a shared
    mapping of an unlinked temporary file made before the first fork.

    Each counter is changed under a lock of the process (its threads) and
    a lock of the file's byte at the counter's number (fcntl: the
    processes); the kernel lets go of the latter if its process dies.

    Every process makes its counters in the same order (it applies the
    same changes in the same order): the n-th counter made takes number n
    in each, and the supervisor sends its next number with each change."""

    size = 1 << 20

    def __init__(self):
        import fcntl
        self._fcntl = fcntl
        self._file = tempfile.TemporaryFile(prefix='vaurien-counters-')
        self._file.truncate(self.size * _COUNT.size)
        self._fd = self._file.fileno()
        self._map = mmap.mmap(self._fd, self.size * _COUNT.size)
        self._lock = threading.Lock()
        #: the number the next counter made takes
        self.next_slot = 0
        self._full = False

    def take(self):
        """A new counter's number (None once the table is full)."""
        slot = self.next_slot
        if slot >= self.size:
            if not self._full:
                self._full = True
                logger.warning('%d shared counters made: from now on, new '
                               'counts are per worker', self.size)
            return None
        self.next_slot = slot + 1
        return slot

    def next(self, slot):
        """Counter *slot*'s value, which then grows by one."""
        offset = slot * _COUNT.size
        lockf = self._fcntl.lockf
        with self._lock:
            lockf(self._fd, self._fcntl.LOCK_EX, 1, slot)
            try:
                value, = _COUNT.unpack_from(self._map, offset)
                _COUNT.pack_into(self._map, offset, value + 1)
            finally:
                lockf(self._fd, self._fcntl.LOCK_UN, 1, slot)
        return value

    def count(self, start=1):
        """Like ``itertools.count(start)``, counted across the processes."""
        slot = self.take()
        if slot is None:
            return itertools.count(start)
        return _SharedCount(self, slot, start)

    def after_fork(self):
        # a lock some other thread held at the fork is held for good
        self._lock = threading.Lock()


class _SharedCount(object):
    """An iterator of numbers from *start*, counted in a _SharedCounters."""

    __slots__ = ('_counters', '_slot', '_start')

    def __init__(self, counters, slot, start):
        self._counters = counters
        self._slot = slot
        self._start = start

    def __iter__(self):
        return self

    def __next__(self):
        return self._start + self._counters.next(self._slot)


def _send_message(sock, value, fds=()):
    """Send *value* (JSON) on a worker's socket pair, with the descriptors
    *fds* (SCM_RIGHTS: the other process gets its own copies)."""
    data = json.dumps(value).encode('utf-8')
    data = _LENGTH.pack(len(data)) + data
    if fds:
        # the descriptors go with the first bytes, the rest as usual
        sent = sock.sendmsg([data[:_LENGTH.size]], [(
            socket.SOL_SOCKET, socket.SCM_RIGHTS,
            struct.pack('%di' % len(fds), *fds))])
        data = data[sent:]
    sock.sendall(data)


def _recv_message(sock, fds=None):
    """The next message on a worker's socket pair; None at its end.  The
    descriptors that came with it are added to *fds* (a list), or closed
    when there is none."""
    if not _HAS_FD_PASSING:
        head = _recv_exactly(sock, _LENGTH.size)
    else:
        head, ancillary, _, _ = sock.recvmsg(
            _LENGTH.size, socket.CMSG_SPACE(_MAX_FDS * _INT_SIZE))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // _INT_SIZE
                got = struct.unpack('%di' % count,
                                    payload[:count * _INT_SIZE])
                if fds is None:
                    for fd in got:
                        os.close(fd)
                else:
                    fds.extend(got)
        if head and len(head) < _LENGTH.size:
            rest = _recv_exactly(sock, _LENGTH.size - len(head))
            head = None if rest is None else head + rest
    if not head:
        return None
    data = _recv_exactly(sock, _LENGTH.unpack(head)[0])
    return None if data is None else json.loads(data.decode('utf-8'))


_HAS_FD_PASSING = hasattr(socket, 'SCM_RIGHTS') and hasattr(socket.socket,
                                                            'recvmsg')
_INT_SIZE = struct.calcsize('i')
#: the most listening sockets one change passes to the workers
_MAX_FDS = 250


def _recv_exactly(sock, size):
    chunks = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        size -= len(data)
    return b''.join(chunks)


def _exit_text(status):
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return 'was killed by %s' % signal.Signals(number).name
        except ValueError:
            return 'was killed by signal %d' % number
    return 'exited with status %d' % os.WEXITSTATUS(status)


class _WorkerProcess(object):
    """The supervisor's view of one worker: its number, pid and socket
    pair."""

    def __init__(self, number, pid, channel):
        self.number = number
        self.pid = pid
        self.channel = channel
        self.alive = True
        self.started = time.monotonic()

    def reply(self, seq, deadline):
        """The worker's answer to message *seq*, or None (it died, or did
        not answer by *deadline*)."""
        try:
            while True:
                self.channel.settimeout(max(0.001, deadline -
                                            time.monotonic()))
                message = _recv_message(self.channel)
                if message is None:
                    self.alive = False      # its end: it is exiting
                    return None
                if message.get('seq') == seq:
                    return message
        except (socket.timeout, ValueError):
            pass                    # silent (or garbled): see answer()
        except OSError:
            self.alive = False
        return None


class _Supervisor(object):
    """The process the user started, with --workers above 1: it holds each
    port, answers the control API, and forks, watches and stops the
    workers (see the notes above)."""

    supervising = True
    #: seconds a worker has to answer a change or a read, and to be ready
    #: (an API call under 200 busy streams takes 50 ms: README.txt)
    answer_timeout = 5.0
    #: seconds the workers have to stop before they are killed
    stop_wait = 0.8

    def __init__(self, count):
        self.count = count
        self.proxies = self.control = None
        self.cpus = [None] * count
        self.allowed = set()
        #: held by every API call and every fork: no change is half made
        #: in a worker's copy of the model, and each reaches every worker
        self.lock = threading.Lock()
        self.workers = [None] * count
        self.stopping = False
        self._seq = 0
        self._exited = threading.Condition()

    @classmethod
    def plan(cls, settings):
        """The supervisor that --workers asks for (None for one process),
        made before any proxy: proxies are made for it.  VaurienError
        where the platform cannot."""
        count = worker_count(settings['workers'])
        if count == 1:
            return None
        listen = os.environ.get('VAURIEN_WORKERS_LISTEN', '')
        if listen not in ('', 'shared', 'reuseport'):
            raise VaurienError('VAURIEN_WORKERS_LISTEN must be shared or '
                               'reuseport, not %r (or unset it)' % listen)
        shared = listen == 'shared' or not hasattr(socket, 'SO_REUSEPORT')
        missing = ('os.fork' if not hasattr(os, 'fork') else
                   'SO_REUSEPORT nor descriptor passing' if shared and
                   not _HAS_FD_PASSING else None)
        if missing:
            raise VaurienError('workers %d: this platform has no %s (use '
                               '--workers 1)' % (count, missing))
        global _COUNTERS, _ROLE
        _COUNTERS = _SharedCounters()
        _ROLE = supervisor = cls(count)
        supervisor.shared = shared
        return supervisor

    #: whether the workers share the supervisor's listening sockets (one
    #: accept queue per port, the sockets passed on with each change)
    #: rather than each listen on its own (SO_REUSEPORT)
    shared = False

    @property
    def listens(self):
        """Whether its proxies' sockets listen: only for the workers to
        share them."""
        return self.shared

    def share_port(self, server, sock):
        """Called before each bind of a proxy's socket."""
        if not self.shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            # every worker polls it and accepts: those that lose the race
            # must find nothing (EAGAIN), not wait in accept()
            sock.setblocking(False)

    def adopt(self, server):
        return None     # it makes the sockets

    def start(self, proxies, control, cpu, allowed):
        """Fork every worker and wait until each listens.  *cpu*: the CPU
        the supervisor was pinned to (None: not pinned); worker k takes
        the k-th CPU from it."""
        self.proxies, self.control, self.allowed = proxies, control, allowed
        if control is not None:
            control.workers = self
        if cpu is not None:
            ordered = sorted(allowed | {cpu})
            first = ordered.index(cpu)
            self.cpus = [ordered[(first + number) % len(ordered)]
                         for number in range(self.count)]
        try:
            for number in range(self.count):
                self._start_worker(number)
        except VaurienError:
            self.stop()
            raise
        threading.Thread(target=self._watch, name='vaurien workers',
                         daemon=True).start()

    def pids(self):
        return [worker.pid for worker in self.workers if worker is not None]

    def _start_worker(self, number):
        with self.lock:
            if self.stopping:
                return None
            ours, theirs = socket.socketpair()
            # the child resets the handlers before a stop signal may run
            # one: the supervisor's would wake the supervisor
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            pid = None
            try:
                pid = os.fork()
            except OSError as exc:
                ours.close()
                theirs.close()
                raise VaurienError('cannot start worker %d: %s' % (
                    number, _os_error_text(exc)))
            finally:
                if pid != 0:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if pid == 0:
                ours.close()
                _Worker.main(self, number, theirs)   # does not return
            theirs.close()
            worker = _WorkerProcess(number, pid, ours)
            self.workers[number] = worker
            if self.stopping:       # stop() came meanwhile
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                return None
            ready = worker.reply(None, time.monotonic() + self.answer_timeout)
            if ready is None:
                raise VaurienError('worker %d (pid %d) did not start: its log '
                                   'says why' % (number, pid))
        return worker

    def answer(self, control, toxiproxy, method, path, body):
        """The answer to an API request: the supervisor's own, once every
        worker made the same change; for a read of live state, every
        worker's merged."""
        route = path.split('?', 1)[0].rstrip('/') or '/'
        live = route == '/metrics' if toxiproxy else (
            method == 'GET' and route in _LIVE_READS)
        with self.lock:
            slots = _COUNTERS.next_slot
            if toxiproxy:
                local = control.toxiproxy.call(method, path, body)
                status = local.status
            else:
                local = control.controller.call(method, path, body)
                status = local[0]
            if live and status != 200 or not live and method in ('GET',
                                                                 'HEAD'):
                return local
            message = {'toxiproxy': toxiproxy, 'method': method,
                       'path': path, 'body': body.decode('latin-1')}
            if not live:
                # what the worker needs to make the same change: the next
                # counter's number, and where the proxies listen (a port
                # 0 the supervisor resolved)
                message['slots'] = slots
                message['addresses'] = dict(
                    (server.name, list(server.server_address[:2]))
                    for server in self.proxies.servers()
                    if server.socket is not None)
            fds = []
            if self.shared and not live:
                # the listening sockets go along: a worker takes the one
                # of a proxy it has to listen for (see _Worker.adopt)
                listening = [server for server in self.proxies.servers()
                             if server.socket is not None][:_MAX_FDS]
                message['sockets'] = [server.name for server in listening]
                fds = [server.socket.fileno() for server in listening]
            answers, silent = self._broadcast(message, fds)
            if live:
                return _merge_live(toxiproxy, route, local, answers)
            # a worker that did not make the change as the supervisor did
            # is forked again, from the model that has it
            for worker, reply in answers:
                if reply.get('status') != status:
                    self._replace(worker, 'answered %s %.100s with %s where '
                                  'the supervisor answered %s' % (
                                      method, path, reply.get('status'),
                                      status))
            for worker in silent:
                self._replace(worker, 'did not answer %s %.100s within %g '
                              'seconds' % (method, path, self.answer_timeout))
        return local

    def _replace(self, worker, why):
        logger.warning('worker %d (pid %d) %s: killing it', worker.number,
                       worker.pid, why)
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGKILL)

    def _broadcast(self, message, fds=()):
        """Send *message* (and the descriptors *fds*) to every worker
        alive: ``([(worker, reply)], [worker that did not answer])``."""
        self._seq += 1
        message['seq'] = self._seq
        sent = []
        for worker in self.workers:
            if worker is None or not worker.alive:
                continue
            try:
                _send_message(worker.channel, message, fds)
            except OSError:
                continue
            sent.append(worker)
        deadline = time.monotonic() + self.answer_timeout
        answers, silent = [], []
        for worker in sent:
            reply = worker.reply(self._seq, deadline)
            if reply is not None:
                answers.append((worker, reply))
            elif worker.alive:
                silent.append(worker)
        return answers, silent

    def _watch(self):
        """Reap the workers that end; start again those that died."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                if self.stopping:
                    return
                time.sleep(0.1)
                continue
            found = [worker for worker in self.workers
                     if worker is not None and worker.pid == pid]
            if not found:
                continue
            worker = found[0]
            with self._exited:
                worker.alive = False
                self._exited.notify_all()
            with self.lock:
                worker.channel.close()
            if status == 0:
                # stopped by a signal of its own: a Ctrl-C reaches every
                # process of the terminal; the supervisor may be stopping
                time.sleep(0.2)
            if self.stopping:
                continue
            logger.warning('worker %d (pid %d) %s: starting it again (its '
                           'connections are lost)', worker.number, pid,
                           _exit_text(status))
            if time.monotonic() - worker.started < 1:
                time.sleep(1)       # one that dies at once: no fork storm
            self._restart(worker.number)

    def _restart(self, number):
        while not self.stopping:
            try:
                new = self._start_worker(number)
            except VaurienError as exc:
                logger.error('%s; trying again in a second', exc)
                time.sleep(1)
                continue
            if new is not None:
                logger.warning('worker %d started again (pid %d)', number,
                               new.pid)
            return

    def stop(self):
        """Stop every worker: SIGTERM, then SIGKILL after ``stop_wait``
        seconds."""
        # not under the lock: an API call may be waiting for a worker that
        # does not answer (a fork under way kills its own if need be)
        self.stopping = True
        workers = [worker for worker in list(self.workers)
                   if worker is not None and worker.alive]
        for signum, wait in ((signal.SIGTERM, self.stop_wait),
                             (signal.SIGKILL, 0.2)):
            for worker in workers:
                if worker.alive:
                    with contextlib.suppress(OSError):
                        os.kill(worker.pid, signum)
            deadline = time.monotonic() + wait
            with self._exited:
                while any(worker.alive for worker in workers):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._exited.wait(left)
            if not any(worker.alive for worker in workers):
                return


class _Worker(object):
    """A worker process's part: the proxies it inherited, listening on
    sockets of its own; the changes the supervisor sends, applied."""

    supervising = False
    listens = True

    def __init__(self, supervisor, number, channel):
        self.number = number
        self.channel = channel
        self.proxies = supervisor.proxies
        self.control = supervisor.control
        self.shared = supervisor.shared
        #: where the supervisor's proxies listen, by name
        self.addresses = {}
        #: the supervisor's listening sockets passed with the change being
        #: applied, by proxy name (the workers share them)
        self._passed = {}

    @classmethod
    def main(cls, supervisor, number, channel):
        """The worker process (a fork of *supervisor*): serve until a stop
        signal or the supervisor's end, then exit."""
        global _ROLE
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            _ROLE = worker = cls(supervisor, number, channel)
            worker.run(supervisor)
            code = 0
        except BaseException as exc:
            with contextlib.suppress(Exception):
                logger.error('worker %d failed: %s: %s', number,
                             type(exc).__name__, exc)
                logger.debug('worker failure', exc_info=True)
        finally:
            os._exit(code)

    def adopt(self, server):
        """The supervisor's listening socket for *server*, when the
        workers share them and the change being applied passed it (None:
        bind as usual)."""
        fd = self._passed.pop(server.name, None)
        if fd is None:
            return None
        try:
            return socket.fromfd(fd, server.address_family,
                                 server.socket_type)
        finally:
            os.close(fd)

    def share_port(self, server, sock):
        """Called before each bind: the port the supervisor got."""
        if not self.shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        address = self.addresses.get(server.name)
        if address is not None:
            server.server_address = tuple(address)

    def run(self, supervisor):
        for other in supervisor.workers:
            if other is not None:
                other.channel.close()
        if self.control is not None:
            self.control.socket.close()     # the supervisor answers it
        # what threads of the supervisor may have held at the fork
        API_FIRST.__init__()
        _COUNTERS.after_fork()
        self.proxies.stopped = threading.Event()
        self.proxies.waker = None       # the supervisor's
        self.proxies._lock = threading.RLock()
        cpu = supervisor.cpus[self.number]
        if cpu is not None:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError as exc:
                logger.warning('worker %d: cannot keep to CPU %d (%s)',
                               self.number, cpu, _os_error_text(exc))
        for server in self.proxies.servers():
            server._stop_request = threading.Event()
            server._stopped = threading.Event()
            server._stats_lock = threading.Lock()
            server._listen_lock = threading.Lock()
            server._spares_lock = threading.Lock()
            if server.socket is not None and not self.shared:
                # (shared: the inherited one is the supervisor's, listening)
                inherited, server.socket = server.socket, None
                inherited.close()
                server._listen_again()
            self.proxies.start_accepting(server)
        threading.Thread(target=self._serve_channel, daemon=True,
                         name='vaurien worker channel').start()
        _send_message(self.channel, {'seq': None, 'ready': os.getpid()})
        serve(self.proxies, None, supervisor.allowed - {cpu}
              if cpu is not None else ())

    def _serve_channel(self):
        """Apply the supervisor's messages in turn; at its end, stop."""
        while True:
            fds = []
            try:
                message = _recv_message(self.channel, fds)
            except (OSError, ValueError):
                message = None
            if message is None:
                logger.info('worker %d: the supervisor is gone: stopping',
                            self.number)
                self.proxies.stop()
                return
            self._passed = dict(zip(message.get('sockets', ()), fds))
            turn = _Turn()          # the connections give way meanwhile
            try:
                reply = self._apply(message)
            except Exception as exc:
                logger.error('worker %d: %s %.100s failed: %s: %s',
                             self.number, message.get('method'),
                             message.get('path'), type(exc).__name__, exc)
                reply = {'status': 500}
            finally:
                turn.end()
                # the sockets it did not take: it listens already
                for fd in self._passed.values():
                    os.close(fd)
                self._passed = {}
            reply['seq'] = message['seq']
            try:
                _send_message(self.channel, reply)
            except OSError:
                self.proxies.stop()
                return

    def _apply(self, message):
        if 'slots' in message:
            _COUNTERS.next_slot = message['slots']
            self.addresses = message['addresses']
        body = message['body'].encode('latin-1')
        if message['toxiproxy']:
            reply = self.control.toxiproxy.call(message['method'],
                                                message['path'], body)
            return {'status': reply.status,
                    'body': reply.body.decode('latin-1')}
        status, answer = self.control.controller.call(
            message['method'], message['path'], body)
        return {'status': status, 'answer': answer}


def _merge_live(toxiproxy, route, local, answers):
    """A read of live state over every worker, from each one's answer."""
    if toxiproxy:
        texts = [local.body.decode('utf-8')] + [
            reply['body'] for _, reply in answers if reply['status'] == 200]
        return _Reply(200, _merge_metrics(texts).encode('utf-8'),
                      local.headers)
    status, merged = local
    merged = dict(merged)
    replies = [(worker, reply['answer']) for worker, reply in answers
               if reply['status'] == 200]
    if route == '/connections':
        found = []
        for worker, answer in replies:
            for conn in answer['connections']:
                conn['worker'] = worker.pid
                found.append(conn)
        merged['connections'] = sorted(found, key=lambda conn: conn['id'])
    elif route == '/decisions':
        merged['decisions'] = sorted(
            (record for _, answer in replies
             for record in answer['decisions']),
            key=lambda record: record['id'])
    else:
        exchanges = collections.Counter()
        for key in ('connections', 'open_connections', 'backend_errors',
                    'bytes_up', 'bytes_down'):
            merged[key] = sum(answer[key] for _, answer in replies)
        for _, answer in replies:
            exchanges.update(answer['exchanges'])
        merged['exchanges'] = dict(exchanges)
        merged['workers'] = [worker.pid for worker, _ in replies]
    return status, merged


def _merge_metrics(texts):
    """Prometheus texts (prometheus_text's) summed, series by series."""
    families = collections.OrderedDict()
    for text in texts:
        for line in text.splitlines():
            if line.startswith('#'):
                headers = families.setdefault(line.split()[2], (
                    [], collections.OrderedDict()))[0]
                if line not in headers:
                    headers.append(line)
            elif line:
                key, _, value = line.rpartition(' ')
                samples = families.setdefault(key.split('{')[0], (
                    [], collections.OrderedDict()))[1]
                samples[key] = samples.get(key, 0) + int(value)
    lines = []
    for headers, samples in families.values():
        lines.extend(headers)
        lines.extend('%s %d' % item for item in samples.items())
    return '\n'.join(lines) + '\n'


# Main ####################################################################

#: The signals that stop vaurien gracefully; SIGHUP (a closed terminal,
#: a supervisor's reload) would otherwise kill it without a word.
STOP_SIGNALS = tuple(getattr(signal, name) for name in
                     ('SIGTERM', 'SIGINT', 'SIGHUP') if hasattr(signal, name))


def serve(proxies, control=None, spare_cpus=()):
    """Serve every proxy of *proxies* (each accepts in a thread of its
    own) until SIGTERM, SIGINT or SIGHUP (or ``proxies.stopped`` is set),
    then stop accepting, stop the control API and return.

    Connections still open are left to the process's exit, which closes
    them all at once (``close_all()`` closes them in a process that goes
    on): closing 500 busy ones in turn from here took up to a second, as
    each close waited for the GIL behind 500 busy threads.  For the same
    reason this thread, the one that exits, leaves the CPU the
    connections run on for *spare_cpus* once a signal came.

    This thread waits for a byte on a socket pair
    (``signal.set_wakeup_fd``): it wakes at once, whichever thread the
    signal reached.  From another thread than the main one (no signals
    there), it waits for ``proxies.stopped``.
    """
    if control is not None:
        threading.Thread(target=control.serve_forever, name='vaurien-control',
                         kwargs={'poll_interval': 0.2}, daemon=True).start()
    waiter, waker = socket.socketpair()
    previous = {}
    try:
        waker.setblocking(False)
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, _on_stop_signal)
            old_wakeup = signal.set_wakeup_fd(waker.fileno())
        except ValueError:      # not the main thread
            proxies.stopped.wait()
            signum = None
        else:
            try:
                signum = _wait_for_stop(proxies, waiter, waker)
            finally:
                signal.set_wakeup_fd(old_wakeup)
        if signum:
            # the connections give way to this thread and to the
            # accepting ones while they stop (see _ApiFirst): else each
            # of their steps waits for the GIL behind every busy one
            API_FIRST.enter()
            if spare_cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, spare_cpus)
            if _ROLE is not None and _ROLE.supervising:
                # the connections are the workers': each says how many
                logger.info('%s: stopping %d workers',
                            signal.Signals(signum).name, _ROLE.count)
            else:
                logger.info('%s: stopping (%d connections open)',
                            signal.Signals(signum).name, sum(
                                len(server.connections)
                                for server in proxies.servers()))
        if _ROLE is not None and _ROLE.supervising:
            _ROLE.stop()
        # what close_all() does, but for the connections (see above):
        # every listener closed at once, then every accepting thread ends
        servers = proxies.servers()
        for server in servers:
            server.closing = True
            server.server_close()
            server._stop_request.set()
        for server in servers:
            server._stopped.wait(1)
            server.statsd.close()
        if control is not None:
            # wake its loop now rather than at its next poll
            with contextlib.suppress(OSError):
                control.socket.shutdown(socket.SHUT_RDWR)
            control.shutdown()
            control.server_close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        waiter.close()
        waker.close()
    logger.info('stopped')


def _check_log(log, settings):
    """VaurienError when the log could not be written at start-up."""
    if log.failure is not None:
        raise VaurienError('cannot write the log to %r: %s (give '
                           '--log-output a writable path)' % (
                               settings['log_output'],
                               _os_error_text(log.failure)))


def _close_all(control, proxies, server):
    # what a start that failed had opened already
    if _ROLE is not None and _ROLE.supervising:
        _ROLE.stop()
    if control is not None:
        control.server_close()
    if proxies is not None:
        proxies.close_all()
    elif server is not None:
        server.server_close()


def _on_stop_signal(signum, frame):
    """Nothing to do here: the wake-up byte tells serve()."""


def _wait_for_stop(proxies, waiter, waker):
    """Wait for a stop signal's byte, or for ``proxies.stopped``: the
    signal's number (None for the other)."""
    proxies.waker = waker
    while not proxies.stopped.is_set():
        wait_readable(waiter)
        try:
            data = waiter.recv(256)
        except (BlockingIOError, InterruptedError):
            continue
        for number in bytearray(data):
            if number in STOP_SIGNALS:
                return number
    return None


def _log_cpus(cpu, supervisor):
    if supervisor is not None:
        _say('%d workers, pids %s%s', supervisor.count, ', '.join(
            map(str, supervisor.pids())), ', on CPUs %s' % ', '.join(
                map(str, supervisor.cpus)) if cpu is not None else '')
    elif cpu is not None:
        logger.info('running on CPU %d (--cpu all lets threads use every '
                    'CPU)', cpu)


def _say(message, *args):
    """Log *message* at info level, whatever the level set."""
    logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0,
                                    message, args, None))


def main(argv=None):
    """The ``vaurien`` command.  Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['ctl']:
        return ctl_main(argv[1:])
    if argv[:1] == ['server']:
        return server_main(argv[1:])
    server = control = proxies = None
    try:
        settings, plugin_options, args = load_settings(argv)
        if args.version:
            print('vaurien %s' % __version__)
            return 0
        if args.list:
            list_plugins()
            return 0
        log = configure_logging(settings['log_level'], settings['log_output'])
        log.warn = False
        raise_descriptor_limit()
        # Threads waiting for the GIL each wake every switch interval to
        # claim it: with thousands of connections busy at once, the
        # default 5 ms floods the scheduler.  Only when vaurien is the
        # program: a test process that imports it keeps its own setting.
        sys.setswitchinterval(SWITCH_INTERVAL)
        allowed = set(os.sched_getaffinity(0)) if hasattr(
            os, 'sched_getaffinity') else set()
        supervisor = _Supervisor.plan(settings)
        # before any thread starts: they inherit the CPU
        cpu = pin_to_cpu(settings['cpu'])
        server = build_server(settings, plugin_options)
        proxies = Proxies(**server.proxy_settings())
        proxies.add(server)
        for name, values in args.proxy_sections:
            proxies.add(build_named_proxy(name, values, settings,
                                          plugin_options, proxies))
        control = start_control(settings, server, proxies)
        if supervisor is not None:
            supervisor.start(proxies, control, cpu, allowed)
        # where it listens is said whatever the log level (port 0 picks)
        _say('vaurien %s: proxying %s -> %s, protocol %s, behavior %s',
             __version__, format_address(server.address),
             server.upstream, server.protocol_name, server.mix)
        for other in proxies.servers():
            if other is not server:
                _say('proxy %s: proxying %s -> %s, protocol %s, behavior '
                     '%s', other.name, other.listen, other.upstream,
                     other.protocol_name, other.mix)
        _log_cpus(cpu, supervisor)
        if control is not None:
            _say('control API on http://%s%s', format_address(control.address),
                 ' (bearer token required)' if control.token else '')
        for setting in SETTINGS:
            if setting.ignored and settings[setting.name] is not None:
                logger.warning('ignoring Vaurien 1.x setting %s: %s',
                               setting.name, setting.ignored)
        _check_log(log, settings)
        log.warn = True
        if settings['ready_file']:
            write_ready_file(settings['ready_file'], server, control)
    except VaurienError as exc:
        _close_all(control, proxies, server)
        sys.stderr.write('vaurien: error: %s\n' % exc)
        return 2
    serve(proxies, control, allowed - {cpu} if cpu is not None else ())
    return 0


def server_main(argv):
    """``vaurien.py server``: a Toxiproxy server, its API on
    127.0.0.1:8474 (-host, -port); the proxies its clients make, or the
    -config file lists.  Go's flags take one dash or two (-port, --port).
    Returns the exit status."""
    parser = _Parser(prog='vaurien server', allow_abbrev=False,
                     description="Toxiproxy's server: its HTTP API, for "
                                 "every Toxiproxy client, and vaurien's.")
    add = parser.add_argument
    add('-host', '--host', default='localhost',
        help='address of the API (default localhost: 127.0.0.1 only)')
    add('-port', '--port', default='8474', help='port of the API (default '
        '8474)')
    add('-config', '--config', metavar='FILE', help="Toxiproxy's JSON "
        'array of proxies (with their toxics) to start with')
    add('-seed', '--seed', help='seed of every random choice (toxicity '
        'draws, jitter...): the same seed and traffic make the same ones')
    add('-proxy-metrics', '--proxy-metrics', action='store_true',
        help='accepted: /metrics always serves every series')
    add('-runtime-metrics', '--runtime-metrics', action='store_true',
        help='accepted (no Go runtime here)')
    add('-version', '--version', action='store_true',
        help='print the version and exit')
    for name in ('http_token', 'log_level', 'log_output', 'timeout',
                 'idle_timeout', 'cpu', 'workers', 'plugins'):
        setting = _SETTINGS[name]
        add(setting.flag, dest=name, metavar=setting.metavar,
            help=setting.help_text())
    proxies = control = None
    try:
        args = parser.parse_args(argv)
        if args.version:
            print('vaurien %s (a Toxiproxy 2.12 API server)' % __version__)
            return 0
        given = dict((name, getattr(args, name)) for name in (
            'http_token', 'log_level', 'log_output', 'timeout',
            'idle_timeout', 'cpu', 'workers', 'plugins', 'seed')
            if getattr(args, name) is not None)
        settings = check_settings(given, 'vaurien server')
        load_plugins([m for m in settings['plugins'].split(',') if m.strip()])
        port = _SETTINGS['http_port'].convert(args.port, 'option -port')
        log = configure_logging(settings['log_level'], settings['log_output'])
        raise_descriptor_limit()
        sys.setswitchinterval(SWITCH_INTERVAL)
        allowed = set(os.sched_getaffinity(0)) if hasattr(
            os, 'sched_getaffinity') else set()
        supervisor = _Supervisor.plan(settings)
        cpu = pin_to_cpu(settings['cpu'])
        proxies = Proxies(seed=settings['seed'],
                          timeout=settings['timeout'] or None,
                          idle_timeout=settings['idle_timeout'])
        if args.config:
            load_toxiproxy_config(args.config, proxies)
        control = start_control(settings, None, proxies,
                                address=(args.host, port),
                                toxiproxy_first=True)
        if supervisor is not None:
            supervisor.start(proxies, control, cpu, allowed)
        _log_cpus(cpu, supervisor)
        _say("vaurien %s: Toxiproxy's API on http://%s%s, %d proxies",
             __version__, format_address(control.address),
             ' (bearer token required)' if control.token else '',
             len(proxies.names()))
        _check_log(log, settings)
    except VaurienError as exc:
        _close_all(control, proxies, None)
        sys.stderr.write('vaurien server: error: %s\n' % exc)
        return 2
    serve(proxies, control, allowed - {cpu} if cpu is not None else ())
    return 0


def load_toxiproxy_config(path, proxies):
    """Toxiproxy's -config file (its /populate array) into *proxies*, the
    toxics each proxy lists applied too (Toxiproxy ignores them), with
    vaurien's protocol fields; VaurienError in one line for a file that
    is not such an array (Toxiproxy only logs)."""
    try:
        with open(path, 'rb') as stream:
            body = stream.read()
    except OSError as exc:
        raise VaurienError('cannot read -config %r: %s' % (
            path, _os_error_text(exc)))
    api = ToxiproxyAPI(proxies)
    reply = api.populate(body)
    if reply.status != 201:
        try:
            message = json.loads(reply.body.decode('utf-8'))['error']
        except (ValueError, KeyError):
            message = reply.body.decode('utf-8', 'replace').strip()
        raise VaurienError('-config %r: %s (give a JSON array of proxies: '
                           'name, listen, upstream, enabled, toxics)'
                           % (path, message))


def ctl_main(argv=None):
    """``vaurien ctl`` (and ``vaurienctl``): the control API from the
    command line, an action per call of CALLS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    where = _Parser(add_help=False)
    # they may come before the action or after it, as with Vaurien 1.x
    where.add_argument('--host', default=argparse.SUPPRESS,
                       help='host of the control API, or its URL, e.g. '
                            'http://localhost:8080 (default localhost)')
    where.add_argument('--port', type=int, default=argparse.SUPPRESS,
                       help='port of the control API (default %d)'
                       % DEFAULTS['http_port'])
    where.add_argument('--token', default=argparse.SUPPRESS,
                       help='bearer token (--http-token of the proxy)')
    where.add_argument('--proxy', default=argparse.SUPPRESS, metavar='NAME',
                       help='the proxy to drive, of the process\'s many '
                            '(default: the command line\'s, "%s")'
                            % DEFAULT_PROXY)
    parser = _Parser(prog='vaurien ctl', allow_abbrev=False, parents=[where],
                     description='Read or change what a running vaurien '
                                 '(started with --http) does.')
    actions = parser.add_subparsers(dest='action', metavar='ACTION')
    calls = {}
    for call in CALLS:
        if call.ctl is None:
            continue
        calls[call.ctl] = call
        action = actions.add_parser(call.ctl, parents=[where],
                                    help=call.help.split('.')[0].lower(),
                                    description=call.help)
        for name, param in _ctl_parameters(call):
            if param.kind == param.VAR_KEYWORD:
                continue        # --NAME VALUE options, read below
            if param.default is param.empty:
                action.add_argument(name, metavar=name.upper())
            else:
                action.add_argument('--' + name, default=param.default,
                                    type=type(param.default))
    try:
        args, extra = parser.parse_known_args(argv)
        if args.action is None:
            raise VaurienError('which action? (see vaurien ctl --help)')
        call = calls[args.action]
        takes_options = any(param.kind == param.VAR_KEYWORD
                            for _, param in _ctl_parameters(call))
        if extra and not takes_options:
            parser.error('unrecognized arguments: %s' % ' '.join(extra))
        client = _ctl_client(getattr(args, 'host', 'localhost'),
                             getattr(args, 'port', None),
                             getattr(args, 'token', None))
        client.proxy = getattr(args, 'proxy', None)
        values = [getattr(args, name) for name, param in
                  _ctl_parameters(call) if param.kind != param.VAR_KEYWORD]
        if call.name == 'set_behavior':
            # the options of a mix: --sleep 2, or --delay.sleep 2
            client.set_mix(values[0], _mix_options(values[0], extra))
            print('Behavior changed to "%s"' % client.get_behavior())
        elif call.name == 'get_behavior':
            answer = client._call('GET', '/behavior')
            print(answer['behavior'])
            # each behavior's own options, and the common ones set
            for name, options in sorted(answer['options'].items()):
                shown = ['%s=%s' % (key, _show(value)) for key, value in
                         sorted(options.items()) if key not in COMMON_OPTIONS
                         or value != _option_spec(COMMON_OPTIONS[key])[2]]
                if shown:
                    print('  %s: %s' % (name, ' '.join(shown)))
        else:
            answer = getattr(client, call.name)(*values)
            if call.name == 'set_backend':
                print('Backend changed to "%s"' % client.get_backend())
            elif isinstance(answer, str):
                print(answer)
            elif isinstance(answer, list) and answer and all(
                    isinstance(item, str) for item in answer):
                print(', '.join(answer))
            else:
                print(json.dumps(answer, indent=2, sort_keys=True))
    except VaurienError as exc:
        sys.stderr.write('vaurien ctl: error: %s\n' % exc)
        return 1
    return 0


def _ctl_parameters(call):
    if call.request is None:
        return []
    return list(inspect.signature(call.request).parameters.items())


def _ctl_client(host, port, token):
    """A Client for ``--host`` (a host name or a URL) and ``--port``."""
    if '://' in host:
        netloc = host.split('://', 1)[1].split('/', 1)[0]
        host, _, url_port = netloc.rpartition(':')
        if not host:
            host, url_port = netloc, ''
        if port is None and url_port.isdigit():
            port = int(url_port)
    host = check_host(host.strip('[]'), 'control API host')
    port = DEFAULTS['http_port'] if port is None else port
    if not 1 <= port <= 65535:
        raise VaurienError('control API port %d: give one from 1 to '
                           '65535' % port)
    return Client(host, port, token=token)


def _mix_options(mix, words):
    """Options of ``ctl set-behavior``: ``--sleep 2`` for the one behavior
    of the mix that is not dummy, ``--delay.sleep 2`` for any."""
    # the proxy checks the names: it may know plugins that we do not
    names = [entry.rpartition(':')[2].strip() for entry in mix.split(',')]
    names = [name for name in names if name and name != 'dummy']
    options = {}
    for key, value in _option_pairs(words).items():
        name, dot, option = key.rpartition('.')
        if not dot:
            if len(names) != 1:
                raise VaurienError('say which behavior --%s is for: --NAME.%s'
                                   % (key, key))
            name = names[0]
        options.setdefault(name, {})[option] = value
    return options


def _option_pairs(words):
    """['--sleep', '2', '--before=false'] -> {'sleep': '2', 'before':
    'false'} (the proxy converts the values)."""
    options = {}
    words = list(words)
    while words:
        word = words.pop(0)
        if not word.startswith('--') or word == '--':
            raise VaurienError('unexpected %r: options go as --NAME VALUE'
                               % word)
        name, sep, value = word[2:].partition('=')
        if not sep:
            value = words.pop(0) if words and not words[0].startswith('--') \
                else 'true'
        options[name.replace('-', '_')] = value
    return options


if __name__ == '__main__':
    sys.exit(main())
