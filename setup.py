"""The one import name: the repository's top-level folders explainers/, transforms/ and pipelines/
install as saliency_audit.explainers, .transforms and .pipelines, so nothing but saliency_audit
lands at the top level of site-packages. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

FOLDERS = ("explainers", "transforms", "pipelines")
packages = ["saliency_audit"] + [f"saliency_audit.{folder}{sub}" for folder in FOLDERS
                                 for sub in ["", *(f".{p}" for p in find_packages(folder))]]
setup(packages=packages, package_dir={"saliency_audit": "saliency_audit",
                                      **{f"saliency_audit.{folder}": folder for folder in FOLDERS}})
