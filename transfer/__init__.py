"""Detection transfer: conv1-5 of a discoattr checkpoint into Fast R-CNN, scored with the VOC 2007 metric."""
