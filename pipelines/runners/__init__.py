"""Runner support: the runner a run names, and the Dask runner that replaces Beam's."""
