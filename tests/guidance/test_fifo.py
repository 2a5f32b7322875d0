"""FIFO-Diffusion's queue logic and prompt schedules, against hand computations."""

import pytest
import torch

from attnsteer.guidance.fifo import PromptSchedule, context_slots, fifo_step, initial_queue, slot_sigmas, windows


@pytest.mark.parametrize("window,partitions", [(4, 3), (5, 2), (2, 1), (3, 4), (21, 4)])
def test_windows_write_every_queue_slot_once_and_lookahead_writes_the_later_part(window, partitions):
    length = window * partitions
    tiled = windows(length, window, lookahead=False)
    assert tiled == [(k * window, k * window, (k + 1) * window) for k in range(partitions)]
    context = context_slots(window, lookahead=True)
    assert context == window // 2 and context_slots(window, lookahead=False) == 0
    calls = windows(length, window, lookahead=True)
    written = [slot for _, write, stop in calls for slot in range(write, stop)]
    assert written == list(range(context, context + length))  # every queue slot, never a context slot
    for start, write, stop in calls:
        assert start >= 0 and stop - start == window and write - start >= window // 2  # f // 2 cleaner frames before
    assert len(calls) <= 2 * partitions
    if window % 2 == 0 or window + 1 > 2 * partitions:
        assert len(calls) == 2 * partitions


@pytest.mark.parametrize("f,n", [(2, 1), (4, 3), (6, 2), (16, 4)])
def test_lookahead_windows_are_the_papers(f, n):
    """FIFO-Diffusion, lookahead denoising: f' = f / 2 context frames, then the queue of f n frames; for
    k = 0 .. 2n - 1 the model runs on frames [k f', k f' + f) and updates only the later f' of them."""
    half = f // 2
    paper = [(k * half, k * half + half, k * half + f) for k in range(2 * n)]
    assert windows(f * n, f, lookahead=True) == paper


def paper_lookahead_step(latents, sigmas, f, n, velocity):
    """One step of lookahead denoising as the paper's algorithm runs it, in place: f / 2 context frames at
    the lowest noise level before the queue; windows from the tail to the head (k = 2n - 1 .. 0), each on
    frames [k f / 2, k f / 2 + f), the Euler step on its later half only."""
    latents, half, length = latents.clone(), f // 2, f * n
    levels = [sigmas[length - 1]] * half + [sigmas[length - 1 - j] for j in range(length)]  # head to tail
    nexts = [None] * half + [sigmas[length - j] for j in range(length)]
    for k in reversed(range(2 * n)):
        start, mid, end = k * half, k * half + half, k * half + f
        x = latents[:, :, start:end].clone()
        v = velocity(x, torch.tensor(levels[start:end]), start, mid)
        for i in range(mid, end):
            latents[:, :, i] = latents[:, :, i] + (nexts[i] - levels[i]) * v[:, :, i - start]
    return latents


@pytest.mark.parametrize("f,n", [(2, 1), (4, 2), (6, 3)])
def test_a_lookahead_step_is_the_papers_algorithm(f, n):
    half, length = f // 2, f * n
    queue = torch.randn(2, 3, half + length, 2, 2, generator=torch.Generator().manual_seed(f + n))
    sigmas = torch.linspace(1, 0, length + 1) ** 0.7

    def velocity(x, s, start, write):  # reads every frame of its window, each at its own sigma
        return x * s.view(1, 1, -1, 1, 1) + x.cumsum(2) + 1

    ours = fifo_step(queue, sigmas, window=f, lookahead=True, velocity=velocity)
    torch.testing.assert_close(ours, paper_lookahead_step(queue, sigmas.tolist(), f, n, velocity))
    torch.testing.assert_close(ours[:, :, :half], queue[:, :, :half])  # the context slots are not denoised
    alone = fifo_step(queue[:, :, half:], sigmas, window=f, lookahead=False, velocity=velocity)
    assert not torch.allclose(ours[:, :, half:], alone)


def test_the_initial_queue_holds_the_clip_last_and_its_first_frame_before_it():
    clip = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(1, 2, 3, 2, 2)
    sigmas = torch.linspace(1, 0, 7)  # 6 slots
    noise = torch.full((1, 2, 6, 2, 2), 10.0)
    queue = initial_queue(clip, sigmas, noise)
    s = slot_sigmas(sigmas, 6)
    assert torch.allclose(s, torch.tensor([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]))
    frames = [0, 0, 0, 0, 1, 2]
    for j in range(6):
        assert torch.allclose(queue[:, :, j], (1 - s[j]) * frames[j] + s[j] * 10.0)
    with_context = initial_queue(clip, sigmas, torch.full((1, 2, 8, 2, 2), 10.0), context=2)
    torch.testing.assert_close(with_context[:, :, 2:], queue)
    for j in range(2):  # the clip's first frame at the head's sigma, as in the head slot
        torch.testing.assert_close(with_context[:, :, j], queue[:, :, 0])
    torch.testing.assert_close(slot_sigmas(sigmas, 6, context=2), torch.cat([s[:1], s[:1], s]))


