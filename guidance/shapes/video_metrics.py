"""Score shapes videos against their captions, from per-frame detections alone.

Per frame: the image metrics (``metrics.score``: coverage, bound, binding). Across frames:

- identity: each prompt object keeps its colour, shape and unnamed attributes: the mean over frames of
  ``metrics.attribute_match`` between the object's detection and its first one (a frame without a
  detection of its colour and shape scores 0);
- smooth: the share of frame triples in which an object's centroid velocity changes by at most
  ``SMOOTH_TOL`` on each axis, the change on an axis along which the object is at the border (a bounce)
  not counted; a triple with the object missing is not smooth;
- followed: a named motion ("moving left") is followed when the centroid's net displacement, first to
  last detection, along the named direction is at least ``MIN_SPEED`` per frame and exceeds the
  displacement across it;
- flicker: the mean absolute change of the background (pixels away from every detection) between
  consecutive frames, in [0, 1].

Lengths are in pixels of a 64-pixel frame and scale with the frame. ``video_drift`` scores consecutive
windows of a long video (identity against the object's first detection in the whole video);
``summarize_videos`` and ``summarize_drift`` give 95% intervals over a set of videos.
"""

import re

import numpy as np
from PIL import Image
from scipy import ndimage

from ..stats import paired_difference
from .detect import detect
from .metrics import attribute_match, rate, score, subject
from .scene import COLOURS, SHAPES
from .video import DIRECTIONS, FRAMES

SMOOTH_TOL = 1.0  # pixels per frame per frame: a larger velocity change is a jolt
MIN_SPEED = 0.25  # pixels per frame: slower net motion along a named direction is not "moving"
BOUNCE_ZONE = 5.0  # an object whose box is this close to an edge may bounce off it (border 2 + speed 2 + 1)
BACKGROUND_MARGIN = 2.0  # pixels around every detection left out of the background (anti-aliased edges)
VIDEO_METRICS = ("coverage", "bound", "binding", "identity", "smooth", "followed", "flicker")
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?(?:\s+moving\s+({'|'.join(DIRECTIONS)}))?\b")


def parse_motion(caption):
    """[(colour, shape, direction or None), ...] in caption order: 'a red circle moving left and a blue
    square' -> [('red', 'circle', 'left'), ('blue', 'square', None)]."""
    return [m.groups() for m in _OBJECT.finditer(caption.lower())]


