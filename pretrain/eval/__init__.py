"""Stage 5: evaluation (cluster purity and NMI now; retrieval mAP with the hashing stage)."""
