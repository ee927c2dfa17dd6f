"""Workers report progress as messages, coalesced: a flood of updates reaches the UI as a few messages, the last
update always among them, and the job's end after it."""

from __future__ import annotations

import threading

from textual.app import App

from pocketlm.app.messages import JobFinished, ProgressMessage
from pocketlm.app.worker_progress import ProgressRelay, new_job_id
from pocketlm.models.progress import ProgressUpdate
from tests.app.test_chat_app import wait_for


class Recorder(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[ProgressMessage | JobFinished] = []

    def on_progress_message(self, message: ProgressMessage) -> None:
        self.seen.append(message)

    def on_job_finished(self, message: JobFinished) -> None:
        self.seen.append(message)


class SteppedClock:
    """A clock the worker moves forward by a fixed step per update, so how many messages the relay may post depends
    on the updates alone, never on how fast the machine runs them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_flood_of_updates_is_coalesced_in_order_and_the_last_one_arrives_just_before_the_end() -> None:
    app = Recorder()
    async with app.run_test() as pilot:
        job, clock = new_job_id(), SteppedClock()
        relay = ProgressRelay(app, job, interval=0.1, clock=clock)

        def work() -> None:
            for done in range(1, 10_001):  # as a download reports its chunks: far faster than anyone reads
                relay(ProgressUpdate("Downloading", done, 10_000))
                clock.now += 0.001  # 10,000 updates over 10 s of the relay's clock: 100 intervals
            relay.finish(result="done")

        thread = threading.Thread(target=work)
        thread.start()
        await wait_for(pilot, lambda: any(isinstance(m, JobFinished) for m in app.seen), timeout=30)
        thread.join()
        *progress, end = app.seen
        assert isinstance(end, JobFinished) and end.job == job and end.result == "done"
        assert all(isinstance(m, ProgressMessage) and m.job == job for m in progress)
        completed = [m.update.completed for m in progress]  # type: ignore[union-attr]
        assert completed == sorted(set(completed)), "updates arrive in order, none twice"
        assert completed[-1] == 10_000
        # One post per interval of the clock at most (100 intervals, plus the first), and the one finish() sends.
        assert len(progress) <= 102


async def test_nothing_is_posted_after_the_end_even_by_a_timer_that_was_waiting() -> None:
    app = Recorder()
    async with app.run_test() as pilot:
        relay = ProgressRelay(app, new_job_id(), interval=0.2, clock=SteppedClock())  # the clock stands still
        relay(ProgressUpdate("Quantizing", 1, 3))  # posted at once
        relay(ProgressUpdate("Quantizing", 2, 3))  # within the interval: a timer will carry it...
        relay(ProgressUpdate("Quantizing", 3, 3))  # ...or rather this newer one
        relay.finish(result="done")  # the post still due: finish sends it, and the timer, however late, sends nothing
        relay(ProgressUpdate("Quantizing", 3, 3))  # a straggler after the end is dropped
        await wait_for(pilot, lambda: any(isinstance(m, JobFinished) for m in app.seen), timeout=10)
        await pilot.pause(0.5)  # past the timer's real wait: a message it posted would be here by now
        assert [m.update.completed if isinstance(m, ProgressMessage) else "end" for m in app.seen] == [1, 3, "end"]


async def test_the_last_update_of_a_burst_arrives_even_when_no_other_follows() -> None:
    app = Recorder()
    async with app.run_test() as pilot:
        relay = ProgressRelay(app, new_job_id(), interval=0.1)
        relay(ProgressUpdate("Downloading", 1, 100))
        relay(ProgressUpdate("Downloading", 2, 100))  # within the interval: held back, then posted by itself
        await wait_for(pilot, lambda: bool(app.seen) and app.seen[-1].update.completed == 2, timeout=10)  # type: ignore[union-attr]
