"""Score shapes images against their captions, from detections alone.

A prompt object is *present* if a detection has its shape and *bound* if a detection
has its shape and its colour; matching is one-to-one (a detection serves at most one
prompt object). Rates over a set come with 95% Wilson intervals.
"""

import re
from collections import Counter

import numpy as np

from .detect import detect
from .scene import COLOURS, SHADE_RANGE, SHAPES, SIZE_RANGE

Z95 = 1.959963984540054  # two-sided 95% normal quantile
_OBJECT = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?\b")


def parse_caption(caption):
    """[(colour, shape), ...] in caption order: 'a red circle and an orange star' ->
    [('red', 'circle'), ('orange', 'star')]."""
    return [m.groups() for m in _OBJECT.finditer(caption.lower())]


def caption_concepts(caption, colour=False):
    """One concept per object of a caption, for methods that steer by words: its shape ('circle'), or
    with ``colour`` its colour and shape ('red circle')."""
    return [f"{c} {s}" if colour else s for c, s in parse_caption(caption)]


def _match(wanted, found):
    """For each wanted key, whether an unused equal key is left in ``found``."""
    left = Counter(found)
    hits = []
    for key in wanted:
        hits.append(left[key] > 0)
        left[key] -= hits[-1]
    return hits


def score(detections, caption):
    """One image against its caption. coverage: fraction of prompt objects present;
    bound: fraction bound; binding: every prompt object bound; count_right: as many
    detections (any shape, any colour) as prompt objects; objects: per prompt object
    booleans."""
    prompt = parse_caption(caption)
    if not prompt:
        raise ValueError(f"no (colour, shape) in caption {caption!r}")
    present = _match([s for _, s in prompt], [d.shape for d in detections])
    bound = _match(prompt, [(d.colour, d.shape) for d in detections])
    return {
        "coverage": sum(present) / len(prompt),
        "bound": sum(bound) / len(prompt),
        "binding": all(bound),
        "count_right": len(detections) == len(prompt),
        "objects": [{"colour": c, "shape": s, "present": p, "bound": b}
                    for (c, s), p, b in zip(prompt, present, bound)],
    }


def wilson(k, n, z=Z95):
    """Wilson score interval (low, high) for k successes out of n."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(centre - half), float(centre + half)


def rate(k, n):
    """{'rate', 'low', 'high', 'k', 'n'}: k of n with its 95% Wilson interval."""
    low, high = wilson(k, n)
    return {"rate": k / n, "low": low, "high": high, "k": int(k), "n": int(n)}


def summarize(scores):
    """Rates over a set of ``score`` results: coverage and bound pooled over all prompt
    objects, binding and count_right over images."""
    objects = [o for s in scores for o in s["objects"]]
    return {
        "n_images": len(scores),
        "coverage": rate(sum(o["present"] for o in objects), len(objects)),
        "bound": rate(sum(o["bound"] for o in objects), len(objects)),
        "binding": rate(sum(s["binding"] for s in scores), len(scores)),
        "count_right": rate(sum(s["count_right"] for s in scores), len(scores)),
    }


def subject(detections, colour, shape=None):
    """The largest detection of that colour and shape (any shape when None), or None."""
    matches = [d for d in detections if d.colour == colour and shape in (None, d.shape)]
    return max(matches, key=lambda d: d.mask.sum(), default=None)


def subject_colours(subjects):
    """The colour of each subject prompt ('a red circle' -> 'red'); ValueError unless each names one
    shapes object and the colours differ (what ``segment_subjects`` tells subjects apart by)."""
    colours = []
    for text in subjects:
        found = parse_caption(text)
        if len(found) != 1:
            raise ValueError(f"segment_subjects: subject {text!r} must name one shapes object, e.g. 'a red circle'")
        colours.append(found[0][0])
    if len(set(colours)) != len(colours):
        raise ValueError(f"segment_subjects: the subjects {list(subjects)!r} must differ in colour")
    return colours


def segment_subjects(images, subjects):
    """Subject masks [images, subjects, H, W] (float, 0 or 1), IR-Diffusion's ``story_segmenter`` for the
    shapes models: in each image, the pixels of the largest detection of each subject's colour, whatever
    shape was drawn (empty where there is none). Images are PIL images; each subject is a prompt naming
    one object ('a red circle'); subjects of one call must differ in colour."""
    colours = subject_colours(subjects)
    masks = np.zeros((len(images), len(colours), images[0].height, images[0].width), np.float32)
    for row, image in enumerate(images):
        detections = detect(image)
        for k, colour in enumerate(colours):
            largest = subject(detections, colour)
            if largest is not None:
                masks[row, k] = largest.mask
    return masks


def attribute_match(a, b):
    """How well one subject's unnamed attributes agree between two images, in [0, 1]:
    mean of size and shade closeness (1 - difference / the generator's range, floored
    at 0) and texture equality. Takes detections (or ObjectSpecs); None (subject
    missing) gives 0."""
    if a is None or b is None:
        return 0.0
    size = max(0.0, 1 - abs(a.size - b.size) / (SIZE_RANGE[1] - SIZE_RANGE[0]))
    shade = max(0.0, 1 - abs(a.shade - b.shade) / (SHADE_RANGE[1] - SHADE_RANGE[0]))
    return float((size + shade + (a.texture == b.texture)) / 3)


def score_frames(frames, caption):
    """Score video frames one by one. Returns per-frame ``score`` results, their
    ``summarize``, and per later frame the mean ``attribute_match`` of the prompt's
    subjects against the first frame (consistency of the subjects over time)."""
    detections = [detect(frame) for frame in frames]
    scores = [score(d, caption) for d in detections]
    prompt = parse_caption(caption)
    first = [subject(detections[0], c, s) for c, s in prompt]
    consistency = [
        float(np.mean([attribute_match(f, subject(d, c, s)) for f, (c, s) in zip(first, prompt)]))
        for d in detections[1:]
    ]
    return {"frames": scores, "summary": summarize(scores), "consistency": consistency}
