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
        'average_size': ("Average size of a slice, in bytes", int, 64),
        'size_variation': ("Slice sizes vary by up to this many bytes either "
                           "way (less than average_size)", int, 32),
        'delay': ("Time between two slices, in microseconds", float, 1000.0),
    }

    @staticmethod
    def check_options(values):
        average = values['average_size']
        variation = values['size_variation']
        if average <= 0:
            raise ValueError("option 'average_size' must be 1 or more bytes, "
                             "not %r" % (average,))
        if not 0 <= variation < average:
            raise ValueError("option 'size_variation' must be 0 or more "
                             "bytes, and less than average_size (%d), not %r"
                             % (average, variation))
        if not (0 <= values['delay'] < float('inf')):
            raise ValueError("option 'delay' must be 0 or more "
                             "microseconds, not %r" % (values['delay'],))

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