def _image(frame):
    """A PIL image, an (H, W, 3) uint8 array, or an (H, W, 3) float array in [0, 1] (a pipeline's "np"
    output) as an RGB PIL image."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"a frame must be a PIL image or an (H, W, 3) array, not an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _centroid(detection):
    ys, xs = np.nonzero(detection.mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def _smooth(found, scale, width, height):
    zone = BOUNCE_ZONE * scale
    smooth = []
    for before, now, after in zip(found, found[1:], found[2:]):
        if before is None or now is None or after is None:
            smooth.append(False)
            continue
        change = np.abs(_centroid(after) - 2 * _centroid(now) + _centroid(before)) / scale
        x0, y0, x1, y1 = now.box
        at_border = (x0 <= zone or x1 >= width - zone, y0 <= zone or y1 >= height - zone)
        smooth.append(all(c <= SMOOTH_TOL or edge for c, edge in zip(change, at_border)))
    return float(np.mean(smooth))


def _followed(found, direction, scale):
    seen = [(t, f) for t, f in enumerate(found) if f is not None]
    if len(seen) < 2:
        return False
    (first, a), (last, b) = seen[0], seen[-1]
    dx, dy = (_centroid(b) - _centroid(a)) / scale
    ux, uy = DIRECTIONS[direction]
    along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
    return bool(along >= MIN_SPEED * (last - first) and along > across)


def _flicker(images, detections, scale):
    margin = max(1, round(BACKGROUND_MARGIN * scale))
    arrays = [np.asarray(im, float) / 255 for im in images]
    covered = [ndimage.binary_dilation(np.any([d.mask for d in dets], 0), iterations=margin) if dets
               else np.zeros(a.shape[:2], bool) for dets, a in zip(detections, arrays)]
    changes = []
    for t in range(len(images) - 1):
        background = ~(covered[t] | covered[t + 1])
        changes.append(float(np.abs(arrays[t + 1] - arrays[t])[background].mean()) if background.any()
                       else float("nan"))
    return float(np.mean(changes))


def _score(images, detections, caption, anchors):
    """Scores of frames already detected; ``anchors``: per prompt object, the detection identity is
    measured against (None: its first detection in these frames)."""
    prompt = parse_motion(caption)
    frames = [score(d, caption) for d in detections]
    width, height = images[0].size
    scale = width / 64
    objects = []
    for (colour, shape, direction), anchor in zip(prompt, anchors or [None] * len(prompt)):
        found = [subject(d, colour, shape) for d in detections]
        if anchor is None:
            anchor = next((f for f in found if f is not None), None)
        objects.append({
            "colour": colour, "shape": shape, "direction": direction,
            "identity": float(np.mean([attribute_match(anchor, f) for f in found])),
            "smooth": _smooth(found, scale, width, height),
            "followed": _followed(found, direction, scale) if direction else None,
            "track": [None if f is None else tuple(_centroid(f)) for f in found],
        })
    named = [o["followed"] for o in objects if o["direction"]]
    return {
        "frames": frames,
        "coverage": float(np.mean([f["coverage"] for f in frames])),
        "bound": float(np.mean([f["bound"] for f in frames])),
        "binding": float(np.mean([f["binding"] for f in frames])),
        "identity": float(np.mean([o["identity"] for o in objects])),
        "smooth": float(np.mean([o["smooth"] for o in objects])),
        "followed": float(np.mean(named)) if named else None,
        "flicker": _flicker(images, detections, scale),
        "objects": objects,
    }


def _prepare(frames, caption, least):
    images = [_image(f) for f in frames]
    if len(images) < least:
        raise ValueError(f"need a video of at least {least} frames, not {len(images)}")
    if not parse_motion(caption):
        raise ValueError(f"no (colour, shape) in caption {caption!r}")
    return images, [detect(im) for im in images]


def score_video(frames, caption):
    """One video (a sequence of at least 3 frames: PIL images or (H, W, 3) arrays) against its caption.
    Returns the per-frame ``score`` results ("frames"), the video's coverage, bound and binding (means
    over frames), identity, smooth, followed (share of named motions followed; None when the caption
    names none) and flicker, and per prompt object ("objects") its identity, smooth, followed and
    centroid track."""
    images, detections = _prepare(frames, caption, 3)
    return _score(images, detections, caption, None)


def _scalars(result):
    return {m: result[m] for m in VIDEO_METRICS}


def video_drift(frames, caption, window=FRAMES):
    """A long video scored per window of ``window`` consecutive frames (at least 3; a last, shorter
    window is left out; at least two windows). Identity in every window is against the object's first
    detection in the whole video, so a slow change of colour or size shows as falling identity.
    Returns {"starts": first frame of each window, "windows": each window's ``score_video`` result,
    "first" and "last": the first and last window's metrics, "change": last minus first}."""
    if window < 3:
        raise ValueError(f"window must be at least 3 frames, not {window!r}")
    images, detections = _prepare(frames, caption, 2 * window)
    anchors = [next((f for f in (subject(d, c, s) for d in detections) if f is not None), None)
               for c, s, _ in parse_motion(caption)]
    starts = list(range(0, len(images) - window + 1, window))
    windows = [_score(images[s:s + window], detections[s:s + window], caption, anchors) for s in starts]
    first, last = _scalars(windows[0]), _scalars(windows[-1])
    change = {m: None if first[m] is None or last[m] is None else last[m] - first[m] for m in VIDEO_METRICS}
    return {"starts": starts, "windows": windows, "first": first, "last": last, "change": change}


def mean_interval(values, groups=None):
    """{'mean', 'low', 'high', 'n', 'groups'}: the mean of per-video values with a 95% normal interval;
    ``groups`` (e.g. each video's prompt) makes it cluster-robust, as ``stats.paired_difference``."""
    d = paired_difference(np.zeros(len(values)), values, groups)
    return {"mean": d["diff"], "low": d["low"], "high": d["high"], "n": d["n"], "groups": d["groups"]}


def summarize_videos(results, groups=None):
    """Means over a set of ``score_video`` results with 95% intervals (``mean_interval``); "followed" is
    the rate of named motions followed, pooled over objects, with its Wilson interval (None if no
    caption names a motion)."""
    if not results:
        raise ValueError("summarize_videos needs at least one scored video")
    summary = {"n_videos": len(results)}
    for m in VIDEO_METRICS:
        if m != "followed":
            summary[m] = mean_interval([r[m] for r in results], groups)
    named = [o["followed"] for r in results for o in r["objects"] if o["direction"]]
    summary["followed"] = rate(sum(named), len(named)) if named else None
    return summary


def summarize_drift(drifts, groups=None):
    """Per metric, last window minus first over a set of ``video_drift`` results: the mean paired
    difference with its 95% interval (``stats.paired_difference``); "followed" over the videos whose
    caption names a motion (None if none does)."""
    if not drifts:
        raise ValueError("summarize_drift needs at least one video_drift result")
    keys = np.arange(len(drifts)) if groups is None else np.asarray(groups)
    summary = {"n_videos": len(drifts)}
    for m in VIDEO_METRICS:
        kept = [i for i, d in enumerate(drifts) if d["change"][m] is not None]
        summary[m] = paired_difference([drifts[i]["first"][m] for i in kept], [drifts[i]["last"][m] for i in kept],
                                       keys[kept]) if kept else None
    return summary
