"""A procedural world of 64x64 scenes with known factors (shape, color, pattern, mark, background,
pose), and probes that read those factors back from generated images.

``dreambooth.world.render`` draws scenes and builds the pretraining distribution (with held-out
subjects); ``dreambooth.world.probe`` is a small CNN that reads scenes, plus the metrics computed
from its readings. The function ``render`` is not re-exported here: it would hide the module of
the same name (``from dreambooth.world.render import render``).
"""

from dreambooth.world.render import (BACKGROUNDS, COLORS, FACTORS, HELD_OUT, MARKS, PATTERNS, SHAPES,
                                     SUBJECTS, Scene, Subject, caption, class_caption,
                                     held_out_subjects, is_held_out, random_scene, render_array,
                                     sample_pretraining, sample_scenes)

__all__ = ["BACKGROUNDS", "COLORS", "FACTORS", "HELD_OUT", "MARKS", "PATTERNS", "SHAPES", "SUBJECTS",
           "Scene", "Subject", "caption", "class_caption", "held_out_subjects", "is_held_out",
           "random_scene", "render_array", "sample_pretraining", "sample_scenes"]
