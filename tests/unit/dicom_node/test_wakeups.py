"""Wake-ups of the result path: set now, set after a delay, polls as the safety net."""

from __future__ import annotations

import threading

from dicom_node.wakeups import Wakeup, Wakeups


def test_set_wakes_a_waiting_loop_and_is_consumed() -> None:
    wakeup = Wakeup()
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(wakeup.wait(60)))
    waiter.start()
    wakeup.set()
    waiter.join(30)
    assert woken == [True]
    assert wakeup.wait(0) is False  # consumed: the next idle wait sleeps again


def test_a_set_during_the_step_is_kept_for_the_next_wait() -> None:
    wakeup = Wakeup()
    wakeup.set()  # e.g. a job created while the worker was busy with another
    assert wakeup.wait(60) is True


def test_set_after_wakes_now_and_again_at_the_deadline() -> None:
    wakeup = Wakeup()
    wakeup.set_after(0.05)
    assert wakeup.wait(60) is True  # now: the loop re-computes its sleep
    assert wakeup.wait(60) is True  # at the deadline, long before the 60 s poll
    assert wakeup.wait(0) is False  # none left


def test_a_later_deadline_survives_an_earlier_one() -> None:
    wakeup = Wakeup()
    wakeup.set_after(0.0)
    wakeup.set_after(0.5)
    assert wakeup.wait(60) is True  # now (and the first deadline)
    while wakeup.wait(0):  # the first deadline, if it was not yet due above
        pass
    assert wakeup.wait(60) is True  # the second one still wakes, before the poll


def test_set_all_wakes_every_loop() -> None:
    wakeups = Wakeups()
    wakeups.set_all()
    assert [w.wait(60) for w in (wakeups.assembler, wakeups.worker, wakeups.sender)] == [
        True, True, True]
