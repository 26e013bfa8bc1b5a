"""slicer: cuts the data in small writes with a delay between them."""

import vaurien


class Slicer(vaurien.Dummy):
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
                         vaurien.Range(1, 1 << 24, 'bytes')),
        'size_variation': ("Slice sizes vary by up to this many bytes either "
                           "way (less than average_size)", int, 32,
                           vaurien.Range(0, (1 << 24) - 1, 'bytes')),
        'delay': ("Time between two slices, in microseconds", float, 1000.0,
                  vaurien.Range(0, vaurien.MAX_DELAY * 10 ** 6,
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


vaurien.Behavior.register(Slicer)
