"""reset_peer: closes the connection with a TCP RST."""

import vaurien


class ResetPeer(vaurien.Dummy):
    """Resets the connection (a TCP RST: the client sees "connection reset
    by peer") ``timeout`` milliseconds after its first chunk either way,
    connections already open included; data before the reset passes."""

    name = 'reset_peer'
    options = {
        'timeout': ("Time from the first chunk to the reset, in "
                    "milliseconds; 0 resets at once", float, 0.0,
                    vaurien.DELAY_MS),
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


vaurien.Behavior.register(ResetPeer)
