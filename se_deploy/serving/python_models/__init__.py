"""Triton python-backend models. ``se-deploy triton`` copies each into a repository as ``<model>/1/model.py``;
they run inside Triton's python backend stub (which provides ``triton_python_backend_utils``), never in se-deploy.
"""
