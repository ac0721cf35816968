"""The prefill fit is refitted when its samples moved enough, not on every sample a busy host records."""

from __future__ import annotations

import threading

from kvagent.costs.calibration.fitting import Fit
from kvagent.costs.calibration.refits import CHEAP_SAMPLES, CPU_SHARE, REFIT_AFTER_S, Refits


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, samples: object) -> Fit:
        self.calls += 1
        return Fit((0.01, 0.001, 0.0), 0.1, len(samples), 0, (1.0,) * 3, (1.0,) * 3)  # type: ignore[arg-type]


def sample(i: int) -> tuple[float, float, float, str]:
    return (float(10 + i), 0.0, 0.001 * (10 + i), "m")


def test_a_fit_is_reused_until_a_quarter_of_its_samples_are_new_or_it_is_old() -> None:
    now = [0.0]
    fit = Counting()
    refits = Refits(fit, clock=lambda: now[0])
    samples = [sample(i) for i in range(40)]
    first = refits.fit("p", samples)
    assert fit.calls == 1 and refits.fit("p", samples) is first and fit.calls == 1
    samples.append(sample(40))  # one new sample of 41: the recent fit stands
    assert refits.fit("p", samples) is first and fit.calls == 1
    samples.extend(sample(i) for i in range(41, 60))  # 20 new of 60: more than a quarter
    second = refits.fit("p", samples)
    assert fit.calls == 2 and second is not first
    samples.append(sample(60))
    assert refits.fit("p", samples) is second
    now[0] += REFIT_AFTER_S  # old enough: the new sample is fitted
    assert refits.fit("p", samples) is not second and fit.calls == 3
    del samples[:14]  # aged out: 14 changed, of the 47 left
    assert refits.fit("p", samples) is not second and fit.calls == 4
    assert refits.fit("p", []) is not None and fit.calls == 5  # all gone: not the last fit's figures
    # another stream has its own fit
    refits.fit("q", samples[:3])
    assert fit.calls == 6


def test_a_fit_of_few_samples_is_redone_on_every_new_one() -> None:
    fit = Counting()
    refits = Refits(fit, clock=lambda: 0.0)
    samples: list[tuple[float, float, float, str]] = []
    for i in range(CHEAP_SAMPLES):
        samples.append(sample(i))
        refits.fit("p", samples)
    assert fit.calls == CHEAP_SAMPLES


def test_while_one_thread_refits_the_others_take_the_previous_fit() -> None:
    started, release = threading.Event(), threading.Event()
    fit = Counting()

    def slow(samples: object) -> Fit:
        if fit.calls:
            started.set()
            release.wait(5)
        return fit(samples)

    refits = Refits(slow, clock=lambda: 0.0)
    samples = [sample(i) for i in range(4)]
    first = refits.fit("p", samples)
    samples.append(sample(4))
    t = threading.Thread(target=refits.fit, args=("p", list(samples)))
    t.start()
    assert started.wait(5)
    samples.append(sample(5))
    assert refits.fit("p", samples) is first  # did not wait for the refit in progress
    release.set()
    t.join(5)
    assert fit.calls == 2


def test_refits_of_a_costly_fit_take_at_most_a_small_share_of_the_time() -> None:
    now = [0.0]
    counted = Counting()

    def costly(samples: object) -> Fit:
        now[0] += 0.3  # a refit of 64 samples on this machine
        return counted(samples)

    refits = Refits(costly, clock=lambda: now[0])
    samples = [sample(i) for i in range(64)]
    refits.fit("p", samples)
    samples[:] = [sample(i) for i in range(100, 164)]  # every sample changed
    now[0] += 0.3 / CPU_SHARE - 0.01
    refits.fit("p", samples)
    assert counted.calls == 1  # too soon: the previous fit stands
    now[0] += 0.02
    refits.fit("p", samples)
    assert counted.calls == 2
