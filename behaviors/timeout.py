"""timeout: swallows the data, then closes the connection (or never)."""

import vaurien


class Timeout(vaurien.Dummy):
    """Swallows every byte (and the end of the stream) and closes the
    connection ``timeout`` milliseconds after the first chunk it swallowed;
    with 0, a black hole that holds the connection open forever."""

    name = 'timeout'
    options = {
        'timeout': ("Time from the first swallowed chunk to the close, in "
                    "milliseconds; 0 never closes (a black hole)", float,
                    0.0, vaurien.DELAY_MS),
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


vaurien.Behavior.register(Timeout)
