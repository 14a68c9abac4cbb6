"""Model modules (networks with checkpoint key layouts)."""
