"""Shapes videos: the generator's ground truth, the video prompt sets, and the video metrics on drawn
videos (clean, and hand-spoilt in one known way each)."""

import dataclasses

import numpy as np
import pytest

from attnsteer.guidance.shapes import (DIRECTIONS, FRAMES, Track, draw_video, draw_video_objects,
                                       mean_interval, motion_caption, parse_caption, parse_motion,
                                       plan_video, plan_video_objects, prompt_set, render, render_video,
                                       score_video, summarize_drift, summarize_videos, video_drift,
                                       video_prompt_set, wilson)
from attnsteer.guidance.shapes.scene import BORDER, GAP, SHAPES, _apart
from attnsteer.guidance.shapes.video import SPEEDS

PERFECT = {"coverage": 1.0, "bound": 1.0, "binding": 1.0, "identity": 1.0, "smooth": 1.0, "flicker": 0.0}


def _fold(start, velocity, lo, hi, frames):
    """Step-by-step bouncing, written independently of the generator's closed form."""
    p, v, path = start, velocity, [start]
    for _ in range(frames - 1):
        p += v
        if p > hi:
            p, v = 2 * hi - p, -v
        elif p < lo:
            p, v = 2 * lo - p, -v
        path.append(p)
    return path


def _axes(track):
    return np.array([o.box[:2] for o in track.objects])


def test_videos_are_deterministic_per_seed():
    a, b, c = draw_video(7), draw_video(7), draw_video(8)
    assert a[1] == b[1] and a[2] == b[2]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0], b[0]))
    assert len(a[0]) == FRAMES and a[0][0].size == (64, 64)
    assert (a[1], a[2]) != (c[1], c[2])
    assert plan_video(7) == (a[1], a[2])  # planning alone gives the same clip, unrendered


@pytest.mark.parametrize("seed", range(40))
def test_objects_keep_their_look_and_bounce_off_the_border(seed):
    frames, caption, tracks = draw_video(seed, frames=33)
    assert parse_caption(caption) == [(t.objects[0].colour, t.objects[0].shape) for t in tracks]
    for track in tracks:
        first = track.objects[0]
        side = first.box[2] - first.box[0]
        for o in track.objects:
            assert (o.colour, o.shape, o.size, o.shade, o.texture) == (
                first.colour, first.shape, first.size, first.shade, first.texture)
            assert o.box[2] - o.box[0] == o.box[3] - o.box[1] == side
        lo, hi = round(BORDER * 64), 64 - round(BORDER * 64) - side
        path = _axes(track)
        for axis in (0, 1):
            assert path[:, axis].tolist() == _fold(path[0, axis], track.velocity[axis], lo, hi, 33)
    for t, frame in enumerate(frames):
        assert np.array_equal(np.asarray(frame), np.asarray(render([tr.objects[t] for tr in tracks])))


def test_some_clips_bounce_and_named_motions_never_do():
    bounced = 0
    for seed in range(60):
        _, caption, tracks = draw_video(seed, named=0.5)
        for track in tracks:
            steps = np.diff(_axes(track), axis=0)
            straight = (steps == np.array(track.velocity)).all()
            bounced += not straight
            if track.named:
                assert straight, (seed, caption)
                speed = max(abs(v) for v in track.velocity)
                assert tuple(v / speed for v in track.velocity) == DIRECTIONS[track.named] and speed in SPEEDS
                assert f"{track.objects[0].shape} moving {track.named}" in caption
            else:
                assert track.velocity != (0, 0)
                assert f"{track.objects[0].shape} moving" not in caption
    assert bounced >= 5


@pytest.mark.parametrize("frames", [17, 49])
def test_two_objects_never_touch(frames):
    gap = round(GAP * 64)
    for seed in range(15):
        _, (a, b) = plan_video(seed, n_objects=2, frames=frames)
        assert all(_apart(x.box, y.box, gap) for x, y in zip(a.objects, b.objects))


def test_sizes_scale_the_whole_clip():
    (_, small), (_, big) = plan_video(3, size=64), plan_video(3, size=128)
    for s, b in zip(small, big):
        assert b.velocity == tuple(2 * v for v in s.velocity)
    frames, _, _ = draw_video(3, size=128)
    assert frames[0].size == (128, 128)


def test_chosen_objects_and_motions():
    frames, caption, (red, blue) = draw_video_objects([("red", "circle", "left"), ("blue", "square")], 4)
    assert caption == "a red circle moving left and a blue square"
    assert red.named == "left" and red.velocity[1] == 0 and red.velocity[0] < 0 and blue.named is None
    assert isinstance(red, Track) and red.centres.shape == (FRAMES, 2)
    assert (np.diff(red.centres[:, 0]) == red.velocity[0]).all()


