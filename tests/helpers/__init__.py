"""Helpers shared by the tests: small trained models, data slices, a training loop, models built
to trip the evaluation checks, and spawned ranks for the tests of several processes (ranks).
tests/conftest.py exposes the trained models and data as session fixtures; the plain utilities and
model classes are imported from the submodules."""
