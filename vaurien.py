#!/usr/bin/env python3
"""vaurien: a chaos TCP proxy in one file.

Vaurien sits between an application and its backend and misbehaves on
purpose, so that you can see what the application does when the backend is
slow, fails, hangs or vanishes.  Everything here is standard library only:
copy this file anywhere and run it.

The life of one client connection::

    client --connect--> ProxyServer (socketserver.ThreadingTCPServer)
                             |  one thread per connection
                             v
                        Connection.run()
                             |  connect to the backend (--timeout)
                             v
              +-------> poll() over the client and backend sockets
              |              |  one of them is readable
              |              v
              |         protocol(source, dest, to_backend)
              |              |  data from the client starts a new
              |              |  exchange: the behavior mix is drawn
              |              v
              |         behavior.on_before_handle()  -- False: close
              |         protocol._handle()           -- False: close
              |             (calls behavior.on_between_handle() once the
              |              request went to the backend)
              |         behavior.on_after_handle()   -- False: close
              +--------------+
                             |  both directions ended, or a hook said stop
                             v
                        close both sockets, log one line

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
import hmac
import http.client
import http.server
import importlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
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

# poll() has no limit on descriptor numbers, unlike select(), which fails
# on descriptors >= 1024; Windows has no poll() at all.
_HAS_POLL = hasattr(select, 'poll')
# Linux tells when a peer shut down its writing side: then a peek tells a
# last request from the bare end of the stream.
_POLLRDHUP = getattr(select, 'POLLRDHUP',
                     0x2000 if sys.platform.startswith('linux') else 0)


# Errors ##################################################################

class VaurienError(Exception):
    """A mistake in what the user asked for: one line, no traceback.

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
    if loops_back(server.server_address, backend):
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


# Plugin registry #########################################################

class Registry(object):
    """The plugins of one kind, by name.

    ``register(cls)`` is what a plugin module calls at import time; two
    different classes under one name are an error naming both modules.
    """

    def __init__(self, kind):
        self.kind = kind
        self._plugins = {}
        self._lock = threading.Lock()

    def register(self, cls, name=None):
        name = name or getattr(cls, 'name', None)
        if not name:
            raise PluginError('%s class %s.%s has no name' % (
                self.kind, cls.__module__, cls.__name__))
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


# Protocols ###############################################################

class BaseProtocol(_Configurable):
    """Moves bytes between the client and the backend.

    One instance serves one client connection (``self.connection``), so a
    protocol may keep parser state in ``self``.  Subclasses implement
    ``_handle``; the engine calls the instance (``__call__``) each time the
    client or the backend socket is readable.
    """

    options = {'buffer': ("Bytes read from a socket at a time", int, 65536,
                          Range(1, 1 << 24, 'bytes'))}
    #: The codes this protocol can answer for the error behavior's option
    #: ``code`` (a Range, or any container that says what it holds when
    #: printed); None: it has no codes, and ignores the option.
    error_codes = None

    @classmethod
    def check_behavior(cls, behavior):
        """Called with each behavior of a mix (its options set) before
        the mix is put in force, at start-up and on each change: raise
        ValueError when this protocol cannot do what the options ask.
        The default refuses an error code outside ``error_codes``."""
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
        """Called once the backend is connected, before any data moves."""

    def __call__(self, source, dest, to_backend):
        """Run one readable event through the behavior hooks.

        Data from the client starts a new exchange, for which the behavior
        mix is drawn; data from the backend belongs to the current one.
        Returns False to close the connection.  Protocols that frame
        requests (several in one read) may override this to start an
        exchange per request: see ``Connection.start_exchange``.
        """
        conn = self.connection
        if to_backend:
            if conn.client_ended:
                # nothing left but the end of the client's stream: no new
                # exchange; only the stream behaviors of the current one
                behavior = conn.exchange.behavior
                if not behavior.acts(to_backend):
                    behavior = None
                return self._handle(
                    source, conn.outlet(dest, to_backend, behavior),
                    to_backend)
            exchange = conn.start_exchange()
        else:
            exchange = conn.exchange
        behavior = exchange.behavior
        if behavior.passive or not behavior.acts(to_backend):
            if conn.queues:
                dest = conn.outlet(dest, to_backend)
            return self._handle(source, dest, to_backend)
        dest = conn.outlet(dest, to_backend, behavior)
        if not behavior.hooks:
            return self._handle(source, dest, to_backend)
        verdict = behavior.on_before_handle(self, source, dest, to_backend)
        if verdict is False:
            return False
        if verdict is not HANDLED:
            if not self._handle(source, dest, to_backend):
                return False
            if behavior.on_after_handle(self, source, dest,
                                        to_backend) is False:
                return False
        return True

    def _handle(self, source, dest, to_backend):
        """Read what *source* has and pass it on to *dest*.

        Return a true value to keep the connection, False to close it.
        """
        raise NotImplementedError

    def _between(self, source, dest, to_backend):
        """Call once the request went to the backend, before its answer is
        read: runs the behavior's ``on_between_handle``."""
        behavior = self.connection.exchange.behavior
        if behavior.passive:
            return True
        return behavior.on_between_handle(self, source, dest,
                                          to_backend) is not False

    def _get_data(self, sock, buffer=None):
        """Read up to *buffer* bytes from *sock*; ``b''`` at end of stream.

        Waits while the socket has nothing yet (EWOULDBLOCK/EAGAIN on a
        non-blocking socket).
        """
        if type(sock) is Outlet:
            sock = sock.sock
        while True:
            try:
                data = sock.recv(buffer or self._bufsize)
                break
            except (BlockingIOError, InterruptedError):
                wait_readable(sock)
        conn = self.connection
        if conn is not None:
            if sock is conn.client:
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
        return self.connection.stop_reading(source)

    def _error_answer(self, behavior):
        """What the ``error`` behavior answers, in this protocol's words.

        ``None`` means the protocol has no words for an error, and random
        bytes are sent instead.
        """
        return None


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
    options = {
        'buffer': BaseProtocol.options['buffer'],
        'keep_alive': ("Turn on TCP keep-alive probes on both sockets, for "
                       "long quiet connections", bool, False),
        'reuse_socket': ("Accepted for Vaurien 1.x configurations; no "
                         "effect (each client gets its own backend "
                         "connection)", bool, False),
    }

    def __init__(self, settings=None, proxy=None):
        BaseProtocol.__init__(self, settings, proxy)
        # the fast path below is for this class's own _handle only
        self._plain = type(self)._handle is TCP._handle

    def setup(self, client, backend):
        if self.option('keep_alive'):
            for sock in (client, backend):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def __call__(self, source, dest, to_backend):
        # The fast path: while the mix is dummy alone and nothing waits in
        # an outbox, bytes go straight through, with no exchange object
        # and no hooks.  Any other mix takes the full path from the next
        # read on.
        conn = self.connection
        if self._plain and conn.queues is None:
            if to_backend:
                single = conn.server.mix.single
                plain = (single is not None and single[1].passive and
                         not conn.client_ended)
            else:
                plain = conn.exchange.behavior.passive
            if plain:
                data = source.recv(self._bufsize)
                if not data:
                    return self._end_of_stream(source, dest)
                dest.sendall(data)
                if to_backend:
                    conn.bytes_up += len(data)
                    conn.exchanges += 1
                    conn.dummies += 1
                    conn.exchange = conn.plain_exchange
                    if conn.server.statsd.enabled:
                        conn.server.statsd.incr('behavior.dummy')
                else:
                    conn.bytes_down += len(data)
                return True
        return BaseProtocol.__call__(self, source, dest, to_backend)

    def _handle(self, source, dest, to_backend):
        data = self._get_data(source)
        if not data:
            return self._end_of_stream(source, dest)
        dest.sendall(data)
        if to_backend:
            return self._between(source, dest, to_backend)
        return True


