"""Reproductions of the Monolith paper's experiments at this project's scale."""
