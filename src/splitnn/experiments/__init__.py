"""Experiment runners: whole studies built from the library, above ``training``.

:mod:`splitnn.experiments.health` runs the vertical health example (two hospitals, one lab, private set
intersection); ``splitnn train --dataset breast-cancer --topology vertical`` offers it.
"""
