"""Training recipes shared by the chapters: pre-train, fine-tune, answer, score over seeds."""
