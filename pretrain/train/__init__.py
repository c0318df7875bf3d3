"""Stages 3-4: representation learning and attribute hashing (losses, augmentation, training)."""
