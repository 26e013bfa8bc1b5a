"""slow_open: holds back the backend connection of a new client."""

import time

import vaurien


class SlowOpen(vaurien.Dummy):
    """A slow handshake: the client's connection is accepted at once, but
    the backend connection (and so the first byte either way) waits
    ``delay`` milliseconds."""

    name = 'slow_open'
    options = {
        'delay': ("Time before the backend is connected, in milliseconds",
                  float, 1000.0, vaurien.DELAY_MS),
    }

    def on_open(self, connection):
        delay = self.option('delay') / 1000.0
        if delay > 0:
            time.sleep(delay)


vaurien.Behavior.register(SlowOpen)
