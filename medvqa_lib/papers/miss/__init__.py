"""MISS (Chen et al.): a Joint Text-Multimodal encoder, TransCap captions, generative answers.

* ``config.py`` — :class:`MISSConfig` (the model), :class:`MISSStudy` (the chapter) and
  ``PLANS``, every number that depends on the run profile; ``study_plan(profile, out_dir, ...)``.
* ``losses.py`` — the paper's objectives: ITC targets (Eqs. 2-3, with the shared
  ``medvqa_lib.nn.itc_loss``), ITM (Eq. 4), MLM through the decoder (Eq. 5), LM (Sec. 3.5).
* ``model.py`` — the :class:`MISS` module (ViT, JTM encoder, decoder), ``build_miss`` and
  ``load_pretrained_for_finetune``.
* ``pipeline.py`` — the chapter's experiments: the TransCap pool, pre-training variants,
  fine-tuning factories, ITC retrieval and the paper's reported numbers (``REPORTED``).
"""
