"""Thin entry points, one per command of ``python -m pipeline``: parse the command line, build the
stage's config from ``params.yaml``, call the library's worker by keyword and print one summary line.
Library code never imports these modules (``tests/test_layout.py``)."""
