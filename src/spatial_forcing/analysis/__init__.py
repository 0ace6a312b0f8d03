"""Probes and diagnostics: how much 3-D structure a policy\x27s visual tokens carry."""