Protocol.register(TCP)


# Behaviors ###############################################################

#: A hook's answer meaning "I dealt with this data myself": the protocol's
#: ``_handle`` is skipped and the connection goes on.
HANDLED = 'handled'

#: The longest delay an option may ask for, in seconds: an hour.  Longer
#: is a connection that never comes back, which ``hang`` says plainly.
MAX_DELAY = 3600
#: The range of an option that is a delay in milliseconds.
DELAY_MS = Range(0, MAX_DELAY * 1000, 'milliseconds')


class Dummy(_Configurable):
    """Passes everything through untouched.  The base of every behavior.

    One instance serves the whole proxy (every connection), from the
    moment the behavior is set until it is set again; keep per-connection
    state in ``protocol.connection.state`` and per-exchange state in
    ``protocol.connection.exchange.state``.

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
    scope, gated = 'exchange', False

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
        self.gated = bool(get('after') or get('every', 1) != 1 or
                          get('times') or get('clients'))
        self._networks = _parse_networks(get('clients', ''))

    def acts(self, to_backend):
        """Whether this behavior acts on data going this way."""
        return self.upstream if to_backend else self.downstream

    def admits(self, connection, number):
        """The gates: whether exchange *number* of *connection* may meet
        this behavior (options after, every, times, clients)."""
        get = self.settings.get
        if number <= get('after', 0) or number % get('every', 1):
            return False
        if self._networks and not _client_in(connection, self._networks):
            return False
        limit = get('times', 0)
        if limit:
            key = ('times', id(self))
            used = connection.state.get(key, 0)
            if used >= limit:
                return False
            connection.state[key] = used + 1
        return True

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


def _client_in(connection, networks):
    try:
        address = ipaddress.ip_address(connection.client_address[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


class Composite(Dummy):
    """Several behaviors at once (``latency+bandwidth``): their socket hooks
    run in order, and their stream hooks as a pipeline, the first one's
    pieces feeding the second."""

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

    def ready(self):
        pass

    def admits(self, connection, number):
        return True

    def _each(self, hook, protocol, source, dest, to_backend):
        """Run *hook* of each part in order; stop at the first that closes
        the connection or (on_before_handle) handles the data."""
        for part in self.parts:
            if part.hooks and part.acts(to_backend):
                verdict = getattr(part, hook)(protocol, source, dest,
                                              to_backend)
                if verdict is False or verdict is HANDLED:
                    return verdict
        return True

    def on_before_handle(self, protocol, source, dest, to_backend):
        return self._each('on_before_handle', protocol, source, dest,
                          to_backend)

    def on_between_handle(self, protocol, source, dest, to_backend):
        return self._each('on_between_handle', protocol, source, dest,
                          to_backend) is not False

    def on_after_handle(self, protocol, source, dest, to_backend):
        return self._each('on_after_handle', protocol, source, dest,
                          to_backend) is not False

    def on_open(self, connection):
        for part in self.parts:
            if part.opens:
                part.on_open(connection)

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

    def on_before_handle(self, protocol, source, dest, to_backend):
        if to_backend and self.option('before'):
            _sleep(self.option('sleep'))
        return True

    def on_after_handle(self, protocol, source, dest, to_backend):
        if to_backend and not self.option('before'):
            _sleep(self.option('sleep'))
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

    def _next_count(self, protocol):
        """0 for the first exchange this behavior is drawn for, 1 for the
        next, and so on."""
        if self.option('per_connection'):
            state = protocol.connection.state
            key = ('count', id(self))
            number = state.get(key, 0)
            state[key] = number + 1
            return number
        with self._lock:
            number = self._count
            self._count += 1
        return number


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
                 "MySQL error number, SMTP reply code); 0 picks the "
                 "protocol's usual one", int, 0, Range(0, 65535)),
        'message': ("Error text for protocols that have one (e.g. a Redis "
                    "'OOM command not allowed'); empty picks the protocol's "
                    "usual one", str, ''),
    }

    def _erring(self, protocol):
        return self._next_count(protocol) >= self.option('warmup')

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
        # through the outlet: never ahead of answers still held back
        protocol.connection.outlet(source, False).sendall(answer)
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
    """Closes the client's connection at once, without a word."""

    name = 'blackout'

    def on_before_handle(self, protocol, source, dest, to_backend):
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


for _cls in (Dummy, Delay, Error, Transient, Hang, Blackout, Abort):
    Behavior.register(_cls)
del _cls


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


_original_module_paths()


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
        self.per_connection = any(b.scope == 'connection' for _, _, b in
                                  self._table)
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


# The engine ##############################################################

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
                self._rng = random.Random('%s:%d:%s:%s' % (
                    seed, self.connection.id,
                    'up' if self.to_backend else 'down', self.behavior.name))
        return self._rng

    @staticmethod
    def now():
        """The clock of ``at`` and ``when``: ``time.monotonic()``."""
        return _now()

    def close(self, when, reset=False):
        """Close the whole connection at *when*; *reset*: with a TCP RST
        to the client."""
        self.connection.close_at(when, reset)


