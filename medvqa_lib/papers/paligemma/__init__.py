"""PaliGemma for radiology VQA (Sun and Shourya, 2025): LoRA fine-tuning of a small VLM.

What lives where:

* ``config.py`` — :class:`PaliGemmaSpec` (model sizes, LoRA), :class:`PaliGemmaStudy`, the
  profile-dependent numbers ``PLANS`` and :func:`study_plan`;
* ``model.py`` — the tiny or Hub PaliGemma, its processor, LoRA targets and adapters,
  :class:`PaliGemmaVQA` (loss and generation);
* ``losses.py`` — the answer-only fine-tuning loss and Eq. 1 (the scaling law) with its fit;
* ``data.py`` — prompts, :class:`VQACollator`, :class:`ItemDataset`, the datamixes;
* ``synthetic_qa.py`` — QA pairs generated from captions and their curation (Section 4.1);
* ``pipeline.py`` — training stages, evaluation (ROUGE/BLEU, consistency rule), Tables 1-2,
  the adapter control;
* ``saliency.py`` — raw attention (Eq. 2), attention rollout, :func:`saliency_for`.
"""
