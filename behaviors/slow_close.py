"""slow_close: delays passing on the end of a stream."""

import vaurien


class SlowClose(vaurien.Dummy):
    """Delays passing on the end of a stream (a close or half-close) by
    ``delay`` milliseconds; the data before it is not delayed."""

    name = 'slow_close'
    options = {
        'delay': ("Time the end of the stream is held back, in "
                  "milliseconds", float, 1000.0, vaurien.DELAY_MS),
    }

    def on_end(self, flow, at):
        return at + self.option('delay') / 1000.0


vaurien.Behavior.register(SlowClose)
