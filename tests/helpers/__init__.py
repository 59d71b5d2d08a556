"""Helpers shared by the tests: small trained models, data slices, a training loop and models built
to trip the evaluation checks. tests/conftest.py exposes the trained models and data as session
fixtures; the plain utilities and model classes are imported from the submodules."""
