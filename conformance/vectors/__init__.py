"""Golden vectors (JSON files beside this module); see README.md and :mod:`conformance.golden`."""
