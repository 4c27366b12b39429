"""CMDPI (He et al., "Rethinking Medical VQA Models: Towards Data-Efficient Learning").

What lives where:

* ``config`` — :class:`CMDPIConfig` (the model), :class:`CMDPIStudy` (the chapter) and
  ``PLANS``, the one home of every number that depends on the run profile; ``study_plan``;
  the measured CPU speed and the chapter's time estimate.
* ``losses`` — the paper's equations, one function each, numbered as in the paper (Eqs. 5-13).
* ``modules`` — the image encoder, the text encoder and RecNet (Eqs. 1, 3).
* ``model`` — :class:`CMDPI`: pre-training (Eqs. 2-7) and fine-tuning (Eqs. 8-13) passes.
* ``answers`` — FFN_A's answer set (training answers only) and its carry-over from pre-training.
* ``similar`` — similar training images for difference reconstruction.
* ``data`` — the fine-tuning dataset, the two collators, answering and reading the heads ``h_D``.
* ``pipeline`` — the pre-training corpus, pre-training, fine-tune → test runs.
* ``analysis`` — the chapter's tables and figures; ``reported`` — the paper's Tables 1-2.
* ``readings`` — where the paper leaves a choice, the reading this package takes.
"""
