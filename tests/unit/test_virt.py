"""virt.call: each libvirt call on a worker thread, with a deadline; workers kept for reuse."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from luksvm import virt


def test_calls_run_on_a_worker_kept_for_the_next_call() -> None:
    # Thread objects, not idents: a thread that ended may pass its ident on to the next one.
    ran_on = [virt.call("ask", threading.current_thread) for _ in range(5)]
    assert threading.current_thread() not in ran_on
    assert len({id(thread) for thread in ran_on}) == 1, "a new thread for each call"
    assert ran_on[0].is_alive() and ran_on[0].daemon


def test_a_call_past_its_deadline_fails_and_its_worker_is_not_used_again() -> None:
    release = threading.Event()
    stuck_on: list[threading.Thread] = []

    def hang() -> None:
        stuck_on.append(threading.current_thread())
        release.wait(30)

    try:
        began = time.monotonic()
        late = r"^libvirt did not answer start web within 0.3 s$"
        with pytest.raises(virt.VirtError, match=late):
            virt.call("start web", hang, deadline=0.3)
        assert 0.3 <= time.monotonic() - began < 5
        # the stuck worker is still in release.wait: the next calls go to another worker
        assert virt.call("state of web", lambda: "running", deadline=5) == "running"
        assert virt.call("ask", threading.current_thread, deadline=5) is not stuck_on[0]
        assert stuck_on[0].is_alive()
    finally:
        release.set()


def test_calls_from_several_threads_run_at_once() -> None:
    # guests.stop_guests stops several guests in parallel: one slow call holds back no other.
    release = threading.Event()
    answers: list[object] = []
    slow = threading.Thread(target=lambda: answers.append(virt.call("slow", release.wait, 10)))
    slow.start()
    try:
        assert virt.call("quick", lambda: 42, deadline=5) == 42
        assert answers == []
    finally:
        release.set()
        slow.join(10)
    assert answers == [True]


def test_a_libvirt_error_becomes_a_virt_error_with_its_code() -> None:
    conn = libvirt.open("test:///default")  # libvirt's test driver: a real error from libvirt
    try:
        with pytest.raises(virt.VirtError, match=r"^look up web: Domain not found") as caught:
            virt.call("look up web", conn.lookupByName, "web")
    finally:
        conn.close()
    assert caught.value.code == virt.VIR_ERR_NO_DOMAIN
    assert virt.call("ask", lambda: "still serving") == "still serving"


def test_any_other_exception_reaches_the_caller_as_it_is() -> None:
    def crash() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        virt.call("crash", crash)
    assert virt.call("ask", lambda: "still serving") == "still serving"
