"""Recipes: YAML files that chain surgeries, validated, run step by step, reported for CI."""
