"""Evaluation pieces several tasks share (below the tasks, above engine/models/data): the
classification objective and top-k evaluator (images and clips), zero-shot classifiers."""
