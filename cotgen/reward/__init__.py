"""Reward models (judges) of the method and their training data (DESIGN section 4)."""
