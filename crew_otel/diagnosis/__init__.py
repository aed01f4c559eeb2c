"""Diagnosis: where errors originate, which objects are shared between requests, async misuse."""
