"""medvqa_lib — the shared library of the medvqa-book.

Data (:mod:`medvqa_lib.data`), evaluation (:mod:`medvqa_lib.evaluation`), training
(:mod:`medvqa_lib.training`), profiles (:mod:`medvqa_lib.config`), the text backbone
(:mod:`medvqa_lib.text`), figures (:mod:`medvqa_lib.plots`) and the book runner
(:mod:`medvqa_lib.reproduce`). Chapters import from here; models live in
:mod:`medvqa_lib.models`, one file per paper.
"""

__version__ = "0.1.0"
