"""Is the deployed model still right: datasets, mAP (COCO evaluator), parity against PyTorch, the report."""