def test_one_step_is_the_euler_update_at_each_frames_own_sigma():
    g = torch.Generator().manual_seed(0)
    queue = torch.randn(2, 3, 4, 2, 2, generator=g)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.0])
    seen = []

    def velocity(x, s, start, write):
        seen.append(s.clone())
        return x * s.view(1, 1, -1, 1, 1) + 1

    out = fifo_step(queue, sigmas, window=4, lookahead=False, velocity=velocity)
    now = torch.tensor([0.2, 0.4, 0.7, 1.0])  # head to tail
    after = torch.tensor([0.0, 0.2, 0.4, 0.7])
    expected = queue + (after - now).view(1, 1, -1, 1, 1) * (queue * now.view(1, 1, -1, 1, 1) + 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(seen[0], now)


def test_lookahead_windows_read_the_queue_as_it_was_before_the_step():
    queue = torch.randn(1, 1, 8, 1, 1, generator=torch.Generator().manual_seed(1))  # 2 context slots, 6 queue slots
    sigmas = torch.linspace(1, 0, 7)
    inputs = []

    def velocity(x, s, start, write):
        inputs.append((start, x.clone()))
        return torch.ones_like(x)

    fifo_step(queue, sigmas, window=4, lookahead=True, velocity=velocity)
    assert [start for start, _ in inputs] == [start for start, _, _ in windows(6, 4, True)]
    for start, x in inputs:
        torch.testing.assert_close(x, queue[:, :, start:start + 4])


def test_prompt_schedule_weights_cut_or_blend_and_sum_to_one():
    schedule = PromptSchedule([(0, 10, "a"), (10, 20, "b"), (20, 33, "c")], 33)
    assert schedule.weights(9).tolist() == [1, 0, 0] and schedule.weights(10).tolist() == [0, 1, 0]
    assert schedule.weights(32).tolist() == [0, 0, 1]
    blended = PromptSchedule([(0, 10, "a"), (10, 20, "b"), (20, 33, "c")], 33, blend=4)
    assert blended.weights(10).tolist() == [0.5, 0.5, 0] and blended.weights(7).tolist() == [1, 0, 0]
    assert blended.weights(11).tolist() == pytest.approx([0.25, 0.75, 0])
    for frame in range(33):
        w = blended.weights(frame)
        assert (w >= 0).all() and w.sum() == pytest.approx(1)


@pytest.mark.parametrize("ranges,message", [
    ([(0, 10, "a"), (8, 20, "b")], r"range \(8, 20\) overlaps the range before it"),
    ([(0, 10, "a"), (12, 20, "b")], r"range \(12, 20\) leaves a gap"),
    ([(0, 10, "a"), (10, 17, "b")], "ends at frame 17, but the video has 20 frames"),
    ([(1, 20, "a")], r"range \(1, 20\) leaves a gap"),
    ([(0, 20)], r"item \(0, 20\) is not \(start, stop, prompt\)"),
    ([], "a list of"),
])
def test_bad_prompt_schedules_are_named(ranges, message):
    with pytest.raises(ValueError, match=message):
        PromptSchedule(ranges, 20)


def test_coherent_tail_keeps_the_low_frequencies_of_the_previous_latent_and_the_high_of_the_noise():
    from attnsteer.guidance.fifo import coherent_tail, low_pass

    g = torch.Generator().manual_seed(3)
    previous, noise = torch.randn(2, 3, 1, 16, 16, generator=g), torch.randn(2, 3, 1, 16, 16, generator=g)
    tail = coherent_tail(previous, noise)
    spectrum = lambda x: torch.fft.fftn(x, dim=(-3, -2, -1))
    torch.testing.assert_close(spectrum(tail)[..., 0, 0, 0], spectrum(previous)[..., 0, 0, 0], atol=1e-4, rtol=1e-4)
    lpf = low_pass((1, 16, 16), 0.25, 1.0)
    assert lpf[0, 0, 0] == 1 and lpf[0, 8, 8] < 1e-3  # Nyquist: the noise's
    high = (lpf < 1e-3).expand(2, 3, 1, 16, 16)
    torch.testing.assert_close(spectrum(tail)[high], spectrum(noise)[high], atol=0.1, rtol=0)