class Outlet(object):
    """Stands in for the destination socket while stream behaviors act (or
    while pieces they delayed still wait): what the protocol sends goes
    through their ``on_chunk`` into the connection's outbox, and out when
    due.  Anything else is the real socket's."""

    __slots__ = ('sock', 'connection', 'to_backend', 'behavior')

    def __init__(self, sock, connection, to_backend, behavior):
        self.sock = sock
        self.connection = connection
        self.to_backend = to_backend
        self.behavior = behavior

    def sendall(self, data):
        self.connection.push(self.to_backend, self.behavior, bytes(data))

    def send(self, data):
        self.sendall(data)
        return len(data)

    def shutdown(self, how):
        if how != socket.SHUT_WR:
            self.sock.shutdown(socket.SHUT_RD)
        if how != socket.SHUT_RD:
            self.connection.push_end(self.to_backend, self.behavior)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class _Queue(object):
    """Pieces waiting for their time, one direction of one connection."""

    __slots__ = ('items', 'size', 'last', 'paused')

    def __init__(self):
        self.items = collections.deque()    # (when, piece or None for end)
        self.size = 0
        self.last = 0.0
        self.paused = False


class Exchange(object):
    """One request from the client and what answers it."""

    __slots__ = ('number', 'name', 'behavior', 'state')

    def __init__(self, number, name, behavior):
        self.number = number
        self.name = name
        self.behavior = behavior
        self.state = {}


