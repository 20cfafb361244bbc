"""The denoising step of a diffusers pipeline, told to attnopt as it runs (for `attention.schedule`).

    from attnopt.integrations.diffusers_steps import track_steps
    with track_steps(pipe):              # or track_steps(pipe.scheduler)
        image = pipe(prompt, num_inference_steps=50).images[0]

How: for the duration of the block, the pipeline's scheduler object gets two wrapped methods
(its class is untouched). `set_timesteps` opens step 0 of `len(scheduler.timesteps)` once the
scheduler has made them; each `step` (called after the denoiser's output, as every diffusers
pipeline does) moves on to the next step, and the last one closes it. So the denoiser calls of
step i run inside `attnopt.step(i, total)`: compiled graphs read it from the step tensor, eager
callers from `attnopt.schedule.current_step()`. Why the scheduler and not `callback_on_step_end`:
every pipeline calls its scheduler, while the callback runs after a step (too late for step 0)
and not every pipeline offers it. Multi-stage schedulers (Heun, DPM2) list each model call as a
timestep, so `total` counts model calls, as the pipeline's own loop does. Runs that start past
step 0 (img2img, `strength` < 1: the pipeline calls `set_begin_index(t_start)`) are numbered as
the scheduler numbers them: step t_start of the full schedule first, so fractions in
`attention.schedule` mean the same noise levels whatever the strength; after each `step` the
scheduler's own `step_index` is taken where it keeps one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from .. import schedule


class _Steps:
    """The step block that is open (if any) and how far the run has got."""

    def __init__(self):
        self.block: contextlib.ExitStack | None = None
        self.i = self.total = 0

    def open(self, i: int, total: int) -> None:
        self.close()
        if 0 <= i < total:
            self.block = contextlib.ExitStack()
            self.block.enter_context(schedule.step(i, total))
            self.i, self.total = i, total

    def close(self) -> None:
        if self.block is not None:
            block, self.block = self.block, None
            block.close()


@contextlib.contextmanager
def track_steps(pipe_or_scheduler: Any) -> Iterator[None]:
    """Within the block, every run of the pipeline (or of anything driving this scheduler) sets
    `attnopt.step(i, total)` around its denoiser calls. Restores the scheduler on exit."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    for name in ("set_timesteps", "step"):
        if not callable(getattr(scheduler, name, None)):
            raise TypeError(f"track_steps: {type(scheduler).__name__} has no {name}() (not a diffusers scheduler)")
    steps = _Steps()
    own = {name: scheduler.__dict__[name] for name in ("set_timesteps", "step") if name in scheduler.__dict__}
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)
    def tracked_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        steps.open(0, len(scheduler.timesteps))
        return out

    @functools.wraps(step)
    def tracked_step(*args, **kwargs):
        out = step(*args, **kwargs)
        if steps.block is not None:
            # the scheduler's own index where it keeps one (img2img runs start past 0), else one more
            idx = getattr(scheduler, "step_index", None)
            steps.open(idx if isinstance(idx, int) else steps.i + 1, steps.total)  # past the last: closed
        return out

    wrapped = {"set_timesteps": tracked_set_timesteps, "step": tracked_step}
    if callable(getattr(scheduler, "set_begin_index", None)):  # img2img / strength: the run starts there
        own.update({"set_begin_index": scheduler.__dict__["set_begin_index"]}
                   if "set_begin_index" in scheduler.__dict__ else {})
        set_begin_index = scheduler.set_begin_index

        @functools.wraps(set_begin_index)
        def tracked_set_begin_index(begin_index: int = 0, *args, **kwargs):
            out = set_begin_index(begin_index, *args, **kwargs)
            if steps.block is not None:
                steps.open(int(begin_index), steps.total)
            return out

        wrapped["set_begin_index"] = tracked_set_begin_index
    for name, fn in wrapped.items():
        setattr(scheduler, name, fn)
    try:
        yield
    finally:
        steps.close()
        for name in wrapped:
            if name in own:
                setattr(scheduler, name, own[name])
            else:
                delattr(scheduler, name)
