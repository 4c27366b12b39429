"""What every chapter's experiments share: cached images and generative fine-tuning
(:mod:`.generative`), fine-tune-and-test runs with seeds and the image control (:mod:`.runs`),
pre-training corpora (:mod:`.corpus`) and the per-question run store (:mod:`.run_store`)."""