class Connection(object):
    """One client, its backend connection and the loop between them."""

    def __init__(self, server, client, address):
        self.server = server
        self.id = next(server._ids)
        self.client = client
        self.client_address = address
        self.client_text = format_address(address)
        self.backend = None
        self.backend_address = server.backend
        self.started = time.time()
        self.bytes_up = 0       # read from the client
        self.bytes_down = 0     # read from the backend
        self.exchanges = 0
        self.behaviors_met = collections.Counter()
        self.dummies = 0        # dummy exchanges of the fast path
        self.state = {}
        self.exchange = self.plain_exchange = Exchange(0, 'dummy',
                                                       server.dummy)
        self._rng = None
        self._poller = None
        self._reading = {}
        self.protocol = None
        #: True once all that is left from the client is its end of stream
        self.client_ended = False
        #: {to_backend: _Queue} once a stream behavior delayed something
        self.queues = None
        self._flows = {}
        self._closing = None            # (when, reset)
        self._sticky = None             # (generation, (name, behavior))

    @property
    def rng(self):
        """This connection's random generator: seeded from ``--seed`` and
        the connection's number, so a run can be replayed."""
        if self._rng is None:
            seed = self.server.seed
            if seed is None:
                self._rng = random.Random()
            else:
                self._rng = random.Random('%s:%d' % (seed, self.id))
        return self._rng

    def start_exchange(self):
        """Draw the behavior for a new exchange and make it current."""
        self.exchanges += 1
        number = self.exchanges
        server = self.server
        mix = server.mix
        if mix.single is not None:
            name, behavior = mix.single
        else:
            name, behavior = self._draw(mix)
            if behavior.gated:
                name, behavior = self._gate(name, behavior, number)
        self.exchange = exchange = Exchange(number, name, behavior)
        self.behaviors_met[name] += 1
        if server.statsd.enabled:
            server.statsd.incr('behavior.' + name)
        if not behavior.passive:
            server.decide(self, number, behavior)
        return exchange

    def _draw(self, mix):
        if not mix.per_connection:
            return mix.draw(self.rng)
        # behaviors of connection scope are drawn once per connection (and
        # again when the mix changes); the others for each exchange
        generation = self.server.mix_generation
        if self._sticky is None or self._sticky[0] != generation:
            name, behavior = mix.draw(self.rng)
            if behavior.scope != 'connection':
                name, behavior = None, None
            self._sticky = (generation, (name, behavior))
        if self._sticky[1][0] is not None:
            return self._sticky[1]
        name, behavior = mix.draw(self.rng)
        if behavior.scope == 'connection':
            return 'dummy', self.server.dummy
        return name, behavior

    def _gate(self, name, behavior, number):
        parts = getattr(behavior, 'parts', None)
        if parts is None:
            if behavior.admits(self, number):
                return name, behavior
            return 'dummy', self.server.dummy
        admitted = [part for part in parts if part.admits(self, number)]
        if not admitted:
            return 'dummy', self.server.dummy
        if len(admitted) == 1:
            return admitted[0].name, admitted[0]
        if len(admitted) < len(parts):
            behavior = Composite(admitted)
        return behavior.name, behavior

    def _open(self):
        """Behaviors that act before the backend connection is made."""
        for percent, name, behavior in self.server.mix.openers:
            if percent < 100 and self.rng.random() * 100 >= percent:
                continue
            for part in getattr(behavior, 'parts', [behavior]):
                if part.opens and (not part._networks or
                                   _client_in(self, part._networks)):
                    self.server.decide(self, 0, part)
                    part.on_open(self)

    # stream behaviors: the outboxes

    def outlet(self, dest, to_backend, behavior=None):
        """*dest*, or its Outlet when stream behaviors act or pieces wait:
        see BaseProtocol.__call__."""
        if (behavior is None or not behavior.streams) and (
                self.queues is None or not self.queues[to_backend].items):
            return dest
        return Outlet(dest, self, to_backend, behavior)

    def _flow(self, behavior, to_backend):
        key = (id(behavior), to_backend)
        flow = self._flows.get(key)
        if flow is None or flow.behavior is not behavior:
            flow = self._flows[key] = Flow(self, to_backend, behavior)
        return flow

    def _stages(self, behavior, to_backend):
        if behavior is None or not behavior.streams:
            return ()
        return [(part, self._flow(part, to_backend))
                for part in getattr(behavior, 'parts', [behavior])
                if part.streams and part.acts(to_backend)]

    def push(self, to_backend, behavior, data):
        """Send *data* through the stream behaviors, now or when due."""
        pieces = [(_now(), data)]
        for part, flow in self._stages(behavior, to_backend):
            passed = []
            for when, piece in pieces:
                passed.extend(part.on_chunk(flow, piece, when))
            pieces = passed
        for when, piece in pieces:
            if piece:
                self._enqueue(to_backend, when, piece)

    def push_end(self, to_backend, behavior):
        """Pass the end of the stream on, now or when due."""
        when = _now()
        for part, flow in self._stages(behavior, to_backend):
            when = part.on_end(flow, when)
            if when is None:
                return
        self._enqueue(to_backend, when, None)

    def _enqueue(self, to_backend, when, piece):
        queues = self.queues
        if queues is None:
            queues = self.queues = {True: _Queue(), False: _Queue()}
        queue = queues[to_backend]
        when = max(when, queue.last)
        queue.last = when
        if not queue.items and when <= _now():
            self._send(to_backend, piece)
            return
        queue.items.append((when, piece))
        if piece is not None:
            queue.size += len(piece)
            if queue.size > self.high_water and not queue.paused:
                queue.paused = True
                self._pause(to_backend, True)

    # pieces waiting this long in bytes stop the reading of their source
    high_water = 4 << 20
    low_water = 1 << 20

    def _send(self, to_backend, piece):
        dest = self.backend if to_backend else self.client
        if piece is None:
            try:
                dest.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            dest.sendall(piece)

    def _pause(self, to_backend, pause):
        sock = self.client if to_backend else self.backend
        fd = sock.fileno()
        if fd not in self._reading:
            return
        try:
            if pause:
                self._poller.unregister(fd)
            else:
                self._poller.register(fd)
        except (KeyError, ValueError, OSError):
            pass

    def wait_sent(self, to_backend):
        """Block until the pieces waiting to go this way are sent (for a
        hook about to answer itself); False if the connection must close."""
        queue = self.queues and self.queues[to_backend]
        while queue and queue.items:
            delay = queue.items[0][0] - _now()
            if delay > 0:
                time.sleep(delay)
            if not self._run_due():
                return False
        return True

    def close_at(self, when, reset=False):
        """Close the connection at *when* (with a RST to the client)."""
        if self._closing is None or when < self._closing[0]:
            self._closing = (when, reset)

    def _due(self):
        """The next time something is due, or None."""
        times = []
        if self.queues is not None:
            times = [q.items[0][0] for q in self.queues.values() if q.items]
        if self._closing is not None:
            times.append(self._closing[0])
        return min(times) if times else None

    def _run_due(self):
        """Send what is due; False when the connection must close now."""
        now = _now()
        closing = self._closing
        if closing is not None and closing[0] <= now:
            # what was due before the close still goes out first
            self._send_due(closing[0])
            if closing[1]:
                _reset(self.client)
            return False
        self._send_due(now)
        return True

    def _send_due(self, now):
        if self.queues is None:
            return
        for to_backend, queue in self.queues.items():
            items = queue.items
            while items and items[0][0] <= now:
                _, piece = items.popleft()
                if piece is not None:
                    queue.size -= len(piece)
                self._send(to_backend, piece)
            if queue.paused and queue.size < self.low_water:
                queue.paused = False
                self._pause(to_backend, False)

    def stop_reading(self, sock):
        """Stop watching *sock*; False when nothing is left to watch (nor
        to send later)."""
        fd = sock.fileno()
        if self._reading.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
        return bool(self._reading) or self._due() is not None

    def describe(self):
        return '%d %s -> %s' % (self.id, format_address(self.client_address),
                                format_address(self.backend_address))

    def run(self):
        server = self.server
        if server.mix.openers:
            self._open()
        try:
            self.backend = server.connect_backend(self.backend_address)
        except OSError as exc:
            logger.warning('connection %s: cannot reach the backend (%s); '
                           'closing the client', self.describe(),
                           _os_error_text(exc))
            server.statsd.incr('backend_errors')
            return
        client, backend = self.client, self.backend
        for sock in (client, backend):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if server.mix.per_connection:
            # a behavior drawn for the whole connection also covers what
            # the backend says before the client's first request
            name, behavior = self._draw(server.mix)
            if not behavior.passive and behavior.scope == 'connection':
                self.exchange = Exchange(0, name, behavior)
                server.decide(self, 0, behavior)
        self.protocol = protocol = server.make_protocol()
        protocol.connection = self
        protocol.setup(client, backend)
        self._loop(protocol, client, backend)

    def _loop(self, protocol, client, backend):
        poller = self._poller = _Poller()
        reading = self._reading
        reading[client.fileno()] = True
        reading[backend.fileno()] = False
        poller.register(client.fileno())
        poller.register(backend.fileno())
        idle = self.server.idle_timeout
        while reading or self._due() is not None:
            timeout, timer, due = idle, False, None
            if self.queues is not None or self._closing is not None:
                due = self._due()
                if due is not None:
                    wait = max(0.0, due - _now())
                    if timeout is None or wait < timeout:
                        timeout, timer = wait, True
            if reading:
                if timer and timeout < 0.002:
                    # poll counts in milliseconds: sleep for finer waits
                    time.sleep(timeout)
                    events = poller.poll(0)
                else:
                    events = poller.poll(timeout)
            else:       # only pieces waiting for their time
                time.sleep(timeout)
                events = ()
            if due is not None and not self._guarded(self._run_due):
                return
            if not events:
                if not timer:
                    logger.info('connection %s: quiet for %gs, closing it',
                                self.describe(), idle)
                    return
                continue
            for fd, flags in events:
                to_backend = reading.get(fd)
                if to_backend is None:
                    continue
                if to_backend:
                    if flags & _POLLRDHUP:
                        self.client_ended = _only_end_of_stream(client)
                    source, dest = client, backend
                else:
                    source, dest = backend, client
                if not self._step(protocol, source, dest, to_backend):
                    return

    def _step(self, protocol, source, dest, to_backend):
        return self._guarded(protocol, source, dest, to_backend)

    def _guarded(self, call, *args):
        """Run *call*; a peer gone or a plugin raising closes this
        connection only (False), with one log line."""
        try:
            return call(*args)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                socket.timeout) as exc:
            logger.debug('connection %s: %s', self.describe(),
                         _os_error_text(exc))
            if isinstance(exc, ConnectionResetError):
                # one peer reset: pass the reset on to the other
                _reset(self.client)
                _reset(self.backend)
            return False
        except OSError as exc:
            if self.server.closing:
                return False
            logger.info('connection %s: %s', self.describe(),
                        _os_error_text(exc))
            return False
        except Exception as exc:
            logger.error('connection %s: %s raised %s: %s; closing this '
                         'connection', self.describe(), _culprit(exc),
                         type(exc).__name__, exc)
            logger.debug('%s', traceback.format_exc())
            return False

    def close(self):
        for sock in (self.client, self.backend):
            if sock is not None:
                _close(sock)

    def abort(self):
        """Wake the connection's thread from another thread: it sees the
        end of both streams and finishes."""
        for sock in (self.client, self.backend):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def met(self):
        """Exchanges by the behavior they met."""
        met = collections.Counter(self.behaviors_met)
        if self.dummies:
            met['dummy'] += self.dummies
        return met

    def summary(self):
        met = ' '.join('%s=%d' % item for item in
                       sorted(self.met().items())) or 'none'
        return ('connection %s closed after %.3fs: %d bytes up, %d bytes '
                'down, %d exchanges (%s)' % (
                    self.describe(), time.time() - self.started,
                    self.bytes_up, self.bytes_down, self.exchanges, met))


