"""bandwidth: limits the rate of the data, per connection or shared."""

import threading

import vaurien

#: what a piece carries at most: about this much time's worth of data...
SLOT = 0.01
#: ...between these sizes, in bytes
MIN_PIECE = 1
MAX_PIECE = 65536
#: seconds of credit a link keeps while it waits (a token bucket this deep):
#: it makes up for a read the proxy made late (a busy machine, a garbage
#: collection), never a lasting burst
CREDIT = 0.05


class Bandwidth(vaurien.Dummy):
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
                 vaurien.Range(0.001, 10 ** 7, 'KB/s')),
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
        step = int(rate * SLOT)
        step = MIN_PIECE if step < MIN_PIECE else min(step, MAX_PIECE)
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
        elif free < at - CREDIT:
            free = at - CREDIT
        pieces = []
        for start in range(0, size, step):
            piece = data[start:start + step] if size > step else data
            free += len(piece) / rate
            pieces.append((free, piece))
        return pieces, free


vaurien.Behavior.register(Bandwidth)
