"""Procedural shapes videos: the shapes scenes' objects moving over a few dozen frames, with captions.

Each clip holds 1 or 2 objects with distinct colours and shapes, drawn frame by frame by scene.py's
``render`` (the same palette, shapes, textures and supersampling as the images). An object keeps its
colour, shape, size, shade and texture in every frame while it moves in a straight line at a constant
speed, bouncing off the image border; objects never touch (a layout whose tracks would touch is redrawn;
two objects at 64 px found one for all of 100 seeds at 49 frames, for 97 at 65 frames).
Some captions name an object's motion ("a red circle moving left and a blue square"): a named motion
is along one axis and, wherever the clip is short enough for it, never bounces, so the caption holds in
every frame. Velocity components are whole pixels per frame at 64 px (``size / 64`` times that at other
sizes), so at multiples of 64 px every frame shows each object exactly as in the first, shifted by
whole pixels, and the per-frame ground truth is exact.
"""

from dataclasses import dataclass

import numpy as np

from .scene import BORDER, COLOURS, GAP, SHAPES, SHADE_RANGE, SIZE_RANGE, TEXTURES, ObjectSpec, _apart, caption, render

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows down
FRAMES = 17  # the default clip: 1 + 4k frames, as Wan's VAE (4x temporal compression) wants
MAX_VIDEO_OBJECTS = 2
SPEEDS = (1, 2)  # pixels per frame at 64 px: a velocity component, and the speed of a named motion
NAMED_FRACTION = 0.5  # chance that a drawn clip's caption names an object's motion
LAYOUT_TRIES = 1000


