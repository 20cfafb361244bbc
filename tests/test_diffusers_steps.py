"""track_steps: a diffusers pipeline's denoiser calls run inside attnopt.step(i, total)."""

import pytest

import attnopt
from attnopt.integrations.diffusers_steps import track_steps


def _tiny_ddpm(diffusers):
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100))


def test_pipeline_steps_reach_attnopt():
    diffusers = pytest.importorskip("diffusers")
    pipe = _tiny_ddpm(diffusers)
    seen, starts = [], []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(attnopt.schedule.current_step()))
    remove = attnopt.schedule.add_step_listener(lambda i, n: starts.append(i))
    step_tensor = attnopt.schedule.step_tensor("cpu")
    try:
        with track_steps(pipe):
            pipe(num_inference_steps=4, output_type="np")
            assert attnopt.schedule.current_step() is None  # the last step closed the block
            pipe(num_inference_steps=3, output_type="np")  # a second run starts at 0 again
    finally:
        remove()
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (0, 3), (1, 3), (2, 3)]
    assert starts == [0, 1, 2, 3, 0, 1, 2]  # listeners (SVG2's per-run state) see step 0 of each run
    assert step_tensor.tolist() == [-1.0, 0.0]
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    seen.clear()
    pipe(num_inference_steps=2, output_type="np")  # outside the block: no step
    assert seen == [None, None]


def test_an_error_mid_run_leaves_no_step_open():
    diffusers = pytest.importorskip("diffusers")
    pipe = _tiny_ddpm(diffusers)

    def boom(m, a):
        if attnopt.schedule.current_step() == (1, 3):
            raise RuntimeError("stop")

    pipe.unet.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="stop"), track_steps(pipe):
        pipe(num_inference_steps=3, output_type="np")
    assert attnopt.schedule.current_step() is None


def test_needs_a_scheduler():
    with pytest.raises(TypeError, match="not a diffusers scheduler"), track_steps(object()):
        pass


def test_runs_that_start_past_step_zero_are_numbered_as_the_scheduler_numbers_them():
    """img2img (strength < 1): set_begin_index(t_start) then timesteps[t_start:]; attnopt sees
    steps t_start.. of the full schedule, as fractions of the noise schedule."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    seen = []
    with track_steps(sched):
        sched.set_timesteps(10)
        sched.set_begin_index(6)
        x = torch.zeros(1, 4)
        for t in sched.timesteps[6:]:
            seen.append(attnopt.schedule.current_step())
            x = sched.step(torch.ones_like(x), t, x).prev_sample
    assert seen == [(6, 10), (7, 10), (8, 10), (9, 10)]
    assert attnopt.schedule.current_step() is None
    assert "set_begin_index" not in sched.__dict__