class _Poller(object):
    """``select.poll`` where there is one, ``selectors`` elsewhere; both
    have no limit on descriptor numbers."""

    if _HAS_POLL:
        _MASK = (select.POLLIN | select.POLLPRI | select.POLLHUP |
                 select.POLLERR | _POLLRDHUP)

        def __init__(self):
            self._poll = select.poll()

        def register(self, fd):
            self._poll.register(fd, self._MASK)

        def unregister(self, fd):
            self._poll.unregister(fd)

        def poll(self, timeout=None):
            ms = None if timeout is None else int(math.ceil(timeout * 1000))
            while True:
                try:
                    return self._poll.poll(ms)
                except InterruptedError:
                    continue
    else:
        def __init__(self):
            import selectors
            self._sel = selectors.DefaultSelector()

        def register(self, fd):
            import selectors
            self._sel.register(fd, selectors.EVENT_READ)

        def unregister(self, fd):
            self._sel.unregister(fd)

        def poll(self, timeout=None):
            return [(key.fd, 0) for key, _ in self._sel.select(timeout)]


def _only_end_of_stream(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b''
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


class _Statsd(object):
    """Counters sent as plain statsd UDP lines; names have a bounded set
    of values (no per-connection ids)."""

    def __init__(self, host=None, port=8125, prefix='vaurien'):
        self.enabled = bool(host)
        self.prefix = prefix
        if self.enabled:
            self.address = (host, port)
            self.sock = socket.socket(
                socket.AF_INET6 if ':' in host else socket.AF_INET,
                socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    def incr(self, name, count=1):
        if not self.enabled:
            return
        line = ('%s.%s:%d|c' % (self.prefix, name, count)).encode('ascii')
        try:
            self.sock.sendto(line, self.address)
        except OSError:
            pass


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
            conn.close()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug('%s', conn.summary())


class _Spare(object):
    """A connection's thread waiting for the next connection."""
    __slots__ = ('wake', 'job')

    def __init__(self):
        self.wake = threading.Lock()
        self.wake.acquire()     # released to hand over a connection
        self.job = None


class ProxyServer(socketserver.ThreadingTCPServer):
    """The chaos proxy: listens on *proxy*, connects each client to
    *backend*, and runs the behavior *mix* on every exchange."""

    # a thread per connection, which must not keep the process alive
    daemon_threads = True
    # do not wait for connections in server_close() (Python 3.7+)
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default of 5 drops part of a burst of connections
    request_queue_size = 2048
    # decisions kept in memory for GET /decisions
    decision_log_size = 10000
    # threads kept waiting for the next connection once theirs has ended,
    # and how long one waits before it ends too (seconds)
    spare_threads = 64
    spare_thread_idle = 60.0

    def __init__(self, proxy=('127.0.0.1', 8000), backend=('127.0.0.1', 80),
                 protocol='tcp', behavior='dummy', timeout=30.0,
                 idle_timeout=None, backlog=None, seed=None,
                 protocol_options=None, behavior_options=None, statsd=None):
        if isinstance(proxy, str):
            proxy = parse_address(proxy, 'proxy address', allow_zero=True)
        if isinstance(backend, str):
            backend = parse_address(backend, 'backend address')
        self.backend = tuple(backend)
        self.timeout = timeout
        self.idle_timeout = idle_timeout or None
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
        self._ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self.started = time.time()
        self._closed_exchanges = collections.Counter()
        # totals of the connections that ended (open ones are added live)
        self.totals = collections.Counter()
        self.mix = None
        self.mix_generation = 0
        self._live = False      # whole-proxy behaviors wait for the socket
        self.decisions = collections.deque(maxlen=self.decision_log_size)
        self._decision_ids = itertools.count(1)
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
        socketserver.ThreadingTCPServer.__init__(self, tuple(proxy)[:2],
                                                 ProxyHandler)
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
            if conn.backend is None:
                self.totals['backend_errors'] += 1
            self._closed_exchanges.update(conn.met())

    def decide(self, conn, number, behavior):
        """Log a non-dummy decision, and keep it for GET /decisions."""
        direction, options = _decision_fields(behavior)
        record = {
            'id': next(self._decision_ids),
            'time': time.time(),      # rounded when read: round() is slow
            'connection': conn.id,
            'client': conn.client_text,
            'exchange': number,
            'direction': direction,
            'behavior': behavior.name,
            'options': options}
        self.decisions.append(record)
        if logger.isEnabledFor(logging.INFO):
            logger.info('decision %d: connection %d (%s) exchange %d: %s, '
                        '%s %s', record['id'], conn.id, record['client'],
                        number, behavior.name, record['direction'],
                        json.dumps(record['options'], sort_keys=True))

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
        """Listen again, on the same address, after ``go_down``."""
        with self._listen_lock:
            if self.socket is not None or self.closing:
                return
            listener = socket.socket(self.address_family, self.socket_type)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self.server_address)
            listener.listen(self.request_queue_size)
            self.socket = listener
        logger.info('up: accepting connections on %s',
                    format_address(self.address))

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


def _stop_listening(listener):
    # shut down first: a close alone leaves the socket listening until the
    # accepting thread's poll lets go of it
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    _close(listener)



# The control API ########################################################

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


class Controller(object):
    """What the control API can do to one proxy, as a table of routes:
    ``call(method, path, body)`` -> ``(status, answer)``.  The HTTP front
    end and the in-process helper share it, so both check the same way.
    """

    def __init__(self, server):
        self.server = server
        self.routes = {
            '/behavior': {'GET': self.get_behavior, 'PUT': self.set_behavior,
                          'POST': self.set_behavior},
            '/behaviors': {'GET': self.list_behaviors},
            '/backend': {'GET': self.get_backend, 'PUT': self.set_backend,
                         'POST': self.set_backend},
            '/connections': {'GET': self.connections},
            '/stats': {'GET': self.stats},
            '/version': {'GET': self.version},
            '/health': {'GET': self.health},
            '/decisions': {'GET': self.decisions},
        }

    def call(self, method, path, body=b''):
        path, _, query = path.partition('?')
        path = path.rstrip('/') or '/'
        self.query = dict((k, v[-1]) for k, v in
                          urllib.parse.parse_qs(query).items())
        route = self.routes.get(path)
        if route is None:
            return 404, _error('url', 'path', 'no such endpoint %r (try: %s)'
                               % (path, ', '.join(sorted(self.routes))))
        handler = route.get(method)
        if handler is None:
            return 405, _error('method', 'method', '%s is not allowed on %s '
                               '(allowed: %s)' % (method, path,
                                                  ', '.join(sorted(route))))
        if method in ('PUT', 'POST'):
            try:
                data = json.loads(body.decode('utf-8') if body else '')
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
        except VaurienError as exc:
            return 400, _error('body', exc.field or '', str(exc))

    # the routes

    def get_behavior(self):
        mix = self.server.mix
        return {'behavior': str(mix),
                'mix': [{'name': name, 'percent': percent}
                        for name, percent in mix.shares],
                'options': dict((name, _options_in_force(behavior))
                                for name, behavior in mix.instances.items())}

    def set_behavior(self, data):
        data = dict(data)
        if 'behavior' in data:
            mix = data.pop('behavior')
            options = data.pop('options', None) or {}
            if data:
                raise VaurienError('unexpected keys beside "behavior": %s'
                                   % ', '.join(sorted(data)), sorted(data)[0])
            if not isinstance(mix, str) or not isinstance(options, dict):
                raise VaurienError('"behavior" must be a mix string and '
                                   '"options" an object of objects',
                                   'behavior')
        elif 'name' in data:
            mix = data.pop('name')
            if not isinstance(mix, str):
                raise VaurienError('"name" must be a string', 'name')
            options = {mix: data} if data else {}
        else:
            raise VaurienError('the body needs a "name" key (or a '
                               '"behavior" mix)', 'name')
        for values in options.values():
            if not isinstance(values, dict):
                raise VaurienError('"options" must map behavior names to '
                                   'objects', 'options')
        self.server.set_mix(mix, options)
        logger.info('behavior changed to %s', self.server.mix)
        return {'status': 'ok'}

    def list_behaviors(self):
        return {'behaviors': Behavior.names()}

    def get_backend(self):
        return {'backend': format_address(self.server.backend)}

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
        logger.info('backend changed to %s (for new connections)',
                    format_address(self.server.backend))
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
        if not since.isdigit():
            raise VaurienError('since must be a decision id (a whole '
                               'number)', 'since')
        since = int(since)
        return {'decisions': [dict(record, time=round(record['time'], 6))
                              for record in list(self.server.decisions)
                              if record['id'] > since]}

    def health(self):
        return {'status': 'ok', 'proxy': format_address(self.server.address),
                'backend': format_address(self.server.backend)}


def _error(location, name, description):
    """An error answer in Vaurien 1.x's format."""
    return {'status': 'error', 'errors': [
        {'location': location, 'name': name, 'description': description}]}


_LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1', 'ip6-localhost')


class ControlHandler(http.server.BaseHTTPRequestHandler):
    """The control API over HTTP: JSON in, JSON out."""

    server_version = 'vaurien/' + __version__
    protocol_version = 'HTTP/1.1'
    # seconds a client may take over its request: a slow client costs its
    # own thread only, never the proxy's traffic
    timeout = 10
    max_body = 1 << 20

    def _serve(self):
        method = self.command
        refusal = self._refusal()
        if refusal is not None:
            status, answer = refusal
        else:
            try:
                length = int(self.headers.get('Content-Length') or 0)
            except ValueError:
                length = -1
            if length < 0 or length > self.max_body:
                status, answer = 413 if length > 0 else 400, _error(
                    'header', 'Content-Length', 'a body of 0 to %d bytes '
                    'is expected' % self.max_body)
                self.close_connection = True
            else:
                body = self.rfile.read(length) if length else b''
                status, answer = self.server.controller.call(
                    method, self.path, body)
        data = (json.dumps(answer, sort_keys=True) + '\n').encode('utf-8')
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        if method != 'HEAD':
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _refusal(self):
        """Requests a web page could make (forged against localhost from a
        browser) are refused; so are requests without the token."""
        headers = self.headers
        agent = headers.get('User-Agent', '')
        if (headers.get('Origin') is not None or agent.startswith('Mozilla/')
                or any(name.lower().startswith('sec-fetch-')
                       for name in headers.keys())):
            return 403, _error('header', 'Origin', 'requests from web '
                               'browsers are refused: use curl, a script or '
                               'vaurien.Client')
        host = headers.get('Host', '')
        name = host.rsplit(':', 1)[0] if not host.endswith(']') else host
        name = name.strip('[]').lower()
        if (self.server.loopback_only and name and
                name not in _LOOPBACK_NAMES and not name.startswith('127.')):
            return 403, _error('header', 'Host', 'this API answers to '
                               'localhost only, not %r' % host)
        token = self.server.token
        if token and self.path.split('?')[0].rstrip('/') != '/health':
            given = headers.get('Authorization', '')
            if not hmac.compare_digest(given.encode('utf-8'),
                                       ('Bearer ' + token).encode('utf-8')):
                return 401, _error('header', 'Authorization', 'a bearer '
                                   'token is required (--http-token)')
        return None

    def log_message(self, format, *args):
        logger.debug('control API: %s %s', self.address_string(),
                     format % args)


class ControlServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The control API's HTTP server, for one ProxyServer."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, proxy, token=None):
        self.proxy = proxy
        self.controller = Controller(proxy)
        self.token = token or None
        host = address[0]
        self.loopback_only = (host in _LOOPBACK_NAMES or
                              host.startswith('127.'))
        if ':' in host:
            self.address_family = socket.AF_INET6
        http.server.HTTPServer.__init__(self, tuple(address)[:2],
                                        ControlHandler)

    @property
    def address(self):
        return self.server_address[:2]

    def handle_error(self, request, client_address):
        logger.debug('control API: %s: %s', format_address(client_address),
                     sys.exc_info()[1])


# Client helpers #########################################################

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
    """The control calls, on top of ``self._call(method, path, body)``."""

    def get_behavior(self):
        """The behavior in force: a name, or a mix like 20:delay,10:error."""
        return self._call('GET', '/behavior')['behavior']

    def get_behavior_options(self):
        """Option values in force, by behavior name."""
        return self._call('GET', '/behavior')['options']

    def set_behavior(self, name, **options):
        """Put behavior *name* (or a mix) in force, with these options;
        options left out take the proxy's configured values."""
        body = {'name': name}
        body.update(options)
        return self._call('PUT', '/behavior', body)

    def set_mix(self, mix, options=None):
        """Put a mix in force, e.g. ``set_mix('20:delay,10:error',
        {'delay': {'sleep': 0.5}})``."""
        return self._call('PUT', '/behavior',
                          {'behavior': mix, 'options': options or {}})

    def list_behaviors(self):
        return self._call('GET', '/behaviors')['behaviors']

    def get_backend(self):
        return self._call('GET', '/backend')['backend']

    def set_backend(self, backend):
        """New connections go to *backend* ('host:port' or a tuple)."""
        if not isinstance(backend, str):
            backend = format_address(backend)
        return self._call('PUT', '/backend', {'backend': backend})

    def connections(self):
        return self._call('GET', '/connections')['connections']

    def stats(self):
        return self._call('GET', '/stats')

    def health(self):
        return self._call('GET', '/health')

    def version(self):
        return self._call('GET', '/version')['version']

    def decisions(self, since=0):
        """The proxy's decisions (non-dummy behaviors met), oldest first."""
        return self._call('GET', '/decisions?since=%d' % since)['decisions']

    @contextlib.contextmanager
    def with_behavior(self, name, **options):
        """Put *name* in force for the ``with`` block, then restore the
        previous behavior (or mix) and its options, exceptions included."""
        before = self._call('GET', '/behavior')
        self.set_behavior(name, **options)
        try:
            yield self
        finally:
            self._call('PUT', '/behavior', {'behavior': before['behavior'],
                                            'options': before['options']})

    behavior = with_behavior


class Client(_ControlMethods):
    """Talks to a proxy's control API (``--http``) over HTTP."""

    def __init__(self, host='localhost', port=8080, scheme='http',
                 token=None, timeout=10.0):
        if scheme != 'http':
            raise VaurienError('the control API speaks plain http only')
        self.host = host
        self.port = int(port)
        self.token = token
        self.timeout = timeout

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
        return Client(host, port, token=self.control.token)


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
    protocol_options, behavior_options).  Several can run at once.
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


