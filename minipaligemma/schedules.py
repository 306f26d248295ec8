"""Learning-rate schedules: functions of the global step t -> a multiplier of the base rate.

PaliGemma's pretraining uses big_vision's "infinite" rsqrt schedule, so that stage 2 can simply
continue where stage 1 stopped; its image encoder also warms up slowly in stage 1 (PaliGemma
paper, arXiv 2407.07726, §3.2.2 and Fig. 3). Transfers use a cosine schedule with a short linear
warm-up (§3.2.4).
"""

import math


def rsqrt_schedule(t: int, warmup: int, timescale: int) -> float:
    """Linear warm-up, then 1 / sqrt(t / timescale): big_vision's "infinite" schedule."""
    return min(1.0, (t + 1) / warmup) * math.sqrt(timescale / max(t + 1, timescale))


def slow_warmup(t: int, warmup: int) -> float:
    """The image encoder's extra linear warm-up in stage 1 (§3.2.2, Fig. 3)."""
    return min(1.0, (t + 1) / warmup)


def cosine_schedule(t: int, total: int, warmup_fraction: float = 0.05) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 0: the transfer schedule."""
    warmup = max(1, int(total * warmup_fraction))
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))
