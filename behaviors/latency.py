"""latency: delays every chunk, pipelined, with jitter from a distribution."""

import math

import vaurien

_LONGEST = vaurien.MAX_DELAY * 1000.0     # milliseconds


class Latency(vaurien.Dummy):
    """Delays each chunk by ``latency`` milliseconds, give or take
    ``jitter``; chunks keep their order, and a delay does not cap the
    throughput (delays are pipelined, chunk by chunk).

    The delay ``d`` of each chunk, in milliseconds, with L = latency,
    J = jitter, a = shape and u drawn uniformly in [0, 1):

    - uniform: ``d = L + J * (2u - 1)``, uniform in [L - J, L + J]
      (clamped at 0);
    - normal: ``d = max(0, N(L, J))``, mean L and standard deviation J;
    - pareto: ``d = L + J * ((1 - u) ** (-1 / a) - 1)`` (Lomax: a Pareto
      tail shifted to start at L), never below L; its median is
      ``L + J * (2 ** (1 / a) - 1)`` and, for a > 1, its mean
      ``L + J / (a - 1)``.

    A chunk is due at its arrival plus its own delay; a chunk drawn a
    shorter delay than the one before it waits for it (order is kept).
    """

    name = 'latency'
    options = {
        'latency': ("Delay added to each chunk, in milliseconds", float,
                    100.0, vaurien.DELAY_MS),
        'jitter': ("Spread of the delay, in milliseconds: the half-width "
                   "(uniform), the standard deviation (normal) or the "
                   "scale of the tail (pareto); 0 for none", float, 0.0,
                   vaurien.DELAY_MS),
        'distribution': ("How the delay is drawn around latency", str,
                         'uniform', ('uniform', 'normal', 'pareto')),
        'shape': ("Tail index of the pareto distribution (no unit): "
                  "smaller is a heavier tail; the mean is finite above 1",
                  float, 2.0, vaurien.Range(0.1, 1000)),
    }

    def delay(self, rng):
        """One chunk's delay, in seconds."""
        latency = self.option('latency')
        jitter = self.option('jitter')
        if not jitter:
            return latency / 1000.0
        distribution = self.option('distribution')
        if distribution == 'normal':
            value = rng.gauss(latency, jitter)
        elif distribution == 'pareto':
            shape = self.option('shape')
            # 1 - u is in (0, 1]: never a division by zero
            value = latency + jitter * (
                math.pow(1.0 - rng.random(), -1.0 / shape) - 1.0)
        else:
            value = latency + jitter * (2.0 * rng.random() - 1.0)
        # a tail draw may be years: no delay is longer than an hour
        return min(max(0.0, value), _LONGEST) / 1000.0

    def on_chunk(self, flow, data, at):
        return [(at + self.delay(flow.rng), data)]


vaurien.Behavior.register(Latency)