def start_proxy(proxy_host='localhost', proxy_port=8000,
                backend_host='localhost', backend_port=8888, protocol='tcp',
                http=True, warmup=10, http_host='localhost', http_port=8080,
                options=None, log_level='info', log_output='-'):
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


def load_plugins(modules=(), callables=()):
    """Import every bundled plugin module, the *modules* a user names, and
    the *callables* ``(kind, name, 'module:Class')`` of ini sections."""
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
        base = BaseProtocol if kind == 'protocol' else Dummy
        module_name, sep, attr = where.strip().partition(':')
        if not sep:
            module_name, _, attr = where.strip().rpartition('.')
        if not module_name or not attr:
            raise PluginError("[%s:%s] callable = %r: expected module:Class"
                              % (kind, name, where))
        module = _import_module(module_name, 'plugin module')
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError("[%s:%s] callable = %r: %s has no %s class %r"
                              % (kind, name, where, module_name, kind, attr))
        registry.register(cls, name)


# Command line and configuration ##########################################

_LOG_LEVELS = ('debug', 'info', 'warning', 'error', 'critical')


class Setting(object):
    """One core setting, declared once: its flag (``--idle-timeout``),
    its ini key (``idle_timeout`` in [vaurien]; *statsd*: its key in
    [statsd] too), its type, default and help, and the values it accepts:
    *limits* (a Range), and *check*, called with the converted value,
    which returns the value to keep or raises VaurienError."""

    def __init__(self, name, default, help, metavar=None, type=str,
                 limits=None, check=None, statsd=None):
        self.name = name
        self.flag = '--' + name.replace('_', '-')
        self.default = default
        self.help = help
        self.metavar = metavar
        self.type = type
        self.limits = limits
        self.check = check
        self.statsd = statsd

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
]
_SETTINGS = collections.OrderedDict((s.name, s) for s in SETTINGS)
#: The default of each core setting.
DEFAULTS = collections.OrderedDict((s.name, s.default) for s in SETTINGS)


