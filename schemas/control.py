"""Control events on `forseti.control`: cancel, pause, resume a job."""

from __future__ import annotations

from .base import Id, LongText, ShortText, Strict


class ControlCommand(Strict):
    """Fields every control event carries."""

    job_id: Id
    """The job to act on."""
    reason: LongText = ""
    """Why, for the job's history."""
    user_id: ShortText | None = None
    """Who asks: a job whose task named a `user_id` obeys only commands that name the same one."""


class CancelJob(ControlCommand):
    """`forseti.control.cancel.v1`: stop the job; it ends as cancelled."""


class PauseJob(ControlCommand):
    """`forseti.control.pause.v1`: hold the job at its next safe point."""


class ResumeJob(ControlCommand):
    """`forseti.control.resume.v1`: continue a paused job."""
