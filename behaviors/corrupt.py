"""corrupt: flips bits in the bytes that pass."""

import math

import vaurien

#: a gap so long that no stream reaches its end (for tiny probabilities)
_FAR = 1 << 62


class Corrupt(vaurien.Dummy):
    """Flips one random bit in each byte chosen, each byte being chosen
    with ``probability``.

    The bytes chosen do not depend on how the proxy happened to cut the
    stream in chunks: the gap to the next corrupted byte (geometric) is
    drawn once per corrupted byte, from the connection's generator
    (--seed), and carries over from chunk to chunk.
    """

    name = 'corrupt'
    options = {
        'probability': ("Chance that a byte gets one bit flipped, from 0 "
                        "to 1 (per byte, e.g. 0.001)", float, 0.001,
                        vaurien.Range(0, 1)),
    }

    def _gap(self, rng, probability):
        """Bytes left intact before the next corrupted one: geometric,
        drawn once per corrupted byte rather than once per byte."""
        if probability >= 1:
            return 0
        # 1 - random() is in (0, 1]: log() is defined
        gap = math.log(1.0 - rng.random()) / math.log1p(-probability)
        return int(gap) if gap < _FAR else _FAR

    def on_chunk(self, flow, data, at):
        probability = self.option('probability')
        if probability <= 0 or not data:
            return [(at, data)]
        rng = flow.rng
        state = flow.state
        position = state.get('skip')
        if position is None:
            position = self._gap(rng, probability)
        size = len(data)
        if position < size:
            data = bytearray(data)
            while position < size:
                data[position] ^= 1 << rng.randrange(8)
                position += 1 + self._gap(rng, probability)
            data = bytes(data)
        state['skip'] = position - size
        return [(at, data)]


vaurien.Behavior.register(Corrupt)
