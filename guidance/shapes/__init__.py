"""Shapes scenes: a procedural data set, a detector with no learned weights, and
metrics for attention-steering methods (missing objects, colour leakage, subject
fusion, subject consistency)."""

from .detect import Detection, classify_shape, detect
from .metrics import (attribute_match, caption_concepts, parse_caption, rate, score,
                      score_frames, segment_subjects, subject, subject_colours, summarize, wilson)
from .prompts import prompt_set
from .scene import (COLOURS, PALETTE, SHAPES, TEXTURES, ObjectSpec, caption, draw,
                    draw_objects, render)

__all__ = [
    "COLOURS", "PALETTE", "SHAPES", "TEXTURES", "Detection", "ObjectSpec",
    "attribute_match", "caption", "caption_concepts", "classify_shape", "detect", "draw", "draw_objects",
    "parse_caption", "prompt_set", "rate", "render", "score", "score_frames", "segment_subjects", "subject", "subject_colours",
    "summarize", "wilson",
]

# Moving-shapes videos: clips with per-frame ground truth, their prompt sets and metrics.
from .video import (DIRECTIONS, FRAMES, Track, draw_video, draw_video_objects, motion_caption,  # noqa: E402
                    plan_video, plan_video_objects, render_video)
from .video_metrics import (VIDEO_METRICS, mean_interval, parse_motion, score_video,  # noqa: E402
                            summarize_drift, summarize_videos, video_drift)
from .video_prompts import VIDEO_SETS, video_prompt_set  # noqa: E402

__all__ += [
    "DIRECTIONS", "FRAMES", "VIDEO_METRICS", "VIDEO_SETS", "Track", "draw_video", "draw_video_objects",
    "mean_interval", "motion_caption", "parse_motion", "plan_video", "plan_video_objects", "render_video",
    "score_video", "summarize_drift", "summarize_videos", "video_drift", "video_prompt_set",
]
