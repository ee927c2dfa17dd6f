"""Local models: where they live, what format they are, whether they fit."""
