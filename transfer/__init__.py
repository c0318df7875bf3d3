"""Detection transfer: conv1-5 of a discoattr checkpoint into Fast R-CNN, scored on VOC 2007 (issue #5)."""
