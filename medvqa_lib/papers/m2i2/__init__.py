"""M2I2 (Li et al., ISBI 2023): masked image and language modelling, image-text matching and
contrast, then a generative answer decoder. What lives where:

* ``config.py``: :class:`M2I2Config`, the study (:class:`M2I2Study`), ``PLANS`` (every number
  that depends on the profile), ``study_plan``, ``CPU_SPEEDS`` and the Table 4 variants.
* ``losses.py``: the paper's losses by equation: ``mim_loss`` (Eq. 1), ``mlm_loss`` (Eq. 2),
  ``itm_loss`` (Eq. 3), ``itc_loss`` (ITC, unnumbered), ``pretraining_loss`` (Eq. 4),
  ``answer_loss`` (Eq. 5).
* ``mae.py``: the MAE image decoder of masked image modelling.
* ``model.py``: the :class:`M2I2` module, ``build_m2i2``, ``load_pretrained_for_finetune``.
* ``rank.py``: rank mode (the public code's evaluation) and its candidate lists.
* ``pipeline.py``: pre-training corpus and variants, fine-tuning factory, scoring and table rows.
* ``reported.py``: the paper's Tables 1-4. ``figures.py``: Figure 3 and MAE reconstructions;
  ``gradcam.py``: Grad-CAM of the cross-attention.
"""
