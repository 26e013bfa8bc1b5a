"""limit_data: passes a number of bytes, then closes the connection."""

import vaurien


class LimitData(vaurien.Dummy):
    """Passes the first ``bytes`` bytes of a stream (each direction counts
    its own), then closes the connection."""

    name = 'limit_data'
    options = {
        'bytes': ("Bytes passed in each direction before the connection "
                  "is closed", int, 1024, vaurien.Range(1, 10 ** 12, 'bytes')),
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


vaurien.Behavior.register(LimitData)