def check_settings(settings, where='settings'):
    """Every core setting of *settings* (a mapping; those missing take
    their default) converted and checked, as a new OrderedDict."""
    return collections.OrderedDict(
        (name, setting.convert(settings.get(name, setting.default), where))
        for name, setting in _SETTINGS.items())


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and no usage block."""

    def error(self, message):
        raise VaurienError('%s (see %s --help)' % (message, self.prog))


def _base_parser(add_help=True):
    parser = _Parser(
        prog='vaurien', add_help=add_help, allow_abbrev=False,
        description='A chaos TCP proxy: sits between an application and its '
                    'backend, and delays, errors, hangs or drops on purpose.',
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


def _add_flag(parser, flag, dest, help, bool_flag=False, metavar=None):
    if bool_flag:
        parser.add_argument(flag, dest=dest, nargs='?', const='true',
                            default=None, metavar='BOOL', help=help)
        parser.add_argument('--no-' + flag[2:], dest=dest,
                            action='store_const', const='false',
                            help=argparse.SUPPRESS)
    else:
        parser.add_argument(flag, dest=dest, default=None, metavar=metavar,
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
                      setting.help_text(), bool_flag=setting.type is bool,
                      metavar=setting.metavar)
    for kind, registry in (('protocol', Protocol), ('behavior', Behavior)):
        group = parser.add_argument_group('%s options' % kind)
        for name, cls in registry.items():
            for option, spec in sorted(option_table(cls).items()):
                description, type_, default, choices = _option_spec(spec)
                flag = '--%s-%s-%s' % (kind, name, option.replace('_', '-'))
                dest = 'plugin:%s:%s:%s' % (kind, name, option)
                text = '%s (default %s)' % (description, _show(default))
                if choices:
                    text += ': %s' % _describe_choices(choices)
                if option in COMMON_OPTIONS and option not in cls.options:
                    text = argparse.SUPPRESS    # said once, in the epilog
                _add_flag(group, flag, dest, text, bool_flag=type_ is bool,
                          metavar=_TYPE_WORDS.get(type_, 'VALUE')
                          .split()[-1].upper())
    return parser


def read_config(path):
    """The ini file as ``{section: {key: value}}``."""
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
    return dict((section, dict(parser.items(section)))
                for section in parser.sections())


def _split_section(section):
    kind, sep, name = section.partition(':')
    if sep and kind.strip() in ('behavior', 'protocol') and name.strip():
        return kind.strip(), name.strip()
    return None, None


def load_settings(argv=None):
    """Defaults < ini file < command line.  Returns ``(settings,
    plugin_options, args)`` where plugin_options maps ``(kind, name)`` to
    raw option values."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early, _ = _base_parser(add_help=False).parse_known_args(argv)
    config = read_config(early.config) if early.config else {}

    callables = []
    for section, values in config.items():
        kind, name = _split_section(section)
        if kind is None and section not in ('vaurien', 'statsd'):
            raise VaurienError(
                "config file %r: unknown section [%s] (sections: [vaurien], "
                "[statsd], [behavior:NAME], [protocol:NAME])"
                % (early.config, section))
        if kind and 'callable' in values:
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
    for section, values in config.items():
        kind, name = _split_section(section)
        if kind:
            registry = Protocol if kind == 'protocol' else Behavior
            registry.get(name)
            for key, value in values.items():
                if key != 'callable':
                    plugin_options[(kind, name)][key.replace('-', '_')] = value

    for dest, value in vars(args).items():
        if value is None or dest in ('config', 'version', 'list'):
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
                         settings['statsd_prefix'])
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


#: The signals that stop vaurien gracefully; SIGHUP (a closed terminal,
#: a supervisor's reload) would otherwise kill it without a word.
STOP_SIGNALS = tuple(getattr(signal, name) for name in
                     ('SIGTERM', 'SIGINT', 'SIGHUP') if hasattr(signal, name))


