"""One cell -> result rows: models, tasks, post-training methods, metrics. No Ray.

Import cost matters here: the driver imports these modules' config types to plan a sweep, and
transformers' modeling code and peft take seconds to import. So modules name transformers classes
as `transformers.X` at call time (the package is lazy) or under TYPE_CHECKING for annotations, and
import peft inside the functions that use it; tests/test_import_boundaries.py checks that planning
a sweep loads neither.
"""
