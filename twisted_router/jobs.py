# -*- test-case-name: tests.unit.test_jobs -*-
"""
Who owns which image and video job, and the job list across the fleet.

A real worker keeps its images and jobs in its own process memory, so a
download, poll or delete must reach the worker that made them: the router
learns owners from the answers it relays, and when it does not know (it was
restarted, or the entry was evicted) it asks the workers that could own the
item. Each worker also lists only its own jobs, so C{GET /v1/videos} over
several workers is merged here, by L{merge_job_lists}, which is pure.

No HTTP serving: the web application parses requests and answers; this module
is given workers and answers, and asks workers through the injected caller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_router.affinity import FINISHED_STATES, OwnerMap
from twisted_router.calls import WorkerCaller
from twisted_router.errors import WorkerFailed
from twisted_router.pool import Worker, WorkerPool
from twisted_router.proxy import ForwardResult

__all__ = [
    "IMAGE_CAPTURE_LIMIT",
    "JOB_CAPTURE_LIMIT",
    "LOOKUP_TIMEOUT",
    "JobOwners",
    "merge_job_lists",
    "parse_json",
]

#: Answers up to this size are kept (while streaming) to learn job ids; of
#: image answers (base64 images, megabytes) only the start is kept, where the id is.
IMAGE_CAPTURE_LIMIT = 4096
JOB_CAPTURE_LIMIT = 256 * 1024
#: How long the router waits for a worker while looking up who owns a job.
LOOKUP_TIMEOUT = 5.0

_IMAGE_URL = re.compile(r"/v1/images/([^/?#]+)/content")
#: The worker serialises its image answer with C{id} first: {"id": "<uuid>", "created": ..., "data": [...]}.
_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\]{1,200})"')
#: A video job's predicted work stops counting on its worker this long
#: after its predicted finish (3× its predicted time behind the work already
#: there, plus a minute), if no poll has shown it finished by then: a client
#: that never polls must not hold a worker's share forever.
JOB_WORK_SLACK = 3.0
JOB_WORK_GRACE = 60.0
#: ... and never longer than this.
JOB_WORK_MAX_HOLD = 6 * 3600.0
#: The router also polls a running job itself, once at its predicted finish
#: and then at doubling intervals in this range, one call at a time per job:
#: a client that polls rarely (or only fetches the content) must not leave
#: the job's work on its worker long after the job ended.
JOB_POLL_MIN = 2.0
JOB_POLL_MAX = 60.0
#: The keys of a job-list page that describe the page, not the fleet's list.
_PAGE_KEYS = ("data", "first_id", "last_id", "has_more")


def parse_json(raw: bytes | None) -> Any:
    """A worker answer as JSON, or None for anything unparsable (never raises: the answer is already sent)."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _created_at(job: dict[str, Any]) -> float:
    """A job's creation time for sorting; anything but a number sorts as 0."""
    value = job.get("created_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def merge_job_lists(
    pages: Sequence[dict[str, Any]], order: str, after: str | None, limit: int | None
) -> dict[str, Any]:
    """
    One job-list page made of every worker's own list.

    The workers' rules, applied to the merged list: newest first unless
    C{order} is C{"asc"}, jobs after the one with id C{after} (none when it
    is unknown), at most C{limit}. The sort is stable, so each worker's
    same-second order is kept. The page's other fields come from the last
    page given.

    @param pages: the answers of the workers that listed their jobs, each a
        dict with a C{data} list (entries that are not objects are skipped).
    """
    template: dict[str, Any] = {"object": "list"}
    jobs: list[dict[str, Any]] = []
    for page in pages:
        template = {k: v for k, v in page.items() if k not in _PAGE_KEYS}
        jobs.extend(job for job in page["data"] if isinstance(job, dict))
    jobs.sort(key=_created_at, reverse=(order != "asc"))
    if after is not None:
        ids = [j.get("id") for j in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    has_more = limit is not None and len(jobs) > limit
    if limit is not None:
        jobs = jobs[:limit]
    answer = dict(template)
    answer["data"] = jobs
    answer["first_id"] = jobs[0].get("id") if jobs else None
    answer["last_id"] = jobs[-1].get("id") if jobs else None
    answer["has_more"] = has_more
    return answer


def _is_job_page(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("data"), list)


def _job_id(job: dict[str, Any]) -> str | None:
    for key in ("id", "video_id", "job_id"):
        job_id = job.get(key)
        if isinstance(job_id, str) and job_id:
            return job_id
    return None


class _RunningJob:
    """A video job counted as outstanding work on its worker."""

    def __init__(self, worker: Worker, work: float, expiry: IDelayedCall) -> None:
        self.worker = worker
        self.work = work
        self.expiry = expiry
        self.poll: IDelayedCall | None = None
        self.interval = JOB_POLL_MIN


class JobOwners:
    """
    The owners of images and video jobs: learned from relayed answers, kept
    in bounded maps, and looked up by asking the workers when forgotten.

    Also the video jobs still running: a job's creation returns at once while
    its worker works on it for minutes, so its predicted work stays on the
    worker (C{predicted_work}, C{running_jobs}) until a relayed poll or list
    shows it finished, the router's own poll (L{JOB_POLL_MIN}) does, it is
    deleted, or it expires (L{JOB_WORK_SLACK}).
    """

    log = Logger()

    def __init__(
        self,
        pool: WorkerPool,
        caller: WorkerCaller,
        *,
        max_video_jobs: int,
        max_image_ids: int,
        clock: IReactorTime | None = None,
    ) -> None:
        """@param clock: for the expiry of running jobs' work; without one, job work is not tracked."""
        self._pool = pool
        self._caller = caller
        self._clock = clock
        self.videos = OwnerMap(max_video_jobs)
        self.images = OwnerMap(max_image_ids)
        self._running: dict[str, _RunningJob] = {}

    # ------------------------------------------------------------------ running jobs' work

    def job_started(self, worker: Worker, job: Any, work: float | None) -> None:
        """
        A video job was created on C{worker} (C{job} is the creation answer):
        count its C{work} there until it finishes. Called while the
        creation's lease is still held, so the job takes the slot over
        without a moment in which the worker looks free.
        """
        if self._clock is None or work is None or not isinstance(job, dict):
            return
        job_id = _job_id(job)
        status = job.get("status")
        if job_id is None or job_id in self._running or (isinstance(status, str) and status in FINISHED_STATES):
            return
        # Called while the creation's lease (with this job's work) is still
        # held: the worker's predicted work already includes the job once.
        predicted_finish = worker.predicted_work * worker.speed.seconds_per_unit
        hold = JOB_WORK_SLACK * predicted_finish + JOB_WORK_GRACE
        worker.add_work(work)
        worker.running_jobs += 1
        expiry = self._clock.callLater(min(hold, JOB_WORK_MAX_HOLD), self._expired, job_id)
        running = self._running[job_id] = _RunningJob(worker, work, expiry)
        running.poll = self._clock.callLater(
            min(max(JOB_POLL_MIN, predicted_finish), JOB_POLL_MAX), self._poll, job_id
        )

    def _poll(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is not None:
            running.poll = None
            Deferred.fromCoroutine(self._poll_job(job_id, running))

    async def _poll_job(self, job_id: str, running: _RunningJob) -> None:
        """Ask the job's worker how it is; learn a finish, else ask again later."""
        reply = await self._caller.call(
            running.worker.url, "GET", "/v1/videos/" + quote(job_id, safe=""), timeout=LOOKUP_TIMEOUT
        )
        if self._running.get(job_id) is not running:
            return  # finished (or deleted) meanwhile
        if reply.status_code == 404:
            self._job_over(job_id)  # the worker no longer has it
            return
        if reply.status_code == 200:
            self.learn_job(running.worker, reply.body)
        if self._running.get(job_id) is running and self._clock is not None:
            running.interval = min(running.interval * 2, JOB_POLL_MAX)
            running.poll = self._clock.callLater(running.interval, self._poll, job_id)

    def _expired(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is not None:
            self.log.info(
                "video job {job} on {worker} not seen finished in time; its work no longer counts there",
                job=job_id,
                worker=running.worker.display_id,
            )
        self._job_over(job_id)

    def _job_over(self, job_id: str, job: dict[str, Any] | None = None) -> None:
        """
        The job ended (C{job}: its last state, when known): its work no longer
        counts on its worker, and a completed job's C{inference_time_s} (the
        worker's own measure of its service time) teaches the worker's speed,
        so a fleet that only makes videos learns too.
        """
        running = self._running.pop(job_id, None)
        if running is None:
            return
        spent = job.get("inference_time_s") if job is not None else None
        if job is not None and job.get("status") == "completed" and isinstance(spent, (int, float)):
            if not isinstance(spent, bool):
                running.worker.speed.observe_service(float(spent), running.work)
                for other in self._pool.workers():
                    if other.speed.samples == 0:
                        other.speed.adopt(running.worker.speed)
        if running.expiry.active():
            running.expiry.cancel()
        if running.poll is not None and running.poll.active():
            running.poll.cancel()
        worker = running.worker
        worker.add_work(-running.work)
        worker.running_jobs = max(0, worker.running_jobs - 1)
        self._pool.slot_free(worker)

    @property
    def running_jobs(self) -> int:
        """Video jobs whose work is counted on their worker now."""
        return len(self._running)

    # ------------------------------------------------------------------ learning

    def learn_images(self, worker: Worker, result: ForwardResult) -> None:
        """Remember which worker made the images of a generation answer (success only)."""
        if not 200 <= result.status < 300:
            return
        answer = parse_json(result.captured)
        if not isinstance(answer, dict):
            # Too large to keep (a base64 image): read the id at its start, not the megabytes after.
            match = _LEADING_ID.match(result.head)
            if match:
                self.images.remember(match.group(1).decode(), worker.url, finished=True)
            return
        ids: set[str] = set()
        if isinstance(answer.get("id"), str):
            ids.add(answer["id"])
        data = answer.get("data")
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                m = _IMAGE_URL.search(item["url"])
                if m:
                    ids.add(unquote(m.group(1)))
        for image_id in ids:
            self.images.remember(image_id, worker.url, finished=True)

    def learn_job(self, worker: Worker, job: Any) -> None:
        """Remember who owns a job from a worker's job object (creation or poll answer)."""
        if not isinstance(job, dict):
            return
        job_id = _job_id(job)
        if job_id is not None:
            status = job.get("status")
            finished = isinstance(status, str) and status in FINISHED_STATES
            self.videos.remember(job_id, worker.url, finished=finished)
            if finished:
                self._job_over(job_id, job)

    def learn_job_list(self, worker: Worker, answer: Any) -> None:
        """Remember the owner of every job in one worker's job-list page."""
        if _is_job_page(answer):
            for job in answer["data"]:
                self.learn_job(worker, job)

    def forget_video(self, video_id: str) -> None:
        """The job was deleted on its worker."""
        self.videos.forget(video_id)
        self._job_over(video_id)

    # ------------------------------------------------------------------ lookup

    async def video_owner(self, video_id: str) -> Worker | None:
        """The worker that owns job C{video_id} (asking the video workers when the router does not know)."""
        return await self._find_owner(
            "video",
            video_id,
            self.videos,
            [w for w in self._pool.workers() if not w.is_dead and w.video_support],
            "/v1/videos/" + quote(video_id, safe=""),
            learn=self.learn_job,
        )

    async def image_owner(self, image_id: str) -> Worker | None:
        """The worker that holds image C{image_id} (asking the image workers when the router does not know)."""
        live = [w for w in self._pool.workers() if not w.is_dead]
        # Any worker may have made it when the fleet had no image-model workers then.
        suspects = [w for w in live if w.image_model] or live
        return await self._find_owner(
            "image",
            image_id,
            self.images,
            suspects,
            "/v1/images/" + quote(image_id, safe="") + "/content",
            finished=True,
        )

    async def _find_owner(
        self,
        kind: str,
        item_id: str,
        owners: OwnerMap,
        suspects: list[Worker],
        path: str,
        *,
        learn: Callable[[Worker, Any], None] | None = None,
        finished: bool = False,
    ) -> Worker | None:
        """
        The worker that holds C{item_id}: the one the router remembers, else
        the first of C{suspects} that answers C{GET path} with 200.

        Only the worker that made an image or runs a job has it, and the
        router's memory of owners is lost on a restart (or evicted), so asking
        the workers is what keeps ids valid for as long as the workers keep them.
        """
        remembered = owners.owner(item_id)
        owner = self._pool.get(remembered) if remembered else None
        if owner is not None:
            return owner
        if not suspects:
            return None
        # A video poll answer says more about the job (learned); an image's bytes say nothing.
        replies = await self._caller.fan_out(
            [w.url for w in suspects], "GET", path, timeout=LOOKUP_TIMEOUT, keep_body=learn is not None
        )
        for worker, reply in zip(suspects, replies, strict=True):
            if reply.status_code == 200:
                if learn is not None:
                    learn(worker, reply.body)
                if item_id not in owners:
                    owners.remember(item_id, worker.url, finished=finished)
                self.log.info(
                    "found owner {worker} of {kind} {item}", worker=worker.display_id, kind=kind, item=item_id
                )
                return worker
        return None

    # ------------------------------------------------------------------ listing

    async def merged_video_list(
        self, workers: list[Worker], *, order: str, after: str | None, limit: int | None, timeout: float
    ) -> dict[str, Any]:
        """
        One job list across several video workers (see L{merge_job_lists}),
        learning every listed job's owner on the way.

        @raise WorkerFailed: no worker could list its jobs.
        """
        forwarded = {"order": order, "limit": "100"}
        replies = await self._caller.fan_out(
            [w.url for w in workers], "GET", "/v1/videos?" + urlencode(forwarded), timeout=timeout
        )
        pages: list[dict[str, Any]] = []
        failures = []
        for worker, reply in zip(workers, replies, strict=True):
            if reply.status_code == 200 and _is_job_page(reply.body):
                self.learn_job_list(worker, reply.body)
                pages.append(reply.body)
            else:
                failures.append(reply)
        if not pages:
            raise WorkerFailed(
                "Worker request failed: "
                + "; ".join(f"{r.worker_url}: {r.error or r.status_code}" for r in failures)
            )
        return merge_job_lists(pages, order, after, limit)
