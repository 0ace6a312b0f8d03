"""Simulation environments (evaluation targets).

Submodules are imported explicitly (``from spatial_forcing.envs import libero``); importing this package
imports no simulator, renderer or GL library.
"""
