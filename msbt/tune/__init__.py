"""Ray Tune: the search around the paper's configuration (`search`) and its fast mode on cached
backbone features (`fast`).
"""