def serve(server, control=None, spare_cpus=()):
    """Serve until SIGTERM, SIGINT or SIGHUP (or ``server.shutdown()``),
    then stop accepting, stop the control API and return.

    Connections still open are left to the process's exit, which closes
    them all at once (``close_all()`` closes them in a process that goes
    on): closing 500 busy ones in turn from here took up to a second, as
    each close waited for the GIL behind 500 busy threads.  For the same
    reason this thread, the one that exits, leaves the CPU the
    connections run on for *spare_cpus* once a signal came.

    The accepting runs in a thread of its own, and this one waits for a
    byte on a socket pair (``signal.set_wakeup_fd``): it wakes at once,
    whichever thread the signal reached.  From another thread than the
    main one (no signals there), this one accepts, until shutdown().
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
            server.serve_forever(poll_interval=0.2)
            signum = None
        else:
            try:
                signum = _wait_for_stop(server, waiter, waker)
            finally:
                signal.set_wakeup_fd(old_wakeup)
        if signum:
            if spare_cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, spare_cpus)
            logger.info('%s: stopping (%d connections open)',
                        signal.Signals(signum).name, len(server.connections))
        # what close_all() does, but for the connections (see above)
        server.closing = True
        server.server_close()           # refuse new connections at once
        server.shutdown()               # the accepting thread ends
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


def _on_stop_signal(signum, frame):
    """Nothing to do here: the wake-up byte tells serve()."""


def _wait_for_stop(server, waiter, waker):
    """Accept in a thread until a stop signal's byte comes: its number
    (None when the accept loop ended by itself)."""
    failure = []

    def accept():
        try:
            server.serve_forever(poll_interval=0.2)
        except BaseException:
            failure.append(sys.exc_info())
        finally:
            with contextlib.suppress(OSError):
                waker.send(b'\0')      # wake serve()
    threading.Thread(target=accept, name='vaurien-accept',
                     daemon=True).start()
    while True:
        wait_readable(waiter)
        try:
            data = waiter.recv(256)
        except (BlockingIOError, InterruptedError):
            continue
        for number in bytearray(data):
            if number in STOP_SIGNALS:
                return number
            if number == 0:
                if failure:
                    raise failure[0][1].with_traceback(failure[0][2])
                return None


def start_control(settings, server):
    """The control API's server, when --http asks for it."""
    if not settings['http']:
        return None
    address = (settings['http_host'], settings['http_port'])
    try:
        return ControlServer(address, server, settings['http_token'])
    except OSError as exc:
        server.server_close()
        raise VaurienError('cannot serve the control API on %s: %s (pick '
                           'another --http-port)' % (format_address(address),
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
    cpu = int(choice) if choice.isdigit() else -1
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


def main(argv=None):
    """The ``vaurien`` command.  Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['ctl']:
        return ctl_main(argv[1:])
    server = control = None
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
        # before any thread starts: they inherit the CPU
        cpu = pin_to_cpu(settings['cpu'])
        server = build_server(settings, plugin_options)
        control = start_control(settings, server)
        logger.info('vaurien %s: proxying %s -> %s, protocol %s, behavior %s',
                    __version__, format_address(server.address),
                    format_address(server.backend), server.protocol_name,
                    server.mix)
        if cpu is not None:
            logger.info('running on CPU %d (--cpu all lets threads use every '
                        'CPU)', cpu)
        if control is not None:
            logger.info('control API on http://%s%s',
                        format_address(control.address),
                        ' (bearer token required)' if control.token else '')
        if log.failure is not None:
            raise VaurienError('cannot write the log to %r: %s (give '
                               '--log-output a writable path)' % (
                                   settings['log_output'],
                                   _os_error_text(log.failure)))
        log.warn = True
        if settings['ready_file']:
            write_ready_file(settings['ready_file'], server, control)
    except VaurienError as exc:
        for listener in (control, server):
            if listener is not None:
                listener.server_close()
        sys.stderr.write('vaurien: error: %s\n' % exc)
        return 2
    serve(server, control, allowed - {cpu} if cpu is not None else ())
    return 0


def ctl_main(argv):
    """``vaurien ctl``: the control API from the command line."""
    parser = _Parser(prog='vaurien ctl', allow_abbrev=False,
                     description='Read or change the behavior of a running '
                                 'vaurien (started with --http).')
    parser.add_argument('--host', default='localhost',
                        help='host of the control API, or its URL '
                             '(default localhost)')
    parser.add_argument('--port', type=int, default=None,
                        help='port of the control API (default 8080)')
    parser.add_argument('--token', default=None,
                        help='bearer token (--http-token of the proxy)')
    actions = parser.add_subparsers(dest='action', metavar='ACTION')
    actions.add_parser('get-behavior', help='print the behavior in force')
    setter = actions.add_parser(
        'set-behavior', help='set a behavior (or a mix): set-behavior delay '
        '--sleep 2, set-behavior 20:delay,10:error')
    setter.add_argument('name')
    actions.add_parser('list-behaviors', help='list the known behaviors')
    actions.add_parser('get-backend', help='print the backend')
    backend = actions.add_parser('set-backend',
                                 help='send new connections to HOST:PORT')
    backend.add_argument('backend', metavar='HOST:PORT')
    for name in ('connections', 'stats', 'health'):
        actions.add_parser(name, help='print /%s as JSON' % name)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.action is None:
            raise VaurienError('which action? (see vaurien ctl --help)')
        if extra and args.action != 'set-behavior':
            parser.error('unrecognized arguments: %s' % ' '.join(extra))
        host, port = args.host, args.port
        if '://' in host:
            netloc = host.split('://', 1)[1].split('/', 1)[0]
            host, _, url_port = netloc.rpartition(':')
            if not host:
                host, url_port = netloc, ''
            if port is None and url_port.isdigit():
                port = int(url_port)
        host = check_host(host.strip('[]'), 'control API host')
        port = 8080 if port is None else port
        if not 1 <= port <= 65535:
            raise VaurienError('control API port %d: give one from 1 to '
                               '65535' % port)
        client = Client(host, port, token=args.token)
        action = args.action
        if action == 'get-behavior':
            print(client.get_behavior())
        elif action == 'set-behavior':
            client.set_mix(args.name, _mix_options(args.name, extra))
            print('behavior changed to %s' % client.get_behavior())
        elif action == 'list-behaviors':
            print(', '.join(client.list_behaviors()))
        elif action == 'get-backend':
            print(client.get_backend())
        elif action == 'set-backend':
            client.set_backend(args.backend)
            print('backend changed to %s' % client.get_backend())
        else:
            print(json.dumps(getattr(client, action)(), indent=2,
                             sort_keys=True))
    except VaurienError as exc:
        sys.stderr.write('vaurien ctl: error: %s\n' % exc)
        return 1
    return 0


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