@dataclass
class Track:
    """One object of a video. ``objects``: its ObjectSpec in every frame (only the box moves);
    ``velocity``: (dx, dy) pixels per frame before any bounce; ``named``: the direction the caption
    names ("left", "right", "up", "down") or None."""

    objects: list
    velocity: tuple
    named: str | None

    @property
    def centres(self):
        """(frames, 2) array of the box centre (x, y) in each frame."""
        return np.array([((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in self.objects])


def motion_caption(specs):
    """'a red circle moving left and a blue square' for a list of (colour, shape, direction or None)."""
    text = caption([(c, s) for c, s, _ in specs])
    for colour, shape, direction in specs:
        if direction is not None:
            text = text.replace(f"{colour} {shape}", f"{colour} {shape} moving {direction}", 1)
    return text


def _bounce(start, velocity, lo, hi, frames):
    """Positions start + velocity * t folded into [lo, hi]: the path of a point bouncing between walls."""
    span = hi - lo
    if span == 0:
        return np.full(frames, float(lo))
    u = (start - lo + velocity * np.arange(frames)) % (2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def _motion(direction, rng):
    """(dx, dy) pixels per frame at 64 px: along ``direction`` at a drawn speed, else any nonzero
    velocity with components in -max(SPEEDS)..max(SPEEDS)."""
    if direction is not None:
        speed = int(rng.choice(SPEEDS))
        return tuple(speed * d for d in DIRECTIONS[direction])
    top = max(SPEEDS)
    while True:
        v = tuple(int(c) for c in rng.integers(-top, top + 1, 2))
        if v != (0, 0):
            return v


def _start(rng, velocity, lo, hi, frames, keep_direction):
    """A start coordinate in [lo, hi]; with ``keep_direction``, one from which the whole path fits
    without a bounce, where there is one."""
    travel = abs(velocity) * (frames - 1)
    if keep_direction and velocity and travel <= hi - lo:
        lo, hi = (lo, hi - travel) if velocity > 0 else (lo + travel, hi)
    return float(rng.integers(round(lo), round(hi) + 1))


def _check(frames, size, specs):
    if not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames must be a whole number >= 1, not {frames!r}")
    if not 1 <= len(specs) <= MAX_VIDEO_OBJECTS:
        raise ValueError(f"a video holds 1 to {MAX_VIDEO_OBJECTS} objects, not {len(specs)}")
    for colour, shape, direction in specs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"({colour!r}, {shape!r}) is not a colour of {COLOURS} and a shape of {SHAPES}")
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {tuple(DIRECTIONS)} or None, not {direction!r}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, not {size!r}")


def plan_video_objects(specs, seed, frames=FRAMES, size=64):
    """Tracks for the given (colour, shape) or (colour, shape, direction) list (direction None or
    missing: an unnamed motion), with sizes, shades, textures, velocities and start positions drawn
    from ``seed`` (an int or a numpy Generator). Nothing is rendered. Returns (caption, tracks)."""
    if any(len(s) not in (2, 3) for s in specs):
        raise ValueError(f"each object must be (colour, shape) or (colour, shape, direction), not {specs!r}")
    specs = [tuple(s) + (None,) * (3 - len(s)) for s in specs]
    _check(frames, size, specs)
    rng = np.random.default_rng(seed)
    low, high = (round(f * size) for f in SIZE_RANGE)
    border, gap, scale = round(BORDER * size), round(GAP * size), size / 64
    looks = [(float(rng.uniform(*SHADE_RANGE)), str(rng.choice(TEXTURES))) for _ in specs]
    for _ in range(LAYOUT_TRIES):
        sides = [int(s) for s in rng.integers(low, high + 1, len(specs))]
        velocities = [_motion(direction, rng) for _, _, direction in specs]
        paths = []
        for (_, _, direction), side, velocity in zip(specs, sides, velocities):
            lo, hi = border, size - border - side
            axes = []
            for v in velocity:
                start = _start(rng, v * scale, lo, hi, frames, direction is not None)
                axes.append(np.rint(_bounce(start, v * scale, lo, hi, frames)).astype(int))
            paths.append([(int(x), int(y), int(x) + side, int(y) + side) for x, y in zip(*axes)])
        if len(paths) == 1 or all(_apart(a, b, gap) for a, b in zip(*paths)):
            break
    else:
        raise ValueError(f"no layout of {len(specs)} objects keeps them apart for {frames} frames at {size} px "
                         f"in {LAYOUT_TRIES} tries; use fewer frames or objects")
    tracks = [
        Track([ObjectSpec(colour, shape, box, side / size, shade, texture) for box in path],
              tuple(v * scale for v in velocity), direction)
        for (colour, shape, direction), side, velocity, path, (shade, texture)
        in zip(specs, sides, velocities, paths, looks)
    ]
    return motion_caption(specs), tracks


def render_video(tracks, size=64):
    """The frames (PIL images) of planned tracks, each drawn by scene.render."""
    return [render([t.objects[f] for t in tracks], size) for f in range(len(tracks[0].objects))]


def draw_video_objects(specs, seed, frames=FRAMES, size=64):
    """``plan_video_objects`` and its frames. Returns (frames, caption, tracks)."""
    text, tracks = plan_video_objects(specs, seed, frames, size)
    return render_video(tracks, size), text, tracks


def plan_video(seed, n_objects=None, frames=FRAMES, size=64, named=NAMED_FRACTION):
    """A random clip's caption and tracks: 1 to ``MAX_VIDEO_OBJECTS`` objects (or ``n_objects``) with
    distinct colours and shapes, each motion named in the caption with probability ``named``.
    Deterministic per seed; nothing is rendered. Returns (caption, tracks)."""
    if not 0 <= named <= 1:
        raise ValueError(f"named must be a probability in [0, 1], not {named!r}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_VIDEO_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_VIDEO_OBJECTS:
        raise ValueError(f"n_objects must be 1 to {MAX_VIDEO_OBJECTS}, not {n_objects!r}")
    colours, shapes = rng.choice(COLOURS, n, replace=False), rng.choice(SHAPES, n, replace=False)
    directions = [str(rng.choice(list(DIRECTIONS))) if rng.random() < named else None for _ in range(n)]
    return plan_video_objects([(str(c), str(s), d) for c, s, d in zip(colours, shapes, directions)], rng,
                              frames, size)


def draw_video(seed, n_objects=None, frames=FRAMES, size=64, named=NAMED_FRACTION):
    """A random clip (see ``plan_video``). Returns (frames, caption, tracks)."""
    text, tracks = plan_video(seed, n_objects, frames, size, named)
    return render_video(tracks, size), text, tracks