@pytest.mark.parametrize("call,message", [
    (lambda: plan_video(0, n_objects=3), "n_objects must be 1 to 2, not 3"),
    (lambda: plan_video(0, n_objects=0), "n_objects must be 1 to 2, not 0"),
    (lambda: plan_video_objects([("red", "circle", "left", 2)], 0), "each object must be (colour, shape) or"),
    (lambda: plan_video(0, named=1.5), "named must be a probability in [0, 1], not 1.5"),
    (lambda: plan_video(0, frames=0), "frames must be a whole number >= 1, not 0"),
    (lambda: plan_video_objects([("red", "circle", "sideways")], 0), "direction must be one of"),
    (lambda: plan_video_objects([("pink", "circle")], 0), "('pink', 'circle') is not a colour of"),
    (lambda: plan_video_objects([], 0), "a video holds 1 to 2 objects, not 0"),
])
def test_bad_requests_are_named(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


def test_motion_captions_parse_back():
    specs = [("orange", "star", "up"), ("purple", "cross", None)]
    text = motion_caption(specs)
    assert text == "an orange star moving up and a purple cross"
    assert parse_motion(text) == specs
    assert parse_caption(text) == [("orange", "star"), ("purple", "cross")]
    assert parse_motion("A Red Circle Moving Down") == [("red", "circle", "down")]


@pytest.mark.parametrize("name,size,n", [("one", 15, 1), ("two", 150, 2), ("one-moving", 60, 1),
                                         ("two-moving", 150, 2)])
def test_video_prompt_sets(name, size, n):
    tune, heldout = video_prompt_set(name, "tune"), video_prompt_set(name, "heldout")
    assert len(tune) == len(heldout) == size and len(set(tune + heldout)) == 2 * size
    assert tune == video_prompt_set(name, "tune")
    key = lambda p: frozenset((c, s) for c, s, _ in parse_motion(p))  # noqa: E731
    assert not {key(p) for p in tune} & {key(p) for p in heldout}
    base = name.removesuffix("-moving")
    assert {key(p) for p in tune} == {frozenset(parse_caption(p)) for p in prompt_set(base, "tune")}
    for p in tune + heldout:
        objects = parse_motion(p)
        assert len(objects) == n
        assert all((d is not None) == name.endswith("-moving") for _, _, d in objects)
    with pytest.raises(ValueError, match="video prompt set must be one of"):
        video_prompt_set("three", "tune")


# ----------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("seed", range(6))
def test_drawn_videos_score_perfectly(seed):
    frames, caption, tracks = draw_video(seed, named=0.5)
    result = score_video(frames, caption)
    assert {m: result[m] for m in PERFECT} == PERFECT
    assert result["followed"] == (1.0 if any(t.named for t in tracks) else None)
    for o, t in zip(result["objects"], tracks):
        moved = np.diff(np.array(o["track"]), axis=0)
        assert np.allclose(moved, np.diff(t.centres, axis=0))


def test_pipeline_arrays_score_like_images():
    frames, caption, _ = draw_video(2)
    floats = np.stack([np.asarray(f) for f in frames]) / 255.0
    assert score_video(floats, caption)["identity"] == score_video(frames, caption)["identity"] == 1.0
    with pytest.raises(ValueError, match=r"an \(H, W, 3\) array, not an array of shape \(64, 64\)"):
        score_video([np.zeros((64, 64))] * 3, caption)
    with pytest.raises(ValueError, match="at least 3 frames, not 2"):
        score_video(frames[:2], caption)
    with pytest.raises(ValueError, match="no \\(colour, shape\\) in caption 'a cat'"):
        score_video(frames, "a cat")


def test_a_colour_swap_midway_loses_identity():
    _, caption, (track,) = draw_video_objects([("red", "circle")], 1)
    swapped = list(track.objects[:8]) + [dataclasses.replace(o, colour="blue") for o in track.objects[8:]]
    result = score_video(render_video([dataclasses.replace(track, objects=swapped)]), caption)
    assert result["identity"] == pytest.approx(8 / FRAMES)
    assert result["bound"] == pytest.approx(8 / FRAMES) and result["coverage"] == 1.0
    # triples through the missing frames are not smooth: frames 7-8-9 onwards, 15 of them all told
    assert result["smooth"] == pytest.approx(6 / 15)


def test_a_texture_change_halves_the_match_of_one_attribute():
    _, caption, (track,) = draw_video_objects([("green", "square")], 3)
    texture = "plain" if track.objects[0].texture != "plain" else "stripes"
    changed = list(track.objects[:9]) + [dataclasses.replace(o, texture=texture) for o in track.objects[9:]]
    result = score_video(render_video([dataclasses.replace(track, objects=changed)]), caption)
    assert result["identity"] == pytest.approx((9 + 8 * 2 / 3) / FRAMES, abs=0.02)
    assert result["binding"] == 1.0


@pytest.mark.parametrize("asked,followed", [("right", 1.0), ("left", 0.0), ("up", 0.0)])
def test_direction_against_the_motion_drawn(asked, followed):
    frames, _, (track,) = draw_video_objects([("yellow", "triangle", "right")], 5)
    result = score_video(frames, f"a yellow triangle moving {asked}")
    assert result["followed"] == followed and result["objects"][0]["followed"] is bool(followed)
    assert track.velocity[0] > 0


def test_a_jolt_is_not_smooth():
    _, caption, (track,) = draw_video_objects([("blue", "cross", "down")], 6)
    objects = list(track.objects)
    x0, y0, x1, y1 = objects[8].box
    objects[8] = dataclasses.replace(objects[8], box=(x0 + 6, y0, x1 + 6, y1))  # one frame jumps 6 px right
    result = score_video(render_video([dataclasses.replace(track, objects=objects)]), caption)
    assert result["smooth"] == pytest.approx(12 / 15)  # the triples around frame 8: 6-7-8, 7-8-9, 8-9-10
    assert result["identity"] == 1.0 and result["followed"] == 1.0


def test_flicker_measures_the_background_change():
    frames, caption, _ = draw_video(9, n_objects=2)
    darker = []
    for t, frame in enumerate(frames):
        a = np.asarray(frame).copy()
        if t % 2:
            a[(a == 235).all(-1)] = 225  # the background of every other frame 10 levels darker
        darker.append(a)
    result = score_video(darker, caption)
    assert result["flicker"] == pytest.approx(10 / 255)
    assert result["identity"] == 1.0 and result["binding"] == 1.0


def test_drift_over_a_long_video():
    frames, caption, (track,) = draw_video_objects([("purple", "star")], 11, frames=3 * FRAMES)
    clean = video_drift(frames, caption)
    assert clean["starts"] == [0, FRAMES, 2 * FRAMES]
    assert clean["first"] == clean["last"] == {**PERFECT, "followed": None}
    faded = [dataclasses.replace(o, shade=o.shade - 0.15) for o in track.objects[2 * FRAMES:]]
    spoilt = video_drift(render_video([dataclasses.replace(track, objects=track.objects[:2 * FRAMES] + faded)]),
                         caption)
    assert spoilt["first"]["identity"] == 1.0
    assert spoilt["last"]["identity"] < 0.8 and spoilt["change"]["identity"] == spoilt["last"]["identity"] - 1
    summary = summarize_drift([clean, spoilt])
    assert summary["identity"]["diff"] == pytest.approx(spoilt["change"]["identity"] / 2)
    assert summary["followed"] is None and summary["coverage"]["diff"] == 0.0
    with pytest.raises(ValueError, match="at least 34 frames, not 17"):
        video_drift(frames[:FRAMES], caption)


def test_summaries_have_intervals():
    assert mean_interval([0.2, 0.4, 0.6]) == pytest.approx(
        {"mean": 0.4, "low": 0.4 - 1.959964 * 0.2 / 3 ** 0.5, "high": 0.4 + 1.959964 * 0.2 / 3 ** 0.5,
         "n": 3, "groups": 3})
    right, _, _ = draw_video_objects([("red", "square", "up")], 0)
    results = [score_video(right, "a red square moving up"), score_video(right, "a red square moving down"),
               score_video(right, "a red square")]
    summary = summarize_videos(results)
    assert summary["n_videos"] == 3 and summary["identity"]["mean"] == 1.0
    low, high = wilson(1, 2)
    assert summary["followed"] == {"rate": 0.5, "low": low, "high": high, "k": 1, "n": 2}
    with pytest.raises(ValueError, match="at least one scored video"):
        summarize_videos([])


def test_every_shape_moving_is_detected_in_every_frame():
    for k, shape in enumerate(SHAPES):
        frames, caption, _ = draw_video_objects([("orange", shape, "down")], 20 + k)
        assert score_video(frames, caption)["binding"] == 1.0
